"""A 2 GiB upload in 64 MiB chunks (and its download) with the server's memory flat.

Slow (it moves 4 GiB through loopback and writes 2 GiB twice): runs only with
``CHRONICLE_SLOW_TESTS=1``. It prints the throughput next to ``cp`` of the same file (run with
``-s`` to see it) but asserts no times, only the server's peak RSS growth.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from server_helpers import Api

MiB = 1024 * 1024
SIZE = 2048 * MiB
CHUNK = 64 * MiB
MAX_RSS_GROWTH = 100 * MiB

pytestmark = pytest.mark.slow


class PeakRss:
    """Samples a process's RSS on a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.every = every
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def make_file(path: Path) -> str:
    """Write SIZE bytes (random blocks, each made unique) and return their SHA-256."""
    block = bytearray(os.urandom(CHUNK))
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for i in range(SIZE // CHUNK):
            block[:8] = i.to_bytes(8, "little")
            fh.write(block)
            digest.update(block)
    return digest.hexdigest()


def test_2gib_upload_keeps_server_memory_flat(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory()
    api = Api(server.url)
    source = tmp_path / "big.bin"
    digest = make_file(source)

    # The reference: cp of the same (page-cached) file on the same disk. Dirty pages are
    # flushed before each measurement so neither pays for the other's writeback.
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", str(source), str(tmp_path / "copy.bin")], check=True)
    cp_seconds = time.perf_counter() - t0
    (tmp_path / "copy.bin").unlink()
    os.sync()

    path, lease = api.started()
    api.upload(path, "warmup.bin", b"w" * (3 * MiB), lease)  # imports, pools, threads
    baseline = psutil.Process(server.proc.pid).memory_info().rss
    uid = api.ok(
        "POST", f"{path}/uploads", 201, json={"name": "big.bin", "size": SIZE, "lease": lease}
    )["upload_id"]
    server_process = psutil.Process(server.proc.pid)
    cpu_before = server_process.cpu_times()
    session = requests.Session()
    # The client reads the next chunk (into a reused buffer) while it sends the current one,
    # as a good client does, so that the figure measures the server rather than the client.
    buffers = [bytearray(CHUNK), bytearray(CHUNK)]
    with (
        PeakRss(server.proc.pid) as upload_rss,
        source.open("rb", buffering=0) as fh,
        concurrent.futures.ThreadPoolExecutor(1) as reader,
    ):
        t0 = time.perf_counter()
        offset = 0
        pending = reader.submit(fh.readinto, buffers[0])
        for index in itertools.count():
            size = pending.result()
            if not size:
                break
            current = buffers[index % 2]
            pending = reader.submit(fh.readinto, buffers[(index + 1) % 2])
            resp = session.put(
                f"{server.url}/v1/uploads/{uid}",
                params={"offset": offset},
                data=current if size == CHUNK else bytes(current[:size]),
                timeout=600,
            )
            assert resp.status_code == 200, resp.text
            offset += size
            assert resp.json()["offset"] == offset
        asset = api.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": digest}, timeout=600)
        upload_seconds = time.perf_counter() - t0
    cpu_after = server_process.cpu_times()
    server_cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    assert asset["size"] == SIZE and asset["sha256"] == digest

    with PeakRss(server.proc.pid) as download_rss:
        t0 = time.perf_counter()
        check = hashlib.sha256()
        with session.get(f"{server.url}{path}/assets/big.bin", stream=True, timeout=600) as resp:
            assert resp.status_code == 200
            for block in resp.iter_content(4 * MiB):
                check.update(block)
        download_seconds = time.perf_counter() - t0
    assert check.hexdigest() == digest

    mb = SIZE / 1e6
    report = (
        f"\n2 GiB upload: {upload_seconds:.2f} s = {mb / upload_seconds:.0f} MB/s "
        f"(cp: {cp_seconds:.2f} s = {mb / cp_seconds:.0f} MB/s, "
        f"ratio {cp_seconds / upload_seconds:.2f}); "
        f"server RSS growth {(upload_rss.peak - baseline) / MiB:.1f} MiB, "
        f"server CPU {server_cpu:.2f} s; load average {os.getloadavg()[0]:.1f}\n"
        f"2 GiB download: {download_seconds:.2f} s = {mb / download_seconds:.0f} MB/s; "
        f"server RSS growth {(download_rss.peak - baseline) / MiB:.1f} MiB"
    )
    print(report)
    api.close()
    session.close()
    (tmp_path.parent / "large_upload_report.txt").write_text(report)
    assert upload_rss.peak - baseline < MAX_RSS_GROWTH, report
    assert download_rss.peak - baseline < MAX_RSS_GROWTH, report
    shutil.rmtree(server.assets, ignore_errors=True)
