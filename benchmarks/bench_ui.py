"""The web view's server time with 10,000 runs in one experiment (goal: <= 200 ms a page).

A fresh store (SQLite, and PostgreSQL unless ``--no-postgres``) gets one experiment of
``--variations`` x ``--runs-per-variation`` runs in a realistic mix of states (bulk INSERT:
succeeded, failed with a traceback, running with fresh heartbeats and progress, lost,
pending), plus 50 small experiments for the front page. Then each page is rendered
``--repeat`` times through the real app (``create_app``, the request guard included) in
process, so the time is the server's: routing, the store's queries, templating. Pages:

* ``/ui`` (50 experiments, counts per state of each: one grouped query over their runs);
* ``/ui/experiments/E`` (first page of 200 runs, the counts of all 10,000, the configs);
* the same with a state filter matching 1 % of the runs (a scan of the experiment's runs);
* a deep page (``?cursor=`` of page 25: a keyset seek, not an OFFSET);
* ``/ui/runs/E/V/R`` of a run with 200 events and 50 assets.

Usage::

    python benchmarks/bench_ui.py [--variations 100] [--runs-per-variation 100] [--repeat 30]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import save, scratch_postgres, stats

GOAL_MS = 200.0


def seed(store: Any, variations: int, per_variation: int) -> str:
    """The big experiment (returns its id) and 50 small ones."""
    from chronicle_integrations.store import schema as t

    now = store.clock()
    eid = "bench-ui-big"
    store.create_experiment(
        "big sweep",
        [{"lr": 10 ** -(v % 5), "seed": v, "opt": "adam"} for v in range(variations)],
        eid,
    )
    message = "Traceback (most recent call last):\n" + '  File "train.py", line 1\n' * 40
    rows = []
    for v in range(variations):
        for r in range(per_variation):
            kind = (v * per_variation + r) % 100
            row: dict[str, Any] = {
                "experiment_id": eid,
                "variation": v,
                "run": r,
                "created_at": now - 3600,
                "state": "succeeded",
                "started_at": now - 3500,
                "alive_at": now - 100,
                "last_heartbeat_at": now - 100,
                "ended_at": now - 100,
                "progress": json.dumps({"step": 1000, "epoch": 9}),
                "progress_at": now - 100,
                "reason": None,
                "message": None,
            }
            if kind < 10:
                row.update(state="failed_crash", reason="crash", message=message)
            elif kind < 20:
                row.update(state="running", ended_at=None, alive_at=now, last_heartbeat_at=now)
            elif kind < 21:  # 1 %: silent for an hour, so effectively lost
                row.update(state="running", ended_at=None, alive_at=now - 3600)
            elif kind < 25:
                row.update(
                    state="pending",
                    started_at=None,
                    alive_at=None,
                    last_heartbeat_at=None,
                    ended_at=None,
                    progress=None,
                    progress_at=None,
                )
            rows.append(row)
    with store.engine.begin() as conn:
        conn.execute(t.runs.insert(), rows)
        conn.execute(
            t.variations.update()
            .where(t.variations.c.experiment_id == eid)
            .values(next_run=per_variation)
        )
    for i in range(50):
        small = f"bench-ui-small-{i:02d}"
        store.create_experiment(f"small {i}", [{"i": i}], small)
        store.create_run(small, 0)
    # one run with a long story: 150 upload events (beats do not log; uploads do)
    run = store.create_run(eid, 0)
    lease = store.start(eid, 0, run.run).lease
    data = b"x" * 1024
    digest = hashlib.sha256(data).hexdigest()
    for n in range(50):
        name = f"ckpt/step-{n:03d}.pt"
        for _ in range(3):  # re-uploads: each one is an event
            store.put_asset(eid, 0, run.run, name, io.BytesIO(data), digest, lease=lease)
    for _ in range(24):  # a worker that keeps going quiet and coming back
        store.heartbeat(eid, 0, run.run, lease=lease)
    return eid


def measure(client: Any, path: str, repeat: int) -> dict[str, Any]:
    client.get(path)  # warm (templates compiled, connections pooled)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        resp = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    result = stats(times)
    result["bytes"] = len(resp.content)
    result["runs_on_page"] = len(re.findall(r"data-run=", resp.text))
    return result


def run_backend(url: str, assets: Path, args: argparse.Namespace) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from chronicle_integrations.server import create_app
    from chronicle_integrations.store import Store

    store = Store.open(url, assets)
    try:
        started = time.perf_counter()
        eid = seed(store, args.variations, args.runs_per_variation)
        seeded = time.perf_counter() - started
        app = create_app(store)
        out: dict[str, Any] = {"runs": args.variations * args.runs_per_variation, "seed_s": seeded}
        with TestClient(app, base_url="http://127.0.0.1") as client:
            # page 25's cursor, taken from the page chain itself
            path = f"/ui/experiments/{eid}"
            for _ in range(24):
                nxt = re.search(r'<a href="([^"]+)" rel="next">', client.get(path).text)
                assert nxt
                path = nxt.group(1).replace("&amp;", "&")
            deep = path
            run_key = f"{eid}/0/{args.runs_per_variation}"
            pages = {
                "experiments": "/ui",
                "experiment": f"/ui/experiments/{eid}",
                "experiment_lost_filter": f"/ui/experiments/{eid}?state=lost",
                "experiment_page_25": deep,
                "run": f"/ui/runs/{run_key}",
            }
            for name, page in pages.items():
                out[name] = measure(client, page, args.repeat)
                print(
                    f"  {name:24s} median {out[name]['median']:7.1f} ms  "
                    f"max {out[name]['max']:7.1f} ms  ({out[name]['runs_on_page']} runs shown)"
                )
        return out
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variations", type=int, default=100)
    parser.add_argument("--runs-per-variation", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"goal_ms": GOAL_MS}
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
        root = Path(tmp)
        print("sqlite:")
        results["sqlite"] = run_backend(f"sqlite:///{root / 'chronicle.db'}", root / "assets", args)
        if not args.no_postgres:
            with scratch_postgres("ui") as url:
                print("postgresql:")
                results["postgresql"] = run_backend(
                    url.replace("postgresql://", "postgresql+psycopg://", 1),
                    root / "pg-assets",
                    args,
                )
    worst = max(
        page["median"]
        for backend in ("sqlite", "postgresql")
        if backend in results
        for page in results[backend].values()
        if isinstance(page, dict)
    )
    results["worst_median_ms"] = worst
    results["goal_met"] = worst <= GOAL_MS
    verdict = "met" if worst <= GOAL_MS else "MISSED"
    print(f"worst median {worst:.1f} ms (goal {GOAL_MS:.0f} ms): {verdict}")
    save("ui", results)


if __name__ == "__main__":
    main()
