"""``chronicle exec``: run a command as a Chronicle-managed worker.

The supervisor owns the process that does the work, so it can do two things an in-process
callback never can:

* **Report how the worker died.** The child runs in its own process group with the run's
  identity and lease exported (``$CHRONICLE_EXPERIMENT`` / ``_VARIATION`` / ``_RUN`` /
  ``_LEASE`` and ``$CHRONICLE_URL`` or ``$CHRONICLE_HOME``), so an integration inside adopts the
  run and leaves its terminal transition to the supervisor, which takes it from the exit
  status: 0 -> ``succeeded``; a non-zero code -> ``failed_crash`` with the code and the tail of
  stderr; a signal -> ``failed_crash`` at once, naming it (SIGKILL: possibly the out-of-memory
  killer). Its own SIGINT -> ``failed_abandoned``; its own SIGTERM (pre-emption) is forwarded
  and leaves no terminal state (the run stays resumable).
* **Tear the worker down** when the store's watchdog (the one clock that decides) says the run
  is ``lost``, or when it was cancelled and the child has not stopped within the grace: SIGTERM
  to the whole group (the integrations take it as pre-emption: flush, no terminal state), the
  grace, SIGKILL to the group, then a check that nothing of it is left. Teardown never changes
  the run's state; it is recorded as ``teardown`` events (requested, done, failed).

Liveness: until an integration inside the child beats for the run, the supervisor beats on the
child's behalf (process liveness only), well inside the store's ``heartbeat_timeout``. Once
someone else beats, it stops, so a training loop that hangs (and stops beating) goes ``lost``
exactly as it would without ``chronicle exec``. When that training ends while the process goes
on (a post-fit export, the interpreter's exit, which can take seconds), the integration says so
by creating the file ``$CHRONICLE_TRAINING_ENDED_FILE`` names: from then on the supervisor beats
again, for good (only process liveness is left to report, and it sees the process itself).

Safety rules: nothing is torn down because the store cannot be reached (training is sacred),
nor before the store has answered without a break for ``heartbeat_timeout`` (right after an
outage every run looks lost at once), nor once the run was taken over by another worker
(``start(resume=True)`` elsewhere: that worker's run is not ours to end). Only the child's own
process group is signalled, and only while its leader is not reaped: the supervisor learns
that the child exited without reaping it (``waitid(WNOWAIT)``), so its pid, which is the group's
id, cannot be given to another process while anything may still be signalled; once reaped,
nothing is signalled any more (no PID reuse can make it hit a stranger). The rules are shared
with the Hydra launcher's watcher, in :mod:`._teardown`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from . import _teardown
from ._config import ENV_TRAINING_ENDED_FILE
from ._errors import APIError, ChronicleError, InvalidTransition, LeaseConflict, TransportError
from ._models import RunInfo
from .client import Chronicle, Run
from .lifecycle import RunState

log = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL in a teardown (SLURM's KillWait, Kubernetes' grace).
DEFAULT_GRACE = _teardown.DEFAULT_GRACE
#: How much of the child's stderr is kept for the failure message.
STDERR_TAIL_BYTES = 8 * 1024
#: The store's watchdog timeout when it cannot be learnt (the server's default).
FALLBACK_HEARTBEAT_TIMEOUT = 900.0

_SIGNAL_NOTES = {
    signal.SIGKILL: "killed, possibly by the out-of-memory killer",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating-point exception",
    signal.SIGILL: "illegal instruction",
}


def describe_signal(signum: int) -> str:
    """``SIGKILL (killed, possibly by the out-of-memory killer)``, ``SIGTERM``, ``signal 99``."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    note = _SIGNAL_NOTES.get(signal.Signals(signum))
    return f"{name} ({note})" if note else name


@dataclass
class Outcome:
    """How the supervised command ended, and what the supervisor recorded for it."""

    exit_code: int
    recorded: str | None  # the terminal state written by the supervisor, if any
    torn_down: bool = False
    notes: list[str] = field(default_factory=list)


