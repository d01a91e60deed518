"""The launcher's watcher and the safety rules it shares with ``chronicle exec``: a real
worker process, a real server subprocess (short heartbeat timeout), the watcher driven round
by round (:meth:`Watcher.tick`) as its thread would."""

from __future__ import annotations

import secrets
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import testkit

from chronicle_integrations import Chronicle, RunState
from chronicle_integrations._teardown import LocalProcess, start_time

pytest.importorskip("hydra")
from hydra_plugins.chronicle_launcher._watch import Watcher

pytestmark = pytest.mark.hydra

TIMEOUT = 2.0
WORKER = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)",
]


@pytest.fixture
def worker() -> Iterator[Any]:
    """A job process that ignores SIGTERM (a hung training)."""
    proc = testkit.spawn(WORKER)
    try:
        yield proc
    finally:
        testkit.reap(proc, signal.SIGKILL, grace=0)


def _managed_run(chronicle: Chronicle, proc: Any) -> tuple[str, str]:
    """A run started under the launcher's lease whose job named itself (the worker)."""
    exp = chronicle.create_experiment("watched", variations=[{}])
    lease = secrets.token_urlsafe(24)
    created = chronicle.create_run(exp, 0)
    run = chronicle.run(exp, 0, created.run, lease=lease).start()
    handle = LocalProcess(LocalProcess.me().host, proc.pid, start_time(proc.pid) or 0, True)
    run.record_event("worker", "worker_started", {**handle.to_dict(), "heartbeat_timeout": TIMEOUT})
    return exp, lease


def _rounds(watcher: Watcher, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        watcher.tick()
        time.sleep(0.1)


def _teardowns(chronicle: Chronicle, exp: str) -> list[Any]:
    return [e for e in chronicle.run(exp, 0, 0).events() if e.kind == "teardown"]


def test_a_lost_job_is_torn_down_sigterm_then_sigkill(server_factory: Any, worker: Any) -> None:
    server = server_factory(heartbeat_timeout=TIMEOUT)
    with Chronicle(url=server.url) as chronicle:
        exp, lease = _managed_run(chronicle, worker)
        watcher = Watcher(chronicle, exp, grace=0.5)
        watcher.watch(0, 0, lease)
        testkit.wait_until(lambda: chronicle.run(exp, 0, 0).state is RunState.LOST, 30)
        _rounds(watcher, 2 * TIMEOUT)
        assert watcher.torn_down == [(0, 0)]
        assert worker.wait(10) == -signal.SIGKILL  # it ignored SIGTERM
        causes = [(e.cause, e.detail["signal"]) for e in _teardowns(chronicle, exp)]
        assert causes == [
            ("teardown_requested", "SIGTERM"),
            ("teardown_requested", "SIGKILL"),
            ("teardown_done", "SIGKILL"),
        ]
        assert chronicle.run(exp, 0, 0).state is RunState.LOST  # the lifecycle is untouched


def test_a_job_whose_run_was_taken_over_is_left_alone(server_factory: Any, worker: Any) -> None:
    server = server_factory(heartbeat_timeout=TIMEOUT)
    with Chronicle(url=server.url) as chronicle:
        exp, lease = _managed_run(chronicle, worker)
        watcher = Watcher(chronicle, exp, grace=0.5)
        watcher.watch(0, 0, lease)
        # Another worker resumes the run (a new lease), then goes quiet: lost under *its* lease.
        chronicle.run(exp, 0, 0).start(resume=True)
        testkit.wait_until(lambda: chronicle.run(exp, 0, 0).state is RunState.LOST, 30)
        _rounds(watcher, 3 * TIMEOUT)
        assert worker.poll() is None, "the old job of a taken-over run must not be touched"
        assert watcher.torn_down == []
        assert _teardowns(chronicle, exp) == []


def test_no_teardown_while_the_server_is_down_nor_right_after(
    server_factory: Any, worker: Any
) -> None:
    server = server_factory(heartbeat_timeout=TIMEOUT)
    with Chronicle(url=server.url, timeout=1.0) as chronicle:
        exp, lease = _managed_run(chronicle, worker)
        watcher = Watcher(chronicle, exp, grace=0.5)
        watcher.watch(0, 0, lease)
        chronicle.run(exp, 0, 0, lease=lease).beat()  # the job is alive ...
        watcher.tick()  # ... and the watcher has seen the store
        server.stop()  # down for longer than the heartbeat timeout
        _rounds(watcher, 2 * TIMEOUT)
        server.start(port=server.port)  # every run looks lost now
        assert chronicle.run(exp, 0, 0).state is RunState.LOST
        _rounds(watcher, TIMEOUT * 0.8)  # within heartbeat_timeout of its return
        assert worker.poll() is None, "no teardown right after the store came back"
        assert watcher.torn_down == []
        # Once it has answered for a whole heartbeat_timeout, lost means lost.
        _rounds(watcher, 2 * TIMEOUT)
        assert watcher.torn_down == [(0, 0)]
