"""Uploads: capture at call time, background pool, directories, names, download, replace."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from client_helpers import sha256_bytes, sha256_file, wait_until

from chronicle_integrations import (
    AssetInfo,
    Chronicle,
    InvalidRequest,
    NotFound,
    Run,
    RunState,
    UploadError,
    UploadHandle,
)
from chronicle_integrations.client._transport import EmbeddedTransport

MB = 1024 * 1024
#: Every test here also runs on a server whose assets live in S3 (see conftest.py).
ON_S3 = True


def _version(tag: int, size: int) -> bytes:
    """A complete, recognisable file version: every byte says which version it belongs to."""
    seed = os.urandom(64 * 1024)
    block = bytes([tag]) * 16 + seed
    return (block * (size // len(block) + 1))[:size]


def _asset_bytes(run: Run, name: str, dest: Path) -> bytes:
    return run.download_asset(name, dest).read_bytes()


@pytest.fixture
def started(run: Run) -> Run:
    return run.start()


def test_upload_returns_a_future_and_download_is_identical(started: Run, tmp_path: Path) -> None:
    data = os.urandom(3 * MB + 17)
    src = tmp_path / "model.ckpt"
    src.write_bytes(data)
    handle = started.upload_asset(src)
    assert isinstance(handle, UploadHandle)
    info = handle.result(60)
    assert isinstance(info, AssetInfo)
    assert (info.name, info.size, info.sha256) == ("model.ckpt", len(data), sha256_bytes(data))
    assert handle.done() and handle.exception() is None
    [listed] = started.assets()
    assert (listed.name, listed.size, listed.sha256) == (info.name, info.size, info.sha256)
    out = started.download_asset("model.ckpt", tmp_path / "downloaded.ckpt")
    assert out.read_bytes() == data
    # an existing directory as dest: the asset's base name inside it
    (tmp_path / "dl").mkdir()
    assert started.download_asset("model.ckpt", tmp_path / "dl") == tmp_path / "dl/model.ckpt"
    assert (tmp_path / "dl/model.ckpt").read_bytes() == data
    started.succeed()


def test_empty_file_and_nested_name(
    request: pytest.FixtureRequest, backend, started: Run, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    info = started.upload_asset(empty, name="dir/sub/empty.bin").result(60)
    assert (info.name, info.size, info.sha256) == ("dir/sub/empty.bin", 0, sha256_bytes(b""))
    assert _asset_bytes(started, "dir/sub/empty.bin", tmp_path / "e") == b""


def test_unusual_but_valid_names_round_trip(started: Run, tmp_path: Path) -> None:
    names = [
        "with space/é ü.bin",
        "hash#tag.bin",
        "query?x=1.bin",
        "percent%20.bin",
        "semi;colon,comma+plus&amp.bin",
        "deep/a/b/c/d/e/f.bin",
        "..dots/x..y/...",
        "~tilde/@at",
    ]
    contents = {}
    for i, name in enumerate(names):
        src = tmp_path / f"src-{i}.bin"
        contents[name] = name.encode() * 100
        src.write_bytes(contents[name])
        assert started.upload_asset(src, name=name).result(60).name == name
    assert sorted(a.name for a in started.assets()) == sorted(names)
    for i, name in enumerate(names):
        assert _asset_bytes(started, name, tmp_path / f"out-{i}.bin") == contents[name], name


def test_source_deleted_right_after_the_call(started: Run, tmp_path: Path) -> None:
    data = os.urandom(4 * MB)
    src = tmp_path / "epoch=1.ckpt"
    src.write_bytes(data)
    handle = started.upload_asset(src)
    src.unlink()  # top-k eviction, right after the call
    assert handle.result(60).sha256 == sha256_bytes(data)
    assert _asset_bytes(started, "epoch=1.ckpt", tmp_path / "out") == data


def test_source_replaced_atomically_right_after_the_call(started: Run, tmp_path: Path) -> None:
    old, new = _version(1, 4 * MB), _version(2, 4 * MB + 5)
    src = tmp_path / "last.ckpt"
    src.write_bytes(old)
    handle = started.upload_asset(src)
    tmp = tmp_path / "last.ckpt.tmp"
    tmp.write_bytes(new)
    os.replace(tmp, src)
    assert handle.result(60).sha256 == sha256_bytes(old)
    assert _asset_bytes(started, "last.ckpt", tmp_path / "out") == old


def test_source_rewritten_in_place_is_never_torn(started: Run, tmp_path: Path) -> None:
    """``open(p, "wb")`` rewrites the same inode right after the call: the asset is one
    complete version (either), never a mix. Raced 32 times with few-MB files, eight at a
    time so that every worker of the pool is reading while a file is being rewritten."""
    size = 3 * MB
    rounds, width = 4, 8
    for r in range(rounds):
        batch = []
        for j in range(width):
            i = r * width + j
            src = tmp_path / f"last-{j}.ckpt"
            old, new = _version(1, size), _version(2, size)
            src.write_bytes(old)
            handle = started.upload_asset(src, name=f"last-{i}.ckpt")
            with open(src, "wb") as fh:  # in place, right after the call
                fh.write(new)
            batch.append((i, handle, sha256_bytes(old), sha256_bytes(new)))
        for i, handle, sha_old, sha_new in batch:
            try:
                info = handle.result(120)
            except UploadError as exc:
                pytest.fail(
                    f"race {i}: the upload failed instead of capturing a complete version: {exc}"
                )
            assert info.sha256 in {sha_old, sha_new}, f"race {i}: the asset is torn"
    # the stored bytes are the ones the digests describe: one version throughout
    for i in (0, rounds * width - 1):
        got = _asset_bytes(started, f"last-{i}.ckpt", tmp_path / f"out-{i}")
        tags = {got[k] for k in range(0, len(got), 64 * 1024 + 16)}
        assert len(tags) == 1 and tags <= {1, 2}
    started.succeed()
    assert started.info().asset_count == rounds * width


def _pending_upload_id(chronicle: Chronicle, run: Run) -> str:
    """The id of the run's upload in flight (read from the pool, to watch its progress)."""
    tasks = wait_until(
        lambda: chronicle._pool.pending(run.key_tuple), timeout=10, what="the upload to be queued"
    )
    return tasks[0].upload_id


