"""PID reuse: a teardown never signals a process it did not start.

The kernel hands a freed pid to the next process; here the test makes it do so at once (as root,
through ``/proc/sys/kernel/ns_last_pid``), so the pid of a worker that exited names a stranger
that leads a process group of its own, exactly what ``os.killpg`` would reach."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import testkit

from chronicle_integrations import Chronicle, RunState
from chronicle_integrations._teardown import LocalProcess, LocalTree, start_time
from chronicle_integrations.supervisor import Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def _spawn_with_pid(pid: int) -> Any:
    """A sleeper (a session and group leader) whose pid is ``pid``: the pid is reused."""
    if os.geteuid() != 0 or not os.access(NS_LAST_PID, os.W_OK):
        pytest.skip("forcing a pid to be reused needs root (/proc/sys/kernel/ns_last_pid)")
    for _ in range(50):  # another process may take the pid first: try again
        with open(NS_LAST_PID, "w") as fh:
            fh.write(str(pid - 1))
        proc = testkit.spawn(SLEEPER)
        if proc.pid == pid:
            return proc
        testkit.reap(proc, signal.SIGKILL, grace=0)
    raise AssertionError(f"could not make the kernel reuse pid {pid}")


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def test_the_supervisor_never_signals_a_reused_pid(tmp_path: Path) -> None:
    with Chronicle(home=tmp_path / "home", heartbeat_timeout=2.0) as chronicle:
        exp = chronicle.create_experiment("pid-reuse", variations=[{}])
        run = chronicle.create_run(exp, 0).start()
        with open(os.devnull, "wb") as sink:
            supervisor = Supervisor(
                chronicle, run, [sys.executable, "-c", "pass"], grace=0.5, stderr=sink
            )
            outcome = supervisor.execute()
        assert outcome.exit_code == 0
        assert run.info().state is RunState.SUCCEEDED
        assert supervisor.proc is not None
        old_pid = supervisor.proc.pid
        stranger = _spawn_with_pid(old_pid)  # its group id is the child's old one
        try:
            assert os.getpgid(stranger.pid) == old_pid
            # A late SIGTERM/SIGINT to forward, a teardown: nothing may reach the stranger.
            assert supervisor.signal_child(signal.SIGKILL) is False
            assert supervisor.signal_child(signal.SIGTERM) is False
            time.sleep(0.2)
            assert stranger.poll() is None, "the supervisor signalled a process it did not start"
        finally:
            testkit.reap(stranger, signal.SIGKILL, grace=0)


def test_a_worker_handle_whose_pid_was_reused_reaches_nothing() -> None:
    worker = testkit.spawn(SLEEPER)
    handle = LocalProcess.from_dict(
        {
            "host": LocalProcess.me().host,
            "pid": worker.pid,
            "start_time": start_time(worker.pid),
            "group": True,
        }
    )
    assert handle.same() and LocalTree(handle).alive()
    testkit.reap(worker, signal.SIGKILL, grace=0)  # the worker exited and was reaped
    # A start time is counted in clock ticks (10 ms): a pid handed out again within the tick
    # of the original's start could not be told apart. The kernel only does that when forced
    # (as here, through ns_last_pid); the pid space wraps far slower. Step past that tick.
    time.sleep(5 / os.sysconf("SC_CLK_TCK"))
    stranger = _spawn_with_pid(worker.pid)
    try:
        tree = LocalTree(handle)
        assert not handle.same(), "a reused pid must not pass for the worker"
        assert not tree.alive()
        tree.terminate()
        tree.kill()
        time.sleep(0.2)
        assert stranger.poll() is None, "the teardown signalled a process it did not start"
    finally:
        testkit.reap(stranger, signal.SIGKILL, grace=0)


def test_a_worker_tree_is_torn_down_whole_without_its_group() -> None:
    """A job that does not lead a group (a joblib worker): the process and its descendants."""
    ready = f"/tmp/tree-{os.getpid()}-{time.monotonic_ns()}"
    parent = testkit.spawn(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time, signal\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "kid = subprocess.Popen([sys.executable, '-c', 'import time, signal; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'])\n"
            f"open({ready!r}, 'w').write(str(kid.pid))\n"
            "time.sleep(120)\n",
        ]
    )
    try:
        testkit.wait_until(lambda: os.path.exists(ready) and Path(ready).read_text(), 30)
        kid = int(Path(ready).read_text())
        handle = LocalProcess(
            LocalProcess.me().host, parent.pid, start_time(parent.pid) or 0, False
        )
        tree = LocalTree(handle)
        assert set(tree.left()) == {parent.pid, kid}
        tree.terminate()  # both ignore SIGTERM
        time.sleep(0.3)
        assert tree.alive()
        tree.kill()
        testkit.wait_until(lambda: not tree.alive(), 10, what="the tree gone")
        parent.wait(10)
        assert _gone(kid)
    finally:
        testkit.reap(parent, signal.SIGKILL, grace=0)
        if os.path.exists(ready):
            os.unlink(ready)
