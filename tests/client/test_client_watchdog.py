"""``lost`` and ``failed_lost`` as the client sees them, with a watchdog in seconds.

Embedded: ``Chronicle(heartbeat_timeout=, lost_grace=)``; HTTP: a server started with
``--heartbeat-timeout`` / ``--lost-grace``. Waits poll the store; nothing assumes how long a
sleep really took.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_helpers import transitions, wait_until

from chronicle_integrations import Chronicle, InvalidTransition, Run, RunState
from chronicle_integrations.lifecycle import is_valid_path

TIMEOUT = 1.0


@pytest.fixture(params=["embedded", "http"])
def watched(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chronicle]:
    """A client whose store declares a run lost after 1 s of silence, failed_lost 2 s later."""
    if request.param == "embedded":
        chronicle = Chronicle(home=tmp_path / "home", heartbeat_timeout=TIMEOUT, lost_grace=2.0)
    else:
        factory: Any = request.getfixturevalue("http_server")
        server = factory(heartbeat_timeout=TIMEOUT, lost_grace=2.0)
        chronicle = Chronicle(url=server.url, home=tmp_path / "home")
    try:
        yield chronicle
    finally:
        chronicle.close(timeout=10)


def _lost(chronicle: Chronicle, run: Run) -> Run:
    wait_until(
        lambda: run.state is RunState.LOST, timeout=30, interval=0.1, what="the run to be lost"
    )
    return run


def test_silent_run_is_lost_and_a_heartbeat_recovers_it(watched: Chronicle) -> None:
    exp = watched.create_experiment("watchdog", variations=[{}])
    run = watched.create_run(exp, 0).start()
    _lost(watched, run)
    assert [i.run for i in watched.runs(exp, state="lost")] == [run.run]
    assert not run.state.is_terminal
    run.heartbeat()
    assert run.state is RunState.RUNNING
    assert watched.runs(exp, state="lost") == []
    edges = transitions(run)
    assert ("running", "lost") in edges and ("lost", "running") in edges
    assert is_valid_path(edges)
    run.succeed()


def test_lost_run_may_still_succeed(watched: Chronicle) -> None:
    exp = watched.create_experiment("watchdog", variations=[{}])
    run = _lost(watched, watched.create_run(exp, 0).start())
    run.succeed()
    assert run.state is RunState.SUCCEEDED
    assert is_valid_path(transitions(run))
    assert transitions(run)[-1] == ("lost", "succeeded")


def test_expired_run_refuses_heartbeats_and_cancels_keep_alive(watched: Chronicle) -> None:
    exp = watched.create_experiment("watchdog", variations=[{}])
    run = watched.create_run(exp, 0).start()
    wait_until(
        lambda: run.state is RunState.FAILED_LOST,
        timeout=30,
        interval=0.1,
        what="the run to expire",
    )
    info = run.info()
    assert info.state.is_terminal and info.reason == "lost"
    with pytest.raises(InvalidTransition) as caught:
        run.heartbeat()
    assert caught.value.state == "failed_lost"
    with pytest.raises(InvalidTransition):
        run.succeed()
    assert is_valid_path(transitions(run))
    assert transitions(run)[-2:] == [("running", "lost"), ("lost", "failed_lost")]

    reasons: list[str] = []
    keepalive = run.keep_alive(interval=0.2, on_cancel=lambda r, why: reasons.append(why))
    assert run.cancelled.wait(30)
    wait_until(lambda: reasons and not keepalive.alive, timeout=10, what="on_cancel")
    assert "failed_lost" in reasons[0]


def test_keep_alive_prevents_loss(watched: Chronicle) -> None:
    exp = watched.create_experiment("watchdog", variations=[{}])
    run = watched.create_run(exp, 0).start()
    keepalive = run.keep_alive(interval=0.2)
    first = wait_until(lambda: run.info().last_heartbeat_at, what="a first heartbeat")
    # keep watching for well past the timeout (judged by the store's own clock)
    wait_until(
        lambda: (run.info().last_heartbeat_at or 0) > first + 3 * TIMEOUT,
        timeout=60,
        what="heartbeats over three timeouts",
    )
    assert run.state is RunState.RUNNING
    assert ("running", "lost") not in transitions(run)
    assert keepalive.alive
    run.succeed()
