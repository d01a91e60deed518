"""Profile the Chronicle server under heartbeat load: py-spy (from the peers venv) samples the
server process while benchmarks/loadgen.py drives N clients; prints the hottest frames.

    .venv/bin/python benchmarks/profile_server.py [--backend sqlite|postgres] [--clients 64]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
import bench_server
import loadgen


def summarize(raw: Path, top: int = 30) -> str:
    """Inclusive/exclusive sample counts per function from py-spy's collapsed stacks."""
    incl: collections.Counter = collections.Counter()
    excl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")[1:]  # drop the thread name
        for f in set(frames):
            incl[f] += n
        if frames:
            excl[frames[-1]] += n
    lines = [f"{total} samples", "", "inclusive (top):"]
    lines += [f"{n / total * 100:5.1f}%  {f}" for f, n in incl.most_common(top)]
    lines += ["", "exclusive (top):"]
    lines += [f"{n / total * 100:5.1f}%  {f}" for f, n in excl.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="sqlite")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=8.0)
    a = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="prof-", dir=c.WORK))
    databases = contextlib.ExitStack()
    try:
        if a.backend == "postgres":
            store = databases.enter_context(c.scratch_postgres("prof"))
        else:
            store = f"sqlite:///{scratch}/p.db"
        with c.chronicle_server(store, scratch / "assets", scratch / "server.log") as server:
            makers = bench_server.chronicle_targets(server, a.clients)
            raw = c.RESULTS / f"profile_server_{a.backend}_{a.clients}.raw.txt"
            spy = subprocess.Popen(
                [
                    str(c.HERE / ".peers-venv" / "bin" / "py-spy"),
                    "record",
                    "--pid",
                    str(server.pid),
                    "--duration",
                    str(int(a.duration)),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "-o",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            r = loadgen.run("127.0.0.1", server.port, makers, a.duration - 1, 0.5, server.pids())
            spy.wait(60)
            print(r)
            report = summarize(raw)
            out = c.RESULTS / f"profile_server_{a.backend}_{a.clients}.txt"
            out.write_text(f"{r}\n\n{report}\n")
            print(report)
    finally:
        databases.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
