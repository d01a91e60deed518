"""Heartbeats: the seed's hand-written loop, and ``run.keep_alive()`` with cancellation."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import testkit
from client_helpers import transitions, wait_until

import chronicle_integrations
from chronicle_integrations import Chronicle, KeepAlive, Run, RunState
from chronicle_integrations.lifecycle import is_valid_path

HAS_CLI = (Path(chronicle_integrations.__file__).parent / "cli" / "__init__.py").exists()


def _beat_at(run: Run) -> float | None:
    return run.info().last_heartbeat_at


def _advances(run: Run, after: float | None, timeout: float = 30.0) -> float:
    """Wait until the store's last_heartbeat_at is later than ``after``."""
    return wait_until(
        lambda: (t := _beat_at(run)) is not None and (after is None or t > after) and t,
        timeout=timeout,
        what="last_heartbeat_at to advance",
    )


def test_seed_heartbeat_loop_verbatim(chronicle: Chronicle, experiment: str) -> None:
    """The loop users wrote before keep_alive existed must keep working unchanged."""
    run = chronicle.create_run(experiment, 0)
    run.start()

    stop = threading.Event()
    errors: list[BaseException] = []

    def heartbeat_loop() -> None:
        while not stop.is_set():
            try:
                run.heartbeat()
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)
                return
            stop.wait(0.2)

    thread = threading.Thread(target=heartbeat_loop, daemon=True)
    thread.start()
    first = _advances(run, None)
    # the main thread works meanwhile (and talks to the store concurrently)
    total = 0
    for step in range(20):
        total += sum(i * i for i in range(20_000))
        if step % 5 == 0:
            run.info()
    _advances(run, first)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert not errors, errors
    run.succeed()
    assert run.state is RunState.SUCCEEDED
    assert is_valid_path(transitions(run))


def test_keep_alive_beats_and_stops_on_succeed(chronicle: Chronicle, run: Run) -> None:
    run.start()
    assert run.info().last_heartbeat_at is None
    keepalive = run.keep_alive(interval=0.2)
    assert isinstance(keepalive, KeepAlive) and keepalive.alive
    assert run.keep_alive(interval=0.2) is keepalive  # one per run
    first = _advances(run, None)
    second = _advances(run, first)
    assert second > first
    run.succeed()
    wait_until(lambda: not keepalive.alive, timeout=10, what="keep-alive to stop")
    assert run.state is RunState.SUCCEEDED
    assert not run.cancelled.is_set()
    assert keepalive.beats >= 2


def test_keep_alive_context_manager_and_stop(chronicle: Chronicle, run: Run) -> None:
    run.start()
    with run.keep_alive(interval=0.2) as keepalive:
        _advances(run, None)
    assert not keepalive.alive
    stopped_at = _beat_at(run)
    time.sleep(0.6)  # three intervals: a stopped loop must not beat again
    assert _beat_at(run) == stopped_at
    assert run.state is RunState.RUNNING  # stopping heartbeats does not end the run
    run.keep_alive(interval=0.2)  # a new loop can start after the old one stopped
    _advances(run, stopped_at)
    run.stop_keep_alive()
    run.succeed()


def test_own_succeed_never_marks_the_run_cancelled(chronicle: Chronicle, experiment: str) -> None:
    """A worker's own succeed() racing its keep-alive must not look like a cancellation."""
    calls: list[str] = []
    for _ in range(15):
        run = chronicle.create_run(experiment, 1).start()
        run.keep_alive(interval=0.001, on_cancel=lambda r, why: calls.append(why))
        _advances(run, None)
        run.succeed()
        time.sleep(0.05)
        assert not run.cancelled.is_set(), run.cancel_reason
    assert calls == []


def test_cancel_from_another_client_is_seen(backend, chronicle: Chronicle, run: Run) -> None:
    run.start()
    seen: list[tuple[Run, str]] = []
    called = threading.Event()

    def on_cancel(r: Run, why: str) -> None:
        seen.append((r, why))
        called.set()

    keepalive = run.keep_alive(interval=0.3, on_cancel=on_cancel)
    _advances(run, None)
    assert not run.cancelled.is_set()

    operator = backend.connect()
    operator.run(run.experiment_id, run.variation, run.run).fail("abandoned", "stop it")
    assert run.cancelled.wait(30), "the keep-alive did not notice the cancellation"
    assert called.wait(10)
    assert len(seen) == 1 and seen[0][0] is run
    assert "failed_abandoned" in seen[0][1]
    assert run.cancel_reason == seen[0][1]
    wait_until(lambda: not keepalive.alive, timeout=10, what="keep-alive to stop")
    assert run.state is RunState.FAILED_ABANDONED


