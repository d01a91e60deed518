"""Profile one big upload: py-spy (peers venv) samples the uploading client process and the
server; prints the CPU each used (cores) and their hottest frames.

    .venv/bin/python benchmarks/profile_upload.py [--size 1G]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
from bench_upload import parse_size
from profile_server import summarize

CLIENT = r"""
import sys, time
from chronicle_integrations import Chronicle
ch = Chronicle(url={url!r}, home={home!r})
exp = ch.create_experiment("prof", variations=[{{}}])
run = ch.create_run(exp, 0).start()
sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.readline()
t0 = time.perf_counter()
run.upload_asset({path!r}).result()
print(f"upload {{time.perf_counter() - t0:.2f}}s", flush=True)
run.succeed(); ch.close()
"""


def main() -> None:
    import psutil

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--no-spy", action="store_true", help="CPU use only (no sampling overhead)")
    p.add_argument(
        "--patches",
        default="",
        help="run the server with these patched_server.py patches (comma-separated)",
    )
    a = p.parse_args()
    size = parse_size(a.size)
    src = c.make_file(c.WORK / "data" / f"blob-{size}.bin", size)
    scratch = Path(tempfile.mkdtemp(prefix="profup-", dir=c.WORK))
    spy = str(c.HERE / ".peers-venv" / "bin" / "py-spy")
    try:
        with c.chronicle_server(
            f"sqlite:///{scratch}/s.db",
            scratch / "assets",
            scratch / "server.log",
            patches=a.patches,
        ) as server:
            client = subprocess.Popen(
                [
                    str(c.PROJECT_PY),
                    "-c",
                    CLIENT.format(url=server.url, home=str(scratch / "home"), path=str(src)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout.readline().strip() == "ready"
            spies = {}
            for who, pid in () if a.no_spy else (("client", client.pid), ("server", server.pid)):
                raw = c.RESULTS / f"profile_upload_{who}.raw.txt"
                spies[who] = (
                    subprocess.Popen(
                        [
                            spy,
                            "record",
                            "--pid",
                            str(pid),
                            "--rate",
                            "250",
                            "--format",
                            "raw",
                            "--threads",
                            "-o",
                            str(raw),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                    raw,
                )
            time.sleep(1.0)
            procs = {"client": psutil.Process(client.pid), "server": psutil.Process(server.pid)}
            cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
            t0 = time.perf_counter()
            client.stdin.write("go\n")
            client.stdin.flush()
            line = client.stdout.readline().strip()
            wall = time.perf_counter() - t0
            cpu1 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
            for proc, _ in spies.values():
                proc.send_signal(2)
                proc.wait(30)
            client.communicate(timeout=60)
        lines = [
            f"{line}; {size / 2**20 / wall:.0f} MiB/s; CPU over the upload: "
            + ", ".join(f"{k} {(cpu1[k] - cpu0[k]) / wall:.2f} cores" for k in procs)
        ]
        for who, (_, raw) in spies.items():
            lines += ["", f"== {who}", summarize(raw, top=25)]
        text = "\n".join(lines)
        if not a.no_spy:
            (c.RESULTS / "profile_upload.txt").write_text(text)
        print(text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