class _StderrTail:
    """Copies the child's stderr to ours as it comes and keeps its last bytes."""

    def __init__(self, source: IO[bytes], sink: IO[bytes] | None) -> None:
        self._source = source
        self._sink = sink
        self._tail: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._thread = threading.Thread(target=self._pump, name="chronicle-exec-stderr")
        self._thread.daemon = True
        self._thread.start()

    def _pump(self) -> None:
        for chunk in iter(lambda: os.read(self._source.fileno(), 65536), b""):
            if self._sink is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._sink.write(chunk)
                    self._sink.flush()
            self._tail.append(chunk)
            self._size += len(chunk)
            while self._size - len(self._tail[0]) >= STDERR_TAIL_BYTES:
                self._size -= len(self._tail.popleft())

    def text(self, timeout: float = 5.0) -> str:
        """The tail, once the child's stderr is closed (bounded wait: a grandchild may hold
        the pipe open)."""
        self._thread.join(timeout)
        data = b"".join(self._tail)[-STDERR_TAIL_BYTES:]
        return data.decode("utf-8", "replace")


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child exited, *without reaping it*: while its zombie exists, its pid (the
    group id) cannot be reused, so signalling the group can only reach our processes."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class _ChildGroup:
    """The child's process group as a teardown :class:`~._teardown.Target`. Signals go to the
    group only while the leader is unreaped (see :func:`_exited`); after that, never."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.description = f"process group {proc.pid}"

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to the group; False (and nothing sent) once the leader was reaped."""
        if self.proc.returncode is not None:
            return False  # reaped: the pid may be another process's by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        return True

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def alive(self) -> bool:
        """A live (non-zombie) process of the group exists. Once only the leader's zombie is
        left, it is reaped here: the teardown is over."""
        if self.proc.returncode is not None:
            return False
        if _teardown.group_members(self.proc.pid):
            return True
        if _exited(self.proc):
            self.proc.wait()
            return False
        return True  # the leader runs (its /proc entry may be racing): not gone

    def left(self) -> Any:
        return _teardown.group_members(self.proc.pid)[:32]


def _group_alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether a live process of the child's group exists while its leader is unreaped."""
    return proc.returncode is None and bool(_teardown.group_members(proc.pid))


