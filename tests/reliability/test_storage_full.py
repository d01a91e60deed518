"""Storage limits: the asset store runs out of space mid-upload.

The server's ``--assets`` lives on a small tmpfs (``mount -t tmpfs -o size=8m``, needs root;
skipped with the reason when mounting is not permitted), nearly filled by a filler file. An
upload that does not fit gets a clear ``507 storage_full``, nothing partial becomes visible, and
once space is freed the same upload resumes from its acknowledged offset and completes
byte-identical: over raw HTTP (every answer checked) and through the real client (which keeps
retrying in the background until the space is back).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testkit
from rel_helpers import Api, assert_error, wait_until

from chronicle_integrations import Chronicle
from chronicle_integrations._errors import StorageFull
from chronicle_integrations.store import blobs

MiB = 2**20


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = testkit.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        testkit.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def _fill(mount: Path, leave: int) -> Path:
    """Fill the tmpfs until about ``leave`` bytes remain free."""
    filler = mount / "filler"
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def test_storage_full_mid_upload_then_resume(
    server_factory: Any, small_tmpfs: Path, figures: Any
) -> None:
    server = server_factory(assets=small_tmpfs / "assets")
    api = Api(server.url)
    key = api.run(api.experiment())
    path = f"/v1/runs/{key[0]}/{key[1]}/{key[2]}"
    lease = api.ok("POST", path + "/start")["lease"]
    data = os.urandom(4 * MiB)
    filler = _fill(small_tmpfs, int(1.5 * MiB))
    uid = api.ok(
        "POST",
        path + "/uploads",
        201,
        json={"name": "model.ckpt", "size": len(data), "lease": lease},
    )["upload_id"]
    offset = 0
    full = None
    while offset < len(data):
        resp = api.request(
            "PUT", f"/v1/uploads/{uid}", params={"offset": offset}, data=data[offset : offset + MiB]
        )
        if resp.status_code != 200:
            full = assert_error(resp, 507, "storage_full")
            break
        offset = resp.json()["offset"]
    assert full is not None, "the upload never ran out of space"
    figures["fault:storage full"] += 1
    # The failed chunk left nothing: the upload stands at its last acknowledged offset.
    assert api.ok("GET", f"/v1/uploads/{uid}")["offset"] == offset
    assert 0 < offset < len(data)
    # Nothing visible, and completing early is refused.
    assert api.assets(key) == {}
    assert_error(
        api.request(
            "POST", f"/v1/uploads/{uid}/complete", json={"sha256": hashlib.sha256(data).hexdigest()}
        ),
        (400, 409),
    )
    assert api.assets(key) == {}
    assert not [e for e in api.events(key) if e["kind"] == "asset"]
    # Free the space: the same upload resumes from where it stood.
    filler.unlink()
    while offset < len(data):
        offset = api.ok(
            "PUT", f"/v1/uploads/{uid}", params={"offset": offset}, data=data[offset : offset + MiB]
        )["offset"]
    info = api.ok(
        "POST", f"/v1/uploads/{uid}/complete", json={"sha256": hashlib.sha256(data).hexdigest()}
    )
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert api.download_sha(key, "model.ckpt") == info["sha256"]
    figures["uploads verified"] += 1
    api.close()


def test_client_upload_waits_out_a_full_store(
    server_factory: Any,
    small_tmpfs: Path,
    tmp_path: Path,
    figures: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = server_factory(assets=small_tmpfs / "assets")
    filler = _fill(small_tmpfs, 1 * MiB)
    source = tmp_path / "model.ckpt"
    data = os.urandom(3 * MiB)
    source.write_bytes(data)
    caplog.set_level(logging.INFO, logger="chronicle_integrations")
    with Chronicle(url=server.url, home=tmp_path / "home", timeout=60) as chronicle:
        experiment = chronicle.create_experiment("storage-full", variations=[{}])
        run = chronicle.create_run(experiment, 0).start()
        handle = run.upload_asset(source)
        # Usually the client reads the 507 (logged as "out of space"); when the server answers
        # before the client finished sending, the client may see a reset instead. Either way
        # the server refused the chunk with 507, and the upload must wait and resume.
        wait_until(
            lambda: "out of space" in caplog.text or '" 507' in server.output(),
            timeout=60,
            what="the store to refuse a chunk for lack of space",
        )
        assert not handle.done()
        assert run.assets() == []
        figures["fault:storage full"] += 1
        filler.unlink()
        info = handle.result(timeout=120)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        run.succeed()
        assert [a.sha256 for a in run.assets()] == [info.sha256]
    figures["uploads verified"] += 1


def test_a_kernel_copy_into_a_full_store_leaves_nothing_torn(
    small_tmpfs: Path, figures: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded client's path (``append_file``: the kernel copies within one filesystem)
    runs out of space mid-copy: ``StorageFull``, the partial is back at its acknowledged offset,
    and once space is freed the same append completes with the digest of the stored bytes."""
    caplog.set_level(logging.DEBUG, logger=blobs.__name__)
    data = os.urandom(3 * MiB)
    source = small_tmpfs / "model.ckpt"
    source.write_bytes(data)
    store = blobs.LocalBlobStore(small_tmpfs / "blobs")
    filler = _fill(small_tmpfs, MiB)
    owner = store.claim("u1", 0)
    with source.open("rb") as fh, pytest.raises(StorageFull):
        store.append_file("u1", 0, fh.fileno(), len(data), owner)
    assert store.offset("u1") == 0, "a torn tail was left behind"
    figures["fault:storage full"] += 1
    filler.unlink()
    owner = store.claim("u1", 0)
    with source.open("rb") as fh:
        assert store.append_file("u1", 0, fh.fileno(), len(data), owner) == len(data)
    sha = hashlib.sha256(data).hexdigest()
    assert store.digest("u1") == sha
    assert store.commit("u1", sha) == len(data)
    assert "copy_file_range refused" not in caplog.text, "the kernel copy was not used"
