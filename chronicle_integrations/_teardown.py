"""Tearing down Chronicle-managed workers: the rules, in one place.

Two executors tear workers down: ``chronicle exec`` (:mod:`.supervisor`, which owns its child)
and the Hydra launcher's watcher (``hydra_plugins.chronicle_launcher._watch``, which owns the
jobs of its sweep: local job processes and SLURM jobs). Both decide from the store (the one
clock that says a run is ``lost`` or was cancelled) and share what is here:

* :class:`TrustWindow`: never tear down because the store is unreachable, nor before it has
  answered without a break for ``heartbeat_timeout`` (right after an outage every run looks
  lost at once, and live workers need that long to beat again);
* :func:`request`: a teardown happens only once the store accepted its ``teardown_requested``
  event under the worker's lease, so a run taken over by another worker (``start(resume=True)``
  elsewhere) is never torn down, and an unreachable store stops it too;
* :func:`escalate`: the signal sequence (SIGTERM, the grace, SIGKILL, a check that the
  worker is gone), with the ``teardown`` events (requested, done, failed) it records;
* :class:`LocalProcess`: a process named by pid *and* start time, so a pid the kernel gave to
  another process after ours exited is never signalled.

Teardown never changes a run's state: a lost run stays ``lost`` (resumable), a cancelled one
``failed_abandoned``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._errors import ChronicleError, LeaseConflict
from .client import Run

log = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL in a teardown (SLURM's KillWait, Kubernetes' grace).
DEFAULT_GRACE = 30.0
#: How long a worker may take to disappear after SIGKILL before the teardown is reported failed.
KILL_CONFIRM_SECONDS = 10.0

TAKEN_OVER = "taken_over"
UNCONFIRMED = "unconfirmed"
REQUESTED = "requested"


def poll_interval(heartbeat_timeout: float) -> float:
    """How often an executor reads the run's state: a tenth of the watchdog's timeout,
    between 0.2 s and 30 s."""
    return max(0.2, min(30.0, heartbeat_timeout / 10))


class TrustWindow:
    """Whether the store's ``lost`` can be acted on: only once it has answered without a break
    for ``heartbeat_timeout``. A failed call, or one that only got through after retrying
    through an outage longer than half the timeout, starts the window afresh."""

    def __init__(self, heartbeat_timeout: float, clock: Callable[[], float] = time.monotonic):
        self.heartbeat_timeout = float(heartbeat_timeout)
        self._clock = clock
        self._since: float | None = None
        self._last: float = clock()

    def answered(self) -> None:
        """The store answered just now."""
        now = self._clock()
        if self._since is None or now - self._last > self.heartbeat_timeout / 2:
            self._since = now
        self._last = now

    def failed(self, why: object = None) -> None:
        """A call to the store failed (unreachable)."""
        if self._since is not None:
            log.warning("chronicle: the store is unreachable (%s); no teardown", why)
        self._since = None

    @property
    def trusted(self) -> bool:
        """True once the store has answered without a break for ``heartbeat_timeout``."""
        return self._since is not None and self._clock() - self._since >= self.heartbeat_timeout


def request(run: Run, detail: dict[str, Any]) -> str:
    """Record ``teardown_requested`` under the run's lease: :data:`REQUESTED` when the store
    accepted it; :data:`TAKEN_OVER` when the run is held under another lease now (then the
    worker is not ours to end); :data:`UNCONFIRMED` when the store could not be asked."""
    try:
        run.record_event("teardown", "teardown_requested", detail)
    except LeaseConflict:
        log.warning(
            "chronicle: run %s is held by another worker now; not tearing its old worker down",
            run.key,
        )
        return TAKEN_OVER
    except ChronicleError as exc:
        log.warning(
            "chronicle: no teardown of run %s: the store did not confirm (%s)", run.key, exc
        )
        return UNCONFIRMED
    return REQUESTED


def record(run: Run, cause: str, detail: dict[str, Any]) -> None:
    """Record a further ``teardown`` event (best effort: the kill does not wait for it)."""
    try:
        run.record_event("teardown", cause, detail)
    except ChronicleError as exc:
        log.warning("chronicle: could not record %s for run %s (%s)", cause, run.key, exc)


class Target(Protocol):
    """What :func:`escalate` tears down."""

    #: How events name it: ``process group 123``, ``SLURM job 45_0``.
    description: str

    def terminate(self) -> None:
        """The polite stop (SIGTERM, ``scancel``)."""

    def kill(self) -> None:
        """The stop that cannot be refused (SIGKILL)."""

    def alive(self) -> bool:
        """Whether anything of it still runs (also reaps what we may reap)."""

    def left(self) -> Any:
        """What survived, for a failed teardown's event."""


