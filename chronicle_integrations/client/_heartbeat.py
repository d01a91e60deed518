"""Heartbeats on a daemon thread, with cancellation detection.

Rules:
* the first beat goes out as soon as the thread starts, then one every ``interval`` seconds,
  or every third of the store's ``heartbeat_timeout`` when that is shorter (the store says it
  in its answers to start and heartbeat; a longer ``interval`` is named once at WARNING):
  beating slower than the watchdog expects makes a healthy run flap ``running -> lost``;
* only a refusal with a Chronicle error code stops the loop: a proxy's 404, 408 or 401 page
  on one beat is a transient failure like a 5xx (the transport raises ``TransportError``);
* transient failures (server down, 5xx) are logged once at WARNING, retried sooner (backoff
  from 1 s up to ``interval``), and their recovery is logged at INFO: no log spam;
* a refusal that means the run is no longer ours - it was cancelled (``failed_abandoned``),
  expired, ended elsewhere, or taken over by another worker (lease conflict) - sets
  ``run.cancelled``, calls the ``on_cancel`` callback once, and stops the thread;
* the thread never keeps a dead training alive: it is a daemon, it stops when its run reaches
  a terminal state through this client, and it stops when the main thread has exited;
* a heartbeat proves the process exists, not that training advances. With ``stall_timeout``,
  the thread watches ``run.progress`` (updated by the training loop, no I/O) and *pauses*
  beating while it has not advanced for that long, saying so at WARNING: the server's watchdog
  then moves the run to ``lost`` honestly. When progress resumes, so do the heartbeats
  (``lost -> running``).

The seam with :class:`~chronicle_integrations.Run`: a loop only uses the :class:`Beating`
interface (the run's identity and lease, its progress and cancellation, ``beat()`` and
``mark_cancelled()``). Handles on the same run under the same lease share one loop per
process (:func:`attach`, :func:`detach`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from .._errors import APIError, InvalidTransition, LeaseConflict, NotFound
from .._models import RunInfo, RunKey

log = logging.getLogger(__name__)


class Progress:
    """Training progress, written by the training thread and read by the heartbeat thread.

    ``update(step=..., epoch=...)`` and ``touch()`` are a few attribute writes: safe to call on
    every training step. Anything that changes the values, or ``touch()`` (for long phases
    with no step: validation, checkpointing), counts as advancing.
    """

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self.advanced_at = time.monotonic()

    def update(self, **values: Any) -> None:
        """Record progress, e.g. ``update(step=120, epoch=3)``."""
        merged = {**self._values, **values}
        if merged != self._values:
            self._values = merged  # one reference swap: readers never see a half update
            self.advanced_at = time.monotonic()

    def advance(self, step: int, epoch: float) -> None:
        """``update(step=step, epoch=epoch)`` for the per-step hot path of the integrations:
        no keyword dict and no merge when only these two values are reported."""
        values = self._values
        if values.get("step") == step and values.get("epoch") == epoch:
            return
        self._values = {**values, "step": step, "epoch": epoch}
        self.advanced_at = time.monotonic()

    def touch(self) -> None:
        """Count as progress without a new value (a long validation or save is not a hang)."""
        self.advanced_at = time.monotonic()

    def snapshot(self) -> dict[str, Any] | None:
        """The latest values, or None if nothing was reported."""
        return dict(self._values) if self._values else None

    def idle_for(self) -> float:
        """Seconds since progress last advanced."""
        return time.monotonic() - self.advanced_at


class Beating(Protocol):
    """What a heartbeat loop needs of the run it beats for (:class:`~chronicle_integrations.Run`
    provides it). The loop reads the run's identity, lease, progress and watchdog timeout,
    beats through :meth:`beat`, and reports a cancellation through :meth:`mark_cancelled`;
    handles sharing a loop (:func:`attach`) are given the owner's ``progress`` and
    ``cancelled``."""

    lease: str | None
    progress: Progress
    cancelled: threading.Event
    heartbeat_timeout: float | None

    @property
    def key(self) -> str:
        """``experiment/variation/run``, for logs and the thread's name."""
        ...

    @property
    def key_tuple(self) -> RunKey:
        """The run's :class:`RunKey`."""
        ...

    def beat(self, quick: bool = True, progress: dict[str, Any] | None = None) -> RunInfo:
        """Send one heartbeat (``quick``: one short try) and return the store's answer."""
        ...

    def mark_cancelled(self, why: str) -> None:
        """Record that the run is no longer this worker's (sets ``cancelled``)."""
        ...


