"""The store's upload limits, on SQLite and PostgreSQL, as the embedded client meets them:
unfinished uploads expire (``upload_expiry``), uploads are bounded (``max_asset_bytes``), and a
newer writer of an upload takes it over from an older one."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from chronicle_integrations import NotFound, OffsetMismatch, PayloadTooLarge
from chronicle_integrations.store import Store


def _run(store: Store) -> tuple[tuple[str, int, int], str]:
    exp = store.create_experiment("limits", [{}]).experiment_id
    key = (exp, 0, store.create_run(exp, 0).run)
    lease = store.start(*key).lease
    assert lease is not None
    return key, lease


def test_unfinished_uploads_expire_with_their_bytes(store_url: str, tmp_path: Path) -> None:
    store = Store.open(store_url, tmp_path / "assets", upload_expiry=1.0)
    try:
        key, lease = _run(store)
        idle = store.begin_upload(*key, "idle.bin", lease=lease).upload_id
        store.write_chunk(idle, 0, [b"x" * 1000])
        empty = store.begin_upload(*key, "empty.bin", lease=lease).upload_id
        done = store.begin_upload(*key, "done.bin", lease=lease).upload_id
        store.write_chunk(done, 0, [b"done"])
        store.complete_upload(done, hashlib.sha256(b"done").hexdigest())
        assert store.expire_uploads() == 0  # nothing is old enough yet
        time.sleep(1.2)
        fresh = store.begin_upload(*key, "fresh.bin", lease=lease).upload_id
        assert store.expire_uploads() == 2
        for upload in (idle, empty):
            with pytest.raises(NotFound, match="expire"):
                store.upload_status(upload)
            with pytest.raises(NotFound):
                store.write_chunk(upload, 0, [b"late"])
            assert not (tmp_path / "assets" / "partial" / upload).exists()
        assert store.upload_status(fresh).offset == 0
        assert store.upload_status(done).completed
        # Throttled by ``every``: a periodic caller does not re-read the table each time.
        time.sleep(1.2)
        assert store.expire_uploads(every=3600) == 0  # checked a moment ago
        assert store.upload_status(fresh).offset == 0
        assert store.expire_uploads() == 1
    finally:
        store.close()


def test_an_upload_without_a_declared_size_is_bounded(store_url: str, tmp_path: Path) -> None:
    store = Store.open(store_url, tmp_path / "assets", max_asset_bytes=100)
    try:
        key, lease = _run(store)
        upload = store.begin_upload(*key, "endless.bin", lease=lease).upload_id
        assert store.write_chunk(upload, 0, [b"a" * 60]).offset == 60
        with pytest.raises(PayloadTooLarge):
            store.write_chunk(upload, 60, [b"b" * 30, b"c" * 30])
        assert store.upload_status(upload).offset == 90  # the bytes before the bound stay
        with pytest.raises(PayloadTooLarge):
            store.begin_upload(*key, "big.bin", size=101, lease=lease)
    finally:
        store.close()


def test_a_newer_writer_takes_the_upload_over(store_url: str, tmp_path: Path) -> None:
    store = Store.open(store_url, tmp_path / "assets")
    try:
        key, lease = _run(store)
        upload = store.begin_upload(*key, "model.bin", lease=lease).upload_id
        stale = store.open_chunk(upload, 0)
        assert stale.write([b"a" * 10]) == 10
        newer = store.open_chunk(upload, 10)
        with pytest.raises(OffsetMismatch, match="taken over") as err:
            stale.write([b"garbage"])
        assert err.value.details["offset"] == 10
        assert newer.write([b"b" * 5]) == 15
        assert store.upload_status(upload).offset == 15
        with pytest.raises(OffsetMismatch):  # a wrong offset claims nothing
            store.open_chunk(upload, 3)
        assert newer.write([b"c"]) == 16
    finally:
        store.close()
