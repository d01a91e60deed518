"""Figure 6: cold start, each sample in a fresh interpreter.

import   : ``import chronicle_integrations`` (time measured inside the child around the
           import; also the child's total wall time), plus which frameworks got imported.
first run: import + ``Chronicle(home=<fresh dir>)`` + create_experiment + create_run +
           ``start()`` on the embedded store (a new SQLite database each time), i.e. what a
           first ``Chronicle().run(...).start()`` costs in a new process.
peer     : ``import mlflow`` and its first ``mlflow.start_run()`` on a local SQLite store
           (peers venv), measured the same way.
breakdown: ``python -X importtime -c "import chronicle_integrations"``, top entries.

  .venv/bin/python benchmarks/bench_coldstart.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

FRAMEWORKS = [
    "torch",
    "lightning",
    "pytorch_lightning",
    "transformers",
    "sqlalchemy",
    "fastapi",
    "uvicorn",
    "starlette",
    "pydantic",
    "numpy",
    "requests",
    "hydra",
]

CHILD_IMPORT = r"""
import sys, time, json
t0 = time.perf_counter()
import {module}
t1 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0,
                   "loaded": sorted(m for m in {frameworks!r} if m in sys.modules)}}))
"""

CHILD_FIRST_RUN = r"""
import sys, time, json
t0 = time.perf_counter()
from chronicle_integrations import Chronicle
t1 = time.perf_counter()
chronicle = Chronicle(home={home!r})
t2 = time.perf_counter()
exp = chronicle.create_experiment("cold", variations=[{{"lr": 0.1}}])
run = chronicle.create_run(exp, 0)
t3 = time.perf_counter()
run.start()
t4 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "client_s": t2 - t1, "create_s": t3 - t2,
                   "start_s": t4 - t3, "total_s": t4 - t0,
                   "loaded": sorted(m for m in {frameworks!r} if m in sys.modules)}}))
chronicle.close()
"""

CHILD_MLFLOW_RUN = r"""
import sys, time, json
t0 = time.perf_counter()
import mlflow
t1 = time.perf_counter()
mlflow.set_tracking_uri({uri!r})
t2 = time.perf_counter()
mlflow.set_experiment("cold")
run = mlflow.start_run()
t4 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "client_s": t2 - t1, "create_s": 0.0,
                   "start_s": t4 - t2, "total_s": t4 - t0,
                   "loaded": sorted(m for m in {frameworks!r} if m in sys.modules)}}))
mlflow.end_run()
"""


def child(python: Path, code: str, env: dict | None = None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=c.WORK,
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def series(python: Path, make_code, repeats: int, env: dict | None = None) -> dict:
    samples, walls = [], []
    for i in range(repeats):
        data, wall = child(python, make_code(i), env)
        samples.append(data)
        walls.append(wall)
    keys = [k for k in samples[0] if k.endswith("_s")]
    return {
        **{k: c.stats([s[k] for s in samples]) for k in keys},
        "process_wall_s": c.stats(walls),
        "loaded": samples[-1]["loaded"],
    }


def importtime(python: Path, module: str, top: int = 15) -> list[tuple[int, int, str]]:
    out = subprocess.run(
        [str(python), "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        cwd=c.WORK,
    )
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = line.split(":", 1)[1].split("|")
        rows.append((int(self_us), int(cum_us), name.rstrip()))
    total = max((r[1] for r in rows), default=0)
    rows.sort(key=lambda r: -r[1])
    return [{"cumulative_us": cu, "self_us": s, "module": n} for s, cu, n in rows[:top]] + [
        {"total_us": total}
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    repeats = a.repeats or (3 if a.quick else 7)
    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cold-", dir=c.WORK))
    out: dict = {"repeats": repeats, "versions": c.versions("chronicle-integrations", "sqlalchemy")}
    try:
        # warm the OS page cache for both venvs once (not timed): we measure warm starts
        child(
            c.PROJECT_PY,
            CHILD_IMPORT.format(module="chronicle_integrations", frameworks=FRAMEWORKS),
        )
        out["chronicle_import"] = series(
            c.PROJECT_PY,
            lambda i: CHILD_IMPORT.format(module="chronicle_integrations", frameworks=FRAMEWORKS),
            repeats,
        )
        out["chronicle_first_run"] = series(
            c.PROJECT_PY,
            lambda i: CHILD_FIRST_RUN.format(
                home=str(scratch / f"home-{i}"), frameworks=FRAMEWORKS
            ),
            repeats,
        )
        out["python_bare"] = {
            "process_wall_s": c.stats(
                [child(c.PROJECT_PY, "print('{\"loaded\": []}')")[1] for _ in range(repeats)]
            )
        }
        out["chronicle_importtime_top"] = importtime(c.PROJECT_PY, "chronicle_integrations")
        if c.peers_ready():
            child(c.PEERS_PY, CHILD_IMPORT.format(module="mlflow", frameworks=FRAMEWORKS))
            peer_repeats = min(repeats, 5)  # MLflow's samples take seconds each
            out["mlflow_import"] = series(
                c.PEERS_PY,
                lambda i: CHILD_IMPORT.format(module="mlflow", frameworks=FRAMEWORKS),
                peer_repeats,
            )
            out["mlflow_first_run"] = series(
                c.PEERS_PY,
                lambda i: CHILD_MLFLOW_RUN.format(
                    uri=f"sqlite:///{scratch}/mlflow-{i}.db", frameworks=FRAMEWORKS
                ),
                peer_repeats,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for key in ("chronicle_import", "chronicle_first_run", "mlflow_import", "mlflow_first_run"):
        if key in out:
            s = out[key]
            main_key = "total_s" if "total_s" in s else "import_s"
            print(
                f"{key:22s} {main_key} median {s[main_key]['median'] * 1e3:7.1f} ms "
                f"[{s[main_key]['min'] * 1e3:.1f}-{s[main_key]['max'] * 1e3:.1f}]  "
                f"process {s['process_wall_s']['median'] * 1e3:.0f} ms  loaded {s['loaded']}"
            )
    c.save("fig6_coldstart" + ("_quick" if a.quick else ""), out)


if __name__ == "__main__":
    main()