def escalate(
    run: Run, target: Target, why: str, grace: float, *, terminate_signal: str = "SIGTERM"
) -> bool:
    """After :func:`request`: terminate, wait up to ``grace``, kill, confirm; records
    ``teardown_requested`` (SIGKILL) when it escalates, then ``teardown_done`` or
    ``teardown_failed``. Returns True when the target is gone."""
    base = {"target": target.description, "why": why}
    log.warning("chronicle: tearing down %s: %s", target.description, why)
    target.terminate()
    used = terminate_signal
    if not _wait_gone(target, grace):
        used = "SIGKILL"
        record(run, "teardown_requested", {**base, "signal": "SIGKILL"})
        target.kill()
        _wait_gone(target, KILL_CONFIRM_SECONDS)
    if target.alive():
        log.error("chronicle: %s survived SIGKILL", target.description)
        record(run, "teardown_failed", {**base, "signal": used, "left": target.left()})
        return False
    record(run, "teardown_done", {**base, "signal": used})
    return True


def _wait_gone(target: Target, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while target.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------------------ local processes
def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None when
    no such process exists. With the pid it names one process for good: a pid reused by the
    kernel comes with another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """``(state, ppid, pgid, start time)`` of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])


def _all_pids() -> list[int]:
    with contextlib.suppress(OSError):
        return [int(e) for e in os.listdir("/proc") if e.isdigit()]
    return []


def group_members(pgid: int, *, zombies: bool = False) -> list[int]:
    """Pids of process group ``pgid`` (from /proc), without zombies unless asked."""
    found = []
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None and st[2] == pgid and (zombies or st[0] != "Z"):
            found.append(pid)
    return found


@dataclass(frozen=True)
class LocalProcess:
    """A worker process on this host, named by pid and start time (see :func:`start_time`).

    ``group``: the worker leads a process group of its own (its whole tree is the group);
    otherwise (a joblib worker, a submitit-local task in its controller's group) the tree is
    the process and its descendants, found through /proc."""

    host: str
    pid: int
    started: int
    group: bool

    @classmethod
    def me(cls) -> LocalProcess:
        """This process, as a job reports itself."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, start_time(pid) or 0, os.getpgrp() == pid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "local",
            "host": self.host,
            "pid": self.pid,
            "start_time": self.started,
            "group": self.group,
        }

    @classmethod
    def from_dict(cls, detail: dict[str, Any]) -> LocalProcess:
        return cls(
            str(detail["host"]),
            int(detail["pid"]),
            int(detail["start_time"]),
            bool(detail["group"]),
        )

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def same(self) -> bool:
        """Whether the pid still names the process that reported itself (not a reuse)."""
        return self.here and start_time(self.pid) == self.started


class LocalTree:
    """:class:`Target` for a :class:`LocalProcess`: its group, or the process and its
    descendants. Every signal first checks that the pid is still that process (start time);
    the group is signalled only while its leader is that process (or its zombie), so a pid or
    group id reused after the worker exited is never reached."""

    def __init__(self, process: LocalProcess) -> None:
        self.process = process
        kind = "process group" if process.group else "process tree of"
        self.description = f"{kind} {process.pid} on {process.host}"
        self._seen: dict[int, int] = {}  # descendants met so far: pid -> start time

    def _tree(self) -> list[int]:
        """Our processes still running (no zombies), by pid, each checked by start time."""
        proc = self.process
        if not proc.here:
            return []
        stats = {pid: st for pid in _all_pids() if (st := _stat(pid)) is not None}
        root = stats.get(proc.pid)
        root_ours = root is not None and root[3] == proc.started
        if proc.group:
            if not root_ours and root is not None:
                # The pid names another process now (reused): its group is not ours. (With
                # the leader gone and the pid unused, members of group pid are ours: a group
                # id cannot be reused while the group has members.)
                return []
            members = [p for p, st in stats.items() if st[2] == proc.pid and st[0] != "Z"]
        else:
            members = [proc.pid] if root_ours and root is not None and root[0] != "Z" else []
            children: dict[int, list[int]] = {}
            for pid, st in stats.items():
                children.setdefault(st[1], []).append(pid)
            frontier = [proc.pid] if root_ours else list(self._seen)
            while frontier:
                parent = frontier.pop()
                for kid in children.get(parent, []):
                    if kid not in members and stats[kid][0] != "Z":
                        members.append(kid)
                        frontier.append(kid)
        for pid in members:
            self._seen.setdefault(pid, stats[pid][3])
        # Only processes whose start time is the one we first saw (no reuse since).
        return [p for p in members if p in stats and stats[p][3] == self._seen.get(p)]

    def _send(self, sig: int) -> None:
        proc = self.process
        if proc.group and proc.same():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                os.killpg(proc.pid, sig)
            return
        for pid in self._tree():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, sig)

    def terminate(self) -> None:
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        self._send(signal.SIGKILL)

    def alive(self) -> bool:
        return bool(self._tree())

    def left(self) -> Any:
        return self._tree()[:32]


__all__ = [
    "DEFAULT_GRACE",
    "REQUESTED",
    "TAKEN_OVER",
    "UNCONFIRMED",
    "LocalProcess",
    "LocalTree",
    "Target",
    "TrustWindow",
    "escalate",
    "group_members",
    "poll_interval",
    "record",
    "request",
    "start_time",
]
