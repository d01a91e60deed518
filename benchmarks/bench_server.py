"""Figure 4: server request capacity - heartbeats/s and p50/p99 latency at 1, 8 and 64
concurrent keep-alive clients, Chronicle server on SQLite and on PostgreSQL, vs MLflow's
``set-tag`` (its cheapest per-run write; MLflow has no heartbeat) on the same machine.

Each client heartbeats its own started run with its own lease and a changing
``{"step": n}`` progress (what keep_alive sends). The load generator (benchmarks/loadgen.py)
is one asyncio process with pre-encoded requests; its CPU use and the server's are reported
(2 cores: whatever the generator uses, the server cannot).

    .venv/bin/python benchmarks/bench_server.py [--quick] [--backends sqlite,postgres,mlflow]

``--attack``: figure 4 under attack instead. One server per backend; 64 clients heartbeat
while benchmarks/attackers.py (its own process) holds 500 slowloris connections and streams
3 endless headers against the same server, next to the same 64 clients without the attack,
interleaved (baseline/attack, then attack/baseline, ...) ``--repeats`` times.

    .venv/bin/python benchmarks/bench_server.py --attack [--quick] [--backends sqlite,postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
import loadgen


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


#: ``--metrics N``: every heartbeat also carries N metric summaries (what ``log_metrics``
#: between two beats makes), e.g. 4: ``train/loss``, ``lr``, ``grad_norm``, ``val/acc``.
METRICS = 0


def _metrics(i: int) -> dict:
    names = ["train/loss", "lr", "grad_norm", "val/acc"] + [f"m{k}" for k in range(60)]
    return {
        name: {
            "last": 1.0 / (i + 1),
            "step": i,
            "min": 0.5 / (i + 1),
            "min_step": i,
            "max": 2.0,
            "max_step": 0,
        }
        for name in names[:METRICS]
    }


def chronicle_targets(server: c.Server, n: int) -> list:
    from chronicle_integrations import Chronicle

    with Chronicle(url=server.url, home=c.WORK / "loadgen-home") as ch:
        exp = ch.create_experiment("load", variations=[{}])
        runs = [ch.create_run(exp, 0).start() for _ in range(n)]
    makers = []
    for run in runs:
        path = f"/v1/runs/{quote(run.experiment_id, safe='')}/{run.variation}/{run.run}/heartbeat"
        lease = run.lease

        def make(i: int, path=path, lease=lease) -> bytes:
            body: dict = {"lease": lease, "progress": {"step": i}}
            if METRICS:
                body["metrics"] = _metrics(i)
            return loadgen.encode("127.0.0.1", server.port, path, body)

        makers.append(make)
    return makers


def mlflow_targets(server: c.Server, n: int) -> list:
    exp = post(server.url + "/api/2.0/mlflow/experiments/create", {"name": "load"})
    makers = []
    for _ in range(n):
        run = post(
            server.url + "/api/2.0/mlflow/runs/create", {"experiment_id": exp["experiment_id"]}
        )["run"]["info"]["run_id"]

        def make(i: int, run=run) -> bytes:
            return loadgen.encode(
                "127.0.0.1",
                server.port,
                "/api/2.0/mlflow/runs/set-tag",
                {"run_id": run, "key": "heartbeat", "value": str(i)},
            )

        makers.append(make)
    return makers


def bench(backend: str, levels: list[int], duration: float, warmup: float, scratch: Path) -> dict:

    databases = contextlib.ExitStack()
    result: dict = {"levels": {}}
    try:
        patches = ""
        if "+" in backend:  # e.g. "sqlite+nolane": a patched server, see patched_server.py
            backend, patches = backend.split("+", 1)
        if backend in ("postgres", "mlflow-postgres"):
            store = databases.enter_context(c.scratch_postgres("server"))
            if backend == "mlflow-postgres":  # MLflow's own driver choice (psycopg2)
                store = store.replace("postgresql://", "postgresql+psycopg2://", 1)
        else:
            store = f"sqlite:///{scratch}/{backend}.db"
        if backend.startswith("mlflow"):
            server = c.mlflow_server(store, scratch / "mlflow-art", scratch / "mlflow.log")
            targets = mlflow_targets
        else:
            server = c.chronicle_server(
                store, scratch / f"{backend}-assets", scratch / f"{backend}.log", patches=patches
            )
            targets = chronicle_targets
        with server:
            result["server_processes"] = len(server.pids())
            makers = targets(server, max(levels))
            for n in levels:
                r = loadgen.run(
                    "127.0.0.1", server.port, makers[:n], duration, warmup, server.pids()
                )
                result["levels"][str(n)] = r
                label = backend + ("+" + patches if patches else "")
                print(
                    f"  {label:8s} {n:3d} clients: {r['rps']:8.0f} req/s  p50 "
                    f"{r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}  "
                    f"cpu: loadgen {r['loadgen_cpu_cores']:.2f} server "
                    f"{r['server_cpu_cores']:.2f} cores",
                    flush=True,
                )
    finally:
        databases.close()
    return result


def attack_bench(
    backend: str, clients: int, duration: float, repeats: int, scratch: Path, attack: list[str]
) -> dict:
    """Baseline and under-attack phases against one server, interleaved."""
    import signal
    import subprocess
    import time

    databases = contextlib.ExitStack()
    phases: dict = {"baseline": [], "attack": []}
    try:
        store = (
            databases.enter_context(c.scratch_postgres("attack"))
            if backend == "postgres"
            else f"sqlite:///{scratch}/{backend}.db"
        )
        server = c.chronicle_server(store, scratch / "assets", scratch / "server.log")
        with server:
            makers = chronicle_targets(server, clients)
            for rep in range(repeats):
                order = ("baseline", "attack") if rep % 2 == 0 else ("attack", "baseline")
                for phase in order:
                    attackers = None
                    if phase == "attack":
                        attackers = subprocess.Popen(
                            [
                                sys.executable,
                                str(Path(__file__).with_name("attackers.py")),
                                "--port",
                                str(server.port),
                                *attack,
                            ],
                            stdout=subprocess.PIPE,
                            text=True,
                            start_new_session=True,
                        )
                        time.sleep(2.0)  # let the slowloris connections open
                    try:
                        r = loadgen.run(
                            "127.0.0.1", server.port, makers, duration, 1.0, server.pids()
                        )
                    finally:
                        if attackers is not None:
                            attackers.send_signal(signal.SIGTERM)
                            out, _ = attackers.communicate(timeout=30)
                    if attackers is not None:
                        r["attackers"] = json.loads(out.strip().splitlines()[-1])
                    r["load1_after"] = c.load1()
                    phases[phase].append(r)
                    print(
                        f"  {backend} {phase:8s} {clients} clients: {r['rps']:8.0f} req/s  "
                        f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors "
                        f"{r['errors']}  server cpu {r['server_cpu_cores']:.2f}  "
                        f"{r.get('attackers', '')}",
                        flush=True,
                    )
    finally:
        databases.close()
    return phases


def main_attack(a: argparse.Namespace) -> None:
    duration = a.duration or (2.0 if a.quick else 4.0)
    repeats = a.repeats or (2 if a.quick else 6)
    clients = max(int(x) for x in a.levels.split(","))
    attack = ["--slowloris", str(a.slowloris), "--endless", str(a.endless)]
    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="attack-", dir=c.WORK))
    out: dict = {
        "duration_s": duration,
        "repeats": repeats,
        "clients": clients,
        "attack": attack,
        "backends": {},
        "versions": c.versions("uvicorn", "httptools", "fastapi", "sqlalchemy", "psycopg"),
    }
    try:
        for b in [b for b in a.backends.split(",") if b in ("sqlite", "postgres")]:
            out["backends"][b] = attack_bench(b, clients, duration, repeats, scratch / b, attack)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary: dict = {}
    for b, phases in out["backends"].items():
        summary[b] = {
            phase: {k: c.stats([r[k] for r in rs]) for k in ("rps", "p50_ms", "p99_ms", "errors")}
            for phase, rs in phases.items()
        }
        for phase, s in summary[b].items():
            print(
                f"{b:8s} {phase:8s} {clients} clients: {s['rps']['median']:8.0f} req/s "
                f"[{s['rps']['min']:.0f}-{s['rps']['max']:.0f}]  p99 "
                f"{s['p99_ms']['median']:.2f} ms [{s['p99_ms']['min']:.2f}-"
                f"{s['p99_ms']['max']:.2f}]  errors {s['errors']['max']:.0f}"
            )
    out["summary"] = summary
    c.save("fig4_attack" + ("_quick" if a.quick else ""), out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--backends", default="sqlite,postgres,mlflow,mlflow-postgres,sqlite+nolane,postgres+nolane"
    )
    p.add_argument("--levels", default="1,8,64")
    p.add_argument("--duration", type=float)
    p.add_argument("--repeats", type=int)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--attack", action="store_true", help="figure 4 under attack (see above)")
    p.add_argument("--slowloris", type=int, default=500)
    p.add_argument("--endless", type=int, default=3)
    p.add_argument(
        "--metrics", type=int, default=0, help="metric summaries on every heartbeat (0-64)"
    )
    a = p.parse_args()
    global METRICS
    METRICS = a.metrics
    if a.attack:
        if a.backends == p.get_default("backends"):
            a.backends = "sqlite"
        main_attack(a)
        return
    duration = a.duration or (2.0 if a.quick else 4.0)
    repeats = a.repeats or (1 if a.quick else 2)
    levels = [int(x) for x in a.levels.split(",")]
    backends = [b for b in a.backends.split(",") if not b.startswith("mlflow") or c.peers_ready()]
    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="server-", dir=c.WORK))
    out: dict = {
        "duration_s": duration,
        "repeats": repeats,
        "backends": {},
        "versions": c.versions("uvicorn", "fastapi", "sqlalchemy", "psycopg"),
    }
    try:
        for rep in range(repeats):
            for b in backends:
                if "+" in b and rep > 0:
                    continue  # proposed-fix variants: one repeat (time budget)
                r = bench(b, levels, duration, 1.0, scratch / f"{b.replace('+', '-')}-{rep}")
                out["backends"].setdefault(b, []).append(r)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # medians over repeats
    summary: dict = {}
    for b, reps in out["backends"].items():
        summary[b] = {}
        for n in map(str, levels):
            rs = [r["levels"][n] for r in reps]
            summary[b][n] = {
                k: c.stats([r[k] for r in rs])
                for k in (
                    "rps",
                    "p50_ms",
                    "p99_ms",
                    "loadgen_cpu_cores",
                    "server_cpu_cores",
                    "errors",
                )
            }
            s = summary[b][n]
            print(
                f"{b:8s} {n:>3s} clients: {s['rps']['median']:8.0f} req/s "
                f"[{s['rps']['min']:.0f}-{s['rps']['max']:.0f}]  p50 "
                f"{s['p50_ms']['median']:.2f} ms  p99 {s['p99_ms']['median']:.2f} ms"
            )
    out["summary"] = summary
    out["metrics_per_heartbeat"] = METRICS
    name = "fig4_server" + (f"_metrics{METRICS}" if METRICS else "")
    c.save(name + ("_quick" if a.quick else ""), out)


if __name__ == "__main__":
    main()
