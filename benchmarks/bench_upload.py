"""Figure 3: upload throughput and memory, one big asset client -> server over loopback.

Per size, per repeat (interleaved, same source file, page-cache warm for all):
  cp       : ``cp SRC DST`` then ``sync DST`` (fsync: the server fsyncs a committed asset,
             so the baseline gets the same durability); cp alone is recorded as well.
  chronicle: ``run.upload_asset(SRC)`` to a Chronicle server (SQLite store, assets on the same
             disk) then ``run.succeed()``; time = call until the upload's future resolved
             (SHA-256 verified, asset published). Also recorded: the end-of-run wait (figure 7)
             = succeed() return minus upload completion.
  mlflow   : ``mlflow.log_artifact(SRC)`` to ``mlflow server --serve-artifacts`` (proxied
             artifact upload), in the peers venv (child process).
Peak RSS growth (psutil, 20 ms sampling) of the uploading client and of the server processes.

    .venv/bin/python benchmarks/bench_upload.py [--quick] [--sizes 256M,2G,4G]
"""

from __future__ import annotations

import argparse
import contextlib
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

MLFLOW_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {here!r})
import _common as c
import mlflow
mlflow.set_tracking_uri({url!r})
mlflow.set_experiment("upload")
with mlflow.start_run():
    with c.RssSampler({{"client": [os.getpid()]}}) as rss:
        t0 = time.perf_counter()
        mlflow.log_artifact({path!r})
        t1 = time.perf_counter()
