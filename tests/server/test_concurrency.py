"""Races through HTTP from several processes: one lease per run, distinct run numbers, and many
concurrent heartbeats served."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Any

import requests
from server_helpers import Api

WORKERS = 8


def _start_worker(url: str, path: str, body: dict[str, Any], barrier: Any, results: Any) -> None:
    """One worker process: wait for the others, then start the run once."""
    with requests.Session() as session:
        session.get(f"{url}/v1/health", timeout=30)  # connect before the barrier
        barrier.wait(timeout=60)
        resp = session.post(f"{url}{path}/start", json=body, timeout=60)
        results.put((resp.status_code, resp.json()))


def _create_runs_worker(
    url: str, experiment_id: str, count: int, barrier: Any, results: Any
) -> None:
    numbers = []
    with requests.Session() as session:
        session.get(f"{url}/v1/health", timeout=30)
        barrier.wait(timeout=60)
        for _ in range(count):
            resp = session.post(
                f"{url}/v1/experiments/{experiment_id}/variations/0/runs", timeout=60
            )
            numbers.append((resp.status_code, resp.json().get("run")))
    results.put(numbers)


def _race(target: Any, args_for: Any, n: int) -> list[Any]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(i), barrier, results)) for i in range(n)]
    for proc in procs:
        proc.start()
    out = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return out


def test_concurrent_start_gives_exactly_one_lease(api: Api, server: Any) -> None:
    path = api.run()
    results = _race(_start_worker, lambda i: (server.url, path, {"holder": f"w{i}"}), WORKERS)
    winners = [body for status, body in results if status == 200]
    losers = [body for status, body in results if status != 200]
    assert len(winners) == 1, results
    assert all(status in (200, 409) for status, _ in results), results
    assert all(b["error"]["code"] == "invalid_transition" for b in losers), losers
    lease = winners[0]["lease"]
    info = api.ok("GET", path)
    assert info["state"] == "running" and info["lease_holder"] == winners[0]["lease_holder"]
    api.ok("POST", f"{path}/heartbeat", json={"lease": lease})
    starts = [e for e in api.ok("GET", f"{path}/events")["events"] if e["cause"] == "start"]
    assert len(starts) == 1


def test_concurrent_resume_leaves_exactly_one_valid_lease(api: Api, server: Any) -> None:
    path, first = api.started()
    results = _race(
        _start_worker, lambda i: (server.url, path, {"resume": True, "holder": f"r{i}"}), WORKERS
    )
    assert all(status == 200 for status, _ in results), results  # each takes it over in turn
    leases = [body["lease"] for _, body in results] + [first]
    assert len(set(leases)) == len(leases)
    valid = [
        lease
        for lease in leases
        if api.post(f"{path}/heartbeat", json={"lease": lease}).status_code == 200
    ]
    assert len(valid) == 1
    assert api.ok("GET", path)["lease_holder"] == next(
        body["lease_holder"] for _, body in results if body["lease"] == valid[0]
    )


def test_concurrent_create_run_gives_distinct_numbers(api: Api, server: Any) -> None:
    eid = api.experiment(1)
    per_worker = 5
    results = _race(_create_runs_worker, lambda i: (server.url, eid, per_worker), 6)
    numbers = [number for batch in results for status, number in batch if status == 201]
    assert len(numbers) == 6 * per_worker, results
    assert sorted(numbers) == list(range(6 * per_worker))
    runs = api.ok("GET", "/v1/runs", params={"experiment_id": eid})["runs"]
    assert sorted(r["run"] for r in runs) == list(range(6 * per_worker))


def test_many_concurrent_heartbeats(api: Api, server: Any) -> None:
    eid = api.experiment(1)
    runs = [api.started(eid) for _ in range(20)]

    def beat(item: tuple[str, str]) -> list[int]:
        path, lease = item
        with requests.Session() as session:
            return [
                session.post(
                    f"{server.url}{path}/heartbeat", json={"lease": lease}, timeout=60
                ).status_code
                for _ in range(10)
            ]

    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        statuses = [s for batch in pool.map(beat, runs) for s in batch]
    assert statuses == [200] * len(runs) * 10
    assert all(api.state(path) == "running" for path, _ in runs)