@pytest.mark.skipif(not HAS_CLI, reason="chronicle_integrations/cli/ does not exist yet")
def test_cancel_from_the_cli_is_seen(
    backend, chronicle: Chronicle, run: Run, tmp_path: Path
) -> None:
    run.start()
    run.keep_alive(interval=0.3)
    _advances(run, None)
    env = dict(os.environ)
    env.pop("CHRONICLE_URL", None)
    if backend.kind == "embedded":
        env["CHRONICLE_HOME"] = str(backend.home)
    else:
        env["CHRONICLE_URL"] = backend.server.url
        env["CHRONICLE_HOME"] = str(tmp_path / "cli-home")
    proc = testkit.run(
        [sys.executable, "-m", "chronicle_integrations.cli", "cancel", run.key],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert run.cancelled.wait(30)
    assert run.state is RunState.FAILED_ABANDONED


def test_takeover_sets_cancelled(backend, chronicle: Chronicle, run: Run) -> None:
    run.start()
    reasons: list[str] = []
    keepalive = run.keep_alive(interval=0.3, on_cancel=lambda r, why: reasons.append(why))
    _advances(run, None)
    newcomer = backend.connect().run(run.experiment_id, run.variation, run.run)
    newcomer.start(resume=True)
    assert run.cancelled.wait(30), "the keep-alive did not notice the takeover"
    wait_until(lambda: reasons, timeout=10, what="on_cancel")
    assert "lease" in reasons[0] or "taken over" in reasons[0]
    wait_until(lambda: not keepalive.alive, timeout=10, what="keep-alive to stop")
    # the new holder is unaffected and finishes the run
    newcomer.heartbeat().succeed()
    assert run.state is RunState.SUCCEEDED


def test_with_block_stops_inside_when_cancelled(backend, chronicle: Chronicle, run: Run) -> None:
    """The training loop can watch run.cancelled; the block then ends without succeeding."""
    from chronicle_integrations import InvalidTransition

    noticed = False
    with pytest.raises(InvalidTransition) as caught, run.start():
        # swap the block's 60 s loop for a fast one (keep_alive() returns a running loop)
        run.stop_keep_alive()
        run.keep_alive(interval=0.2)
        backend.connect().run(run.experiment_id, 0, 0).fail("abandoned")
        noticed = run.cancelled.wait(30)
    assert noticed, "the block's keep-alive did not notice the cancellation"
    assert caught.value.state == "failed_abandoned"  # succeed() at the end was refused
    assert run.state is RunState.FAILED_ABANDONED


def test_keep_alive_rejects_bad_interval(chronicle: Chronicle, run: Run) -> None:
    run.start()
    with pytest.raises(ValueError):
        run.keep_alive(interval=0)


def test_close_stops_heartbeats_without_ending_the_run(backend, run: Run) -> None:
    worker = backend.connect()
    mine = worker.run(run.experiment_id, run.variation, run.run).start()
    keepalive = mine.keep_alive(interval=0.2)
    _advances(mine, None)
    worker.close()
    wait_until(lambda: not keepalive.alive, timeout=10, what="the keep-alive to stop")
    assert run.state is RunState.RUNNING  # left to be resumed (or lost), not ended


def test_beat_is_one_heartbeat_answered_with_the_run(chronicle: Chronicle, run: Run) -> None:
    """``Run.beat()``, the single beat the heartbeat loop and ``chronicle exec``'s supervisor
    use, sends the run's progress and answers with the run as the store now holds it; and
    ``mark_cancelled`` is how the loop says the run is no longer this worker's."""
    run.start()
    run.progress.update(step=7)
    info = run.beat()
    assert info.state is RunState.RUNNING
    assert info.last_heartbeat_at is not None
    assert run.info().progress == {"step": 7}
    assert not run.cancelled.is_set()
    run.mark_cancelled("failed_abandoned on the server")
    assert run.cancelled.is_set() and run.cancel_reason == "failed_abandoned on the server"
    run.succeed()