print(json.dumps({{"seconds": t1 - t0, "client_rss_growth_mib": rss.growth_mib()["client"]}}))
"""


def parse_size(s: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


def fmt_size(n: int) -> str:
    return f"{n / 2**30:g}GiB" if n >= 2**30 else f"{n / 2**20:g}MiB"


def timed_cp(src: Path, dst: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    t1 = time.perf_counter()
    subprocess.run(["sync", str(dst)], check=True)
    t2 = time.perf_counter()
    dst.unlink()
    return t1 - t0, t2 - t0


def chronicle_upload(ch, exp: str, src: Path, server: c.Server) -> dict:
    run = ch.create_run(exp, 0).start()
    done: dict = {}
    with c.RssSampler({"client": [os.getpid()], "server": server.pids()}) as rss:
        t0 = time.perf_counter()
        handle = run.upload_asset(src)
        t_call = time.perf_counter()
        handle.futures[0].add_done_callback(lambda f: done.setdefault("t", time.perf_counter()))
        run.succeed()
        t_end = time.perf_counter()
    info = handle.result()
    assert info.size == src.stat().st_size
    return {
        "seconds": done["t"] - t0,
        "call_ms": (t_call - t0) * 1e3,
        "end_wait_overhead_ms": (t_end - done["t"]) * 1e3,
        "client_rss_growth_mib": rss.growth_mib()["client"],
        "server_rss_growth_mib": rss.growth_mib()["server"],
    }


def mlflow_upload(src: Path, server: c.Server) -> dict:
    code = MLFLOW_CHILD.format(here=str(c.HERE), url=server.url, path=str(src))
    with c.RssSampler({"server": server.pids()}) as rss:
        out = subprocess.run([str(c.PEERS_PY), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["server_rss_growth_mib"] = rss.growth_mib()["server"]
    return data


def clean_dir(path: Path) -> None:
    """Delete uploaded asset bytes between repeats (keeps the disk from filling up)."""
    for p in path.rglob("*"):
        if p.is_file() and p.stat().st_size > 2**20:
            p.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes")
    p.add_argument("--repeats", type=int)
    p.add_argument("--peers", default="mlflow")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    sizes = [
        parse_size(s) for s in (a.sizes or ("64M,256M" if a.quick else "256M,2G,4G")).split(",")
    ]
    repeats = a.repeats or (2 if a.quick else 3)
    c.WORK.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(c.WORK).free
    if max(sizes) * 4 > free:
        print(f"skipping sizes above {fmt_size(free // 4)}: only {fmt_size(free)} free")
        sizes = [s for s in sizes if s * 4 <= free]
    scratch = Path(tempfile.mkdtemp(prefix="upload-", dir=c.WORK))
    data_dir = c.WORK / "data"
    use_mlflow = "mlflow" in a.peers and c.peers_ready()
    out: dict = {
        "repeats": repeats,
        "sizes": {},
        "versions": c.versions("requests", "uvicorn", "fastapi", "mlflow"),
    }
    from chronicle_integrations import Chronicle

    servers = contextlib.ExitStack()  # stopped whatever happens
    try:
        server = servers.enter_context(
            c.chronicle_server(
                f"sqlite:///{scratch}/server.db", scratch / "assets", scratch / "chronicle.log"
            )
        )
        mlf = (
            servers.enter_context(
                c.mlflow_server(
                    f"sqlite:///{scratch}/mlflow.db", scratch / "mlflow-art", scratch / "mlflow.log"
                )
            )
            if use_mlflow
            else None
        )
        ch = Chronicle(url=server.url, home=scratch / "client-home")
        exp = ch.create_experiment("upload", variations=[{}])
        try:
            for size in sizes:
                src = c.make_file(data_dir / f"blob-{size}.bin", size)
                with open(src, "rb") as fh:  # warm the page cache for every contender
                    while fh.read(64 << 20):
                        pass
                res: dict = {"cp": [], "cp_nosync": [], "chronicle": [], "mlflow": []}
                for rep in range(repeats if size <= 2**31 else 1):  # 4 GiB: once (time budget)
                    nosync, withsync = timed_cp(src, scratch / "cp-dst.bin")
                    res["cp"].append(withsync)
                    res["cp_nosync"].append(nosync)
                    r = chronicle_upload(ch, exp, src, server)
                    res["chronicle"].append(r)
                    clean_dir(scratch / "assets")
                    line = (
                        f"  {fmt_size(size)} rep {rep}: cp+sync {withsync:.2f}s "
                        f"(cp {nosync:.2f}s)  chronicle {r['seconds']:.2f}s "
                        f"(rss client +{r['client_rss_growth_mib']:.0f} MiB, server "
                        f"+{r['server_rss_growth_mib']:.0f} MiB, end wait "
                        f"+{r['end_wait_overhead_ms']:.1f} ms)"
                    )
                    if mlf is not None:
                        m = mlflow_upload(src, mlf)
                        res["mlflow"].append(m)
                        clean_dir(scratch / "mlflow-art")
                        line += (
                            f"  mlflow {m['seconds']:.2f}s (rss client "
                            f"+{m['client_rss_growth_mib']:.0f} MiB, server "
                            f"+{m['server_rss_growth_mib']:.0f} MiB)"
                        )
                    print(line, flush=True)
                mib = size / 2**20
                summary = {"cp_s": c.stats(res["cp"]), "cp_nosync_s": c.stats(res["cp_nosync"])}
                for who in ("chronicle", "mlflow"):
                    if res[who]:
                        summary[f"{who}_s"] = c.stats([r["seconds"] for r in res[who]])
                        for k in res[who][0]:
                            if k != "seconds":
                                summary[f"{who}_{k}"] = c.stats([r[k] for r in res[who]])
                for k in list(summary):
                    if k.endswith("_s") and summary[k]["n"]:
                        summary[k.replace("_s", "_mib_per_s", 1)] = mib / summary[k]["median"]
                summary["chronicle_vs_cp"] = (
                    summary["cp_s"]["median"] / summary["chronicle_s"]["median"]
                )
                summary["chronicle_vs_cp_nosync"] = (
                    summary["cp_nosync_s"]["median"] / summary["chronicle_s"]["median"]
                )
                if res["mlflow"]:
                    summary["mlflow_vs_cp"] = (
                        summary["cp_s"]["median"] / summary["mlflow_s"]["median"]
                    )
                out["sizes"][fmt_size(size)] = summary
                print(
                    f"{fmt_size(size)}: chronicle {summary['chronicle_mib_per_s']:.0f} MiB/s "
                    f"= {summary['chronicle_vs_cp']:.2f}x cp+sync "
                    f"({summary['chronicle_vs_cp_nosync']:.2f}x cp)"
                    + (
                        f"; mlflow {summary['mlflow_mib_per_s']:.0f} MiB/s = "
                        f"{summary['mlflow_vs_cp']:.2f}x cp+sync"
                        if res["mlflow"]
                        else ""
                    ),
                    flush=True,
                )
        finally:
            ch.close()
    finally:
        servers.close()
        shutil.rmtree(scratch, ignore_errors=True)
    c.save("fig3_upload" + ("_quick" if a.quick else ""), out)


if __name__ == "__main__":
    main()
