"""The blob store paces writeback inside ``append``: however the caller chunks its bytes (the
embedded store hands a whole file to one append; the server appends ~1 MiB batches), the kernel
is asked to start writing at least every ``WRITEBACK_EVERY`` bytes, so a large upload is not
stalled by dirty-page throttling. Observed through the real ``posix_fadvise`` calls (recorded,
then made)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import testkit

from chronicle_integrations import Chronicle
from chronicle_integrations.store import blobs

MiB = 2**20
EVERY = 4 * MiB  # a small pace for the test; the shipped one is pinned below


@pytest.fixture
def hints(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every DONTNEED hint as (offset, length), in order; the real call still happens."""
    seen: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            seen.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    monkeypatch.setattr(blobs, "WRITEBACK_EVERY", EVERY)
    return seen


def _assert_paced(seen: list[tuple[int, int]], total: int) -> None:
    assert seen, "no writeback hint at all"
    # Contiguous from 0 to the end, none longer than the pace allows (plus one chunk).
    position = 0
    for offset, length in seen:
        assert offset == position, seen
        assert length <= EVERY + MiB, seen
        position += length
    assert position == total


def test_the_shipped_pace_is_the_measured_one() -> None:
    assert 8 * MiB <= blobs.WRITEBACK_EVERY <= 64 * MiB


def test_one_large_append_is_hinted_as_it_goes(
    tmp_path: Path, hints: list[tuple[int, int]]
) -> None:
    store = blobs.LocalBlobStore(tmp_path / "blobs")
    owner = store.claim("u1", 0)
    data = os.urandom(MiB)
    total = 9 * EVERY + 3 * MiB
    written = store.append("u1", 0, (data for _ in range(total // MiB)), owner)
    assert written == total
    _assert_paced(hints, total)


def test_the_embedded_upload_path_is_paced(tmp_path: Path, hints: list[tuple[int, int]]) -> None:
    source = tmp_path / "model.ckpt"
    total = 5 * EVERY + 512 * 1024
    with source.open("wb") as fh:
        for _ in range(total // (512 * 1024)):
            fh.write(os.urandom(512 * 1024))
    with Chronicle(home=tmp_path / "home") as chronicle:
        exp = chronicle.create_experiment("pacing", variations=[{}])
        run = chronicle.create_run(exp, 0).start()
        asset: Any = run.upload_asset(source).result(timeout=120)
        run.succeed()
    assert asset.sha256 == testkit.sha256_file(source)
    _assert_paced(hints, total)
