"""``chronicle exec``: a supervised worker's end is recorded from its exit status, and a lost or
cancelled worker is torn down (whole process group), with real processes and real signals."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import testkit

from chronicle_integrations import Chronicle, NotFound, RunState

TIMEOUT = 2.0  # the store's heartbeat timeout in these tests


def _env(home: Path, url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env.update(CHRONICLE_HOME=str(home), CHRONICLE_HEARTBEAT_TIMEOUT=str(TIMEOUT))
    env["PYTHONUNBUFFERED"] = "1"
    if url:
        env["CHRONICLE_URL"] = url
    return env


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / f"child_{time.monotonic_ns()}.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _exec(
    tmp_path: Path, *command: str, url: str | None = None, extra: tuple[str, ...] = ()
) -> Any:
    """Start ``chronicle exec --experiment E -- CMD`` (a fresh experiment) in its own session."""
    home = tmp_path / "home"
    with Chronicle(url=url, home=home, heartbeat_timeout=TIMEOUT) as chronicle:
        exp = chronicle.create_experiment("exec", variations=[{}])
    args = [sys.executable, "-m", "chronicle_integrations.cli", "exec", "--experiment", exp]
    proc = testkit.spawn(
        [*args, *extra, "--", *command],
        env=_env(home, url),
        stdout=(tmp_path / "exec.out").open("wb"),
        stderr=(tmp_path / "exec.err").open("wb"),
    )
    return proc, exp, home


def _finish(proc: Any, tmp_path: Path, timeout: float = 60) -> int:
    try:
        return int(proc.wait(timeout))
    except Exception:
        testkit.reap(proc)
        raise AssertionError((tmp_path / "exec.err").read_text()[-3000:]) from None


def _info(home: Path, exp: str, url: str | None = None) -> Any:
    with Chronicle(url=url, home=home, heartbeat_timeout=TIMEOUT) as chronicle:
        return chronicle.run(exp, 0, 0).info()


def _state(home: Path, exp: str, url: str | None = None) -> RunState | None:
    """The run's state, or None while ``chronicle exec`` has not created it yet."""
    try:
        return _info(home, exp, url).state  # type: ignore[no-any-return]
    except NotFound:
        return None


def _events(home: Path, exp: str, url: str | None = None) -> list[Any]:
    with Chronicle(url=url, home=home, heartbeat_timeout=TIMEOUT) as chronicle:
        return chronicle.run(exp, 0, 0).events()


@pytest.fixture(params=["embedded", "http"])
def target(request: pytest.FixtureRequest, server_factory: Any) -> str | None:
    if request.param == "embedded":
        return None
    return str(server_factory(heartbeat_timeout=TIMEOUT).url)