def _stored_offset(chronicle: Chronicle, upload_id: str) -> int:
    """How many bytes of an upload the store holds (0 before it began)."""
    from chronicle_integrations import NotFound as _NotFound

    try:
        if isinstance(chronicle.transport, EmbeddedTransport):
            return chronicle.transport.store.upload_status(upload_id).offset
        response = requests.get(f"{chronicle.url}/v1/uploads/{upload_id}", timeout=10)
        return int(response.json()["offset"]) if response.status_code == 200 else 0
    except _NotFound:
        return 0


def _rewrite_mid_upload(
    chronicle: Chronicle, run: Run, tmp_path: Path, old: bytes, new: bytes, mode: str
) -> tuple[UploadHandle, str]:
    """Start uploading ``old``; once the store holds part of it (the worker is reading the
    staged inode), rewrite the source in place with ``new``. Returns the handle and the
    id of the upload that was under way."""
    src = tmp_path / "last.ckpt"
    src.write_bytes(old)
    handle = run.upload_asset(src)
    upload_id = _pending_upload_id(chronicle, run)
    offset = wait_until(
        lambda: _stored_offset(chronicle, upload_id) >= 8 * MB or handle.done(),
        timeout=60,
        interval=0.001,
        what="the upload to be under way",
    )
    offset = _stored_offset(chronicle, upload_id)
    assert not handle.done() and offset < len(old) // 2, (
        "the upload finished before it could be rewritten: make the file bigger"
    )
    with open(src, mode) as fh:
        fh.write(new)
    return handle, upload_id


BIG = 128 * MB


def test_in_place_rewrite_that_grows_the_file_mid_upload(
    request: pytest.FixtureRequest, backend, chronicle: Chronicle, started: Run, tmp_path: Path
) -> None:
    """A bigger version written over the same inode (no truncation) while the worker reads:
    the asset must be one complete version, not a failure and not a mix."""
    old, new = _version(1, BIG), _version(2, BIG + 4 * MB)
    handle, _ = _rewrite_mid_upload(chronicle, started, tmp_path, old, new, "r+b")
    info = handle.result(300)
    assert info.sha256 in {sha256_bytes(old), sha256_bytes(new)}
    assert info.sha256 == sha256_bytes(new)  # the call-time bytes were partly overwritten


