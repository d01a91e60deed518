"""The Lightning integration, once for both namespaces (``lightning.pytorch`` and
``pytorch_lightning``).

This module imports no framework: :class:`LightningCore` is duck-typed over the ``Trainer``,
the ``LightningModule`` and the checkpoint callbacks. ``chronicle_integrations.lightning`` and
``chronicle_integrations.pytorch_lightning`` each mix it into their namespace's ``Callback``
(``isinstance`` checks, e.g. jsonargparse's, need the right base class, and importing one
namespace must not import the other).

Hook -> lifecycle (rank zero only; ``validate``/``test``/``predict`` never touch the run):

==========================  ==============================================================
``on_fit_start``            start the run (identity: the shared resolver, from the
                            arguments, ``$CHRONICLE_*``, the checkpoint state on
                            ``ckpt_path=`` resume, or a new run whose variation config
                            is the merged ``hparams_initial``, else LightningCLI's
                            resolved config)
checkpoint written          ``upload_asset`` (see "How checkpoints are caught" below)
``on_fit_end``              final scan, then ``succeed`` (waits for the uploads)
``on_exception``            ``KeyboardInterrupt`` -> ``fail("abandoned")`` (quick);
                            ``SIGTERMException`` / ``SystemExit(0)`` -> pre-empted: uploads
                            flushed, heartbeats stopped, no terminal state (resumable);
                            anything else -> uploads flushed (bounded), then
                            ``fail("crash")`` with type, message, traceback
run cancelled on the server ``trainer.should_stop = True``; the run stays abandoned
                            (under DDP the ranks agree through a collective, see
                            ``_check_cancel``; ``min_epochs``/``min_steps`` still apply)
each training step          ``run.progress.update(step=, epoch=)`` (no I/O), sent with the
                            heartbeats; validation and saves count as progress
validation / train epoch    ``run.log_metrics(trainer.callback_metrics, step=global_step)``
end, fit end                (one ``.item()`` per logged name there, never per step; off
                            with ``log_metrics=False``); sent with the next heartbeat
checkpoint uploaded         with ``{"metric": monitor, "value": its score, "step"}``
                            from its ``ModelCheckpoint`` (``best_k_models`` /
                            ``best_model_score``), so ``chronicle best`` names it
==========================  ==============================================================

How checkpoints are caught
--------------------------
Lightning has no public "file written" event (``on_save_checkpoint`` runs *before* the
write). Our hooks read every checkpoint callback's ``last_model_path``, ``best_model_path``
and ``best_k_models`` and hand each file not seen before (key: path, inode, size, mtime;
not ctime, which the staging hard link itself changes) to ``upload_asset``, which
hard-links it into staging in O(1) and returns; the bytes go up on the client's background
pool. Scans run in ``on_train_batch_start``,
``on_train_epoch_start/end``, ``on_validation_start/end``, ``on_train_end``, ``on_fit_end``,
``on_exception`` **and** ``on_save_checkpoint``.

Why evicted top-k files are never missed: ``ModelCheckpoint`` deletes an evicted file inside
the very call that writes its replacement (``_update_best_and_save``: pop it from
``best_k_models``, save the new file, remove the old one), so nothing outside that call can
see it between the write of the new file and the deletion. But the evicted file was written
in an *earlier* round, and from its write until that pop it is listed in ``best_k_models``
(or is ``best_model_path`` / ``last_model_path``). Between two save rounds of a checkpoint
callback at least one of our scans runs: a callback saves at most once per global step, every
step starts with ``on_train_batch_start``, the epoch/validation hooks sit between the
epoch-level saves, and in every hook our callback runs before the checkpoint callbacks
(Lightning calls those last). So each file is hard-linked while it still exists, and the link
keeps its bytes after the deletion. ``tests/frameworks/test_lightning.py`` checks this with
``save_weights_only=True`` too, where ``on_save_checkpoint`` is not called at all.

The scan in ``on_save_checkpoint`` (before the write) is an extra point inside a save round:
it catches a file written earlier in the same round (a second checkpoint callback on the same
hook, a custom callback that saves and rotates several files at once). It cannot see the
file the current save will evict (already popped). Wrapping the private
``ModelCheckpoint._save_checkpoint`` / ``_remove_checkpoint`` would see every write and every
deletion directly, but is private API that changes between releases; the public scans cost a
few ``stat`` calls per step. Known gap: the checkpoint ``ModelCheckpoint(save_on_exception=
True)`` writes in its ``on_exception`` runs after ours and is not uploaded.

Asset names: ``<checkpoint dir name>/<path under it>`` (e.g. ``checkpoints/last.ckpt``, or
``ckpts/epoch=0-val/loss=1.69.ckpt`` for ``filename="{epoch}-{val/loss:.2f}"``, which
writes into sub-folders), the path relative to the checkpoint directory's parent, so two
checkpoint callbacks in different directories do not collide, two files never share an asset,
and the name stays stable across resumes; a file outside its callback's directory keeps just
its file name. Re-uploading ``last.ckpt`` replaces the asset
(the event log keeps every version's digest).

``upload="best_and_last"`` uploads only the best and the last checkpoint of each callback,
once, when the fit ends (or fails / is pre-empted); ``upload="none"`` uploads nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ._config import DEFAULT_STALL_TIMEOUT
from ._frameworks import TrackedRun
from .client import Chronicle, Run
from .client._uploads import UploadHandle

log = logging.getLogger(__name__)

UPLOAD_MODES = ("all", "best_and_last", "none")

#: Under DDP, ranks agree on a server-side cancellation every this many steps (a collective;
#: a single process checks every step for free).
DDP_CANCEL_SYNC_STEPS = 20

#: What a run still active at interpreter exit is recorded with (``TrackedRun.arm_at_exit``).
EXIT_MESSAGE = (
    "the process exited while the fit was running, without an exception reaching "
    "Lightning's on_exception (e.g. a failed ddp_spawn worker: see the launching "
    "process's error for the worker's traceback)"
)


def _is_fitting(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return getattr(fn, "value", fn) == "fit"


def _env_rank() -> int:
    """The process rank from the environment, as Lightning's ``rank_zero_only`` reads it
    (known before the strategy is set up)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _is_global_zero(trainer: Any) -> bool:
    """``trainer.is_global_zero`` (not a collective). The environment is checked too: before
    the strategy has set the ranks up (an exception early in ``fit``) every process would
    otherwise believe it is rank zero."""
    if _env_rank() != 0:
        return False
    try:
        return bool(trainer.is_global_zero)
    except Exception:  # no strategy yet: a single process
        return True


