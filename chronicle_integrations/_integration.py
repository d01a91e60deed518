"""What every framework integration shares: run identity, a guarded lifecycle, never raising.

Framework modules (``lightning``, ``pytorch_lightning``, ``transformers``) map their hooks onto
a :class:`TrackedRun` and nothing else, so the rules of SPEC section 7 live in one place:

* **Identity**: explicit arguments, else ``$CHRONICLE_EXPERIMENT`` / ``$CHRONICLE_VARIATION`` /
  ``$CHRONICLE_RUN`` (+ ``$CHRONICLE_LEASE``, set by a launcher that already started the run),
  else a new run whose variation records the hyperparameters: fits with the same
  ``experiment_name`` in one process share that experiment (one variation per distinct
  config, one run per fit); an unnamed fit gets an experiment of its own.
* **Ownership**: a run adopted from a launcher (a lease in the environment) belongs to the
  launcher: the integration beats and uploads but leaves the terminal transition to its owner,
  so a job never sees two conflicting transitions.
* **Training is sacred**: every call is guarded; a tracking error is logged once (WARNING, then
  DEBUG) and swallowed, unless ``strict=True``.
* **Idempotent**: ``begin``/``succeed``/``crash``/``abandon``/``preempted`` may be called in any
  order and any number of times (framework hooks fire in surprising orders); the first terminal
  outcome wins.
* **Picklable**: nothing is created before ``begin`` (``ddp_spawn`` pickles callbacks).
* **Where it ended**: the hooks keep ``run.progress`` (step, epoch) current, and the terminal
  transition (``succeed`` / ``crash`` / ``abandon``) carries its last snapshot
  (``Run.succeed`` / ``Run.fail`` send ``run.progress`` by default), so a finished run shows
  the step it ended at, not the one of its last heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ._errors import NotFound
from ._uploads import UploadHandle
from .client import Chronicle, Run, format_exception

log = logging.getLogger(__name__)

ENV_EXPERIMENT = "CHRONICLE_EXPERIMENT"
ENV_VARIATION = "CHRONICLE_VARIATION"
ENV_RUN = "CHRONICLE_RUN"
ENV_LEASE = "CHRONICLE_LEASE"

#: Integrations pause heartbeats when training has not advanced for this long (a hung
#: collective or data loader), so the watchdog sees the run go ``lost``. Generous on purpose:
#: a single step, validation or save longer than this is rare; pass a larger value if yours
#: are, or None to disable.
DEFAULT_STALL_TIMEOUT = 1800.0

#: ``TrackedRun.not_resumable``'s answer for a run the store does not have.
UNKNOWN_RUN = "is unknown to this Chronicle"

#: How long a pre-empted job flushes uploads before the rest is spooled for `chronicle sync`.
PREEMPT_FLUSH_SECONDS = 20.0

#: Experiments this process created by name: ``(store target, experiment name) ->
#: (experiment id, {canonical config JSON: variation})`` (see ``TrackedRun._new_run``).
_NAMED: dict[tuple[str, str], tuple[str, dict[str, int]]] = {}
_NAMED_LOCK = threading.Lock()


def identity_from_env() -> tuple[str, int, int, str | None] | None:
    """``(experiment_id, variation, run, lease)`` from the environment, or None."""
    exp = os.environ.get(ENV_EXPERIMENT)
    var = os.environ.get(ENV_VARIATION)
    run = os.environ.get(ENV_RUN)
    if not exp or var is None or run is None:
        return None
    try:
        return exp, int(var), int(run), os.environ.get(ENV_LEASE) or None
    except ValueError:
        log.warning("ignoring malformed %s/%s=%r/%r", ENV_VARIATION, ENV_RUN, var, run)
        return None


def jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe rendering of hyperparameters (unknown objects become their repr)."""
    if depth > 8:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): jsonable(v, depth + 1) for k, v in dict(value.items()).items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    return repr(value)


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
    """One run's lifecycle as seen by a framework integration.

    Args:
        chronicle: an existing client; default: one created on first use from the
            environment (``$CHRONICLE_URL`` or the embedded store), closed by ``close()``.
        experiment_id, variation, run: explicit identity (all three, or experiment_id and
            variation to create a new run of that variation).
        experiment_name: name of the experiment when no identity is given; fits with the
            same name in one process share it (see ``_new_run``).
        heartbeat_interval: seconds between heartbeats.
        stall_timeout: pause heartbeats while ``run.progress`` has not advanced for this long
            (None: never); the framework hooks report progress at every step.
        strict: raise tracking errors instead of logging them.
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
    ) -> None:
        if run is not None and (experiment_id is None or variation is None):
            raise ValueError("run= needs experiment_id= and variation= too")
        if variation is not None and experiment_id is None:
            raise ValueError("variation= needs experiment_id= too")
        self.chronicle = chronicle
        self.experiment_id = experiment_id
        self.variation = variation
        self.run_number = run
        self.experiment_name = experiment_name
        self.heartbeat_interval = heartbeat_interval
        self.stall_timeout = stall_timeout
        self.run: Run | None = None
        self.owns_run = True
        self.outcome: str | None = None  # "succeeded" | "crashed" | "abandoned" | "preempted"
        self._own_client = False
        #: ``(url, home)`` of a user-given client dropped by pickling, rebuilt on first use.
        self._client_spec: tuple[str | None, str] | None = None
        self._guard = Guard(strict)

    # -- pickling: drop live objects (ddp_spawn pickles callbacks into workers) -------------
    def __getstate__(self) -> dict[str, Any]:
        """Live objects stay behind: the run, and any client (it holds locks, threads and
        sessions). A client the user gave is replaced by how to rebuild it (its URL and
        home), so the copy talks to the same store; one we created is made afresh."""
        state = self.__dict__.copy()
        state.update(chronicle=None, run=None)
        if self.chronicle is not None and not self._own_client:
            state["_client_spec"] = (self.chronicle.url, str(self.chronicle.home))
        return state

    @property
    def active(self) -> bool:
        """True between a successful ``begin`` and the end of the run."""
        return self.run is not None and self.outcome is None

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
        """Why the run ``key`` (e.g. named by a checkpoint) cannot be resumed: ``"already
        <state>"`` when it ended, ``"is unknown to this Chronicle"`` when the store does not
        have it (a checkpoint from another Chronicle). None when it can be, or when asking
        failed (then resuming it reports the error)."""
        try:
            state = self._client().run(*key).state
        except NotFound:
            return UNKNOWN_RUN
        except Exception:
            return None
        return f"already {state}" if state.is_terminal else None

    # -- lifecycle -----------------------------------------------------------------------
    def begin(
        self,
        config: dict[str, Any] | None = None,
        resume_identity: tuple[str, int, int] | None = None,
        on_cancel: Callable[[Run, str], None] | None = None,
    ) -> Run | None:
        """Create or attach the run and start it (resume when ``resume_identity`` is given),
        then keep it alive. Returns the run, or None when tracking failed (non-strict)."""
        if self.run is not None:
            return self.run
        with self.guard("starting the run"):
            client = self._client()
            resume = False
            lease = None
            env = identity_from_env()
            if resume_identity is not None:
                key = resume_identity
                resume = True
            elif self.experiment_id is not None and self.run_number is not None:
                key = (self.experiment_id, int(self.variation or 0), self.run_number)
            elif self.experiment_id is not None:
                created = client.create_run(self.experiment_id, int(self.variation or 0))
                key = created.key_tuple
            elif env is not None:
                key, lease = env[:3], env[3]
                self.owns_run = lease is None
            else:
                key = self._new_run(client, jsonable(config or {}))
            run = client.run(*key, lease=lease)
            run.start(resume=resume)
            run.progress.touch()  # the stall window opens at the start
            run.keep_alive(
                self.heartbeat_interval, on_cancel=on_cancel, stall_timeout=self.stall_timeout
            )
            self.run = run
            log.info("chronicle: tracking run %s (%s)", run.key, client.target)
        return self.run

    def _new_run(self, client: Chronicle, config: dict[str, Any]) -> tuple[str, int, int]:
        """A new run when no identity is given. Fits with the same ``experiment_name`` in
        one process (on one store) share its experiment: each distinct config is one
        variation, each fit one run of it. Unnamed fits each get an experiment of their own
        (named ``"training"``)."""
        if self.experiment_name is None:
            exp = client.create_experiment("training", variations=[config])
            return client.create_run(exp, 0).key_tuple
        canonical = json.dumps(config, sort_keys=True)
        with _NAMED_LOCK:
            slot = _NAMED.get((client.target, self.experiment_name))
            if slot is None:
                exp = client.create_experiment(self.experiment_name, variations=[config])
                slot = _NAMED[(client.target, self.experiment_name)] = (exp, {canonical: 0})
            exp, variations = slot
            variation = variations.get(canonical)
            if variation is None:
                variation = variations[canonical] = client.add_variation(exp, config)
        return client.create_run(exp, variation).key_tuple

    def upload(self, path: str | os.PathLike[str], name: str | None = None) -> UploadHandle | None:
        """Upload a file or directory to the tracked run; returns its handle, or None when
        there is no run or it could not be queued (logged, unless strict).

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
                run.stop_keep_alive()

    def crash(self, exc: BaseException) -> None:
        """An exception ended training: ``fail("crash")`` with type, message, traceback."""
        self._fail("crashed", "crash", format_exception(exc))

    def abandon(self, message: str = "KeyboardInterrupt") -> None:
        """Interrupted by the user: ``fail("abandoned")``, quickly (no waiting for uploads)."""
        self._fail("abandoned", "abandoned", message)

    def _fail(self, outcome: str, reason: str, message: str) -> None:
        if not self.active or self.run is None:
            return
        self.outcome = outcome
        run = self.run
        with self.guard(f"recording the {reason}"):
            if self.owns_run and not run.cancelled.is_set():
                run.fail(reason, message)
            else:
                run.stop_keep_alive()

    def preempted(self, flush_timeout: float | None = PREEMPT_FLUSH_SECONDS) -> None:
        """SIGTERM / pre-emption: no terminal transition. Flush uploads (bounded: schedulers
        send SIGKILL ~30 s after SIGTERM), stop heartbeats, leave the run to be resumed
        (``lost`` is recoverable for 48 h). ``close()`` then spools what did not finish."""
        if not self.active or self.run is None:
            return
        self.outcome = "preempted"
        run = self.run
        with self.guard("flushing uploads on pre-emption"):
            run.wait_uploads(flush_timeout)
        with self.guard("stopping heartbeats"):
            run.stop_keep_alive()
        log.warning("chronicle: run %s pre-empted; left resumable (no terminal state)", run.key)

    def close(self) -> None:
        """Close the client if this object created it (after a pre-emption, quickly: what is
        still uploading is spooled rather than waited for)."""
        if self._own_client and self.chronicle is not None:
            with self.guard("closing the client"):
                self.chronicle.close(timeout=2.0 if self.outcome == "preempted" else None)


__all__ = ["Guard", "TrackedRun", "identity_from_env", "jsonable"]
