"""HuggingFace Transformers: a ``TrainerCallback`` that gets crashes right.

Usage - pass the callback, nothing else::

    from chronicle_integrations.transformers import ChronicleTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[ChronicleTrainerCallback()])
    trainer.train()          # succeeded / failed_crash / failed_abandoned / left resumable

Event mapping (SPEC section 7):

* ``on_train_begin`` (world process zero only) starts the run, or **resumes** it
  (``start(resume=True)``) when training resumes from a checkpoint that carries the run's
  identity. The identity travels in the checkpoint itself: the callback is an
  ``ExportableState``, so its ``state()`` lands in ``trainer_state.json``
  (``stateful_callbacks``) and, on resume, ``Trainer`` loads that file into ``state`` before
  ``on_train_begin``. This works whatever ``restore_callback_states_from_checkpoint`` says
  (with ``True`` the Trainer replaces the callback by a fresh instance built from
  ``state()["args"]``; that instance shares the settings of the one being replaced, see
  ``__init__``). Precedence on resume: explicit ``experiment_id``/``variation``/``run``, then
  ``$CHRONICLE_*`` (a launcher's lease is adopted, never taken over), then the checkpoint.
  A run that cannot be resumed (it already ended, or the checkpoint names a run of another
  Chronicle) is replaced by a new run of its variation. Resuming from a checkpoint written
  without this callback works too (transformers 5.x would raise ``KeyError`` at the first
  save for any new ``ExportableState`` callback; ``on_train_begin`` registers an entry).
* Each ``train()`` call is one run; which one is decided by the rule every integration
  shares (``chronicle_integrations._frameworks.identity``). Without an identity, the
  ``train()`` calls of one callback (hyperparameter search trials, a second fit) share one
  experiment (with ``experiment_name``: the one experiment of that name in the process), a
  variation per distinct config (TrainingArguments, model config, trial params) and a run
  per call.
* ``on_save`` uploads the just-written ``checkpoint-N`` folder as a directory asset named
  ``checkpoint-N`` (files are hard-linked into staging during the call, so the
  ``save_total_limit`` rotation that follows cannot race the upload). Under hyperparameter
  search the folder is ``output_dir/run-<trial>/checkpoint-N``. With several processes every
  rank writes into the folder (``rng_state_<rank>.pth``) and 5.x has no barrier between those
  writes and ``on_save``, so when ``torch.distributed`` is initialised every rank enters a
  barrier in ``on_save`` before rank zero stages the folder (a collective called by all
  ranks, never inside a rank-zero-only branch).
* **Failure detection needs no user code.** Transformers has no exception hook: on an
  exception the events simply stop. In ``on_init_end`` the callback finds the ``Trainer``
  being constructed (the ``self`` of the ``Trainer.__init__`` frame that calls it) and wraps
  that instance's ``train`` method. Around each ``train()`` call:

  - normal return -> ``succeed`` (early stopping too); when the server cancelled the run it is
    left ``failed_abandoned`` and not marked succeeded;
  - ``Exception`` -> ``fail("crash", message)`` then re-raise. The wrapper sees it before any
    user ``try/except`` around ``trainer.train()`` can swallow it;
  - ``KeyboardInterrupt`` -> ``fail("abandoned")`` then re-raise;
  - SIGTERM (pre-emption) -> no terminal transition: uploads are flushed, heartbeats stop,
    the run stays resumable. Transformers 5.x only handles SIGTERM when
    ``enable_jit_checkpoint=True`` (it then saves a checkpoint and returns normally); the
    wrapper chains a SIGTERM handler in front of whatever handler is installed, remembers the
    signal, and (when the previous handler was the default one, i.e. "terminate") raises
    ``SystemExit(143)`` so ``finally`` blocks and the flush run. Any ``SystemExit`` is treated
    as pre-emption (schedulers requeue that way), never as a crash. ``handle_sigterm=False``
    leaves SIGTERM alone.

  - ``optuna.TrialPruned`` (``hyperparameter_search`` pruning the trial, raised after
    ``on_train_end``) -> ``fail("abandoned", "pruned by optuna at step N")``: the search
    cancelled the trial, it did not crash. Recognised by class name and module, optuna is
    never imported. (Ray Tune stops a trial by stopping its actor: no exception to see.)

  **A callback added after construction** (``trainer.add_callback(callback)``, as HF's docs
  show) cannot wrap the ``train()`` call already running when ``on_train_begin`` sees it.
  Then ``on_train_begin`` finds the Trainer by the same frame walk and wraps ``train`` for
  the *next* calls, chains a SIGTERM handler, and arms a process-wide net: chained
  ``sys.excepthook`` / ``threading.excepthook`` record an uncaught exception exactly like the
  wrapper (type, message, traceback), and an ``atexit`` handler records a run still active
  at exit. An exception the program catches is not seen: that run is recorded
  ``failed_crash`` ("trainer.train() did not finish ...") when the next ``train()`` starts or
  at exit, whichever comes first (in a notebook: the next ``train()``; until then heartbeats
  go on, and the stall timeout eventually lets the watchdog see the run ``lost``). Normal
  ends go through ``on_train_end`` (success; optuna's pruning is told apart there by its
  caller). ``callback.attach(trainer)`` or ``with track(trainer): trainer.train()`` before
  the first ``train()`` avoids the gap.
* The server cancelling the run (``chronicle cancel``, another client's
  ``fail("abandoned")``) sets ``control.should_training_stop`` at the next step end. With
  several processes rank zero's flag is all-reduced at logging / saving / evaluation steps
  (which every rank computes identically), so all ranks stop together.
* Only world process zero talks to Chronicle; nothing unpicklable is created in ``__init__``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # the real ``transformers`` package: imports are absolute, this module is no clash
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState, TrainerControl, TrainerState
    from transformers.training_args import TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "transformers is not installed; the Chronicle TrainerCallback needs it. "
        "Hint: pip install 'chronicle-integrations[transformers]'"
    ) from exc

from ._config import DEFAULT_STALL_TIMEOUT
from ._frameworks import TrackedRun
from ._frameworks.identity import check_arguments
from ._transformers_hooks import (
    _NET,
    _any_rank,
    _barrier,
    _chain_sigterm,
    _distributed,
    _frames,
    _in_frame,
    _newest_mtime_ns,
    _noop,
    _pruned_by,
    _saved_identity,
    _variation_config,
)
from .client import Chronicle, Run

log = logging.getLogger(__name__)

__all__ = ["ChronicleTrainerCallback", "track"]

#: Checkpoint folders are ``checkpoint-<global_step>`` (``transformers.trainer_utils``).
CHECKPOINT_PREFIX = "checkpoint"

#: Callbacks whose wrapped ``train()`` is running, innermost last (see ``__init__``).
_TRAINING: list[ChronicleTrainerCallback] = []


class ChronicleTrainerCallback(TrainerCallback, ExportableState):
    """Track a ``Trainer`` run in Chronicle: start/resume, checkpoint uploads, a truthful end.

    Args:
        chronicle: an existing client; default: one made from the environment on first use
            (``$CHRONICLE_URL`` or the embedded store) and closed when training ends.
        experiment_id, variation, run: explicit identity (see ``TrackedRun``); default:
            ``$CHRONICLE_EXPERIMENT``/``$CHRONICLE_VARIATION``/``$CHRONICLE_RUN``, else a new
            experiment named ``experiment_name`` whose variation config records the
            TrainingArguments (secrets dropped) and the model config.
        upload_checkpoints: upload each ``checkpoint-N`` folder when it is written.
        heartbeat_interval: seconds between heartbeats.
        strict: raise tracking errors instead of logging them (training is never stopped by
            a tracking error otherwise).
        handle_sigterm: chain a SIGTERM handler while ``train()`` runs (see module doc).

    Example::

        callback = ChronicleTrainerCallback(chronicle=Chronicle(home="runs"))
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
        trainer.train()
        print(callback.run.key, callback.run.state)
    """

    def __init__(
        self,
        chronicle: Chronicle | None = None,
        experiment_id: str | None = None,
        variation: int | None = None,
        run: int | None = None,
        experiment_name: str | None = None,
        upload_checkpoints: bool = True,
        heartbeat_interval: float = 60.0,
        strict: bool = False,
        handle_sigterm: bool = True,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        _restored: bool = False,
    ) -> None:
        if _restored and _TRAINING:
            # ``restore_callback_states_from_checkpoint=True``: the Trainer replaces the
            # instance the user passed by ``type(cb)(**state()["args"])``. Share the
            # replaced instance's settings and live state (client, run, wrapped train()).
            self.__dict__ = _TRAINING[-1].__dict__
            return
        if _restored:
            log.warning(
                "chronicle: the callback was rebuilt from a checkpoint outside a "
                "wrapped train(); its settings come from the environment. Hint: "
                "pass it in Trainer(callbacks=[...]) or call callback.attach(trainer)"
            )
        # Validate the identity arguments now (bad combinations fail at construction).
        check_arguments(experiment_id, variation, run)
        self.chronicle = chronicle
        self.experiment_id = experiment_id
        self.variation = variation
        self.run_number = run
        self.experiment_name = experiment_name
        self.upload_checkpoints = upload_checkpoints
        self.heartbeat_interval = heartbeat_interval
        self.strict = strict
        self.handle_sigterm = handle_sigterm
        self.stall_timeout = stall_timeout
        self.tracker: TrackedRun | None = None
        self._trainer_ref: Callable[[], Trainer | None] | None = None
        #: The experiment of this callback's unnamed trainings (see ``identity``): plain data.
        self._groups: dict[Any, Any] = {}
        #: checkpoint folder name -> newest file mtime (ns) when it was uploaded
        self._uploaded: dict[str, int] = {}
        self._depth = 0
        self._sigterm = False
        self._train_started = 0.0
        self._stop_logged = False
        #: (global step, metrics) of the latest evaluation, for the checkpoint saved after it.
        self._last_eval: tuple[int | None, dict[str, Any]] = (None, {})
        self._warned_unwrapped = False
        self._restore_sigterm: Callable[[], None] = _noop  # for an unwrapped train() call

    # ------------------------------------------------------------------ pickling / export
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trainer_ref"] = None
        state["_restore_sigterm"] = _noop
        return state

    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the run identity, so a resume continues it."""
        return {"args": {"_restored": True}, "attributes": {"_saved_run": self._identity_dict()}}

    def _identity_dict(self) -> dict[str, Any] | None:
        run = self.tracker.run if self.tracker is not None else None
        if run is None:
            return None
        return {
            "experiment_id": run.experiment_id,
            "variation": run.variation,
            "run": run.run,
            "target": run.chronicle.target,
        }

    @property
    def run(self) -> Run | None:
        """The current :class:`~chronicle_integrations.Run` (None before training starts, on
        other ranks, or when tracking failed)."""
        return self.tracker.run if self.tracker is not None else None

    # ------------------------------------------------------------------ attaching
    def attach(self, trainer: Trainer) -> Trainer:
        """Wrap ``trainer.train`` so its outcome is recorded (done automatically when the
        callback is passed to ``Trainer(callbacks=[...])``). Idempotent; returns the trainer."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer_ref = weakref.ref(trainer)
        original = trainer.train
        if getattr(original, "_chronicle_callback", None) is not None:
            return trainer

        @functools.wraps(original)
        def train(*args: Any, **kwargs: Any) -> Any:
            with self._tracking(trainer):
                return original(*args, **kwargs)

        train._chronicle_callback = self  # type: ignore[attr-defined]
        trainer.train = train  # type: ignore[method-assign]
        return trainer

    def _find_trainer(self, in_function: str | None = "__init__") -> Trainer | None:
        """The Trainer calling us: the ``self`` of the nearest ``in_function`` frame (any
        frame when None) that is a Trainer holding this callback. ``on_init_end`` looks for
        ``Trainer.__init__``; ``on_train_begin`` for the ``train()`` loop calling it."""
        for frame in _frames(sys._getframe(1), 64):
            if in_function is None or frame.f_code.co_name == in_function:
                candidate = frame.f_locals.get("self")
                handler = getattr(candidate, "callback_handler", None)
                if isinstance(candidate, Trainer) and self in getattr(handler, "callbacks", ()):
                    return candidate
        return None

    def _trainer(self) -> Trainer | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    # ------------------------------------------------------------------ around train()
    @contextlib.contextmanager
    def _tracking(self, trainer: Trainer) -> Iterator[None]:
        """Map how ``train()`` ends onto the run. Nested levels (``track()`` around a
        wrapped ``train``) all handle the outcome; the first one wins (idempotent)."""
        outermost = self._depth == 0
        self._depth += 1
        restore: Callable[[], None] = _noop
        if outermost:
            self._end_left_over()
            _TRAINING.append(self)
            self._sigterm = False
            self._train_started = time.time()
            restore = self._install_sigterm_handler()
        try:
            yield
        except BaseException as exc:
            self._end_by(exc)
            raise
        else:
            self._end("preempted" if self._sigterm else "succeed")
        finally:
            self._depth -= 1
            if outermost:
                restore()
                with contextlib.suppress(ValueError):
                    _TRAINING.remove(self)

    def _install_sigterm_handler(self) -> Callable[[], None]:
        """Remember SIGTERM while ``train()`` runs; chain to the installed handler."""
        if not self.handle_sigterm:
            return _noop
        return _chain_sigterm(self._note_sigterm)

    def _note_sigterm(self) -> None:
        self._sigterm = True

    def _end_by(self, exc: BaseException) -> None:
        """Record the outcome of an exception that leaves ``train()``: Ctrl+C -> abandoned;
        a hyperparameter search pruning the trial -> abandoned ("pruned by optuna at step
        N"); SIGTERM or ``SystemExit`` -> pre-empted (left resumable); anything else ->
        crash. Never raises (the exception is on its way out)."""
        if isinstance(exc, KeyboardInterrupt):
            self._end("abandon", failing=True)
        elif _pruned_by(exc) is not None:
            self._end("pruned", exc, failing=True)
        elif self._sigterm or isinstance(exc, SystemExit):
            log.warning(
                "chronicle: training stopped by %s",
                "SIGTERM" if self._sigterm else f"SystemExit({getattr(exc, 'code', None)!r})",
            )
            self._end("preempted", failing=True)
        else:
            self._end("crash", exc, failing=True)

    def _end(self, how: str, exc: BaseException | None = None, failing: bool = False) -> None:
        """Record the outcome. While an exception propagates (``failing``) nothing raised
        here may replace it, not even with ``strict=True``."""
        try:
            self._record(how, exc)
        except Exception:
            if self.strict and not failing:
                raise
            log.exception("chronicle: recording the outcome (%s) failed", how)
        finally:
            self._disarm()

    # ------------------------------------------------------------------ unwrapped train()
    def _watch_unwrapped(self) -> None:
        """``on_train_begin`` of a ``train()`` call that is not wrapped (the callback was
        added with ``trainer.add_callback`` after the Trainer was built, as HF's docs do).
        This call cannot be wrapped any more (it is running), so: wrap the Trainer's
        ``train`` for the next calls, chain a SIGTERM handler, and arm the process-wide net
        (``_transformers_hooks._UnwrappedNet``) that records how this call ends when no
        hook sees it."""
        trainer = self._find_trainer(None)
        if trainer is not None:
            self.attach(trainer)  # the next train() calls are wrapped
        if self.tracker is not None and self.tracker.active:
            self._restore_sigterm = self._install_sigterm_handler()
            _NET.arm(self)

    def _disarm(self) -> None:
        _NET.disarm(self)
        restore, self._restore_sigterm = self._restore_sigterm, _noop
        restore()

    def _end_left_over(self, when: str = "before this train() call started") -> None:
        """A run of an unwrapped ``train()`` call still active although that call is over:
        an exception left it and the program caught it (the exception itself was never
        seen). Record a crash saying so instead of leaving the run ``running``."""
        if not _NET.armed(self) or self.tracker is None or not self.tracker.active:
            return
        self._end(
            "preempted" if self._sigterm else "crash",
            RuntimeError(
                f"trainer.train() did not finish: it ended without on_train_end {when} "
                "(an exception left it and the program caught it, or the process exited "
                "inside it). The exception was not seen: the callback was added with "
                "trainer.add_callback() after the Trainer was built, so that first train() "
                "call was not wrapped (later calls are). Hint: pass the callback in "
                "Trainer(callbacks=[...]) or call callback.attach(trainer) before train()"
            ),
            failing=True,
        )

    def _record(self, how: str, exc: BaseException | None) -> None:
        tracker = self.tracker
        if tracker is None or not tracker.active:
            return
        if how == "preempted":
            with tracker.guard("uploading the last checkpoint"):
                self._upload_final_checkpoint()
            tracker.preempted("SIGTERM" if self._sigterm else "SystemExit")
        elif how == "succeed":
            tracker.succeed()
        elif how == "crash":
            assert exc is not None
            tracker.crash(exc)
        elif how == "pruned":
            # exc is None when on_train_end saw optuna's pruning before TrialPruned is raised
            trainer = self._trainer()
            step = f" at step {trainer.state.global_step}" if trainer is not None else ""
            tracker.abandon(f"pruned by {_pruned_by(exc) or 'optuna'}{step}")
        else:
            tracker.abandon()  # quick: Ctrl+C must not wait for uploads
        tracker.close()

    def _upload_final_checkpoint(self) -> None:
        """After a SIGTERM stop: transformers' JIT checkpoint is written without ``on_save``,
        at ``global_step`` or one before it (possibly over a folder uploaded already). Upload
        the newest checkpoint folder unless it is exactly what was uploaded."""
        trainer = self._trainer()
        if trainer is None or not self.upload_checkpoints:
            return
        step = trainer.state.global_step
        for candidate in (step, step - 1):
            folder = self._checkpoint_dir(trainer.args, candidate)
            if folder is None:
                continue
            newest = _newest_mtime_ns(folder)
            if newest / 1e9 >= self._train_started and newest != self._uploaded.get(folder.name):
                self._upload(folder)
            return

    # ------------------------------------------------------------------ hooks
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self._find_trainer()
        if trainer is not None:
            self.attach(trainer)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Resuming from a checkpoint written without this callback: Trainer._save_checkpoint
        # indexes stateful_callbacks[<our name>] and would raise KeyError at the first save.
        saved: Any = state.stateful_callbacks
        if isinstance(saved, dict):
            saved.setdefault(type(self).__name__, self.state())
        if not state.is_world_process_zero:
            return
        if (
            self._depth == 0
            and _NET.armed(self)
            and self._find_trainer(None) is not self._trainer()
        ):
            self._end_left_over()  # an unwrapped train() of another Trainer, left earlier
        if self.tracker is not None and self.tracker.active:
            return  # auto_find_batch_size fires on_train_begin again
        if self._depth == 0 and not self._warned_unwrapped:
            self._warned_unwrapped = True
            log.warning(
                "chronicle: this trainer.train() call is not wrapped (the callback was "
                "added after the Trainer was built): a crash is recorded when its "
                "exception reaches the top level; one the program catches is recorded at "
                "the next train() or at exit, without its message. Later train() calls are "
                "wrapped. Hint: pass the callback in Trainer(callbacks=[...]) or call "
                "callback.attach(trainer) before train()"
            )
        self._uploaded = {}
        self._stop_logged = False
        self._begin(args, state, kwargs.get("model"))
        if self._depth == 0:
            self._watch_unwrapped()

    def _begin(self, args: TrainingArguments, state: TrainerState, model: Any) -> None:
        tracker = self.tracker = TrackedRun(
            chronicle=self.chronicle,
            experiment_id=self.experiment_id,
            variation=self.variation,
            run=self.run_number,
            experiment_name=self.experiment_name,
            heartbeat_interval=self.heartbeat_interval,
            stall_timeout=self.stall_timeout,
            strict=self.strict,
            groups=self._groups,
        )
        resuming = state.global_step > 0
        tracker.begin(
            _variation_config(args, model, state),
            resuming=resuming,
            saved=_saved_identity(state, type(self).__name__) if resuming else None,
        )

    def _progress(self, state: TrainerState | None = None) -> None:
        """Report progress for the heartbeats (attribute writes, no I/O); without a state,
        a long phase (evaluation, saving) counts as progress."""
        run = self.run
        if run is None:
            return
        if state is None:
            run.progress.touch()
        else:
            run.progress.advance(int(state.global_step), float(state.epoch or 0.0))

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._progress()  # gradient accumulation: a long step is not a hang

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._progress()  # evaluation batches count as progress

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._progress(state)
        stop = self.tracker is not None and self.tracker.cancelled
        if (control.should_log or control.should_save or control.should_evaluate) and _distributed(
            args
        ):
            stop = _any_rank(stop, args)  # every rank reaches this at the same step
        if stop:
            control.should_training_stop = True
            if not self._stop_logged and state.is_world_process_zero:
                self._stop_logged = True
                reason = self.run.cancel_reason if self.run is not None else "cancelled"
                log.warning("chronicle: the run was %s; stopping training", reason)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.upload_checkpoints:
            return
        if _distributed(args):
            _barrier()  # all ranks have finished writing checkpoint-N (rng_state_<rank>.pth)
        tracker = self.tracker
        if not state.is_world_process_zero or tracker is None or not tracker.active:
            return
        if tracker.cancelled:
            return
        with tracker.guard(f"uploading {CHECKPOINT_PREFIX}-{state.global_step}"):
            folder = self._checkpoint_dir(args, state.global_step)
            if folder is None:
                log.warning(
                    "chronicle: no %s-%d folder found under %s; not uploaded",
                    CHECKPOINT_PREFIX,
                    state.global_step,
                    args.output_dir,
                )
                return
            self._upload(folder, self._checkpoint_metric(args, state))
        self._record_objective(state)

    def _upload(self, folder: Path, metric: dict[str, Any] | None = None) -> None:
        if self.tracker is not None:
            self._uploaded[folder.name] = _newest_mtime_ns(folder)
            self.tracker.upload(folder, folder.name, metric=metric)

    # ------------------------------------------------------------------ metrics
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """What the Trainer logs (plain floats: loss, learning_rate, eval_*...) becomes the
        run's metric summaries, sent with the next heartbeat."""
        self._record_metrics(state, logs)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Evaluation metrics (also kept for the checkpoint saved right after, which is
        recorded with ``metric_for_best_model``'s value)."""
        self._record_metrics(state, metrics)
        if metrics:
            self._last_eval = (int(state.global_step), dict(metrics))

    def _record_metrics(self, state: TrainerState, values: dict[str, Any] | None) -> None:
        tracker = self.tracker
        if not values or not state.is_world_process_zero or tracker is None:
            return
        if not tracker.active:
            return
        numbers = {
            k: v
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        tracker.log_metrics(numbers, step=int(state.global_step))

    def _record_objective(self, state: TrainerState) -> None:
        """Under ``hyperparameter_search``, the trial's objective (what the search optimises,
        ``Trainer.objective`` after each evaluation) as the metric ``objective``: ``chronicle
        best E --metric objective --mode min|max`` picks the best trial."""
        trainer = self._trainer()
        if trainer is None or getattr(trainer, "hp_search_backend", None) is None:
            return
        objective = getattr(trainer, "objective", None)
        if isinstance(objective, int | float) and not isinstance(objective, bool):
            self._record_metrics(state, {"objective": objective})

    def _checkpoint_metric(
        self, args: TrainingArguments, state: TrainerState
    ) -> dict[str, Any] | None:
        """``metric_for_best_model`` (``eval_`` prefixed as the Trainer does) and its value
        at this save, from the evaluation of the same step; None without one."""
        name = getattr(args, "metric_for_best_model", None)
        last: tuple[int | None, dict[str, Any]] = getattr(self, "_last_eval", (None, {}))
        step, metrics = last
        if not name or step != int(state.global_step):
            return None
        key = name if name.startswith("eval_") else f"eval_{name}"
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        return {
            "metric": key,
            "value": float(value),
            "step": int(state.global_step),
            "epoch": float(state.epoch) if state.epoch is not None else None,
        }

    def _checkpoint_dir(self, args: TrainingArguments, step: int) -> Path | None:
        """``<run dir>/checkpoint-<step>``; the run dir is ``output_dir`` or, under
        hyperparameter search, ``output_dir/run-<trial>`` (asked from the Trainer)."""
        name = f"{CHECKPOINT_PREFIX}-{step}"
        trainer = self._trainer()
        if trainer is not None:
            with contextlib.suppress(Exception):
                run_dir = trainer._get_output_dir(trial=getattr(trainer, "_trial", None))
                if Path(run_dir, name).is_dir():
                    return Path(run_dir, name)
        base = Path(args.output_dir or ".")
        found = [p for p in [base / name, *base.glob(f"*/{name}")] if p.is_dir()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._record_objective(state)
        if self._depth == 0:  # not wrapped: the best we can do
            # optuna's pruning calls on_train_end, then raises TrialPruned
            self._end("pruned" if _in_frame("_report_to_hp_search") else "succeed")


@contextlib.contextmanager
def track(
    trainer: Trainer, callback: ChronicleTrainerCallback | None = None
) -> Iterator[ChronicleTrainerCallback]:
    """Record how the block ends, for setups where the automatic attach cannot work::

        with track(trainer) as callback:
            trainer.train()

    Uses the trainer's ``ChronicleTrainerCallback`` (adds ``callback`` or a default one when
    it has none).
    """
    if callback is None:
        callback = next(
            (
                cb
                for cb in trainer.callback_handler.callbacks
                if isinstance(cb, ChronicleTrainerCallback)
            ),
            None,
        )
    if callback is None:
        callback = ChronicleTrainerCallback()
    callback.attach(trainer)
    with callback._tracking(trainer):
        yield callback