def _checkpoint_callbacks(trainer: Any) -> list[Any]:
    """Every checkpoint callback of either namespace (duck-typed, not ``isinstance``)."""
    return [
        cb
        for cb in getattr(trainer, "callbacks", ())
        if hasattr(cb, "best_k_models") and hasattr(cb, "last_model_path")
    ]


def _is_preemption(exc: BaseException) -> bool:
    """``SIGTERMException`` (a ``SystemExit``) of either namespace, or a clean ``SystemExit``
    (a requeue handler exiting 0): the job is being moved, not broken."""
    if not isinstance(exc, SystemExit):
        return False
    return type(exc).__name__ == "SIGTERMException" or exc.code in (None, 0)


#: The docstring of both public ``ChronicleCallback`` classes (one per Lightning namespace).
CALLBACK_DOC = """Track a ``Trainer.fit`` as a Chronicle run.

Args:
    chronicle: a :class:`~chronicle_integrations.Chronicle`; default: one created from the
        environment (``$CHRONICLE_URL``, else the embedded store in ``$CHRONICLE_HOME`` or
        ``./chronicle``) on global rank zero when the fit starts.
    experiment_id, variation, run: the run to track (else ``$CHRONICLE_EXPERIMENT`` /
        ``$CHRONICLE_VARIATION`` / ``$CHRONICLE_RUN``, else a new run whose variation
        config is the model's and datamodule's ``hparams_initial``, or, when they saved
        none, the config LightningCLI resolved).
    experiment_name: the name of that experiment. Fits with the same name in one
        process (on one store) share it: one variation per distinct config, one run per
        fit. Default: the fits of this callback share an experiment of their own, named
        ``"training"`` (the same rule: a variation per distinct config, a run per fit).
    upload: ``"all"`` checkpoints as they are written (default), ``"best_and_last"``
        when the fit ends, or ``"none"``.
    heartbeat_interval: seconds between heartbeats.
    strict: raise tracking errors instead of logging them and training on.
    stall_timeout: pause heartbeats while training makes no progress for this long
        (None: never), so the watchdog can mark a hung fit lost.

Resuming with ``trainer.fit(..., ckpt_path=...)`` continues the run recorded in the
checkpoint (pass the callback again); a run named by ``$CHRONICLE_*`` without a lease is
resumed instead, and a run that already ended is replaced by a new run of its variation (the
rule every integration shares: ``chronicle_integrations._frameworks.identity``).

A model saved or exported after ``fit`` joins the run the callback tracked with
``callback.upload_asset(path)`` (also after the run succeeded: the store accepts assets of a
finished run from the worker that held it; then the call returns when the upload is done,
and ``.result()`` on the returned handle gives its :class:`AssetInfo`). ``callback.run``
stays readable after the fit, but its client may be closed (the one the callback created
is closed when the fit ends): use ``callback.upload_asset``, not ``run.upload_asset``.
"""


