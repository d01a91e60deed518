"""Scale-out: heartbeats/s and p99 through HAProxy with 1 and 2 replicas on one PostgreSQL,
and the watchdog sweep's cost with N replicas (coordinated vs every replica sweeping).

Part 1 reuses figure 4's load generator (benchmarks/loadgen.py, ``bench_server``'s
``chronicle_targets``): closed-loop keep-alive clients, each beating its own run, against
one replica directly and through HAProxy (``deploy/haproxy.cfg``, the tests' configuration)
in front of 1 and 2 replicas. On a 2-core machine the load generator, HAProxy, PostgreSQL and
the replicas share the same two cores: a second replica adds no CPU, so the figure shows the
balancer's overhead and that a second replica does not cost throughput, not a speed-up.

Part 2 runs N store objects ("replicas", one thread each) on one PostgreSQL with a steady
stream of runs going silent, each calling the watchdog on its own timer for ``--sweep-window``
seconds: ``sweep_if_due`` (the advisory-locked, fleet-wide cadence) against plain ``sweep``
(what every replica did before). Reported: sweeps that did the work, calls skipped, database
time spent in sweeps, transitions moved.

    .venv/bin/python benchmarks/bench_scaleout.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
import loadgen
from bench_server import chronicle_targets

if not c.PROJECT_PY.exists():  # a worktree without its own venv: the running interpreter
    c.PROJECT_PY = Path(sys.executable)


# ------------------------------------------------------------------------------ part 1
@contextlib.contextmanager
def haproxy(backends: list[int], scratch: Path) -> Any:
    """HAProxy from deploy/haproxy.cfg in front of ``backends``; yields (port, pid)."""
    port = c.free_port()
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
    config = scratch / "haproxy.cfg"
    config.write_text(
        string.Template((c.ROOT / "deploy" / "haproxy.cfg").read_text()).substitute(
            listen=f"127.0.0.1:{port}", servers=servers
        )
    )
    log = open(scratch / "haproxy.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        c.wait_http(f"http://127.0.0.1:{port}/v1/ready", proc=proc)
        time.sleep(1.5)  # every replica's health check up (inter 500ms, rise 1)
        yield port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(15)
        log.close()


def bench_lb(levels: list[int], duration: float, scratch: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with c.scratch_postgres("scaleout") as store:
        replicas = []
        try:
            for i in range(2):
                replicas.append(
                    c.chronicle_server(
                        store, scratch / "assets", scratch / f"replica{i}.log"
                    ).__enter__()
                )
            first = replicas[0]
            makers_direct = chronicle_targets(first, max(levels))
            setups: list[tuple[str, list[Any]]] = [
                ("direct, 1 replica", replicas[:1]),
                ("haproxy, 1 replica", replicas[:1]),
                ("haproxy, 2 replicas", replicas),
            ]
            for label, behind in setups:
                results[label] = {}
                with contextlib.ExitStack() as stack:
                    if label.startswith("direct"):
                        port, extra_pids, makers = first.port, [], makers_direct
                    else:
                        d = scratch / label.replace(" ", "").replace(",", "-")
                        d.mkdir(parents=True, exist_ok=True)
                        port, pid = stack.enter_context(haproxy([r.port for r in behind], d))
                        extra_pids = [pid]
                        # the same runs and leases, addressed to the balancer
                        makers = chronicle_targets_at(first, port, max(levels))
                    pids = [p for r in behind for p in r.pids()] + extra_pids
                    for n in levels:
                        r = loadgen.run("127.0.0.1", port, makers[:n], duration, 1.0, pids)
                        results[label][str(n)] = r
                        print(
                            f"  {label:20s} {n:3d} clients: {r['rps']:7.0f} hb/s  p50 "
                            f"{r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors "
                            f"{r['errors']}  cpu: loadgen {r['loadgen_cpu_cores']:.2f} "
                            f"servers+haproxy {r['server_cpu_cores']:.2f} cores",
                            flush=True,
                        )
        finally:
            for r in replicas:
                r.stop()
    return results


def chronicle_targets_at(server: Any, port: int, n: int) -> list[Any]:
    """``chronicle_targets`` (runs created through ``server``) with requests sent to ``port``."""
    return chronicle_targets(SimpleNamespace(url=server.url, port=port), n)


# ------------------------------------------------------------------------------ part 2
def seed(store: Any, runs: int, spread: float, timeout: float) -> None:
    """``runs`` running runs whose silence crosses ``timeout`` uniformly over the next
    ``spread`` seconds (a steady stream of runs going lost), inserted in bulk."""
    import sqlalchemy as sa

    from chronicle_integrations.store import schema as t

    now = store.clock()
    with store.engine.begin() as conn:
        conn.execute(t.experiments.insert().values(experiment_id="sw", name="sw", created_at=now))
        per = 1000
        nvar = (runs + per - 1) // per
        conn.execute(
            t.variations.insert(),
            [
                {"experiment_id": "sw", "variation": v, "config": "{}", "created_at": now}
                for v in range(nvar)
            ],
        )
        rng = random.Random(5)
        rows = []
        for i in range(runs):
            alive = now - timeout + rng.uniform(1.0, spread)
            v, r = divmod(i, per)
            rows.append(
                {
                    "experiment_id": "sw",
                    "variation": v,
                    "run": r,
                    "state": "running",
                    "created_at": now - timeout,
                    "started_at": alive,
                    "alive_at": alive,
                    "lease": f"l{i}",
                }
            )
        for i in range(0, len(rows), 5000):
            conn.execute(t.runs.insert(), rows[i : i + 5000])
        conn.execute(sa.text("ANALYZE runs"))


def sweep_round(n: int, coordinated: bool, runs: int, window: float, every: float) -> dict:
    """N replicas (store objects, one thread each) calling the watchdog every ``every``
    seconds, phases spread, for ``window`` seconds on a fresh database."""
    from chronicle_integrations.store import Store

    timeout = 60.0
    stats: dict[str, float] = {"sweeps": 0, "skipped": 0, "db_s": 0.0, "moved": 0}
    lock = threading.Lock()
    with c.scratch_postgres(f"sweep{n}") as url:
        scratch = Path(tempfile.mkdtemp(dir=c.WORK))
        stores = [
            Store.open(url, scratch, heartbeat_timeout=timeout, lost_grace=3600.0) for _ in range(n)
        ]
        seed(stores[0], runs, window, timeout)
        stop = time.monotonic() + window

        def replica(store: Any, phase: float) -> None:
            time.sleep(phase)
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                moved = store.sweep_if_due(every) if coordinated else store.sweep()
                spent = time.perf_counter() - t0
                with lock:
                    stats["db_s"] += spent
                    if moved is None:
                        stats["skipped"] += 1
                    else:
                        stats["sweeps"] += 1
                        stats["moved"] += moved["lost"]
                time.sleep(every)

        threads = [
            threading.Thread(target=replica, args=(s, every * i / n)) for i, s in enumerate(stores)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for s in stores:
            s.close()
        shutil.rmtree(scratch, ignore_errors=True)
    stats["db_ms_per_s"] = stats["db_s"] * 1e3 / window
    return stats


def bench_sweep(replicas: list[int], runs: int, window: float, every: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("coordinated", "every replica"):
        for n in replicas:
            stats = sweep_round(n, mode == "coordinated", runs, window, every)
            out.setdefault(mode, {})[str(n)] = stats
            print(
                f"  sweep {mode:13s} {n} replicas: {stats['sweeps']:3.0f} sweeps, "
                f"{stats['skipped']:3.0f} skipped, {stats['moved']:6.0f} moved, "
                f"{stats['db_ms_per_s']:.2f} ms of sweep per second",
                flush=True,
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--levels", default="8,64")
    p.add_argument("--duration", type=float)
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--sweep-runs", type=int, default=20000)
    p.add_argument("--sweep-window", type=float)
    p.add_argument("--sweep-every", type=float, default=1.0)
    a = p.parse_args()
    duration = a.duration or (2.0 if a.quick else 5.0)
    window = a.sweep_window or (6.0 if a.quick else 15.0)
    levels = [int(x) for x in a.levels.split(",")]
    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="scaleout-", dir=c.WORK))
    out: dict[str, Any] = {
        "duration_s": duration,
        "versions": c.versions("uvicorn", "fastapi", "sqlalchemy", "psycopg"),
    }
    try:
        out["heartbeats"] = bench_lb(levels, duration, scratch)
        out["sweep"] = {
            "runs": a.sweep_runs,
            "window_s": window,
            "every_s": a.sweep_every,
            "results": bench_sweep(
                [int(x) for x in a.replicas.split(",")], a.sweep_runs, window, a.sweep_every
            ),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    c.save("scaleout" + ("_quick" if a.quick else ""), out)


if __name__ == "__main__":
    main()
