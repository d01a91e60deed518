"""Honest liveness with the bare client: heartbeats carry progress and pause when it stops."""

from __future__ import annotations

import time

import pytest
import testkit

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


def test_the_final_progress_goes_with_the_terminal_transition(chronicle: Chronicle) -> None:
    """``succeed()`` / ``fail()`` send the latest ``run.progress`` (or the one given); invalid
    progress is dropped with a WARNING rather than getting the transition refused."""
    exp = chronicle.create_experiment("liveness", [{}])
    run = chronicle.create_run(exp, 0).start()
    run.progress.update(step=7, epoch=1)
    assert run.succeed().info().progress == {"step": 7, "epoch": 1}
    run = chronicle.create_run(exp, 0).start()
    run.fail("crash", "boom", progress={"step": 2})
    assert run.info().progress == {"step": 2}
    run = chronicle.create_run(exp, 0).start()
    run.progress.update(step=float("nan"))
    assert run.succeed().info().state is RunState.SUCCEEDED
    assert run.info().progress is None


def test_progress_advance_is_update_of_step_and_epoch() -> None:
    from chronicle_integrations.client._heartbeat import Progress

    progress = Progress()
    progress.update(loss=0.5)
    before = progress.advanced_at
    time.sleep(0.01)
    progress.advance(3, 1)
    assert progress.snapshot() == {"loss": 0.5, "step": 3, "epoch": 1}
    moved = progress.advanced_at
    assert moved > before
    time.sleep(0.01)
    progress.advance(3, 1)  # the same values again: not progress
    assert progress.advanced_at == moved
    progress.advance(4, 1)
    assert progress.snapshot()["step"] == 4 and progress.advanced_at > moved


def test_stalled_training_stops_heartbeats_and_goes_lost_then_recovers(
    chronicle: Chronicle,
) -> None:
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


def test_two_handles_on_one_run_share_one_loop(chronicle: Chronicle, tmp_path) -> None:
    # A launcher beats for its job's run (no progress probe); a callback inside the job adopts
    # the run with the launcher's lease and reports progress. One hung loop must stop the only
    # heartbeats the run has, and a cancellation must reach both.
    exp = chronicle.create_experiment("liveness", [{}])
    launcher = chronicle.create_run(exp, 0).start()
    outer = launcher.keep_alive(interval=0.2)
    with Chronicle(home=tmp_path / "home", heartbeat_timeout=1.5) as inner_client:
        inner = inner_client.run(*launcher.key_tuple, lease=launcher.lease)
        reasons = []
        joined = inner.keep_alive(
            interval=0.2, stall_timeout=1.0, on_cancel=lambda run, why: reasons.append(why)
        )
        assert joined is outer and inner.progress is launcher.progress
        wait_for(lambda: launcher.state is RunState.LOST)  # no progress: beats paused
        inner.progress.update(step=1)
        wait_for(lambda: launcher.state is RunState.RUNNING)
        inner.stop_keep_alive()  # the callback leaves: the launcher's loop goes on, unprobed
        assert outer.alive and outer.stall_timeout is None
        chronicle.run(*launcher.key_tuple).fail("abandoned")
        wait_for(lambda: launcher.cancelled.is_set())
        assert not reasons  # it left before the cancellation


def test_progress_is_visible_with_chronicle_show_json_during_a_run(chronicle: Chronicle) -> None:
    import json
    import os
    import sys

    exp = chronicle.create_experiment("liveness", [{}])
    run = chronicle.create_run(exp, 0).start()
    run.keep_alive(interval=0.2)
    run.progress.update(step=42, epoch=2)
    wait_for(lambda: (run.info().progress or {}).get("step") == 42)
    env = dict(os.environ, CHRONICLE_HOME=str(chronicle.home))
    env.pop("CHRONICLE_URL", None)
    shown = testkit.run(
        [sys.executable, "-m", "chronicle_integrations.cli", "show", run.key, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(shown.stdout)
    assert data["state"] == "running"
    assert data["progress"] == {"step": 42, "epoch": 2}
    assert data["stalled"] is False and data["progress_at"] is not None
    assert "lease" not in data
    run.succeed()