# ----------------------------------------------------------------------- outcomes
def test_a_child_killed_by_sigkill_is_a_crash_naming_it_at_once(
    tmp_path: Path, target: str | None
) -> None:
    child = _script(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc, exp, home = _exec(tmp_path, sys.executable, child, url=target)
    assert _finish(proc, tmp_path) == 128 + signal.SIGKILL
    info = _info(home, exp, target)
    assert info.state is RunState.FAILED_CRASH
    assert "SIGKILL" in info.message and "out-of-memory" in info.message


def test_a_non_zero_exit_is_a_crash_with_the_code_and_stderr_tail(
    tmp_path: Path, target: str | None
) -> None:
    child = _script(
        tmp_path, "import sys\nprint('the disk said no', file=sys.stderr)\nsys.exit(3)\n"
    )
    proc, exp, home = _exec(tmp_path, sys.executable, child, url=target)
    assert _finish(proc, tmp_path) == 3
    info = _info(home, exp, target)
    assert info.state is RunState.FAILED_CRASH
    assert "exited with code 3" in info.message
    assert "the disk said no" in info.message
    assert "the disk said no" in (tmp_path / "exec.err").read_text()  # passed through too


def test_a_plain_script_succeeds_with_heartbeats_sent_on_its_behalf(
    tmp_path: Path, target: str | None
) -> None:
    child = _script(tmp_path, "import time\ntime.sleep(3 * 2.0)\n")  # three heartbeat timeouts
    proc, exp, home = _exec(tmp_path, sys.executable, child, url=target)
    assert _finish(proc, tmp_path) == 0
    info = _info(home, exp, target)
    assert info.state is RunState.SUCCEEDED
    assert info.last_heartbeat_at is not None and info.last_heartbeat_at > info.started_at
    causes = [e.cause for e in _events(home, exp, target)]
    assert "watchdog" not in causes, causes  # it never went lost while the child ran


def test_the_child_gets_the_run_identity_and_lease(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    child = _script(
        tmp_path,
        f"""
        import os
        names = ["CHRONICLE_EXPERIMENT", "CHRONICLE_VARIATION", "CHRONICLE_RUN",
                 "CHRONICLE_LEASE", "CHRONICLE_HOME"]
        open({str(out)!r}, "w").write("\\n".join(os.environ.get(n, "") for n in names))
        """,
    )
    proc, exp, home = _exec(tmp_path, sys.executable, child)
    assert _finish(proc, tmp_path) == 0
    e, v, r, lease, child_home = out.read_text().split("\n")
    assert (e, v, r) == (exp, "0", "0")
    assert lease and Path(child_home) == home.resolve()


# ----------------------------------------------------------------------- teardown
HANGS_AFTER_BEATING = """
import os, signal, subprocess, sys, time
from chronicle_integrations import Chronicle
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a training that does not even flush
# A grandchild (a DataLoader worker, say) that must go too.
kid = subprocess.Popen([sys.executable, "-c", "import time, signal; "
                        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
open(os.environ["PIDS"], "w").write(f"{os.getpid()} {kid.pid}")
env = os.environ
chronicle = Chronicle()
run = chronicle.run(env["CHRONICLE_EXPERIMENT"], int(env["CHRONICLE_VARIATION"]),
                    int(env["CHRONICLE_RUN"]), lease=env["CHRONICLE_LEASE"])
for _ in range(6):                               # an integration beating for its run ...
    run.heartbeat()
    time.sleep(0.5)
time.sleep(600)                                  # ... then hung: no more beats
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_hung_worker_goes_lost_and_is_torn_down_whole_run_stays_lost(
    tmp_path: Path, target: str | None
) -> None:
    pids = tmp_path / "pids"
    child = _script(tmp_path, HANGS_AFTER_BEATING)
    os.environ["PIDS"] = str(pids)
    try:
        proc, exp, home = _exec(tmp_path, sys.executable, child, url=target, extra=("--grace", "1"))
    finally:
        del os.environ["PIDS"]
    code = _finish(proc, tmp_path, timeout=90)
    assert code == 128 + signal.SIGKILL, (tmp_path / "exec.err").read_text()
    parent, grandchild = map(int, pids.read_text().split())
    testkit.wait_until(
        lambda: not _alive(parent) and not _alive(grandchild), 10, what="the whole tree gone"
    )
    info = _info(home, exp, target)
    assert info.state is RunState.LOST  # teardown never changes the lifecycle
    teardown = [e for e in _events(home, exp, target) if e.kind == "teardown"]
    assert [e.cause for e in teardown] == [
        "teardown_requested",
        "teardown_requested",
        "teardown_done",
    ]
    assert [e.detail["signal"] for e in teardown] == ["SIGTERM", "SIGKILL", "SIGKILL"]
    assert "lost" in teardown[0].detail["why"]


def test_a_cancelled_worker_that_goes_on_is_torn_down_after_the_grace(tmp_path: Path) -> None:
    child = _script(tmp_path, "import time\ntime.sleep(600)\n")
    proc, exp, home = _exec(tmp_path, sys.executable, child, extra=("--grace", "1"))
    testkit.wait_until(lambda: _state(home, exp) is RunState.RUNNING, 30, what="running")
    with Chronicle(home=home, heartbeat_timeout=TIMEOUT) as chronicle:
        chronicle.run(exp, 0, 0).fail("abandoned", "cancelled by the test")
    code = _finish(proc, tmp_path)
    assert code == 128 + signal.SIGTERM  # a plain sleep dies of the SIGTERM
    assert _info(home, exp).state is RunState.FAILED_ABANDONED
    causes = [e.cause for e in _events(home, exp) if e.kind == "teardown"]
    assert causes == ["teardown_requested", "teardown_done"]


def test_no_teardown_while_the_server_is_unreachable(tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(heartbeat_timeout=TIMEOUT)
    done, go = tmp_path / "done", tmp_path / "go"
    child = _script(
        tmp_path,
        f"""
        import os, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        open({str(done)!r}, "w").close()
        """,
    )
    proc, exp, home = _exec(tmp_path, sys.executable, child, url=server.url)
    testkit.wait_until(
        lambda: _state(home, exp, server.url) is RunState.RUNNING, 30, what="running"
    )
    server.stop()  # the store goes away for longer than the heartbeat timeout
    time.sleep(3 * TIMEOUT)
    server.start(port=server.port)  # every run looks lost now
    time.sleep(TIMEOUT / 2)
    go.touch()
    code = _finish(proc, tmp_path, timeout=120)
    assert done.exists(), "the worker must have run to its end"
    assert code == 0
    assert not [e for e in _events(home, exp, server.url) if e.kind == "teardown"]


def test_a_run_taken_over_elsewhere_is_never_torn_down_by_the_old_supervisor(
    tmp_path: Path,
) -> None:
    go = tmp_path / "go"
    child = _script(
        tmp_path, f"import os, time\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\n"
    )
    proc, exp, home = _exec(tmp_path, sys.executable, child, extra=("--grace", "1"))
    testkit.wait_until(lambda: _state(home, exp) is RunState.RUNNING, 30, what="running")
    with Chronicle(home=home, heartbeat_timeout=TIMEOUT) as chronicle:
        # Another worker resumes the run, then goes quiet: the run goes lost under *its* lease.
        chronicle.run(exp, 0, 0).start(resume=True)
        testkit.wait_until(lambda: chronicle.run(exp, 0, 0).state is RunState.LOST, 30, what="lost")
        time.sleep(3 * TIMEOUT)  # several chances for the old supervisor to misfire
        assert proc.poll() is None, "the old supervisor must not tear its command down"
        go.touch()
        assert _finish(proc, tmp_path) == 0
        # ... nor end the new worker's run with its stale lease.
        assert chronicle.run(exp, 0, 0).state is RunState.LOST
        assert not [e for e in chronicle.run(exp, 0, 0).events() if e.kind == "teardown"]


# ----------------------------------------------------------------------- our own signals
def test_sigint_to_the_supervisor_is_an_abandon(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = _script(tmp_path, f"import time\nopen({str(ready)!r}, 'w').close()\ntime.sleep(600)\n")
    proc, exp, home = _exec(tmp_path, sys.executable, child)
    testkit.wait_until(ready.exists, 30, what="the child to start")
    os.kill(proc.pid, signal.SIGINT)
    _finish(proc, tmp_path)
    info = _info(home, exp)
    assert info.state is RunState.FAILED_ABANDONED
    assert "SIGINT" in info.message


def test_sigterm_to_the_supervisor_is_forwarded_and_leaves_the_run_resumable(
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    child = _script(tmp_path, f"import time\nopen({str(ready)!r}, 'w').close()\ntime.sleep(600)\n")
    proc, exp, home = _exec(tmp_path, sys.executable, child)
    testkit.wait_until(ready.exists, 30, what="the child to start")
    os.kill(proc.pid, signal.SIGTERM)
    assert _finish(proc, tmp_path) == 128 + signal.SIGTERM
    assert _info(home, exp).state in (RunState.RUNNING, RunState.LOST)  # not terminal
    # ... and a restarted worker resumes the same run to the end.
    with Chronicle(home=home, heartbeat_timeout=TIMEOUT) as chronicle:
        run = chronicle.run(exp, 0, 0).start(resume=True)
        run.succeed()
        assert run.state is RunState.SUCCEEDED


def test_exec_needs_a_command_after_the_double_dash(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    done = testkit.run(
        [sys.executable, "-m", "chronicle_integrations.cli", "exec", "--experiment", "x"],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--" in done.stderr
