"""What one heartbeat costs inside the store (no HTTP, one thread), SQLite and PostgreSQL:

heartbeat        : ``Store.heartbeat(...)``: one transaction, one prebuilt
                   ``UPDATE ... RETURNING`` (the fast path of a live run under its lease);
heartbeat_many_64: ``Store.heartbeat_many`` with 64 runs per call, what the server's
                   heartbeat lane does under load (one transaction per batch; on
                   PostgreSQL one ``UPDATE ... FROM unnest(...)`` for the batch).

  .venv/bin/python benchmarks/micro_heartbeat.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

BATCH = 64


def bench(url: str, assets: Path, n: int) -> dict:
    from chronicle_integrations.store import Store

    store = Store.open(url, assets)
    exp = store.create_experiment("hb", [{}]).experiment_id
    runs = []
    for i in range(BATCH):
        run = store.create_run(exp, 0, f"request-hb-{i}").run
        runs.append((run, store.start(exp, 0, run, holder="bench").lease))
    run, lease = runs[0]

    def one(i: int) -> None:
        store.heartbeat(exp, 0, run, lease, {"step": i})

    def many(i: int) -> None:
        out = store.heartbeat_many([(exp, 0, r, le, {"step": i}) for r, le in runs])
        assert not any(isinstance(x, Exception) for x in out)

    out = {}
    for name, fn, per_call in (("heartbeat", one, 1), (f"heartbeat_many_{BATCH}", many, BATCH)):
        calls = max(1, n // per_call) * (4 if per_call > 1 else 1)
        for i in range(20):
            fn(i)
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(calls):
                fn(i)
            samples.append((time.perf_counter() - t0) / (calls * per_call))
        out[name] = c.stats([s * 1e3 for s in samples])  # ms per heartbeat
        assert store.get_run(exp, 0, run).state.value == "running"
    store.close()
    return out


def main() -> None:

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    n = 200 if a.quick else 1000
    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="hb-", dir=c.WORK))
    out: dict = {
        "heartbeats_per_sample": n,
        "backends": {},
        "versions": c.versions("sqlalchemy", "psycopg"),
    }
    try:
        out["backends"]["sqlite"] = bench(f"sqlite:///{scratch}/hb.db", scratch / "a", n)
        with c.scratch_postgres("hb") as url:
            out["backends"]["postgres"] = bench(url, scratch / "b", n)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for b, r in out["backends"].items():
        print(
            f"{b:8s} "
            + "   ".join(
                f"{name} {s['median']:.3f} ms [{s['min']:.3f}-{s['max']:.3f}] per heartbeat"
                for name, s in r.items()
            )
        )
    c.save("micro_heartbeat" + ("_quick" if a.quick else ""), out)


if __name__ == "__main__":
    main()