class Supervisor:
    """Runs ``command`` for ``run`` (already started, holding its lease) and records how it
    ended. See the module docstring for the rules.

    Args:
        chronicle: the client the run belongs to (its target is exported to the child).
        run: the started run (``run.lease`` set).
        command: the argv to execute.
        grace: seconds between SIGTERM and SIGKILL in a teardown, and how long a cancelled
            child may take to stop by itself before it is torn down.
        heartbeat_interval: the longest interval between the supervisor's own beats (kept
            within a third of the store's ``heartbeat_timeout``).
        stderr: where the child's stderr is copied (default: ours).
    """

    def __init__(
        self,
        chronicle: Chronicle,
        run: Run,
        command: Sequence[str],
        *,
        grace: float = DEFAULT_GRACE,
        heartbeat_interval: float = 60.0,
        stderr: IO[bytes] | None = None,
    ) -> None:
        if not command:
            raise ValueError("chronicle exec needs a command to run")
        if run.lease is None:
            raise ValueError("the run must be started (hold a lease) before it is supervised")
        self.chronicle = chronicle
        self.run = run
        self.command = list(command)
        self.grace = float(grace)
        self.heartbeat_interval = float(heartbeat_interval)
        self._stderr_sink = stderr if stderr is not None else sys.stderr.buffer
        self.proc: subprocess.Popen[bytes] | None = None
        self._signalled: int | None = None  # SIGINT / SIGTERM the supervisor received
        self._wake = threading.Event()
        self.heartbeat_timeout = FALLBACK_HEARTBEAT_TIMEOUT
        #: Created by the integration inside when its training ended (see the module doc).
        self.training_ended_file = os.path.join(
            tempfile.mkdtemp(prefix="chronicle-exec-"), "training-ended"
        )

    # ------------------------------------------------------------------ the child
    def child_env(self) -> dict[str, str]:
        """Our environment plus the run's identity, lease and target."""
        env = dict(os.environ)
        run = self.run
        env.update(
            CHRONICLE_EXPERIMENT=run.experiment_id,
            CHRONICLE_VARIATION=str(run.variation),
            CHRONICLE_RUN=str(run.run),
            CHRONICLE_LEASE=str(run.lease),
        )
        env[ENV_TRAINING_ENDED_FILE] = self.training_ended_file
        if self.chronicle.url:
            env["CHRONICLE_URL"] = self.chronicle.url
        else:
            env.pop("CHRONICLE_URL", None)
            env["CHRONICLE_HOME"] = str(self.chronicle.home)
        return env

    def _spawn(self) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                self.command,
                env=self.child_env(),
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own group: teardown reaches the whole tree
            )
        except OSError as exc:
            raise ChronicleError(f"cannot start {self.command[0]!r}: {exc}") from exc

    # ------------------------------------------------------------------ main loop
    def execute(self) -> Outcome:
        """Start the child, supervise it until it exits, record the outcome."""
        self.heartbeat_timeout = learn_heartbeat_timeout(self.chronicle, self.run)
        restore = self._install_signal_handlers()
        try:
            self.proc = proc = self._spawn()
            assert proc.stderr is not None
            tail = _StderrTail(proc.stderr, self._stderr_sink)
            torn_down = self._watch(proc)
            # The leader exited (not reaped yet); so must the rest of its group (a stray
            # DataLoader worker): torn down while the leader's zombie still holds the group id.
            if _group_alive(proc):
                self._teardown(proc, "the command exited; its other processes remained", False)
            code = proc.wait()  # reaped: from here on nothing is signalled
            return self._finish(code, tail.text(), torn_down)
        finally:
            restore()
            with contextlib.suppress(OSError):
                os.unlink(self.training_ended_file)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.training_ended_file))

    def _watch(self, proc: subprocess.Popen[bytes]) -> bool:
        """Beat and watch until the child exits (True) or was torn down (also True)."""
        timeout = self.heartbeat_timeout
        beat_every = max(0.2, min(self.heartbeat_interval, timeout / 3))
        poll_every = _teardown.poll_interval(timeout)
        beating = True
        own_beat_at: float | None = None  # store time of our last beat
        next_beat = 0.0
        trust = _teardown.TrustWindow(timeout)
        cancelled_at: float | None = None
        warned_takeover = False
        handed_back = False  # the training inside ended: we beat for the process, for good
        while not _exited(proc):
            now = time.monotonic()
            if not handed_back and os.path.exists(self.training_ended_file):
                handed_back = beating = True
                next_beat = 0.0
                log.info("chronicle exec: the training inside ended; beating for the process")
            info: RunInfo | None = None
            try:
                if beating and now >= next_beat:
                    info = self.run.beat(quick=True)
                    own_beat_at = info.last_heartbeat_at
                    next_beat = now + beat_every
                else:
                    info = self.run.info()
                trust.answered()
            except TransportError as exc:
                trust.failed(exc)
            except LeaseConflict:
                if not warned_takeover:
                    warned_takeover = True
                    log.warning(
                        "chronicle exec: run %s was taken over by another worker; this "
                        "command is no longer its worker and is left alone",
                        self.run.key,
                    )
                beating = False
            except InvalidTransition:
                # A beat refused on a terminal run: read the state below.
                with contextlib.suppress(ChronicleError):
                    info = self.run.info()
            except APIError as exc:
                log.warning("chronicle exec: %s", exc)
            if info is not None and not warned_takeover:
                beat_at = info.last_heartbeat_at
                if (
                    beating
                    and not handed_back
                    and own_beat_at is not None
                    and (beat_at or 0.0) > own_beat_at + 1e-6
                ):
                    # Someone else (the integration inside) beats: do not mask its hangs.
                    beating = False
                    log.info("chronicle exec: the command beats for run %s itself", self.run.key)
                # After an outage every run looks lost: trust "lost" only once the store has
                # answered without a break for a whole heartbeat_timeout.
                state = info.state
                if state is RunState.LOST and trust.trusted:
                    done = self._teardown(proc, f"run {self.run.key} is lost (no heartbeat)")
                    if done == "done":
                        return True
                    warned_takeover = done == "taken_over"  # then: never ours again
                if state is RunState.FAILED_ABANDONED:
                    cancelled_at = cancelled_at or now
                    beating = False
                    if (
                        now - cancelled_at >= self.grace
                        and self._teardown(
                            proc, f"run {self.run.key} was cancelled and the command went on"
                        )
                        == "done"
                    ):
                        return True
                elif state.is_terminal:
                    beating = False  # ended by the command itself (or expired): just wait
            self._wake.wait(min(poll_every, beat_every) if beating else poll_every)
            self._wake.clear()
        return False

    # ------------------------------------------------------------------ teardown
    def _teardown(self, proc: subprocess.Popen[bytes], why: str, bound: bool = True) -> str:
        """SIGTERM to the group, the grace, SIGKILL, confirm; each step an event.

        ``bound``: the teardown serves the run, so it happens only if the store accepts its
        ``teardown_requested`` event under our lease: a run taken over by another worker
        (``"taken_over"``), or a store that cannot be reached (``"unconfirmed"``), gets no
        teardown. Returns ``"done"`` when the group was signalled."""
        group = _ChildGroup(proc)
        request = {
            "target": group.description,
            "why": why,
            "signal": "SIGTERM",
            "grace": self.grace,
        }
        if bound:
            answer = _teardown.request(self.run, request)
            if answer != _teardown.REQUESTED:
                return answer
        else:
            _teardown.record(self.run, "teardown_requested", request)
        _teardown.escalate(self.run, group, why, self.grace)
        return "done"

    def signal_child(self, sig: int) -> bool:
        """Send ``sig`` to the child's process group; False when it was not sent because the
        child was reaped already (its pid may belong to another process by now)."""
        proc = self.proc
        return proc is not None and _ChildGroup(proc).signal(sig)

    # ------------------------------------------------------------------ signals to us
    def _install_signal_handlers(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def forward(signum: int, frame: Any) -> None:
            self._signalled = signum
            self.signal_child(signum)
            self._wake.set()

        for sig in previous:
            signal.signal(sig, forward)

        def restore() -> None:
            for sig, handler in previous.items():
                with contextlib.suppress(ValueError, OSError, TypeError):
                    signal.signal(sig, handler)

        return restore

    # ------------------------------------------------------------------ the outcome
    def _finish(self, code: int, stderr_tail: str, torn_down: bool) -> Outcome:
        exit_code = 128 - code if code < 0 else code
        outcome = Outcome(exit_code=exit_code, recorded=None, torn_down=torn_down)
        self.run.stop_keep_alive()
        if torn_down:
            outcome.notes.append("torn down: the run keeps its state (resumable while lost)")
            return outcome
        if self._signalled == signal.SIGTERM:
            outcome.notes.append("SIGTERM (pre-emption): no terminal state, the run is resumable")
            return outcome
        try:
            info = self.run.info()
        except ChronicleError:
            info = None
        if info is not None and info.state.is_terminal:
            return outcome  # recorded already (by the command, a cancellation, the watchdog)
        try:
            if self._signalled == signal.SIGINT:
                self.run.fail("abandoned", "interrupted: SIGINT to chronicle exec")
                outcome.recorded = RunState.FAILED_ABANDONED.value
            elif code == 0:
                self.run.succeed()
                outcome.recorded = RunState.SUCCEEDED.value
            else:
                if code < 0:
                    head = f"{' '.join(self.command)!r} was killed by {describe_signal(-code)}"
                else:
                    head = f"{' '.join(self.command)!r} exited with code {code}"
                message = head + (f"\n\nstderr (tail):\n{stderr_tail}" if stderr_tail else "")
                self.run.fail("crash", message)
                outcome.recorded = RunState.FAILED_CRASH.value
        except (InvalidTransition, LeaseConflict) as exc:
            # Ended or taken over meanwhile: that record stands.
            outcome.notes.append(f"outcome not recorded: {exc}")
        return outcome


def learn_heartbeat_timeout(chronicle: Chronicle, run: Run) -> float:
    """The store's watchdog timeout: told by the server, or the embedded store's setting."""
    store = getattr(chronicle.transport, "store", None)
    if store is not None:
        return float(store.heartbeat_timeout)
    told = getattr(run, "heartbeat_timeout", None)
    return float(told) if told else FALLBACK_HEARTBEAT_TIMEOUT


__all__ = ["DEFAULT_GRACE", "Outcome", "Supervisor", "describe_signal"]
