"""Figure 5: one watchdog sweep (``Store.sweep()``) over N runs of which K are owed a transition.

The rows are bulk-inserted straight into the store's tables (chronicle_integrations/store/
schema.py) through SQLAlchemy (PostgreSQL: COPY on the SQLAlchemy connection), then
``ANALYZE``d. The population: K runs owed a watchdog transition - K/2 running runs silent for
longer than the heartbeat timeout (-> ``lost``) and K/2 lost runs silent for longer than
timeout + grace (-> ``failed_lost``), one event each - 10% running and fresh, the rest
terminal. Each
repeat resets the K runs (untimed) and times one ``sweep()``; a second sweep with nothing
owed is timed too (the steady-state cost).

    .venv/bin/python benchmarks/bench_sweep.py [--quick] [--backends sqlite,postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

PER_VARIATION = 1000
PROFILE = False
TIMEOUT = 900.0
GRACE = 172800.0


def populate(store, n: int, k: int, now: float) -> tuple[str, int]:
    """Insert one experiment, n/1000 variations, n runs; the first k runs are stale."""
    import sqlalchemy as sa

    from chronicle_integrations.store import schema as t

    exp = "bench-sweep"
    nvar = (n + PER_VARIATION - 1) // PER_VARIATION
    stale_vars = (k + PER_VARIATION - 1) // PER_VARIATION
    fresh_until = k + n // 10

    def rows():
        for i in range(n):
            v, r = divmod(i, PER_VARIATION)
            if i < k // 2:
                yield (
                    exp,
                    v,
                    r,
                    "running",
                    now - 5000,
                    now - 4000,
                    now - 2000,
                    None,
                    None,
                    "lease",
                    "bench",
                )
            elif i < k:
                yield (
                    exp,
                    v,
                    r,
                    "lost",
                    now - 200000,
                    now - 190000,
                    now - 180000,
                    None,
                    None,
                    "lease",
                    "bench",
                )
            elif i < fresh_until:
                yield (
                    exp,
                    v,
                    r,
                    "running",
                    now - 5000,
                    now - 4000,
                    now - 10,
                    None,
                    None,
                    "lease",
                    "bench",
                )
            else:
                yield (
                    exp,
                    v,
                    r,
                    "succeeded",
                    now - 90000,
                    now - 80000,
                    now - 70000,
                    now - 70000,
                    None,
                    "lease",
                    "bench",
                )

    cols = [
        "experiment_id",
        "variation",
        "run",
        "state",
        "created_at",
        "started_at",
        "alive_at",
        "ended_at",
        "reason",
        "lease",
        "lease_holder",
    ]
    with store.engine.begin() as conn:
        conn.execute(
            t.experiments.insert().values(
                experiment_id=exp, name=exp, created_at=now, next_variation=nvar
            )
        )
        conn.execute(
            t.variations.insert(),
            [
                {
                    "experiment_id": exp,
                    "variation": v,
                    "config": "{}",
                    "created_at": now,
                    "next_run": PER_VARIATION,
                }
                for v in range(nvar)
            ],
        )
        if store.engine.dialect.name == "postgresql":
            raw = conn.connection.driver_connection
            with raw.cursor() as cur, cur.copy(f"COPY runs ({', '.join(cols)}) FROM STDIN") as copy:
                buf: list[str] = []
                for row in rows():
                    buf.append("\t".join("\\N" if x is None else str(x) for x in row))
                    if len(buf) == 100_000:
                        copy.write("\n".join(buf) + "\n")
                        buf = []
                if buf:
                    copy.write("\n".join(buf) + "\n")
        else:
            # executemany of plain tuples on the SQLAlchemy connection (the fast path)
            sql = (
                f"INSERT INTO runs ({', '.join(cols)}, last_heartbeat_at) "
                f"VALUES ({', '.join('?' * (len(cols) + 1))})"
            )
            batch: list[tuple] = []
            for row in rows():
                batch.append((*row, row[6]))
                if len(batch) == 100_000:
                    conn.exec_driver_sql(sql, batch)
                    batch = []
            if batch:
                conn.exec_driver_sql(sql, batch)
    with store.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(sa.text("ANALYZE"))
    return exp, stale_vars


def reset(store, exp: str, k: int, now: float) -> None:

    from chronicle_integrations.store import schema as t

    c_ = t.runs.c
    index = c_.variation * PER_VARIATION + c_.run  # the owed runs are the first k
    with store.engine.begin() as conn:
        conn.execute(
            t.runs.update()
            .where(c_.experiment_id == exp, index < k // 2)
            .values(state="running", alive_at=now - 2000)
        )
        conn.execute(
            t.runs.update()
            .where(c_.experiment_id == exp, index >= k // 2, index < k)
            .values(state="lost", alive_at=now - 180000, ended_at=None, reason=None)
        )
        conn.execute(t.events.delete().where(t.events.c.cause == "watchdog"))


def sweep_setbased(store) -> dict[str, int]:
    """The proposed fix, measured here without changing the library: the lost-transition
    events are written by the database from the rows it moves (no row travels through
    Python). SQLite: INSERT ... SELECT then UPDATE with the same predicate inside the one
    BEGIN IMMEDIATE transaction (no writer can slip in between). PostgreSQL: one statement,
    ``WITH moved AS (UPDATE ... RETURNING ...) INSERT INTO events SELECT ... FROM moved``;
    running -> lost first, then lost -> failed_lost, as ``Store.sweep`` does."""
    import sqlalchemy as sa

    now = store.clock()
    timeout, grace = store.heartbeat_timeout, store.lost_grace
    params = {
        "cut": now - timeout,
        "ecut": now - timeout - grace,
        "timeout": timeout,
        "grace": grace,
    }
    cols = "experiment_id, variation, run, kind, from_state, to_state, at, cause, detail"
    lost_sel = (
        "experiment_id, variation, run, 'transition', 'running', 'lost', "
        "alive_at + :timeout, 'watchdog', NULL"
    )
    exp_sel = (
        "experiment_id, variation, run, 'transition', 'lost', 'failed_lost', "
        "alive_at + :timeout + :grace, 'watchdog', NULL"
    )
    lost_where = "state = 'running' AND alive_at < :cut"
    exp_where = "state = 'lost' AND alive_at < :ecut"
    exp_set = "state = 'failed_lost', reason = 'lost', ended_at = alive_at + :timeout + :grace"
    with store._write() as conn:
        if store._sqlite:
            conn.execute(
                sa.text(
                    f"INSERT INTO events ({cols}) SELECT {lost_sel} FROM runs WHERE {lost_where}"
                ),
                params,
            )
            lost = conn.execute(
                sa.text(f"UPDATE runs SET state = 'lost' WHERE {lost_where}"), params
            ).rowcount
            conn.execute(
                sa.text(
                    f"INSERT INTO events ({cols}) SELECT {exp_sel} FROM runs WHERE {exp_where}"
                ),
                params,
            )
            expired = conn.execute(
                sa.text(f"UPDATE runs SET {exp_set} WHERE {exp_where}"), params
            ).rowcount
        else:
            lost = conn.execute(
                sa.text(
                    f"WITH moved AS (UPDATE runs SET state = 'lost' WHERE {lost_where} "
                    "RETURNING experiment_id, variation, run, alive_at) "
                    f"INSERT INTO events ({cols}) SELECT {lost_sel} FROM moved"
                ),
                params,
            ).rowcount
            expired = conn.execute(
                sa.text(
                    f"WITH moved AS (UPDATE runs SET {exp_set} WHERE {exp_where} "
                    "RETURNING experiment_id, variation, run, alive_at) "
                    f"INSERT INTO events ({cols}) SELECT {exp_sel} FROM moved"
                ),
                params,
            ).rowcount
    return {"lost": lost, "failed_lost": expired}


def watchdog_trail(store) -> list[tuple]:
    """The events and run rows a sweep wrote (to check the proposal writes the same)."""
    import sqlalchemy as sa

    from chronicle_integrations.store import schema as t

    e, r = t.events.c, t.runs.c
    with store.engine.connect() as conn:
        events = conn.execute(
            sa.select(
                e.experiment_id, e.variation, e.run, e.kind, e.from_state, e.to_state, e.at, e.cause
            ).where(e.cause == "watchdog")
        ).all()
        runs = conn.execute(
            sa.select(r.experiment_id, r.variation, r.run, r.state, r.reason, r.ended_at).where(
                r.state.in_(["lost", "failed_lost"])
            )
        ).all()
    return sorted((*x[:6], round(x[6], 3), x[7]) for x in events) + sorted(
        (*x[:5], None if x[5] is None else round(x[5], 3)) for x in runs
    )


def bench_backend(backend: str, n: int, k: int, repeats: int) -> dict:

    from chronicle_integrations.store import Store

    scratch = Path(tempfile.mkdtemp(prefix="sweep-", dir=c.WORK))
    databases = contextlib.ExitStack()
    try:
        if backend == "sqlite":
            url = f"sqlite:///{scratch}/sweep.db"
        else:
            url = databases.enter_context(c.scratch_postgres("sweep"))
        store = Store.open(url, scratch / "assets", heartbeat_timeout=TIMEOUT, lost_grace=GRACE)
        now = time.time()
        t0 = time.perf_counter()
        exp, _ = populate(store, n, k, now)
        setup_s = time.perf_counter() - t0
        print(f"  {backend}: inserted {n} runs in {setup_s:.1f}s", flush=True)
        owed, idle = [], []
        store.clock = lambda: now  # one clock for both versions: identical trails expected
        for rep in range(repeats):
            reset(store, exp, k, now)
            t0 = time.perf_counter()
            moved = store.sweep()
            owed.append(time.perf_counter() - t0)
            assert moved == {"lost": k // 2, "failed_lost": k - k // 2}, moved
            t0 = time.perf_counter()
            again = store.sweep()
            idle.append(time.perf_counter() - t0)
            assert again == {"lost": 0, "failed_lost": 0}, again
            print(
                f"  {backend} rep {rep}: sweep {owed[-1] * 1e3:.1f} ms (moved {moved}), "
                f"idle sweep {idle[-1] * 1e3:.1f} ms",
                flush=True,
            )
        trail = watchdog_trail(store)
        proposed = []
        for _ in range(repeats):
            reset(store, exp, k, now)
            t0 = time.perf_counter()
            moved = sweep_setbased(store)
            proposed.append(time.perf_counter() - t0)
            assert moved == {"lost": k // 2, "failed_lost": k - k // 2}, moved
        assert watchdog_trail(store) == trail, "the proposed sweep writes a different trail"
        print(
            f"  {backend}: proposed set-based sweep median "
            f"{c.stats(proposed)['median'] * 1e3:.1f} ms",
            flush=True,
        )
        if PROFILE:
            import cProfile
            import pstats

            reset(store, exp, k, now)
            prof = cProfile.Profile()
            prof.enable()
            store.sweep()
            prof.disable()
            prof_path = c.RESULTS / f"fig5_sweep_{backend}.prof.txt"
            with open(prof_path, "w") as fh:
                pstats.Stats(prof, stream=fh).sort_stats("cumulative").print_stats(35)
            print(f"  profile: {prof_path}")
        store.close()
        return {
            "runs": n,
            "owed": k,
            "insert_s": setup_s,
            "sweep_s": c.stats(owed),
            "idle_sweep_s": c.stats(idle),
            "proposed_setbased_sweep_s": c.stats(proposed),
        }
    finally:
        databases.close()
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int)
    p.add_argument("--owed", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile one sweep per backend")
    a = p.parse_args()
    global PROFILE
    PROFILE = a.profile
    n = a.runs or (100_000 if a.quick else 1_000_000)
    k = a.owed or (1_000 if a.quick else 10_000)
    repeats = a.repeats or (3 if a.quick else 5)
    c.WORK.mkdir(parents=True, exist_ok=True)
    out = {"backends": {}, "versions": c.versions("sqlalchemy", "psycopg")}
    import sqlite3

    out["versions"]["sqlite"] = sqlite3.sqlite_version
    for backend in a.backends.split(","):
        r = bench_backend(backend, n, k, repeats)
        out["backends"][backend] = r
        s = r["sweep_s"]
        print(
            f"{backend}: sweep over {n} runs, {k} owed: median {s['median'] * 1e3:.1f} ms "
            f"[{s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f}]"
        )
    c.save("fig5_sweep" + ("_quick" if a.quick else "") + ("_profiled" if a.profile else ""), out)


if __name__ == "__main__":
    main()
