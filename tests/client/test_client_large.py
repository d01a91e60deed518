"""A 2 GiB upload over HTTP: digest end to end, bounded client memory. ``slow``: run with
``CHRONICLE_SLOW_TESTS=1``."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from client_helpers import sha256_file, write_random

from chronicle_integrations import Chronicle

GiB = 1024**3
MiB = 1024**2


class PeakRSS:
    """Samples this process's resident set size on a thread; ``growth`` is peak - baseline."""

    def __init__(self, every: float = 0.02) -> None:
        self._proc = psutil.Process()
        self._every = every
        self._stop = threading.Event()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._every)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.mark.slow
def test_two_gib_upload_over_http(http_server: Any, tmp_path: Path, record_property: Any) -> None:
    server = http_server()
    src = tmp_path / "big.bin"
    started = time.monotonic()
    digest = write_random(src, 2 * GiB)  # real bytes on disk, not a sparse file
    assert src.stat().st_blocks * 512 >= 2 * GiB
    write_s = time.monotonic() - started

    chronicle = Chronicle(url=server.url, home=tmp_path / "home", timeout=60)
    try:
        exp = chronicle.create_experiment("big", variations=[{}])
        run = chronicle.create_run(exp, 0).start()
        with PeakRSS() as upload_rss:
            started = time.monotonic()
            info = run.upload_asset(src).result(1800)
            run.succeed()
            upload_s = time.monotonic() - started
        assert info.sha256 == digest and info.size == 2 * GiB
        assert run.info().asset_count == 1

        with PeakRSS() as download_rss:
            started = time.monotonic()
            out = run.download_asset("big.bin", tmp_path / "back.bin")  # verifies the SHA-256
            download_s = time.monotonic() - started
        assert sha256_file(out) == digest
    finally:
        chronicle.close(timeout=30)

    numbers = {
        "write_s": round(write_s, 1),
        "upload_s": round(upload_s, 1),
        "upload_MiB_per_s": round(2 * GiB / MiB / upload_s, 1),
        "upload_rss_growth_MiB": round(upload_rss.growth / MiB, 1),
        "download_s": round(download_s, 1),
        "download_rss_growth_MiB": round(download_rss.growth / MiB, 1),
    }
    for key, value in numbers.items():
        record_property(key, value)
    print(f"\n2 GiB over HTTP: {numbers}")
    assert upload_rss.growth < 100 * MiB, numbers
    assert download_rss.growth < 100 * MiB, numbers
