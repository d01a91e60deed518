"""Figure 3e: uploads into the embedded store and over HTTP against ``cp`` + ``fsync`` of the
same file, interleaved in one run (issue #20).

Variants per round, in rotating order:

- ``cp+fsync``: ``shutil.copyfile`` (the kernel copies) and an ``fsync``: the disk's baseline;
- ``embedded``: ``run.upload_asset(path).result()`` into an embedded home (the store copies
  the file with ``copy_file_range`` and hashes what it wrote on a second thread);
- ``http``: the same call against a ``chronicle server`` on loopback (SQLite, local assets);
- ``embedded, no pacing`` (with ``--unpaced``): the embedded upload with ``WRITEBACK_EVERY``
  beyond the file's size (one copy, writeback requested only at the end).

The source is in the page cache (read once first). For each upload the peak RSS growth of
the client process (which is the store, embedded) and of the server is sampled.

    .venv/bin/python benchmarks/bench_embedded_upload.py [--sizes 256,1024,4096] [--repeats 3]

Writes ``benchmarks/results/fig3e_embedded.json`` and prints medians, min-max and ratios to
``cp`` + ``fsync``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

from chronicle_integrations import Chronicle
from chronicle_integrations.store import blobs

MiB = 2**20


def _warm(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(8 * MiB):
            pass


def _cp_fsync(src: Path, work: Path, _: dict[str, list[int]]) -> tuple[float, dict[str, float]]:
    dst = work / "copy.bin"
    start = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    dst.unlink()
    return elapsed, {}


def _upload(chronicle: Chronicle, src: Path, pids: dict[str, list[int]]) -> tuple[float, Any]:
    exp = chronicle.create_experiment("bench", variations=[{}])
    run = chronicle.create_run(exp, 0).start()
    with c.RssSampler(pids) as rss:
        start = time.perf_counter()
        run.upload_asset(src).result()
        elapsed = time.perf_counter() - start
    run.succeed()
    return elapsed, rss.growth_mib()


def _embedded(
    src: Path, work: Path, pids: dict[str, list[int]], paced: bool = True
) -> tuple[float, dict[str, float]]:
    saved = blobs.WRITEBACK_EVERY
    blobs.WRITEBACK_EVERY = saved if paced else 2**62
    home = Path(tempfile.mkdtemp(dir=work))
    try:
        with Chronicle(home=home) as chronicle:
            return _upload(chronicle, src, {"client": pids["client"]})
    finally:
        blobs.WRITEBACK_EVERY = saved
        shutil.rmtree(home, ignore_errors=True)


def _http(server: c.Server) -> Callable[..., tuple[float, dict[str, float]]]:
    def run(src: Path, work: Path, pids: dict[str, list[int]]) -> tuple[float, dict[str, float]]:
        home = Path(tempfile.mkdtemp(dir=work))
        try:
            with Chronicle(url=server.url, home=home) as chronicle:
                return _upload(chronicle, src, {**pids, "server": [server.pid]})
        finally:
            shutil.rmtree(home, ignore_errors=True)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024,4096", help="MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unpaced", action="store_true", help="also the unpaced embedded upload")
    parser.add_argument("--work", default=None, help="directory on the disk to measure")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-embedded-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    pids = {"client": [os.getpid()]}
    try:
        with c.chronicle_server(
            f"sqlite:///{work / 'server.db'}", work / "server-assets", work / "server.log"
        ) as server:
            variants: dict[str, Callable[..., tuple[float, dict[str, float]]]] = {
                "cp+fsync": _cp_fsync,
                "embedded": _embedded,
                "http": _http(server),
            }
            if args.unpaced:
                variants["embedded, no pacing"] = lambda s, w, p: _embedded(s, w, p, paced=False)
            for size_mib in (int(s) for s in args.sizes.split(",")):
                src = work / f"src-{size_mib}.bin"
                c.make_file(src, size_mib * MiB)
                names = list(variants)
                for round_ in range(args.repeats):
                    order = names[round_ % len(names) :] + names[: round_ % len(names)]
                    for name in order:
                        _warm(src)
                        seconds, rss = variants[name](src, work, pids)
                        row = results.setdefault(f"{size_mib} {name}", {"s": [], "rss": []})
                        row["s"].append(seconds)
                        row["rss"].append(rss)
                        print(f"{size_mib} MiB  {name:<20} {seconds:7.3f} s  rss {rss}", flush=True)
                src.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    print("\nsize  variant               median s  [min-max]        MiB/s   x cp+fsync   RSS+ MiB")
    for key, row in results.items():
        size_mib, name = key.split(" ", 1)
        base = statistics.median(results[f"{size_mib} cp+fsync"]["s"])
        med = statistics.median(row["s"])
        peaks: dict[str, float] = {}
        for sample in row["rss"]:
            for who, mib in sample.items():
                peaks[who] = max(peaks.get(who, 0.0), mib)
        summary[key] = {"s": c.stats(row["s"]), "x_cp_fsync": base / med, "rss_peak_mib": peaks}
        print(
            f"{size_mib:>4}  {name:<20}  {med:8.2f}  [{min(row['s']):.2f}-{max(row['s']):.2f}]"
            f"  {int(size_mib) / med:7.0f}   {base / med:5.2f}   "
            + ", ".join(f"{w} {m:.0f}" for w, m in peaks.items())
        )
    c.save("fig3e_embedded", {"sizes_mib": args.sizes, "repeats": args.repeats, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