class LightningCore:
    """The namespace-independent body of ``ChronicleCallback``; see the module docstring.

    Mixed in *before* the namespace's ``Callback`` so its hooks override the no-op ones.
    Creates nothing unpicklable before ``on_fit_start`` (``ddp_spawn`` pickles callbacks).
    """

    def __init__(
        self,
        chronicle: Chronicle | None = None,
        experiment_id: str | None = None,
        variation: int | None = None,
        run: int | None = None,
        experiment_name: str | None = None,
        upload: str = "all",
        heartbeat_interval: float = 60.0,
        strict: bool = False,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        log_metrics: bool = True,
    ) -> None:
        super().__init__()
        if upload not in UPLOAD_MODES:
            raise ValueError(
                f"upload={upload!r} is not one of {', '.join(UPLOAD_MODES)}. "
                "Hint: upload='best_and_last' uploads only the best and the last "
                "checkpoint when the fit ends."
            )
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0 (seconds)")
        self._args: dict[str, Any] = dict(
            experiment_id=experiment_id,
            variation=variation,
            run=run,
            experiment_name=experiment_name,
            heartbeat_interval=heartbeat_interval,
            stall_timeout=stall_timeout,
            strict=strict,
        )
        # TrackedRun validates the identity arguments (and creates nothing live).
        self._tracked = TrackedRun(chronicle=chronicle, **self._args)
        #: Whether the coming fit resumes from a checkpoint (``ckpt_path=``).
        self._resuming = False
        self.upload = upload
        self.strict = strict
        #: Record ``trainer.callback_metrics`` at validation / epoch / fit end.
        self._log_metrics = log_metrics
        #: Identity restored by ``load_state_dict`` (``fit(ckpt_path=...)``).
        self._resume_identity: tuple[str, int, int] | None = None
        #: path -> (inode, size, mtime_ns) of every checkpoint handed to the client.
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._cancel_requested = False
        self._stopping = False
        #: A checkpoint may have been written since the last scan (see ``_scan``).
        self._scan_dirty = True
        #: Some checkpoint callback saves weights only (no ``on_save_checkpoint``): scan at
        #: every scan point rather than only after a marked save.
        self._always_scan = True
        #: ``trainer.world_size`` of the current fit (read once at its start).
        self._world = 1

    # ------------------------------------------------------------------ public read-outs
    @property
    def run(self) -> Run | None:
        """The tracked :class:`~chronicle_integrations.Run` (rank zero, during/after a fit)."""
        return self._tracked.run

    def upload_asset(
        self, path: str | os.PathLike[str], name: str | None = None
    ) -> UploadHandle | None:
        """Attach a file or directory to the tracked run, e.g. ``trainer.save_checkpoint(p)``
        or an export after ``fit``: see the class docstring. Returns the upload's handle,
        or None when no run is tracked here (another rank, tracking off) or the upload
        could not be queued (logged; raised with ``strict=True``)."""
        return self._tracked.upload(path, name)

    @property
    def chronicle(self) -> Chronicle | None:
        """The client in use (created from the environment on first use if none was given)."""
        return self._tracked.chronicle

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # The TrackedRun pickles itself without live objects (a user-given client becomes
        # its URL and home, rebuilt in the worker on first use).
        state = self.__dict__.copy()
        # Lightning binds the module's log/log_dict onto callbacks at each fit; not ours to ship.
        state.pop("log", None)
        state.pop("log_dict", None)
        return state

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The run identity, saved in every full checkpoint so ``fit(ckpt_path=...)`` resumes
        the same run."""
        run = self._tracked.run
        key = run.key_tuple if run is not None else self._resume_identity
        if key is None:
            return {}
        return {"experiment_id": key[0], "variation": key[1], "run": key[2]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resuming = True  # only called when a fit restores a checkpoint
        try:
            self._resume_identity = (
                str(state_dict["experiment_id"]),
                int(state_dict["variation"]),
                int(state_dict["run"]),
            )
        except (KeyError, TypeError, ValueError):
            log.debug("no Chronicle run identity in the checkpoint's callback state")

    # ------------------------------------------------------------------ fit start / end
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._cancel_requested = self._stopping = False  # every rank: a fresh fit
        self._scan_dirty = True
        self._always_scan = any(
            getattr(cb, "save_weights_only", False) for cb in _checkpoint_callbacks(trainer)
        )
        self._world = int(getattr(trainer, "world_size", 1) or 1)
        if not _is_fitting(trainer) or not _is_global_zero(trainer):
            return
        self._begin(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if not _is_fitting(trainer) or not _is_global_zero(trainer) or not self._tracked.active:
            return
        self._scan(trainer, final=True)
        self._record_metrics(trainer)
        self._tracked.succeed()
        self._tracked.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not _is_fitting(trainer) or not _is_global_zero(trainer):
            return
        tracked = self._tracked
        if tracked.outcome is not None:
            return  # already ended (e.g. an exception after on_fit_end)
        if isinstance(exception, KeyboardInterrupt):
            if self._ensure_started(trainer, pl_module, exception):
                tracked.abandon("KeyboardInterrupt: training interrupted by the user")
            tracked.close()
            return
        if _is_preemption(exception):
            if tracked.active:
                self._scan(trainer, final=True)
                tracked.preempted(type(exception).__name__)  # bounded flush
            tracked.close()
            return
        if self._ensure_started(trainer, pl_module, exception):
            self._scan(trainer, final=True)
            tracked.crash(exception)  # flush (bounded), then record
        tracked.close()

    # ------------------------------------------------------------------ scan points
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._scan(trainer)
        self._check_cancel(trainer, sync=False)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._progress(step, trainer.current_epoch)
        self._check_cancel(trainer, sync=step % DDP_CANCEL_SYNC_STEPS == 0)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._scan(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._scan(trainer)
        self._record_metrics(trainer)
        self._check_cancel(trainer, sync=True)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._scan(trainer)
        self._progress()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._scan(trainer)
        self._record_metrics(trainer)
        self._progress()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._scan(trainer)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Inside a save, before the write: catches files written earlier in this round.
        self._scan(trainer)
        self._progress()
        # The file is written after this hook returns: the next scan must look again.
        self._scan_dirty = True

    # ------------------------------------------------------------------ internals
    def _begin(self, trainer: Any, pl_module: Any) -> None:
        tracked = self._tracked
        if tracked.outcome is not None:
            # A second fit with the same callback: a fresh lifecycle (same settings, same
            # client unless we created it, same experiment for unnamed fits).
            tracked = self._tracked = tracked.renew()
            self._seen.clear()
        if tracked.run is not None:
            return
        resuming = self._resuming or bool(getattr(trainer, "ckpt_path", None))
        tracked.begin(
            config=_hparams(trainer, pl_module),
            resuming=resuming,
            saved=self._resume_identity,
            on_cancel=self._on_cancel,
        )
        if tracked.run is not None:
            # Used; a later fit without ckpt_path starts afresh.
            self._resume_identity, self._resuming = None, False
            tracked.arm_at_exit(EXIT_MESSAGE)

    def _record_metrics(self, trainer: Any) -> None:
        """``trainer.callback_metrics`` (what the module ``self.log``-ged, reduced) into the
        run's summaries, at a point where Lightning has them on the host side anyway: one
        ``.item()`` per name, at validation / train epoch / fit end, never per step. Bad
        names or values are logged once and skipped (``strict=True`` raises)."""
        if not self._log_metrics or not self._tracked.active or not _is_global_zero(trainer):
            return
        if getattr(trainer, "sanity_checking", False):
            return
        metrics = getattr(trainer, "callback_metrics", None)
        if metrics:
            self._tracked.log_metrics(metrics, step=int(trainer.global_step))

    def _progress(self, step: int | None = None, epoch: int = 0) -> None:
        """Report training progress for the heartbeats (attribute writes, no I/O): the step
        and epoch after a step, a plain "still advancing" during validation and saves."""
        progress = getattr(self._tracked.run, "progress", None)
        if progress is None:
            return
        if step is None:
            progress.touch()
        else:
            progress.advance(step, epoch)

    def _on_cancel(self, run: Run, why: str) -> None:  # heartbeat thread
        self._cancel_requested = True

    def _check_cancel(self, trainer: Any, sync: bool) -> None:
        """Stop training when the server cancelled the run. Under DDP all ranks must stop
        together: the decision is reduced across ranks (on every rank, never rank-zero-only)
        every ``DDP_CANCEL_SYNC_STEPS`` steps and at epoch ends."""
        if self._stopping:
            return
        world = self._world
        if world == 1 and not self._cancel_requested:
            return  # the per-step fast path: one attribute read
        local = self._cancel_requested and _is_fitting(trainer)
        if world > 1:
            if not sync or not _is_fitting(trainer):
                return
            try:
                stop = bool(trainer.strategy.reduce_boolean_decision(local, all=False))
            except Exception as exc:
                log.debug("could not agree on cancellation across ranks: %s", exc)
                return
        else:
            stop = local
        if stop:
            self._stopping = True
            trainer.should_stop = True
            if _is_global_zero(trainer):
                run = self._tracked.run
                log.warning(
                    "chronicle: run %s was cancelled (%s); stopping training",
                    run.key if run else "?",
                    run.cancel_reason if run else "cancelled",
                )

    def _ensure_started(
        self, trainer: Any, pl_module: Any, exception: BaseException | None = None
    ) -> bool:
        """For an exception before ``on_fit_start`` (e.g. in ``setup``): start the run so its
        failure is recorded. True when there is an active run.

        Not for a ``ddp_spawn`` worker's failure seen by the launching process: the run
        lives in the worker (which records the crash at exit), so none is created here.
        """
        if exception is not None and type(exception).__module__.startswith("torch.multiprocessing"):
            return self._tracked.active
        if self._tracked.run is None and self._tracked.outcome is None:
            self._begin(trainer, pl_module)
        return self._tracked.active

    def _scan(self, trainer: Any, final: bool = False) -> None:
        """Upload checkpoint files not seen before (see "How checkpoints are caught").

        A checkpoint file can only appear after a save, so a non-final scan does nothing
        until ``on_save_checkpoint`` marked the scan dirty, which keeps the per-step cost to
        a few attribute reads. ``save_weights_only=True`` callbacks save without calling
        ``on_save_checkpoint``: with one of those every scan point looks.
        """
        if self.upload == "none" or not self._tracked.active:
            return
        if self.upload == "best_and_last" and not final:
            return
        if not final and not self._scan_dirty and not self._always_scan:
            return
        if not _is_global_zero(trainer):
            return
        self._scan_dirty = False
        with self._tracked.guard("looking for checkpoints"):  # never breaks training
            for cb in _checkpoint_callbacks(trainer):
                paths = [getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")]
                if self.upload == "all":
                    paths.extend(getattr(cb, "best_k_models", {}) or {})
                dirpath = getattr(cb, "dirpath", None)
                for path in paths:
                    if path:
                        self._offer(str(path), dirpath, cb, trainer)

    def _offer(self, path: str, dirpath: Any, cb: Any = None, trainer: Any = None) -> None:
        key_path = os.path.abspath(path)
        try:
            st = os.stat(key_path)
        except OSError:
            return  # not written yet, already gone, or not a local path
        # Not ctime: staging hard-links the file, which changes its ctime.
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._seen.get(key_path) == key:
            return
        self._seen[key_path] = key
        # The client uploads in the background and keeps same-name uploads (every version
        # of last.ckpt) in submission order, so the newest version ends as the asset.
        self._tracked.upload(
            key_path, _asset_name(key_path, dirpath), metric=_checkpoint_metric(path, cb, trainer)
        )


def _checkpoint_metric(path: str, cb: Any, trainer: Any) -> dict[str, Any] | None:
    """What ``cb`` saved ``path`` for: its ``monitor`` and the file's score (from
    ``best_k_models``, or ``best_model_score`` for the best file), with the step and epoch
    of the upload. None for an unmonitored callback or a file it holds no score for (e.g.
    ``last.ckpt``). One ``.item()``, once per new checkpoint file."""
    monitor = getattr(cb, "monitor", None)
    if not monitor or cb is None:
        return None
    score = (getattr(cb, "best_k_models", None) or {}).get(path)
    if score is None and path == getattr(cb, "best_model_path", None):
        score = getattr(cb, "best_model_score", None)
    if score is None:
        return None
    try:
        value = score.item() if hasattr(score, "item") else float(score)
    except (TypeError, ValueError, RuntimeError):
        return None
    # The step of the save the callback last made (scans run after it, when the trainer's own
    # step or epoch may already be the next one; no epoch is recorded for that reason).
    step = getattr(cb, "_last_global_step_saved", None)
    return {
        "metric": str(monitor),
        "value": value,
        "step": step if isinstance(step, int) and step >= 0 else None,
    }


def _asset_name(path: str, dirpath: Any) -> str:
    """``<checkpoint dir name>/<path relative to it>`` for a file anywhere under its
    callback's directory (a ``filename`` with a ``/``, e.g. ``"{epoch}-{val/loss:.2f}"``,
    writes into sub-folders: each file keeps its own name), else the file name."""
    file = Path(path)
    if dirpath:
        try:
            directory = Path(os.path.abspath(str(dirpath)))
        except (TypeError, ValueError):
            return file.name
        if directory.name and file.is_relative_to(directory):
            return f"{directory.name}/{file.relative_to(directory).as_posix()}"
    return file.name


def _hparams(trainer: Any, pl_module: Any) -> dict[str, Any]:
    """The variation config: ``pl_module.hparams_initial`` merged with the datamodule's;
    when neither saved any (no ``save_hyperparameters()``), LightningCLI's resolved config."""
    config: dict[str, Any] = {}
    for obj in (pl_module, getattr(trainer, "datamodule", None)):
        hparams = getattr(obj, "hparams_initial", None) if obj is not None else None
        if hparams:
            try:
                config.update(dict(hparams))
            except (TypeError, ValueError):
                log.debug("ignoring hyperparameters of %r: not a mapping", obj)
    return config or _cli_config(trainer)


def _cli_config(trainer: Any) -> dict[str, Any]:
    """The config LightningCLI resolved for this fit (what it writes to ``config.yaml``),
    read from its ``SaveConfigCallback`` (duck-typed: a ``parser`` and a jsonargparse
    ``config`` namespace), without ``config`` (the paths of the files it was read from).
    Empty without LightningCLI, or with ``save_config_callback=None``."""
    for cb in getattr(trainer, "callbacks", ()):
        as_dict = getattr(getattr(cb, "config", None), "as_dict", None)
        if not hasattr(cb, "parser") or not callable(as_dict):
            continue
        try:
            config = dict(as_dict())
        except Exception as exc:  # a foreign callback that merely looks like it
            log.debug("could not read the LightningCLI config from %r: %s", cb, exc)
            continue
        config.pop("config", None)
        return config
    return {}


def missing_framework(package: str, extra: str) -> ImportError:
    """The ImportError raised when a namespace module's framework is not installed."""
    return ImportError(
        f"{package} is not installed; the Chronicle Lightning callback needs "
        f"it. Hint: pip install 'chronicle-integrations[{extra}]'"
    )


__all__ = ["UPLOAD_MODES", "LightningCore", "missing_framework"]
