"""GET /v1/runs over many runs: the paged listing (default page) against the full listing of
the code before pagination (``git archive main``), on SQLite and PostgreSQL.

For each code variant a fresh store is seeded with ``--runs`` pending runs (one bulk INSERT
through that variant's own store), a real server subprocess of that variant is started on it,
and ``GET /v1/runs`` is timed ``--repeat`` times (wall time and bytes of the answer). For the
paged code the time of walking every page (``limit=1000``) is measured too.

Usage::

    python benchmarks/bench_pages.py [--runs 20000] [--repeat 5] [--base main] [--no-postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, WORK, free_port, save, scratch_postgres, stats, wait_http

SEED = """
import sys
from chronicle_integrations.store import Store
from chronicle_integrations.store import schema as t
url, assets, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store.open(url, assets)
per = 100
exps = (n + per * 10 - 1) // (per * 10)
rows = []
for e in range(exps):
    eid = f"bench-{e:04d}"
    store.create_experiment(eid, [{"v": v} for v in range(10)], eid)
    rows += [dict(experiment_id=eid, variation=v, run=r, state="pending", created_at=1.0)
             for v in range(10) for r in range(per)]
with store.engine.begin() as conn:
    conn.execute(t.runs.insert(), rows[:n])
    conn.execute(t.variations.update().values(next_run=per))
store.close()
"""


def code_of(ref: str) -> Path:
    """The package as of git ``ref``, unpacked under WORK (its own sys.path root)."""
    dest = WORK / f"code-{ref}"
    if not (dest / "chronicle_integrations").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "chronicle_integrations"],
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest)
    return dest


@contextlib.contextmanager
def server(code: Path, store_url: str, assets: Path, log: Path) -> Any:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(code)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chronicle_integrations.server",
                "--port",
                str(port),
                "--store",
                store_url,
                "--assets",
                str(assets),
                "--log-level",
                "warning",
            ],
            cwd=code,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/health", proc=proc)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(url: str, repeat: int, walk: bool) -> dict[str, Any]:
    import requests

    session = requests.Session()
    times, size, count = [], 0, 0
    for _ in range(repeat):
        start = time.perf_counter()
        resp = session.get(url + "/v1/runs", timeout=600)
        resp.raise_for_status()
        times.append(time.perf_counter() - start)
        size, count = len(resp.content), len(resp.json()["runs"])
    result: dict[str, Any] = {"first_request_s": stats(times), "bytes": size, "runs": count}
    if walk:
        walks = []
        for _ in range(max(1, repeat // 2)):
            start, cursor, total = time.perf_counter(), None, 0
            while True:
                body = session.get(
                    url + "/v1/runs", params={"limit": 1000, "cursor": cursor}, timeout=600
                ).json()
                total += len(body["runs"])
                cursor = body.get("next_cursor")
                if cursor is None:
                    break
            walks.append(time.perf_counter() - start)
        result["walk_all_s"] = stats(walks)
        result["walk_all_runs"] = total
    session.close()
    return result


def crowd(url: str, pid: int, listers: int = 16) -> dict[str, Any]:
    """16 clients each GET /v1/runs once at the same time (as in the issue) while one
    more client creates, starts and succeeds a run: that lifecycle's time and the server's
    peak RSS (VmHWM)."""
    import threading

    import requests

    go = threading.Barrier(listers + 1)

    def lister() -> None:
        with requests.Session() as s:
            go.wait()
            s.get(url + "/v1/runs", timeout=600).raise_for_status()

    threads = [threading.Thread(target=lister) for _ in range(listers)]
    for thread in threads:
        thread.start()
    with requests.Session() as s:
        go.wait()
        time.sleep(0.2)  # the listings are under way
        start = time.perf_counter()
        info = s.post(url + "/v1/experiments/bench-0000/variations/0/runs", timeout=600).json()
        path = f"/v1/runs/bench-0000/0/{info['run']}"
        lease = s.post(url + path + "/start", json={}, timeout=600).json()["lease"]
        s.post(url + path + "/succeed", json={"lease": lease}, timeout=600).raise_for_status()
        lifecycle = time.perf_counter() - start
    for thread in threads:
        thread.join()
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return {"create_start_succeed_s": lifecycle, "server_peak_rss_bytes": hwm}


def run_variant(
    name: str, code: Path, store_url: str, runs: int, repeat: int, walk: bool
) -> dict[str, Any]:
    base = WORK / f"pages-{name}-{os.getpid()}"
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    subprocess.run(
        [sys.executable, "-c", SEED, store_url, str(base / "assets"), str(runs)],
        cwd=code,
        env=env,
        check=True,
    )
    with server(code, store_url, base / "assets", base / "server.log") as (url, pid):
        result = measure(url, repeat, walk)
        result["under_16_listings"] = crowd(url, pid)
    print(
        name,
        result["runs"],
        "runs",
        result["bytes"],
        "bytes",
        f"{result['first_request_s']['median']:.3f} s",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--base", default="main", help="git ref of the unpaged code")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    old, new = code_of(args.base), ROOT
    results: dict[str, Any] = {"runs": args.runs, "base": args.base}
    backends = ["sqlite"] + ([] if args.no_postgres else ["postgres"])
    for backend in backends:
        for name, code, walk in (("full", old, False), ("paged", new, True)):
            key = f"{backend}-{name}"
            if backend == "sqlite":
                db = WORK / f"pages-{key}-{os.getpid()}.db"
                results[key] = run_variant(
                    key, code, f"sqlite:///{db}", args.runs, args.repeat, walk
                )
            else:
                with scratch_postgres(f"pages_{name}") as url:
                    results[key] = run_variant(key, code, url, args.runs, args.repeat, walk)
    save("pages", results)


if __name__ == "__main__":
    main()