R = TypeVar("R", bound=Beating)


class KeepAlive(Generic[R]):
    """A running heartbeat loop for one run. A context manager; ``stop()`` ends it."""

    def __init__(
        self,
        run: R,
        interval: float = 60.0,
        on_cancel: Callable[[R, str], None] | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        if stall_timeout is not None and stall_timeout <= 0:
            raise ValueError("stall_timeout must be > 0 (or None to disable)")
        self.run = run
        #: The interval asked for; ``interval`` is the one in force (see :meth:`watchdog`).
        self.requested_interval = float(interval)
        self.interval = float(interval)
        self._told_slow = False
        self.on_cancel = on_cancel
        self.stall_timeout = stall_timeout
        #: Other handles on the same run that joined this loop: (run, on_cancel, stall).
        self._members: list[tuple[R, Callable[[R, str], None] | None, float | None]] = []
        self._own_stall = stall_timeout
        #: True while heartbeats are paused because training made no progress.
        self.stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop,
            daemon=True,
            name=f"chronicle-heartbeat-{run.key}",
        )
        self.beats = 0

    def join(
        self, run: R, on_cancel: Callable[[R, str], None] | None, stall_timeout: float | None
    ) -> None:
        """Let another handle on this run share the loop (or update the owner's settings).
        The tightest stall timeout of all members applies."""
        if run is self.run:
            if on_cancel is not None:
                self.on_cancel = on_cancel
            if stall_timeout is not None:
                self._own_stall = stall_timeout
        else:
            self._members = [m for m in self._members if m[0] is not run]
            self._members.append((run, on_cancel, stall_timeout))
        self._recompute_stall()

    def leave(self, run: R) -> None:
        """A member handle stops using the loop; the owner keeps beating."""
        self._members = [m for m in self._members if m[0] is not run]
        self._recompute_stall()

    def training_ended(self, run: R) -> None:
        """The training loop behind ``run`` (the owner or a member) is over while its process
        goes on (post-fit export, interpreter exit) and someone else ends the run: drop that
        handle's stall rule (no loop to watch any more) but keep beating, as process
        liveness, so a supervisor does not see the run go lost and tear down a process that
        is merely finishing."""
        if run is self.run:
            self._own_stall = None
        else:
            self._members = [(r, c, None if r is run else s) for r, c, s in self._members]
        self._recompute_stall()

    def _recompute_stall(self) -> None:
        stalls = [s for s in (self._own_stall, *(m[2] for m in self._members)) if s]
        self.stall_timeout = min(stalls) if stalls else None

    def watchdog(self, heartbeat_timeout: float | None) -> None:
        """Fit the interval to the store's watchdog: at least three beats per
        ``heartbeat_timeout`` (one lost or late beat must not make the run ``lost``)."""
        if not heartbeat_timeout or heartbeat_timeout <= 0:
            return
        bound = heartbeat_timeout / 3
        self.interval = min(self.requested_interval, bound)
        if self.requested_interval > bound and not self._told_slow:
            self._told_slow = True
            log.warning(
                "run %s: heartbeats were asked every %gs but the server marks a run lost after "
                "%gs of silence; beating every %gs instead (pass a shorter interval, or raise "
                "the server's --heartbeat-timeout)",
                self.run.key,
                self.requested_interval,
                heartbeat_timeout,
                self.interval,
            )

    def start(self) -> KeepAlive[R]:
        """Start beating (idempotent)."""
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """True while the heartbeat thread runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop beating and wait (bounded) for the thread to end."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> KeepAlive[R]:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _loop(self) -> None:
        delay = 0.0
        failing = False
        main = threading.main_thread()
        while not self._stop.wait(delay):
            if not main.is_alive():
                log.debug("main thread exited; heartbeats stop")
                return
            if self._paused_for_stall():
                delay = min(self.interval, 1.0)
                continue
            try:
                info = self.run.beat()
            except (InvalidTransition, LeaseConflict, NotFound) as exc:
                self._cancelled(exc)
                return
            except APIError as exc:
                if exc.status < 500 and exc.status != 429:
                    log.error("heartbeat for %s refused: %s; heartbeats stop", self.run.key, exc)
                    return
                failing, delay = self._failed(exc, failing, delay)
                continue
            except Exception as exc:
                failing, delay = self._failed(exc, failing, delay)
                continue
            self.beats += 1
            self.watchdog(info.heartbeat_timeout)
            if failing:
                log.info("heartbeats for %s are getting through again", self.run.key)
                failing = False
            delay = self.interval

    def _paused_for_stall(self) -> bool:
        if self.stall_timeout is None:
            return False
        idle = self.run.progress.idle_for()
        if idle > self.stall_timeout:
            if not self.stalled:
                log.warning(
                    "run %s: no training progress for %.0fs (stall_timeout=%.0fs); "
                    "heartbeats pause so the watchdog can mark the run lost",
                    self.run.key,
                    idle,
                    self.stall_timeout,
                )
                self.stalled = True
            return True
        if self.stalled:
            log.warning("run %s: training progresses again; heartbeats resume", self.run.key)
            self.stalled = False
        return False

    def _failed(self, exc: BaseException, failing: bool, delay: float) -> tuple[bool, float]:
        if not failing:
            log.warning(
                "heartbeat for %s failed (%s); retrying until it gets through", self.run.key, exc
            )
        return True, min(self.interval, max(1.0, delay * 2))

    def _cancelled(self, exc: APIError) -> None:
        if isinstance(exc, LeaseConflict):
            why = "taken over by another worker (lease conflict)"
        elif isinstance(exc, NotFound):
            why = "deleted on the server"
        else:
            state = exc.state if isinstance(exc, InvalidTransition) else None
            why = f"{state} on the server" if state else str(exc)
        log.warning(
            "run %s is %s: heartbeats stop and the run is marked cancelled", self.run.key, why
        )
        for run, callback in [(self.run, self.on_cancel), *((m[0], m[1]) for m in self._members)]:
            run.mark_cancelled(why)
            if callback is None:
                continue
            try:
                callback(run, why)
            except Exception:  # a user callback must not break the thread
                log.exception("the on_cancel callback for %s raised", run.key)


#: Live heartbeat loops of this process by (experiment, variation, run, lease).
_LOOPS: dict[tuple[str, int, int, str | None], KeepAlive[Any]] = {}
_LOOPS_LOCK = threading.Lock()


def attach(
    run: R,
    current: KeepAlive[R] | None,
    interval: float,
    on_cancel: Callable[[R, str], None] | None,
    stall_timeout: float | None,
) -> tuple[KeepAlive[R], bool]:
    """The loop that beats for ``run``, and whether it was started now.

    ``current`` (the handle's own loop, if alive) gets the new settings. Else a live loop of
    another handle on the same run under the same lease (a launcher, and a callback inside its
    job) is shared: ``run`` takes that owner's progress and cancellation, so that one hung
    training loop stops the only heartbeats the run has. Else a new loop starts, fitted to
    the run's known ``heartbeat_timeout``.
    """
    with _LOOPS_LOCK:
        if current is not None and current.alive:
            current.join(run, on_cancel, stall_timeout)
            return current, False
        slot = (*run.key_tuple, run.lease)
        shared: KeepAlive[R] | None = _LOOPS.get(slot)
        if shared is not None and shared.alive:
            run.progress = shared.run.progress
            run.cancelled = shared.run.cancelled
            if hasattr(shared.run, "pending_metrics"):  # one buffer: the loop sends it
                run.pending_metrics = shared.run.pending_metrics  # type: ignore[attr-defined]
            shared.join(run, on_cancel, stall_timeout)
            return shared, False
        shared = KeepAlive(run, interval, on_cancel, stall_timeout)
        shared.watchdog(run.heartbeat_timeout)
        shared.start()
        _LOOPS[slot] = shared
        return shared, True


def detach(run: R, keepalive: KeepAlive[R]) -> None:
    """``run`` stops using ``keepalive``: the loop's owner stops it (and it leaves the
    registry); a member handle only leaves it, and the owner keeps beating."""
    if keepalive.run is not run:
        keepalive.leave(run)
        return
    keepalive.stop()
    slot = (*run.key_tuple, run.lease)
    with _LOOPS_LOCK:
        if _LOOPS.get(slot) is keepalive:
            del _LOOPS[slot]
