"""Uploads into the embedded store against ``cp`` + ``fsync`` of the same file, interleaved.

Three variants per round, in rotating order: ``cp`` + ``fsync`` (the disk's baseline), the
embedded upload as shipped (writeback paced every ``blobs.WRITEBACK_EVERY`` bytes) and the
embedded upload with pacing off (``WRITEBACK_EVERY`` set beyond the file's size: the behaviour
before the pacing, hinted only at the end). Page cache warm (the source is read once first).

    .venv/bin/python benchmarks/bench_embedded_upload.py [--sizes 256,1024] [--repeats 3]

Prints one JSON line per measurement and a summary (medians, min-max, ratios to cp+fsync).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from chronicle_integrations import Chronicle
from chronicle_integrations.store import blobs

MiB = 2**20


def _make(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as fh:
        for _ in range(size // MiB):
            fh.write(block)
    with path.open("rb") as fh:  # warm the page cache
        while fh.read(8 * MiB):
            pass


def _cp_fsync(src: Path, work: Path) -> float:
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
    return elapsed


def _embedded(src: Path, work: Path, paced: bool) -> float:
    saved = blobs.WRITEBACK_EVERY
    blobs.WRITEBACK_EVERY = saved if paced else 2**62
    home = Path(tempfile.mkdtemp(dir=work))
    try:
        with Chronicle(home=home) as chronicle:
            exp = chronicle.create_experiment("bench", variations=[{}])
            run = chronicle.create_run(exp, 0).start()
            start = time.perf_counter()
            run.upload_asset(src).result()
            elapsed = time.perf_counter() - start
            run.succeed()
        return elapsed
    finally:
        blobs.WRITEBACK_EVERY = saved
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024", help="MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="directory on the disk to measure")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-embedded-"))
    work.mkdir(parents=True, exist_ok=True)
    variants = {
        "cp+fsync": lambda src: _cp_fsync(src, work),
        "embedded": lambda src: _embedded(src, work, paced=True),
        "embedded, no pacing": lambda src: _embedded(src, work, paced=False),
    }
    results: dict[tuple[int, str], list[float]] = {}
    try:
        for size_mib in (int(s) for s in args.sizes.split(",")):
            src = work / f"src-{size_mib}.bin"
            _make(src, size_mib * MiB)
            names = list(variants)
            for round_ in range(args.repeats):
                order = names[round_ % len(names) :] + names[: round_ % len(names)]
                for name in order:
                    seconds = variants[name](src)
                    results.setdefault((size_mib, name), []).append(seconds)
                    print(json.dumps({"size_mib": size_mib, "variant": name, "s": seconds}))
            src.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nsize  variant               median s  [min-max]        MiB/s   x cp+fsync")
    for (size_mib, name), values in results.items():
        base = statistics.median(results[(size_mib, "cp+fsync")])
        med = statistics.median(values)
        print(
            f"{size_mib:>4}  {name:<20}  {med:8.2f}  [{min(values):.2f}-{max(values):.2f}]"
            f"  {size_mib / med:7.0f}   {base / med:5.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
