"""What metrics cost: on the training thread, in the store, and for ``best`` at scale.

log_metrics       : ``run.log_metrics({...}, step=i)`` on the calling thread, ns per call
                    (1 and 4 names), while ``keep_alive`` beats every 50 ms on its own thread
                    (so the lock is contended as in a fit); embedded store, no I/O per call.
heartbeat(+m)     : ``Store.heartbeat`` without and with 4 metric summaries (ms per beat), and
                    ``heartbeat_many`` with 64 runs per call (the server's lane under load).
best_100k         : ``Store.best`` over one experiment of 100,000 succeeded runs with one
                    metric each (rows bulk-inserted, then the query timed), SQLite and
                    PostgreSQL; its plan is an index walk of ``ix_run_metrics_min``.

  .venv/bin/python benchmarks/micro_metrics.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

BATCH = 64


def bench_log_metrics(home: Path, calls: int) -> dict[str, Any]:
    from chronicle_integrations import Chronicle

    out: dict[str, Any] = {}
    with Chronicle(home=home) as chronicle:
        exp = chronicle.create_experiment("metrics-bench", [{}])
        run = chronicle.create_run(exp, 0).start()
        with run.keep_alive(interval=0.05):
            for label, values in (
                ("1_name", {"train/loss": 0.5}),
                ("4_names", {"train/loss": 0.5, "lr": 1e-3, "grad_norm": 1.2, "acc": 0.9}),
            ):
                log = run.log_metrics
                for i in range(2000):
                    log(values, i)
                samples = []
                for _ in range(7):
                    t0 = time.perf_counter_ns()
                    for i in range(calls):
                        log(values, i)
                    samples.append((time.perf_counter_ns() - t0) / calls)
                out[label] = c.stats(samples)  # ns per call
            # the baseline the integrations already pay per step
            samples = []
            for _ in range(7):
                t0 = time.perf_counter_ns()
                for i in range(calls):
                    run.progress.advance(i, 0)
                samples.append((time.perf_counter_ns() - t0) / calls)
            out["progress_advance_baseline"] = c.stats(samples)
        run.succeed()
        assert run.info().metrics["train/loss"]["last"] == 0.5
    return out


def bench_heartbeat(url: str, assets: Path, n: int) -> dict[str, Any]:
    from chronicle_integrations.store import Store

    store = Store.open(url, assets)
    exp = store.create_experiment("hbm", [{}]).experiment_id
    runs = []
    for i in range(BATCH):
        run = store.create_run(exp, 0, f"request-hbm-{i}").run
        runs.append((run, store.start(exp, 0, run, holder="bench").lease))
    run, lease = runs[0]
    names = ("train/loss", "lr", "grad_norm", "val/acc")

    def metrics(i: int) -> dict[str, Any]:
        return {k: {"last": 1.0 / (i + 1), "step": i} for k in names}

    cases = {
        "heartbeat": lambda i: store.heartbeat(exp, 0, run, lease, {"step": i}),
        "heartbeat_4_metrics": lambda i: store.heartbeat(
            exp, 0, run, lease, {"step": i}, metrics(i)
        ),
        f"heartbeat_many_{BATCH}": lambda i: store.heartbeat_many(
            [(exp, 0, r, le, {"step": i}) for r, le in runs]
        ),
        f"heartbeat_many_{BATCH}_4_metrics": lambda i: store.heartbeat_many(
            [(exp, 0, r, le, {"step": i}, metrics(i), None) for r, le in runs]
        ),
    }
    out = {}
    for name, fn in cases.items():
        per_call = BATCH if "many" in name else 1
        calls = max(1, n // per_call) * (4 if per_call > 1 else 1)
        for i in range(20):
            fn(i)
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(calls):
                result = fn(i)
            samples.append((time.perf_counter() - t0) / (calls * per_call))
        if isinstance(result, list):
            assert not any(isinstance(x, Exception) for x in result)
        out[name] = c.stats([s * 1e3 for s in samples])  # ms per heartbeat
    assert store.get_run(exp, 0, run).metrics["val/acc"]["last_step"] is not None
    store.close()
    return out


def bench_best(url: str, assets: Path, runs: int) -> dict[str, Any]:
    """100,000 succeeded runs of one experiment (one variation per 100 runs), each with a
    ``val/loss`` summary, bulk-inserted; then ``best`` timed."""
    import sqlalchemy as sa

    from chronicle_integrations.store import Store
    from chronicle_integrations.store import schema as t

    store = Store.open(url, assets)
    exp = store.create_experiment("best-100k", []).experiment_id
    per_variation = 100
    variations = runs // per_variation
    rng = random.Random(0)
    now = time.time()
    t0 = time.perf_counter()
    with store.engine.begin() as conn:
        conn.execute(
            t.variations.insert(),
            [
                {"experiment_id": exp, "variation": v, "config": "{}", "created_at": now}
                for v in range(variations)
            ],
        )
        for start in range(0, runs, 10_000):
            block = range(start, min(runs, start + 10_000))
            conn.execute(
                t.runs.insert(),
                [
                    {
                        "experiment_id": exp,
                        "variation": i // per_variation,
                        "run": i % per_variation,
                        # a tenth still running: best must skip them without scanning
                        "state": "running" if i % 10 == 0 else "succeeded",
                        "created_at": now,
                        "started_at": now,
                        "alive_at": now,
                        "ended_at": now,
                    }
                    for i in block
                ],
            )
            values = [rng.random() for _ in block]
            conn.execute(
                t.run_metrics.insert(),
                [
                    {
                        "experiment_id": exp,
                        "variation": i // per_variation,
                        "run": i % per_variation,
                        "name": "val/loss",
                        "last": v,
                        "last_step": 100,
                        "min": v,
                        "min_step": 100,
                        "max": v + 1,
                        "max_step": 1,
                        "updated_at": now,
                    }
                    for i, v in zip(block, values, strict=True)
                ],
            )
        conn.execute(
            t.experiments.update()
            .where(t.experiments.c.experiment_id == exp)
            .values(next_variation=variations)
        )
        if store.engine.dialect.name == "postgresql":
            conn.execute(sa.text("ANALYZE runs"))
            conn.execute(sa.text("ANALYZE run_metrics"))
        else:
            conn.execute(sa.text("ANALYZE"))
    setup = time.perf_counter() - t0
    # the answer is right: the smallest succeeded value
    with store.engine.connect() as conn:
        expected = conn.execute(
            sa.select(sa.func.min(t.run_metrics.c.min))
            .select_from(
                t.run_metrics.join(
                    t.runs,
                    sa.and_(
                        t.runs.c.experiment_id == t.run_metrics.c.experiment_id,
                        t.runs.c.variation == t.run_metrics.c.variation,
                        t.runs.c.run == t.run_metrics.c.run,
                    ),
                )
            )
            .where(t.runs.c.state == "succeeded")
        ).scalar()
    out: dict[str, Any] = {"runs": runs, "setup_s": round(setup, 1)}
    for label, kwargs in (
        ("best_min", {"mode": "min"}),
        ("best_max", {"mode": "max"}),
        ("best_min_include_running", {"mode": "min", "include_running": True}),
    ):
        for _ in range(5):
            store.best(exp, "val/loss", **kwargs)
        samples = []
        for _ in range(50):
            t1 = time.perf_counter()
            best = store.best(exp, "val/loss", **kwargs)
            samples.append((time.perf_counter() - t1) * 1e3)
        out[label] = c.stats(samples)  # ms per call
        if label == "best_min":
            assert best.value == expected, (best.value, expected)
    # The plan of the ranking query (the first page of the walk).
    from chronicle_integrations.store.outcomes import _best_query

    query = _best_query(exp, "val/loss", "min", False)[0].limit(64)
    compiled = str(query.compile(store.engine, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "postgresql":
            plan = [r[0] for r in conn.execute(sa.text("EXPLAIN ANALYZE " + compiled))]
        else:
            plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + compiled)]
    out["plan"] = plan
    store.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="metrics-", dir=c.WORK))
    calls = 20_000 if a.quick else 200_000
    n = 200 if a.quick else 1000
    runs = 10_000 if a.quick else 100_000
    out: dict[str, Any] = {"versions": c.versions("sqlalchemy", "psycopg"), "backends": {}}
    try:
        out["log_metrics_ns"] = bench_log_metrics(scratch / "home", calls)
        out["backends"]["sqlite"] = {
            "heartbeat_ms": bench_heartbeat(f"sqlite:///{scratch}/hb.db", scratch / "a", n),
            "best": bench_best(f"sqlite:///{scratch}/best.db", scratch / "b", runs),
        }
        with c.scratch_postgres("hbm") as url:
            pg: dict[str, Any] = {"heartbeat_ms": bench_heartbeat(url, scratch / "c", n)}
        with c.scratch_postgres("best") as url:
            pg["best"] = bench_best(url, scratch / "d", runs)
        out["backends"]["postgres"] = pg
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for label, s in out["log_metrics_ns"].items():
        print(f"log_metrics {label:26s} {s['median']:8.0f} ns/call [{s['min']:.0f}-{s['max']:.0f}]")
    for backend, r in out["backends"].items():
        for name, s in r["heartbeat_ms"].items():
            print(
                f"{backend:8s} {name:32s} {s['median']:.3f} ms/beat [{s['min']:.3f}-{s['max']:.3f}]"
            )
        for name, s in r["best"].items():
            if isinstance(s, dict) and "median" in s:
                print(
                    f"{backend:8s} {name:32s} {s['median']:.2f} ms over {r['best']['runs']} runs "
                    f"[{s['min']:.2f}-{s['max']:.2f}]"
                )
    for backend, r in out["backends"].items():
        print(f"{backend} plan of best:\n  " + "\n  ".join(r["best"]["plan"]))
    c.save("micro_metrics" + ("_quick" if a.quick else ""), out)


if __name__ == "__main__":
    main()