def test_in_place_rewrite_that_shrinks_the_file_mid_upload(
    request: pytest.FixtureRequest, backend, chronicle: Chronicle, started: Run, tmp_path: Path
) -> None:
    """``open(p, "wb")`` with a smaller version while the worker reads past its new end."""
    old, new = _version(1, BIG), _version(2, 2 * MB)
    handle, _ = _rewrite_mid_upload(chronicle, started, tmp_path, old, new, "wb")
    info = handle.result(300)
    assert info.sha256 == sha256_bytes(new)


def test_a_dropped_capture_leaves_no_partial_upload(
    backend, chronicle: Chronicle, started: Run, tmp_path: Path
) -> None:
    old = _version(1, BIG)
    # the rewrite each transport recaptures correctly today (see the two tests above)
    if backend.kind == "embedded":
        new, mode = _version(2, 2 * MB), "wb"
    else:
        new, mode = _version(2, BIG + 4 * MB), "r+b"
    handle, dropped = _rewrite_mid_upload(chronicle, started, tmp_path, old, new, mode)
    assert handle.result(300).sha256 == sha256_bytes(new)
    assert _stored_offset(chronicle, dropped) == 0, "the dropped upload's bytes are kept"


@pytest.fixture
def other_fs_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on another filesystem than the client home (no hard link possible)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to stage from")
    path = Path(tempfile.mkdtemp(dir=shm, prefix="chronicle-client-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_source_on_another_filesystem_is_copied_at_call_time(
    started: Run, other_fs_dir: Path, tmp_path: Path
) -> None:
    """Staging falls back to a copy at the call: deleting, replacing or rewriting in place
    right after the call cannot change what is uploaded."""
    cases = {}
    for how in ("delete", "replace", "rewrite"):
        old, new = _version(1, 2 * MB), _version(2, 3 * MB)
        src = other_fs_dir / f"{how}.ckpt"
        src.write_bytes(old)
        handle = started.upload_asset(src)
        if how == "delete":
            src.unlink()
        elif how == "replace":
            (other_fs_dir / "tmp").write_bytes(new)
            os.replace(other_fs_dir / "tmp", src)
        else:
            with open(src, "wb") as fh:
                fh.write(new)
        cases[how] = (handle, sha256_bytes(old))
    for how, (handle, digest) in cases.items():
        assert handle.result(60).sha256 == digest, how
    started.succeed()


def test_directory_keeps_its_layout(started: Run, tmp_path: Path) -> None:
    root = tmp_path / "checkpoint-500"
    expected: dict[str, str] = {}
    for i in range(1000):
        sub = root / f"shard-{i % 10}" / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        data = f"file {i}\n".encode() * (i % 7 + 1)
        (sub / f"f{i:04d}.txt").write_bytes(data)
        rel = (sub / f"f{i:04d}.txt").relative_to(root).as_posix()
        expected[f"ckpt/step-500/{rel}"] = sha256_bytes(data)
    handle = started.upload_asset(root, name="ckpt/step-500")
    assert handle.directory and len(handle.futures) == 1000
    infos = handle.result(300)
    assert isinstance(infos, list) and len(infos) == 1000
    started.succeed()
    assets = {a.name: a.sha256 for a in started.assets()}
    assert assets == expected
    assert started.info().asset_count == 1000
    name = "ckpt/step-500/shard-3/deep/f0003.txt"
    assert _asset_bytes(started, name, tmp_path / "one") == b"file 3\n" * 4


def test_succeed_waits_for_this_runs_uploads(
    chronicle: Chronicle, started: Run, tmp_path: Path
) -> None:
    handles = []
    for i in range(6):
        src = tmp_path / f"out-{i}.bin"
        src.write_bytes(os.urandom(2 * MB))
        handles.append(started.upload_asset(src))
    started.succeed()
    # right after succeed() returns, every upload is complete and visible
    assert all(h.done() for h in handles)
    info = started.info()
    assert info.state is RunState.SUCCEEDED
    assert info.asset_count == 6
    assert len(started.assets()) == 6
    # nothing is left behind in the client's staging area
    assert list((chronicle.home / "staging").iterdir()) == []


def test_missing_path_raises_at_call(started: Run, tmp_path: Path) -> None:
    with pytest.raises(UploadError):
        started.upload_asset(tmp_path / "does-not-exist.ckpt")
    assert started.assets() == []


@pytest.mark.parametrize(
    "bad",
    [
        "../escape",
        "/abs/path",
        "a\\b",
        "a\x00b",
        "a//b",
        "./a",
        "a/..",
        "",
        "x" * 1025,
        "tab\there",
    ],
)
def test_invalid_names_raise(started: Run, tmp_path: Path, bad: str) -> None:
    src = tmp_path / "ok.bin"
    src.write_bytes(b"payload")
    with pytest.raises(InvalidRequest):
        started.upload_asset(src, name=bad)
    with pytest.raises(InvalidRequest):
        started.download_asset(bad, tmp_path / "x")
    assert started.assets() == []


def test_download_of_an_unknown_asset(started: Run, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        started.download_asset("nope.bin", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_reupload_replaces_atomically_and_events_keep_both_digests(
    started: Run, tmp_path: Path
) -> None:
    first, second = os.urandom(MB), os.urandom(MB + 3)
    src = tmp_path / "best.ckpt"
    src.write_bytes(first)
    started.upload_asset(src).result(60)
    src.write_bytes(second)
    started.upload_asset(src).result(60)
    [asset] = started.assets()
    assert (asset.name, asset.sha256, asset.size) == (
        "best.ckpt",
        sha256_bytes(second),
        len(second),
    )
    assert _asset_bytes(started, "best.ckpt", tmp_path / "out") == second
    uploads = [e for e in started.events() if e.kind == "asset"]
    digests = [e.detail["sha256"] for e in uploads if e.detail and e.detail["name"] == "best.ckpt"]
    assert digests == [sha256_bytes(first), sha256_bytes(second)]
    started.succeed()
    assert started.info().asset_count == 1


def test_latest_upload_of_a_name_wins(started: Run, tmp_path: Path) -> None:
    """last.ckpt uploaded every epoch: the asset must end as the latest call's content, even
    when an older, bigger version is still uploading when the newer one is captured."""
    older, newer = os.urandom(64 * MB), os.urandom(1000)
    src = tmp_path / "last.ckpt"
    src.write_bytes(older)
    started.upload_asset(src)
    tmp = tmp_path / "last.tmp"
    tmp.write_bytes(newer)
    os.replace(tmp, src)  # the next epoch's checkpoint
    started.upload_asset(src)
    started.succeed()
    [asset] = started.assets()
    assert asset.sha256 == sha256_bytes(newer), "the asset rolled back to an older version"


def test_replacement_is_never_seen_half_written(started: Run, tmp_path: Path) -> None:
    """While an asset is re-uploaded, readers see the old or the new version, nothing else."""
    versions = [os.urandom(2 * MB) for _ in range(4)]
    digests = {sha256_bytes(v) for v in versions}
    src = tmp_path / "model.bin"
    src.write_bytes(versions[0])
    started.upload_asset(src).result(60)
    stop = threading.Event()
    seen: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            seen.extend(a.sha256 for a in started.assets())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for version in versions[1:]:
            tmp = tmp_path / "model.tmp"
            tmp.write_bytes(version)
            os.replace(tmp, src)
            started.upload_asset(src).result(60)
    finally:
        stop.set()
        thread.join(30)
    assert seen and set(seen) <= digests
    assert started.assets()[0].sha256 == sha256_bytes(versions[-1])


def test_upload_requires_the_runs_lease(
    backend, chronicle: Chronicle, started: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the worker holding the run writes its assets. A failed upload is never silent:
    its future raises, an ERROR names the file. The refusal is final and the file is still
    there, unchanged: the staged copy is not kept (nothing piles up in staging)."""
    src = tmp_path / "intruder.bin"
    src.write_bytes(b"not yours")
    client = backend.connect()
    stranger = client.run(started.experiment_id, started.variation, started.run)
    with caplog.at_level("ERROR", logger="chronicle_integrations"):
        handle = stranger.upload_asset(src)
        with pytest.raises(UploadError, match="refused") as caught:
            handle.result(60)
    assert started.assets() == []
    assert any(r.levelname == "ERROR" and str(src) in r.getMessage() for r in caplog.records)
    assert caught.value.staged_path is None and src.read_bytes() == b"not yours"
    assert list((client.home / "staging").iterdir()) == []


def test_a_refused_upload_leaves_no_staged_copy(
    backend, chronicle: Chronicle, tmp_path: Path
) -> None:
    """Refused by the store (no such run) or by the client itself (closed): staging stays
    empty, whether the refusal comes back from a worker or at the call."""
    src = tmp_path / "orphan.bin"
    src.write_bytes(b"nobody's")
    with pytest.raises(UploadError, match="refused"):
        chronicle.run("no-such-experiment", 0, 0).upload_asset(src).result(60)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for rel in ("a.bin", "sub/b.bin"):
        (tree / rel).write_bytes(rel.encode())
    closed = backend.connect()
    closed.close()
    with pytest.raises(UploadError, match="closed"):
        closed.run("no-such-experiment", 0, 0).upload_asset(tree)
    for client in (chronicle, closed):
        assert list((client.home / "staging").iterdir()) == []
    assert src.read_bytes() == b"nobody's"


def test_uploads_of_two_runs_are_waited_for_separately(
    chronicle: Chronicle, experiment: str, tmp_path: Path
) -> None:
    a = chronicle.create_run(experiment, 0).start()
    b = chronicle.create_run(experiment, 1).start()
    for run, n in ((a, 3), (b, 2)):
        for i in range(n):
            src = tmp_path / f"{run.run}-{run.variation}-{i}.bin"
            src.write_bytes(os.urandom(MB))
            run.upload_asset(src)
    a.succeed()
    assert a.info().asset_count == 3
    b.succeed()
    assert b.info().asset_count == 2


def test_upload_after_close_is_refused(
    backend, tmp_path: Path, experiment: str, chronicle: Chronicle
) -> None:
    run = chronicle.create_run(experiment, 0).start()
    src = tmp_path / "late.bin"
    src.write_bytes(b"late")
    pending = run.upload_asset(src)
    chronicle.close()  # waits for pending uploads
    assert pending.done() and pending.exception() is None
    with pytest.raises(UploadError):
        run.upload_asset(src)
    chronicle.close()  # idempotent
    reopened = backend.connect(home=backend.home)
    assert [a.name for a in reopened.run(experiment, 0, 0).assets()] == ["late.bin"]
    assert sha256_file(src) == reopened.run(experiment, 0, 0).assets()[0].sha256


def test_an_embedded_upload_hashes_its_bytes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into the embedded store, the blob store's running SHA-256 of the bytes it writes is
    the digest the upload is completed with: each byte is hashed once, not once by the
    client and again by the store, and the asset is still the file's, byte for byte."""
    import hashlib

    real = hashlib.sha256
    hashed = [0]

    class Counting:
        def __init__(self, data: bytes = b"") -> None:
            self._h = real(data)
            hashed[0] += len(data)

        def update(self, data: Any) -> None:
            hashed[0] += len(data)
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

        def digest(self) -> bytes:
            return self._h.digest()

        def copy(self) -> Any:
            return self._h.copy()

    data = os.urandom(5 * MB + 3)
    src = tmp_path / "model.ckpt"
    src.write_bytes(data)
    with Chronicle(home=tmp_path / "home") as chronicle:
        eid = chronicle.create_experiment("hash-once", variations=[{}])
        with chronicle.create_run(eid, 0).start() as run:
            monkeypatch.setattr(hashlib, "sha256", Counting)
            info = run.upload_asset(src).result(timeout=60)
            monkeypatch.setattr(hashlib, "sha256", real)
            passes = hashed[0] / len(data)  # (small digests elsewhere: ids, names)
            assert len(data) <= hashed[0] < len(data) + 4096, f"{passes:.2f} hash passes"
            assert info.sha256 == sha256_bytes(data) and info.size == len(data)
            assert _asset_bytes(run, "model.ckpt", tmp_path / "back") == data
