"""Clients learn the watchdog: the store says its ``heartbeat_timeout`` in its answers to
``start`` and ``heartbeat`` (the FastAPI route, the heartbeat fast lane, and the embedded
store alike), and ``keep_alive`` beats at least three times within it, saying once at WARNING
that it was configured to beat slower. Without this, ``chronicle server --heartbeat-timeout
30`` and the default 60 s interval make healthy runs flap ``running -> lost -> running``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from testkit import HttpApi

from chronicle_integrations import Chronicle, RunState

TIMEOUT = 3.0


@pytest.fixture(params=["embedded", "http"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "http":
        server = request.getfixturevalue("server_factory")(heartbeat_timeout=TIMEOUT)
        chronicle = Chronicle(url=server.url, home=tmp_path / "home")
    else:
        chronicle = Chronicle(home=tmp_path / "home", heartbeat_timeout=TIMEOUT)
    try:
        yield chronicle
    finally:
        chronicle.close(timeout=10)


def test_keep_alive_beats_inside_the_servers_watchdog(
    client: Chronicle, caplog: pytest.LogCaptureFixture
) -> None:
    exp = client.create_experiment("watchdog", variations=[{}])
    run = client.create_run(exp, 0).start()
    assert run.heartbeat_timeout == TIMEOUT
    caplog.set_level(logging.WARNING, logger="chronicle_integrations")
    keepalive = run.keep_alive(interval=60)
    states = set()
    until = time.monotonic() + 10  # over three watchdog timeouts
    while time.monotonic() < until:
        states.add(run.state)
        time.sleep(0.25)
    assert states == {RunState.RUNNING}, states
    assert keepalive.interval <= TIMEOUT / 3
    assert keepalive.beats >= 4
    warnings = [r for r in caplog.records if "marks a run lost after" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # said once, not at every beat
    assert warnings[0].levelno == logging.WARNING
    run.succeed()
    edges = [(e.from_state, e.to_state) for e in run.events() if e.kind == "transition"]
    assert ("running", "lost") not in edges, edges


def test_a_short_enough_interval_is_kept_and_not_warned_about(
    client: Chronicle, caplog: pytest.LogCaptureFixture
) -> None:
    exp = client.create_experiment("watchdog", variations=[{}])
    run = client.create_run(exp, 0).start()
    caplog.set_level(logging.WARNING, logger="chronicle_integrations")
    keepalive = run.keep_alive(interval=0.5)
    assert run.heartbeat_timeout == TIMEOUT  # known, and 0.5 s is well inside it
    assert keepalive.interval == 0.5
    run.succeed()
    assert "marks a run lost after" not in caplog.text


def test_start_and_heartbeat_answers_carry_the_timeout(server_factory: Any) -> None:
    """Over raw HTTP: the start route and the heartbeat fast lane (which serves every
    well-formed heartbeat; ``tests/server/test_fastlane.py`` holds the route to the same
    answers). A plain read does not carry it: it is told to the worker."""
    server = server_factory(heartbeat_timeout=TIMEOUT)
    with HttpApi(server.url) as api:
        api.ok(
            "POST",
            "/v1/experiments",
            201,
            json={"name": "w", "variations": [{}], "experiment_id": "watchdog-raw"},
        )
        api.ok("POST", "/v1/experiments/watchdog-raw/variations/0/runs", 201)
        path = "/v1/runs/watchdog-raw/0/0"
        started = api.ok("POST", path + "/start", json={"lease": "lease-raw-0123456789"})
        assert started["heartbeat_timeout"] == TIMEOUT
        fast = api.ok("POST", path + "/heartbeat", json={"lease": "lease-raw-0123456789"})
        assert fast["heartbeat_timeout"] == TIMEOUT
        assert api.ok("GET", path).get("heartbeat_timeout") is None  # only to the worker
