"""The blob store paces writeback inside every append: however the caller hands over its bytes
(the embedded store gives a whole file to one ``append_file``, which the kernel copies; the
server appends ~1 MiB batches of what it receives), the kernel is asked to start writing at
least every ``WRITEBACK_EVERY`` bytes, so a large upload is not stalled by dirty-page
throttling. Observed through the real writeback requests (recorded, then made).

Also here: ``append_file``'s kernel copy keeps the running digest equal to the SHA-256 of the
stored bytes, and falls back to read-and-write where the kernel cannot copy between the two
files (a source on another filesystem: ``/dev/shm`` is tmpfs, the store is not)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
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
    """Every writeback request as (offset, length), in order; the real one still happens."""
    seen: list[tuple[int, int]] = []
    real = blobs._start_writeback

    def record(fd: int, offset: int, length: int) -> None:
        if length > 0:
            seen.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(blobs, "_start_writeback", record)
    monkeypatch.setattr(blobs, "WRITEBACK_EVERY", EVERY)
    return seen


def _assert_paced(seen: list[tuple[int, int]], total: int) -> None:
    assert seen, "no writeback request at all"
    # Contiguous from 0 to the end, none longer than the pace allows (plus one chunk).
    position = 0
    for offset, length in seen:
        assert offset == position, seen
        assert length <= EVERY + MiB, seen
        position += length
    assert position == total


def _source(path: Path, size: int) -> str:
    with path.open("wb") as fh:
        left = size
        while left:
            block = os.urandom(min(left, 512 * 1024))
            fh.write(block)
            left -= len(block)
    return testkit.sha256_file(path)


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A directory on another filesystem than ``tmp_path`` (tmpfs), where the kernel refuses
    ``copy_file_range`` between the two."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("this test needs /dev/shm on another filesystem than the test's tmp_path")
    folder = shm / f"chronicle-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    try:
        yield folder
    finally:
        for entry in folder.iterdir():
            entry.unlink()
        folder.rmdir()


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


@pytest.mark.parametrize("where", ["same filesystem", "another filesystem"])
def test_append_file_is_paced_and_its_digest_is_the_stored_bytes(
    tmp_path: Path,
    hints: list[tuple[int, int]],
    where: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=blobs.__name__)
    folder = tmp_path if where == "same filesystem" else request.getfixturevalue("other_filesystem")
    total = 7 * EVERY + 123_457
    source = folder / "model.ckpt"
    sha = _source(source, total)
    store = blobs.LocalBlobStore(tmp_path / "blobs")
    owner = store.claim("u1", 0)
    seen: list[int] = []
    with source.open("rb") as fh:
        assert store.append_file("u1", 0, fh.fileno(), total, owner, seen.append) == total
    _assert_paced(hints, total)
    assert seen and seen[-1] == total and seen == sorted(seen)
    assert store.digest("u1") == sha
    assert testkit.sha256_file(tmp_path / "blobs" / "partial" / "u1") == sha
    assert store.commit("u1", sha) == total
    assert testkit.sha256_file(store.object_path(sha)) == sha
    fell_back = "copy_file_range refused" in caplog.text
    assert fell_back == (where == "another filesystem"), caplog.text


def test_append_file_resumes_and_stops_short_where_the_source_ends(tmp_path: Path) -> None:
    total = 3 * MiB + 17
    source = tmp_path / "model.ckpt"
    sha = _source(source, total)
    store = blobs.LocalBlobStore(tmp_path / "blobs")
    first = MiB + 5
    owner = store.claim("u1", 0)
    with source.open("rb") as fh:
        assert store.append("u1", 0, [fh.read(first)], owner) == first
        owner = store.claim("u1", first)
        # Asked for more than the file holds: the copy ends where the file does.
        assert store.append_file("u1", first, fh.fileno(), total, owner) == total
    assert store.digest("u1") == sha  # the running digest went on from the first append
    assert store.commit("u1", sha) == total


def test_a_stale_writer_copies_nothing(tmp_path: Path) -> None:
    source = tmp_path / "model.ckpt"
    _source(source, 2 * MiB)
    store = blobs.LocalBlobStore(tmp_path / "blobs")
    stale = store.claim("u1", 0)
    store.claim("u1", 0)
    with source.open("rb") as fh, pytest.raises(blobs.OffsetMismatch):
        store.append_file("u1", 0, fh.fileno(), 2 * MiB, stale)
    assert store.offset("u1") == 0


def test_the_embedded_upload_path_is_paced(tmp_path: Path, hints: list[tuple[int, int]]) -> None:
    source = tmp_path / "model.ckpt"
    total = 5 * EVERY + 512 * 1024
    sha = _source(source, total)
    with Chronicle(home=tmp_path / "home") as chronicle:
        exp = chronicle.create_experiment("pacing", variations=[{}])
        run = chronicle.create_run(exp, 0).start()
        asset: Any = run.upload_asset(source).result(timeout=120)
        run.succeed()
    assert asset.sha256 == sha == hashlib.sha256(source.read_bytes()).hexdigest()
    _assert_paced(hints, total)
