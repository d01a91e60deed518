"""Honest liveness with the bare client: heartbeats carry progress and pause when it stops."""

from __future__ import annotations

import time

import pytest

from chronicle_integrations import Chronicle, RunState


def wait_for(predicate, timeout: float = 30.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


@pytest.fixture
def chronicle(tmp_path):
    with Chronicle(home=tmp_path / "home", heartbeat_timeout=1.5) as client:
        yield client


def test_progress_travels_with_heartbeats(chronicle: Chronicle) -> None:
    exp = chronicle.create_experiment("liveness", [{}])
    run = chronicle.create_run(exp, 0).start()
    run.progress.update(step=7, epoch=1)
    run.heartbeat()
    assert run.info().progress == {"step": 7, "epoch": 1}
    run.heartbeat(progress={"step": 8})
    assert run.info().progress == {"step": 8}
    run.succeed()


def test_stalled_training_stops_heartbeats_and_goes_lost_then_recovers(
        chronicle: Chronicle) -> None:
    exp = chronicle.create_experiment("liveness", [{}])
    run = chronicle.create_run(exp, 0).start()
    keepalive = run.keep_alive(interval=0.2, stall_timeout=1.0)
    # Training advances: the run stays running.
    for step in range(15):
        run.progress.update(step=step)
        time.sleep(0.1)
    assert run.state is RunState.RUNNING
    assert not keepalive.stalled
    # Training hangs (the process is alive, the heartbeat thread too): beats pause, and the
    # watchdog (1.5 s) moves the run to lost.
    wait_for(lambda: keepalive.stalled)
    wait_for(lambda: run.state is RunState.LOST)
    assert keepalive.alive
    # Progress resumes: so do the heartbeats, lost -> running.
    run.progress.update(step=100)
    wait_for(lambda: run.state is RunState.RUNNING)
    edges = [(e.from_state, e.to_state) for e in run.events() if e.kind == "transition"]
    assert ("running", "lost") in edges and ("lost", "running") in edges
    run.succeed()
    assert not keepalive.alive


def test_without_stall_timeout_a_hung_loop_keeps_beating(chronicle: Chronicle) -> None:
    # The bare client's default: heartbeats prove the process exists, nothing more.
    exp = chronicle.create_experiment("liveness", [{}])
    run = chronicle.create_run(exp, 0).start()
    keepalive = run.keep_alive(interval=0.2)
    first = wait_for(lambda: keepalive.beats >= 1 and keepalive.beats)
    wait_for(lambda: keepalive.beats >= first + 10)
    assert run.state is RunState.RUNNING
    run.succeed()
