"""Figure 7: end-of-run wait. ``run.upload_asset(ckpt)`` immediately followed by
``run.succeed()``: succeed() must return no later than the upload's own completion plus
50 ms (the wait itself adds nothing but the succeed request).

Measured per repeat: t_call (upload_asset returns), t_done (the upload's future resolves:
verified and published, from a done-callback on the worker), t_end (succeed returns).
Reported: overhead = t_end - t_done (goal <= 50 ms), and the remaining upload time
t_done - t_call, for the embedded store and for a server on loopback.

    .venv/bin/python benchmarks/bench_endwait.py [--quick]
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
from bench_upload import fmt_size, parse_size


def one(ch, exp: str, src: Path) -> dict:
    run = ch.create_run(exp, 0).start()
    done: dict = {}
    t0 = time.perf_counter()
    handle = run.upload_asset(src)
    t_call = time.perf_counter()
    handle.futures[0].add_done_callback(lambda f: done.setdefault("t", time.perf_counter()))
    run.succeed()
    t_end = time.perf_counter()
    assert run.state.value == "succeeded" and handle.done()
    return {
        "overhead_ms": (t_end - done["t"]) * 1e3,
        "upload_s": done["t"] - t_call,
        "call_ms": (t_call - t0) * 1e3,
        "total_s": t_end - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes")
    p.add_argument("--repeats", type=int)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    sizes = [
        parse_size(s) for s in (a.sizes or ("16M,64M" if a.quick else "64M,256M,1G")).split(",")
    ]
    repeats = a.repeats or (3 if a.quick else 5)
    from chronicle_integrations import Chronicle

    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="endwait-", dir=c.WORK))
    out: dict = {
        "repeats": repeats,
        "modes": {},
        "versions": c.versions("chronicle-integrations", "requests", "uvicorn"),
    }
    try:
        with c.chronicle_server(
            f"sqlite:///{scratch}/server.db", scratch / "assets", scratch / "server.log"
        ) as server:
            for mode in ("http", "embedded"):
                url = server.url if mode == "http" else None
                with Chronicle(url=url, home=scratch / f"home-{mode}") as ch:
                    exp = ch.create_experiment("endwait", variations=[{}])
                    for size in sizes:
                        src = c.make_file(c.WORK / "data" / f"blob-{size}.bin", size)
                        rs = [one(ch, exp, src) for _ in range(repeats)]
                        for d in (scratch / "assets", scratch / f"home-{mode}" / "assets"):
                            for f in d.rglob("*") if d.exists() else ():
                                if f.is_file() and f.stat().st_size > 2**20:
                                    f.unlink()
                        s = {k: c.stats([r[k] for r in rs]) for k in rs[0]}
                        out["modes"].setdefault(mode, {})[fmt_size(size)] = s
                        print(
                            f"{mode:8s} {fmt_size(size):>7s}: succeed() returned "
                            f"{s['overhead_ms']['median']:.1f} ms "
                            f"[{s['overhead_ms']['min']:.1f}-{s['overhead_ms']['max']:.1f}] "
                            f"after the upload finished (upload {s['upload_s']['median']:.2f}s,"
                            f" upload_asset call {s['call_ms']['median']:.2f} ms)",
                            flush=True,
                        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    c.save("fig7_endwait" + ("_quick" if a.quick else ""), out)


if __name__ == "__main__":
    main()
