"""One run's lifecycle, for every integration: Lightning, Transformers and the Hydra job.

The integrations map their hooks onto a :class:`TrackedRun` and nothing else:

* **Identity**: ``begin`` asks the one resolver (:mod:`.identity`): explicit arguments, the
  environment, the checkpoint's identity and whether training resumes from a checkpoint.
* **Ownership**: a run adopted from a launcher (a lease in the environment: ``chronicle
  exec``, the Hydra job) belongs to the launcher: the integration beats and uploads but
  leaves the terminal transition to its owner. When the training ends (success, crash,
  interruption) while the process goes on, the heartbeats go on as process liveness (the
  stall rule is dropped: there is no training loop to watch any more), so the owner does not
  see the run go ``lost`` and tear down a process that is merely finishing.
* **Outcomes** (the first one wins; every call is idempotent, hooks fire in odd orders):

  ====================  ===================================================================
  ``succeed()``         wait for the uploads, ``succeed`` (a run cancelled on the server
                        stays ``failed_abandoned``: not marked succeeded)
  ``crash(exc)``        **flush, bounded, then record**: wait up to
                        ``crash_flush_seconds`` for the uploads (heartbeats go on, so the
                        run stays ``running`` meanwhile), then ``fail("crash")`` with the
                        exception's type, message and traceback; what is still uploading
                        goes on in the background (the store accepts assets of an ended run
                        from the worker that held it) or is spooled at ``close``. Flushing
                        first means that whoever sees ``failed_crash`` finds every file
                        written before the crash.
  ``abandon(message)``  Ctrl+C, or a search pruning the trial: ``fail("abandoned")`` at
                        once (no waiting for uploads)
  ``preempted()``       SIGTERM / ``SystemExit``: flush (bounded: ``preempt_flush_seconds``,
                        ``PREEMPT_FLUSH_SECONDS`` in process, ``JOB_PREEMPT_FLUSH_SECONDS``
                        for a Hydra job), stop heartbeats, no terminal state (resumable)
  ``arm_at_exit(msg)``  fallback: a run still active when the interpreter exits is recorded
                        as a crash with ``msg`` (or the exception being handled)
  ====================  ===================================================================

* **Training is sacred**: every call is guarded (:class:`Guard`); a tracking error is logged
  once at WARNING (then DEBUG) and swallowed, unless ``strict=True``.
* **Picklable**: nothing live is created before ``begin`` (``ddp_spawn`` pickles callbacks).
* **Where it ended**: the terminal transition carries the last ``run.progress`` snapshot.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from .._config import (
    CRASH_FLUSH_SECONDS,
    DEFAULT_STALL_TIMEOUT,
    ENV_TRAINING_ENDED_FILE,
    PREEMPT_FLUSH_SECONDS,
)
from .._errors import ChronicleError, InvalidTransition, NotFound
from .._models import RunKey
from ..client import Chronicle, Run, format_exception
from ..client._heartbeat import KeepAlive
from ..client._uploads import UploadHandle
from ..lifecycle import RunState
from .identity import (
    UNKNOWN_RUN,
    Decision,
    ExperimentGroups,
    check_arguments,
    identity_from_env,
    jsonable,
    resolve,
    settle,
)

log = logging.getLogger(__name__)

#: How long ``close()`` waits for uploads after an interruption or a pre-emption before the
#: rest is spooled for ``chronicle sync``.
QUICK_CLOSE_SECONDS = 2.0


class RunNotRunnable(ChronicleError):
    """The run was already ended (e.g. cancelled) before its worker started: the work is not
    done (``begin(take_over=True)``, the Hydra job)."""


class Guard:
    """Runs tracking code so that its errors never reach the training (or job) code: each is
    logged, the first at WARNING and later ones at DEBUG, and swallowed, unless ``strict``.
    Exceptions of the ``passthrough`` types always propagate (they are decisions, not
    tracking failures)."""

    def __init__(
        self,
        strict: bool,
        *,
        carry_on: str = "training continues without it",
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.strict = strict
        self.carry_on = carry_on
        self.passthrough = passthrough
        self.warned = False

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        try:
            yield
        except self.passthrough:
            raise
        except Exception as exc:
            if self.strict:
                raise
            level = logging.DEBUG if self.warned else logging.WARNING
            log.log(
                level,
                "chronicle: %s failed (%s: %s); %s",
                what,
                type(exc).__name__,
                exc,
                self.carry_on,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            self.warned = True


class TrackedRun:
    """One training's (or job's) run, from ``begin`` to its outcome; see the module docstring.

    Args:
        chronicle: an existing client; default: one created on first use from the
            environment (``$CHRONICLE_URL`` or the embedded store), closed by ``close()``.
        experiment_id, variation, run: explicit identity (see :func:`.identity.resolve`).
        experiment_name: the experiment of new runs, shared by name in the process.
        heartbeat_interval: seconds between heartbeats.
        stall_timeout: pause heartbeats while ``run.progress`` has not advanced for this long
            (None: never); the framework hooks report progress at every step.
        strict: raise tracking errors instead of logging them.
        carry_on: what the log says happens after a tracking error.
        crash_flush_seconds, preempt_flush_seconds: the bounded upload flushes.
        groups: the caller's own experiment group (unnamed trainings of one callback share
            one experiment); plain data, kept across trainings by the callback.
        lease: the lease to start the explicit run with (the Hydra launcher's, see
            ``hydra_plugins.chronicle_launcher._watch``); default: a fresh one.
    """

    def __init__(
        self,
        *,
        chronicle: Chronicle | None = None,
        experiment_id: str | None = None,
        variation: int | None = None,
        run: int | None = None,
        experiment_name: str | None = None,
        heartbeat_interval: float = 60.0,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        strict: bool = False,
        carry_on: str = "training continues without it",
        crash_flush_seconds: float = CRASH_FLUSH_SECONDS,
        preempt_flush_seconds: float = PREEMPT_FLUSH_SECONDS,
        groups: dict[Any, Any] | None = None,
        lease: str | None = None,
    ) -> None:
        check_arguments(experiment_id, variation, run)
        self.chronicle = chronicle
        self.experiment_id = experiment_id
        self.variation = variation
        self.run_number = run
        self.experiment_name = experiment_name
        self.heartbeat_interval = heartbeat_interval
        self.stall_timeout = stall_timeout
        self.crash_flush_seconds = crash_flush_seconds
        self.preempt_flush_seconds = preempt_flush_seconds
        self.groups: dict[Any, Any] = {} if groups is None else groups
        #: The lease to start the explicit run with (a launcher's, so that its watcher's
        #: teardown is bound to it); None: a fresh one.
        self.lease = lease
        self.run: Run | None = None
        self.decision: Decision | None = None
        self.outcome: str | None = None  # succeeded | crashed | abandoned | preempted | cancelled
        self._keepalive: KeepAlive | None = None
        self._own_client = False
        #: ``(url, home)`` of a user-given client dropped by pickling, rebuilt on first use.
        self._client_spec: tuple[str | None, str] | None = None
        self._guard = Guard(strict, carry_on=carry_on, passthrough=(RunNotRunnable,))
        self._exit_message: str | None = None

    # -- pickling: drop live objects (ddp_spawn pickles callbacks into workers) -------------
    def __getstate__(self) -> dict[str, Any]:
        """Live objects stay behind: the run, its heartbeat loop, and any client. A client
        the user gave is replaced by how to rebuild it (its URL and home), so the copy talks
        to the same store; one we created is made afresh."""
        state = self.__dict__.copy()
        state.update(chronicle=None, run=None, _keepalive=None)
        if self.chronicle is not None and not self._own_client:
            state["_client_spec"] = (self.chronicle.url, str(self.chronicle.home))
        return state

    def renew(self) -> TrackedRun:
        """A fresh lifecycle for the next training of the same callback: the same settings,
        the same client unless this object created it (it was closed at the end), the same
        experiment group."""
        fresh = TrackedRun.__new__(TrackedRun)
        fresh.__dict__.update(self.__getstate__())
        fresh.chronicle = None if self._own_client else self.chronicle
        fresh._own_client = False
        fresh.decision, fresh.outcome, fresh._exit_message = None, None, None
        fresh._guard = Guard(
            self.strict, carry_on=self._guard.carry_on, passthrough=self._guard.passthrough
        )
        return fresh

    # -- read-outs -----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True between a successful ``begin`` and the end of the run."""
        return self.run is not None and self.outcome is None

    @property
    def owns_run(self) -> bool:
        """False for a run adopted from a launcher: its owner records the end."""
        return self.decision is None or self.decision.owns_end

    @property
    def cancelled(self) -> bool:
        """True when the server said the run was cancelled, expired or taken over."""
        return self.run is not None and self.run.cancelled.is_set()

    @property
    def strict(self) -> bool:
        """Raise tracking errors instead of logging them."""
        return self._guard.strict

    def guard(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Run tracking code; log (once at WARNING) and swallow errors unless strict."""
        return self._guard(what)

    def _client(self) -> Chronicle:
        if self.chronicle is None:
            if self._client_spec is not None:
                url, home = self._client_spec
                self.chronicle = Chronicle(url=url, home=home)
            else:
                self.chronicle = Chronicle()
            self._own_client = True
        return self.chronicle

    def not_resumable(self, key: tuple[str, int, int]) -> str | None:
        """Why the run ``key`` cannot be resumed: ``"already <state>"`` when it ended,
        :data:`UNKNOWN_RUN` when the store does not have it. None when it can be, or when
        asking failed (then resuming it reports the error)."""
        try:
            state = self._client().run(*key).state
        except NotFound:
            return UNKNOWN_RUN
        except Exception:
            return None
        return f"already {state}" if state.is_terminal else None

    # -- start -----------------------------------------------------------------------------
    def begin(
        self,
        config: dict[str, Any] | None = None,
        *,
        resuming: bool = False,
        saved: tuple[str, int, int] | None = None,
        on_cancel: Callable[[Run, str], None] | None = None,
        take_over: bool = False,
    ) -> Run | None:
        """Decide the run (:func:`.identity.resolve`, then :func:`.identity.settle`), create
        it if needed, start or resume it, keep it alive. ``resuming``: training resumes from
        a checkpoint; ``saved``: the identity that checkpoint carries. ``take_over`` (a
        requeued job): a run already running or lost is resumed; an ended one raises
        :class:`RunNotRunnable`. Returns the run, or None when tracking failed (non-strict)."""
        if self.run is not None:
            return self.run
        with self.guard("starting the run"):
            client = self._client()
            decision = resolve(
                experiment_id=self.experiment_id,
                variation=self.variation,
                run=self.run_number,
                experiment_name=self.experiment_name,
                env=identity_from_env(),
                saved=saved,
                resuming=resuming,
            )
            decision = settle(decision, self.not_resumable)
            if decision.key is not None:
                key = decision.key
            elif decision.create is not None:
                key = RunKey(*client.create_run(*decision.create).key_tuple)
            else:
                key = ExperimentGroups.new_run(
                    client, decision.experiment_name, jsonable(config or {}), self.groups
                )
            lease = decision.lease
            if lease is None and tuple(key) == (
                self.experiment_id,
                self.variation,
                self.run_number,
            ):
                lease = self.lease
            run = client.run(*key, lease=lease)
            self._start(run, decision.resume, take_over)
            run.progress.touch()  # the stall window opens at the start
            self._keepalive = run.keep_alive(
                self.heartbeat_interval, on_cancel=on_cancel, stall_timeout=self.stall_timeout
            )
            self.run, self.decision = run, decision
            if decision.replaces is not None:
                stale, why = decision.replaces
                log.warning(
                    "chronicle: the checkpoint's run %s %s, so it cannot be resumed; "
                    "this training is tracked as new run %s%s",
                    stale,
                    why,
                    run.key,
                    "" if why == UNKNOWN_RUN else " of the same variation",
                )
            log.info("chronicle: tracking run %s (%s)", run.key, client.target)
        return self.run

    @staticmethod
    def _start(run: Run, resume: bool, take_over: bool) -> None:
        try:
            run.start(resume=resume)
        except InvalidTransition as exc:
            if not take_over:
                raise
            if exc.state not in (RunState.RUNNING.value, RunState.LOST.value):
                raise RunNotRunnable(
                    f"run {run.key} is {exc.state}; not running its job (was it cancelled?"
                    " Rerun it with hydra.launcher.rerun_failed_of=...)"
                ) from exc
            # A requeued job (pre-emption): take over the run it left running or lost.
            log.info("chronicle: run %s was %s; resuming it", run.key, exc.state)
            run.start(resume=True)

    # -- uploads ---------------------------------------------------------------------------
    def upload(self, path: str | os.PathLike[str], name: str | None = None) -> UploadHandle | None:
        """Upload a file or directory to the run; returns its handle, or None when there is
        no run or it could not be queued (logged, unless strict).

        While the run is live this returns at once (the bytes go up in the background).
        After the run ended it still works (the store accepts assets of a finished run from
        the worker that held it): when the client this object created was closed at the
        end, a short-lived one on the same store, under the same lease, uploads it and this
        call returns when it is done (or spooled)."""
        run = self.run
        if run is None:
            return None
        with self.guard(f"uploading {path}"):
            if not run.chronicle._closed:
                return run.upload_asset(path, name)
            client = run.chronicle
            with Chronicle(url=client.url, home=client.home) as fresh:
                return fresh.run(*run.key_tuple, lease=run.lease).upload_asset(path, name)
        return None

    def _flush(self, timeout: float | None) -> None:
        """Wait, bounded, for the run's uploads (heartbeats go on meanwhile)."""
        run = self.run
        assert run is not None
        with self.guard("waiting for uploads"):
            if not run.wait_uploads(timeout):
                log.warning(
                    "chronicle: run %s: uploads still pending after %.0f s; they go on in "
                    "the background (or are spooled for `chronicle sync`)",
                    run.key,
                    timeout or 0.0,
                )

    # -- outcomes --------------------------------------------------------------------------
    def _training_ended(self, run: Run) -> None:
        """The training is over but the run is not ours to end: keep beating (process
        liveness for the owner), without the stall rule, and tell a ``chronicle exec``
        supervisor (``$CHRONICLE_TRAINING_ENDED_FILE``), which then beats for the process
        through its exit, when no Python thread can beat any more."""
        if self._keepalive is not None:
            self._keepalive.training_ended(run)
        path = os.environ.get(ENV_TRAINING_ENDED_FILE)
        if path:
            with self.guard("telling the supervisor the training ended"), open(path, "a"):
                pass

    def succeed(self) -> None:
        """Normal end: wait for uploads, record success (unless cancelled or not ours)."""
        if not self.active or self.run is None:
            return
        run = self.run
        if run.cancelled.is_set():
            self.outcome = "cancelled"
            log.warning(
                "chronicle: run %s was %s; not marking it succeeded", run.key, run.cancel_reason
            )
            with self.guard("waiting for uploads"):
                run.wait_uploads()
                run.stop_keep_alive()
            return
        self.outcome = "succeeded"
        with self.guard("recording success"):
            if self.owns_run:
                run.succeed()
            else:
                run.wait_uploads()
                self._training_ended(run)

    def crash(self, exc: BaseException) -> None:
        """An exception ended training: flush (bounded), then ``fail("crash")`` with its
        type, message and traceback."""
        if not self.active or self.run is None:
            return
        self.outcome = "crashed"
        self._flush(self.crash_flush_seconds)
        self._fail("crash", format_exception(exc))

    def abandon(self, message: str = "KeyboardInterrupt") -> None:
        """Interrupted (Ctrl+C) or pruned by a search: ``fail("abandoned")``, at once."""
        if not self.active or self.run is None:
            return
        self.outcome = "abandoned"
        self._fail("abandoned", message)

    def _fail(self, reason: str, message: str) -> None:
        run = self.run
        assert run is not None
        with self.guard(f"recording the {reason}"):
            if run.cancelled.is_set():
                run.stop_keep_alive()
            elif self.owns_run:
                run.fail(reason, message)
            else:
                self._training_ended(run)

    def preempted(self, why: str = "SIGTERM") -> None:
        """Pre-emption: no terminal transition. Flush uploads (bounded: schedulers send
        SIGKILL soon after SIGTERM), stop heartbeats, leave the run to be resumed (``lost``
        is recoverable for 48 h). ``close()`` then spools what did not finish."""
        if not self.active or self.run is None:
            return
        self.outcome = "preempted"
        run = self.run
        self._flush(self.preempt_flush_seconds)
        with self.guard("stopping heartbeats"):
            run.stop_keep_alive()
        log.warning(
            "chronicle: run %s pre-empted (%s); left resumable (no terminal state)", run.key, why
        )

    def arm_at_exit(self, message: str) -> None:
        """Record a crash (``message``, or the exception being handled) when the interpreter
        exits while the run is still active and no hook saw its end."""
        if self._exit_message is None:
            atexit.register(self._at_exit)
        self._exit_message = message

    def _at_exit(self) -> None:
        if self.active and self._exit_message is not None:
            self.crash(sys.exc_info()[1] or RuntimeError(self._exit_message))
            self.close(QUICK_CLOSE_SECONDS)

    def close(self, timeout: float | None = None) -> None:
        """After the outcome: close the client if this object created it (after an
        interruption or a pre-emption, quickly: what is still uploading is spooled). An
        adopted run's heartbeats beat on this client until the process exits (the client
        closes itself at exit), so then it stays open."""
        client = self.chronicle
        if not self._own_client or client is None or client._closed:
            return
        keepalive = self._keepalive
        if (
            not self.owns_run
            and self.run is not None
            and keepalive is not None
            and keepalive.run is self.run
            and keepalive.alive
        ):
            return
        if timeout is None and self.outcome in ("abandoned", "preempted"):
            timeout = QUICK_CLOSE_SECONDS
        with self.guard("closing the client"):
            client.close(timeout=timeout)


__all__ = ["QUICK_CLOSE_SECONDS", "Guard", "RunNotRunnable", "TrackedRun"]
