"""What one heartbeat costs inside the store, and what the proposed fast path would cost.

  current : ``Store.heartbeat(...)`` (builds an UPDATE expression per call, executes it, then
            re-reads the row with a second SELECT to build the RunInfo)
  proposed: one pre-built ``UPDATE runs SET ... WHERE <pk> AND state='running' AND
            lease=:lease AND alive_at >= :cut RETURNING <run columns>`` (constructed once
            with bindparams, so SQLAlchemy's compiled cache hits without rebuilding the
            expression tree; one statement instead of two), then the same RunInfo.

Single thread, no HTTP: the store's own CPU cost per heartbeat (SQLite and PostgreSQL).

    .venv/bin/python benchmarks/micro_heartbeat.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

PG_ADMIN = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def fast_heartbeat_factory(store):
    import json

    import sqlalchemy as sa

    from chronicle_integrations.store import schema as t

    col = t.runs.c
    stmt = (t.runs.update()
            .where(col.experiment_id == sa.bindparam("p_e"), col.variation == sa.bindparam("p_v"),
                   col.run == sa.bindparam("p_r"), col.state == "running",
                   col.lease == sa.bindparam("p_lease"), col.alive_at >= sa.bindparam("p_cut"))
            .values(last_heartbeat_at=sa.bindparam("p_now"), alive_at=sa.bindparam("p_now"),
                    progress=sa.bindparam("p_progress"),
                    progress_at=sa.case((col.progress.is_distinct_from(
                        sa.bindparam("p_progress")), sa.bindparam("p_now")),
                        else_=col.progress_at))
            .returning(*t.runs.c))

    def heartbeat(e, v, r, lease, progress):
        now = store.clock()
        with store._write() as conn:
            row = conn.execute(stmt, {"p_e": e, "p_v": v, "p_r": r, "p_lease": lease,
                                      "p_cut": now - store.heartbeat_timeout, "p_now": now,
                                      "p_progress": json.dumps(progress,
                                                               separators=(",", ":"))}).first()
            if row is None:
                return store.heartbeat(e, v, r, lease, progress)  # the slow, exact path
            return store._info(row, now)

    return heartbeat


def bench(url: str, assets: Path, n: int) -> dict:
    from chronicle_integrations.store import Store

    store = Store.open(url, assets)
    exp = store.create_experiment("hb", [{}]).experiment_id
    run = store.create_run(exp, 0, "request-hb-1").run
    lease = "lease-" + "x" * 20
    store.start(exp, 0, run, lease=lease, holder="bench")
    fast = fast_heartbeat_factory(store)
    out = {}
    for name, fn in (("current", lambda i: store.heartbeat(exp, 0, run, lease, {"step": i})),
                     ("proposed", lambda i: fast(exp, 0, run, lease, {"step": i}))):
        for i in range(50):
            fn(i)
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(n):
                fn(i)
            samples.append((time.perf_counter() - t0) / n)
        out[name] = c.stats([s * 1e3 for s in samples])  # ms per heartbeat
        info = store.get_run(exp, 0, run)
        assert info.state.value == "running"
    store.close()
    return out


def main() -> None:
    import sqlalchemy as sa

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    n = 200 if a.quick else 1000
    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="hb-", dir=c.WORK))
    dbname = f"chronicle_bench_hb_{os.getpid()}"
    admin = sa.create_engine(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://", 1),
                             isolation_level="AUTOCOMMIT")
    out: dict = {"heartbeats_per_sample": n, "backends": {},
                 "versions": c.versions("sqlalchemy", "psycopg")}
    try:
        out["backends"]["sqlite"] = bench(f"sqlite:///{scratch}/hb.db", scratch / "a", n)
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{dbname}"'))
        out["backends"]["postgres"] = bench(PG_ADMIN.rsplit("/", 1)[0] + "/" + dbname,
                                            scratch / "b", n)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(scratch, ignore_errors=True)
    for b, r in out["backends"].items():
        print(f"{b:8s} Store.heartbeat {r['current']['median']:.3f} ms "
              f"[{r['current']['min']:.3f}-{r['current']['max']:.3f}]   proposed "
              f"{r['proposed']['median']:.3f} ms "
              f"[{r['proposed']['min']:.3f}-{r['proposed']['max']:.3f}]")
    c.save("micro_heartbeat" + ("_quick" if a.quick else ""), out)


if __name__ == "__main__":
    main()
