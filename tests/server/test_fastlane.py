"""The heartbeat fast lane (``server/fastlane.py``) against the FastAPI route it shortcuts.

Two real uvicorn servers on random loopback ports serve one real store: one with the lane,
one without (``create_app(heartbeat_lane=False)``: every heartbeat through the route). Twin
runs get the same requests, well-formed and malformed, and must get the same answers; then
many concurrent clients beat through the lane (group-committed batches) and each must get
its own run's record.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import uvicorn

from chronicle_integrations.lifecycle import RunState, is_valid_path
from chronicle_integrations.server import create_app
from chronicle_integrations.store import Store

TIMEOUT = 3.0  # seconds of silence before a run is lost (for the lost -> running case)


class _Served:
    """``create_app(store, ...)`` under uvicorn on a thread, on a random loopback port."""

    def __init__(self, store: Store, **options: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(store, sweep_interval=3600, **options)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture
def store(store_url: str, tmp_path) -> Iterator[Store]:
    s = Store.open(store_url, tmp_path / "assets", heartbeat_timeout=TIMEOUT)
    yield s
    s.close()


@pytest.fixture
def servers(store: Store) -> Iterator[tuple[_Served, _Served]]:
    lane, route = _Served(store), _Served(store, heartbeat_lane=False)
    yield lane, route
    lane.stop()
    route.stop()


def _twin_runs(store: Store) -> dict[str, tuple[str, int, int, str | None]]:
    """One run per situation a heartbeat can meet: name -> (experiment, variation, run, lease)."""
    exp = store.create_experiment("lane", [{}, {}]).experiment_id
    runs: dict[str, tuple[str, int, int, str | None]] = {}
    for name in ("live", "live2", "lost", "succeeded", "pending", "cancelled"):
        number = store.create_run(exp, 0).run
        lease = None
        if name != "pending" and name != "cancelled":
            lease = store.start(exp, 0, number).lease
        runs[name] = (exp, 0, number, lease)
    store.succeed(*runs["succeeded"])
    store.fail(*runs["cancelled"][:3], "abandoned")
    return runs


def _cases(runs: dict[str, tuple[str, int, int, str | None]]) -> list[tuple[str, bytes, dict]]:
    """(path, body, headers): well-formed heartbeats and everything the lane must decline."""

    def path(name: str, variation: Any = None, run: Any = None) -> str:
        e, v, r, _ = runs[name]
        return (
            f"/v1/runs/{e}/{v if variation is None else variation}/"
            f"{r if run is None else run}/heartbeat"
        )

    def body(value: Any) -> bytes:
        return json.dumps(value).encode()

    js = {"Content-Type": "application/json"}
    lease = runs["live"][3]
    return [
        (path("live"), body({"lease": lease, "progress": {"step": 1, "epoch": 0}}), js),
        (path("live"), body({"lease": lease, "progress": {"step": 1, "epoch": 0}}), js),
        (path("live"), body({"lease": lease}), js),
        (path("live"), body({"lease": lease, "progress": None, "extra": 1}), js),
        (
            path("live"),
            body({"lease": lease, "progress": {"step": 2}}),
            {"Content-Type": "application/json; charset=utf-8"},
        ),
        (
            path("live"),
            body({"lease": lease, "progress": {"step": 3}}),
            {"Content-Type": "text/plain"},
        ),
        (path("live"), body({"lease": lease, "progress": {"step": 4}}), {}),
        (path("live"), b"", {}),
        (path("live"), b"", js),
        (path("live"), b"   ", js),
        (path("live"), body({"lease": 5}), js),
        (path("live"), body({"lease": None}), js),
        (path("live"), body({"lease": "not-the-lease"}), js),
        (path("live"), body({"lease": lease, "progress": [1, 2]}), js),
        (path("live"), body({"lease": lease, "progress": {"step": [1]}}), js),
        (path("live"), body({"lease": lease, "progress": {f"k{i}": i for i in range(40)}}), js),
        (
            path("live"),
            body({"lease": lease, "progress": {"step": 1e400}}).replace(b"Infinity", b"1e400"),
            js,
        ),
        (path("live", variation="007"), body({"lease": lease}), js),
        (path("live", variation=2**31), body({"lease": lease}), js),
        (path("live", run=10**20), body({"lease": lease}), js),
        (path("live", run=99), body({"lease": lease}), js),
        (path("live2"), body({"lease": runs["live2"][3], "progress": {"step": 9}}), js),
        (path("succeeded"), body({"lease": runs["succeeded"][3]}), js),
        (path("cancelled"), body({"lease": "any-lease-123"}), js),
        (path("pending"), body({"lease": "any-lease-123"}), js),
        (path("pending"), b"", {}),
        ("/v1/runs/bad%20id/0/0/heartbeat", body({"lease": lease}), js),
        (f"/v1/runs/{runs['live'][0]}/0/0/heartbeat/", body({"lease": lease}), js),
        # Metrics ride on heartbeats (lane and route alike), refused whole when invalid.
        (path("live"), body({"lease": lease, "metrics": {"val/loss": 0.5, "acc": "NaN"}}), js),
        (
            path("live"),
            body({"lease": lease, "metrics": {"val/loss": {"last": 0.25, "step": 9}}}),
            js,
        ),
        (path("live"), body({"lease": lease, "metrics": {"a/../b": 1.0}}), js),
        (path("live"), body({"lease": lease, "metrics": {"x": "fast"}}), js),
        (path("live"), body({"lease": lease, "metrics": {f"m{i}": 1 for i in range(65)}}), js),
        (path("live"), body({"lease": lease, "metrics": [1]}), js),
        (
            path("live"),
            body(
                {
                    "lease": lease,
                    "checkpoints": {"a.ckpt": {"metric": "val/loss", "value": 0.25}},
                }
            ),
            js,
        ),
        (path("live2"), body({"lease": "not-the-lease", "metrics": {"val/loss": 0.1}}), js),
        (path("lost"), body({"lease": runs["lost"][3]}), js),  # lost -> running
    ]


def _normalised(resp: requests.Response, runs: dict[str, tuple]) -> tuple[int, Any]:
    """Status and body, without what differs between twins (their identity and times)."""
    try:
        data: Any = resp.json()
    except ValueError:
        return resp.status_code, resp.text
    if "error" in data:
        message = data["error"].get("message", "")
        for e, _, _, lease in runs.values():
            message = message.replace(e, "E").replace(str(lease), "L")
        data["error"]["message"] = message
        data["error"].pop("experiment_id", None)
        return resp.status_code, data
    for key in (
        "experiment_id",
        "created_at",
        "started_at",
        "last_heartbeat_at",
        "progress_at",
        "ended_at",
        "lease_holder",
    ):
        data.pop(key, None)
    return resp.status_code, data


def test_lane_answers_exactly_as_the_route(store: Store, servers: tuple[_Served, _Served]) -> None:
    lane, route = servers
    twins = [_twin_runs(store), _twin_runs(store)]
    for run in (twins[0]["lost"], twins[1]["lost"]):
        store.heartbeat(*run)
    # Let both "lost" runs go silent past the timeout, then bring them back via each server.
    time.sleep(TIMEOUT + 0.5)
    for twin in twins:
        for name in ("live", "live2"):
            store.heartbeat(*twin[name])
    answers = []
    for served, runs in zip((lane, route), twins, strict=True):
        with requests.Session() as http:
            got = []
            for path, body, headers in _cases(runs):
                resp = http.post(served.url + path, data=body, headers=headers, timeout=30)
                got.append(_normalised(resp, runs))
            answers.append(got)
    assert answers[0] == answers[1]
    statuses = {status for status, _ in answers[0]}
    assert statuses >= {200, 400, 404, 409}
    for runs in twins:
        metrics = store.get_run(*runs["live"][:3]).metrics
        assert set(metrics) == {"val/loss", "acc"} and metrics["val/loss"]["last_step"] == 9
        assert store.get_run(*runs["live2"][:3]).metrics is None
    # The lane did the happy path: the lost run is running again, through the exact path.
    lost = twins[0]["lost"]
    assert store.get_run(*lost[:3]).state is RunState.RUNNING
    edges = [(e.from_state, e.to_state) for e in store.events(*lost[:3]) if e.kind == "transition"]
    assert edges[-2:] == [("running", "lost"), ("lost", "running")]
    assert is_valid_path(edges)


def test_concurrent_heartbeats_each_get_their_own_record(
    store: Store, servers: tuple[_Served, _Served]
) -> None:
    lane, _ = servers
    exp = store.create_experiment("many", [{}]).experiment_id
    runs = []
    for _ in range(48):
        number = store.create_run(exp, 0).run
        runs.append((number, store.start(exp, 0, number).lease))
    asset_run, asset_lease = runs[0]
    import hashlib
    import io

    store.put_asset(
        exp,
        0,
        asset_run,
        "x.bin",
        io.BytesIO(b"x"),
        hashlib.sha256(b"x").hexdigest(),
        lease=asset_lease,
    )

    def beat(item: tuple[int, str]) -> list[tuple[int, int, int]]:
        number, lease = item
        out = []
        with requests.Session() as http:
            for step in range(25):
                resp = http.post(
                    f"{lane.url}/v1/runs/{exp}/0/{number}/heartbeat",
                    json={"lease": lease, "progress": {"step": step}},
                    timeout=60,
                )
                assert resp.status_code == 200, resp.text
                data = resp.json()
                out.append((data["run"], data["progress"]["step"], data["asset_count"]))
        return out

    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(beat, runs))
    for (number, _), answers in zip(runs, results, strict=True):
        assert answers == [(number, step, 1 if number == asset_run else 0) for step in range(25)]
        info = store.get_run(exp, 0, number)
        assert info.state is RunState.RUNNING and info.progress == {"step": 24}
    # A stale lease in the middle of the crowd is refused alone.
    resp = requests.post(
        f"{lane.url}/v1/runs/{exp}/0/{runs[1][0]}/heartbeat",
        json={"lease": "stale-lease-123"},
        timeout=30,
    )
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "lease_conflict"
