"""The S3 blob store on a real S3 server (SeaweedFS): the proxied chunk protocol, streamed into
multipart uploads, with the server's own SHA-256 as the truth.

* chunks of any size at acknowledged offsets end as one object at its content address whose
  bytes (read back with boto3) hash to the declared SHA-256; nothing of the upload is left;
* a wrong digest publishes nothing and leaves nothing in the bucket;
* a restart (a new store object: no running hash, no cached state) resumes from what S3 and
  the tail hold, and the digest is recomputed by reading the object back;
* a crash between "part stored" and "tail dropped" does not count the tail twice;
* discard aborts the multipart upload; stale writers are refused; the part size adapts to the
  part-count limit; ranged reads read only the range;
* a store that does not answer is 503 ``unavailable`` (never a 500 or a raw exception, even
  for botocore's read timeouts, which are ``OSError``s), and the upload resumes after it;
* the sweep deletes upload objects left behind by a crash after publishing.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import s3kit

from chronicle_integrations import ConfigurationError, DigestMismatch, NotFound
from chronicle_integrations._errors import OffsetMismatch, Unavailable
from chronicle_integrations.store import blobs
from chronicle_integrations.store.s3 import (
    DEFAULT_PART,
    MIN_PART,
    S3BlobStore,
    S3Settings,
    part_size_for,
)

pytestmark = pytest.mark.s3
MiB = 2**20


@pytest.fixture
def settings(seaweedfs: s3kit.SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> S3Settings:
    for name, value in seaweedfs.env.items():
        monkeypatch.setenv(name, value)  # boto3's own chain, as an operator would configure
    return S3Settings(path_style=True)


def _open(bucket: str, tmp_path: Path, settings: S3Settings) -> S3BlobStore:
    store = blobs.open_blob_store(f"s3://{bucket}/pre/fix", work_dir=tmp_path / "work", s3=settings)
    assert isinstance(store, S3BlobStore)
    return store


def _keys(seaweedfs: s3kit.SeaweedServer, bucket: str) -> list[str]:
    listing = seaweedfs.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _mpus(seaweedfs: s3kit.SeaweedServer, bucket: str) -> list[str]:
    listing = seaweedfs.client().list_multipart_uploads(Bucket=bucket)
    return [u["Key"] for u in listing.get("Uploads", [])]


def _send(store: S3BlobStore, upload_id: str, data: bytes, offset: int, block: int) -> int:
    owner = store.claim(upload_id, offset, None)
    pieces = (data[i : i + block] for i in range(offset, len(data), block))
    return store.append(upload_id, offset, pieces, owner)


def test_chunks_become_one_verified_object_at_its_content_address(
    seaweedfs: s3kit.SeaweedServer, s3_bucket: str, tmp_path: Path, settings: S3Settings
) -> None:
    store = _open(s3_bucket, tmp_path, settings)
    data = os.urandom(2 * DEFAULT_PART + 3 * MiB + 17)  # three parts, the last one small
    sha = hashlib.sha256(data).hexdigest()
    assert store.offset("u1") == 0
    half = len(data) // 2
    owner = store.claim("u1", 0, len(data))
    assert store.append("u1", 0, [data[:half]], owner) == half
    assert store.offset("u1") == half  # stored parts + the local tail
    assert store.append("u1", half, [data[half:]], owner) == len(data)
    assert _mpus(seaweedfs, s3_bucket) == ["pre/fix/uploads/u1"]
    assert store.commit("u1", sha) == len(data)

    assert _keys(seaweedfs, s3_bucket) == [f"pre/fix/objects/{sha[:2]}/{sha}"]
    assert _mpus(seaweedfs, s3_bucket) == []
    assert not list((tmp_path / "work").iterdir())  # no local copy left
    body = seaweedfs.client().get_object(Bucket=s3_bucket, Key=store.object_key(sha))["Body"]
    assert hashlib.sha256(body.read()).hexdigest() == sha
    assert store.exists(sha) and store.size(sha) == len(data)
    with store.open(sha) as fh:
        fh.seek(len(data) - 100)
        assert fh.read(1000) == data[-100:]
        fh.seek(5)
        assert fh.read(10) == data[5:15]
    assert store.offset("u1") == 0  # committed: the upload is gone


def test_wrong_digest_publishes_nothing(
    seaweedfs: s3kit.SeaweedServer, s3_bucket: str, tmp_path: Path, settings: S3Settings
) -> None:
    store = _open(s3_bucket, tmp_path, settings)
    data = os.urandom(MIN_PART + 5)
    _send(store, "bad", data, 0, MiB)
    with pytest.raises(DigestMismatch):
        store.commit("bad", hashlib.sha256(b"other").hexdigest())
    assert _keys(seaweedfs, s3_bucket) == []
    assert _mpus(seaweedfs, s3_bucket) == []


def test_empty_object(
    seaweedfs: s3kit.SeaweedServer, s3_bucket: str, tmp_path: Path, settings: S3Settings
) -> None:
    store = _open(s3_bucket, tmp_path, settings)
    sha = hashlib.sha256(b"").hexdigest()
    store.claim("empty", 0, 0)
    assert store.commit("empty", sha) == 0
    assert store.size(sha) == 0
    with store.open(sha) as fh:
        assert fh.read() == b""


def test_a_restart_resumes_from_the_stored_parts_and_rehashes(
    seaweedfs: s3kit.SeaweedServer, s3_bucket: str, tmp_path: Path, settings: S3Settings
) -> None:
    data = os.urandom(DEFAULT_PART + 2 * MiB)
    sha = hashlib.sha256(data).hexdigest()
    first = _open(s3_bucket, tmp_path, settings)
    cut = DEFAULT_PART + MiB
    assert _send(first, "r", data[:cut], 0, MiB) == cut  # one part stored, 1 MiB in the tail
    second = _open(s3_bucket, tmp_path, settings)  # a restarted server: nothing in memory
    assert second.offset("r") == cut
    with pytest.raises(OffsetMismatch) as refused:
        second.claim("r", 0, None)
    assert refused.value.details["offset"] == cut
    assert _send(second, "r", data, cut, MiB) == len(data)
    assert second.commit("r", sha) == len(data)  # digest recomputed from the object
    assert _keys(seaweedfs, s3_bucket) == [second.object_key(sha)]


def test_a_tail_already_stored_as_a_part_is_not_counted_twice(
    s3_bucket: str, tmp_path: Path, settings: S3Settings
) -> None:
    """The crash window between UploadPart and the tail's unlink: the tail of part 1 is still
    there, but part 1 is listed: it is dropped on load."""
    data = os.urandom(DEFAULT_PART + MiB)
    store = _open(s3_bucket, tmp_path, settings)
    _send(store, "w", data, 0, MiB)
    tail = store.work_dir / "w.1"
    tail.write_bytes(data[:DEFAULT_PART])  # as if the unlink never happened
    again = _open(s3_bucket, tmp_path, settings)
    assert again.offset("w") == len(data)
    assert not tail.exists()
    assert again.commit("w", hashlib.sha256(data).hexdigest()) == len(data)


def test_a_part_cut_short_by_a_crash_is_sent_again_from_the_tail(
    seaweedfs: s3kit.SeaweedServer, s3_bucket: str, tmp_path: Path, settings: S3Settings
) -> None:
    """SeaweedFS keeps a part whose body was cut (what arrived): the tail, still there and
    longer, is the truth; the short part is replaced, never counted."""
    data = os.urandom(2 * DEFAULT_PART + MiB)
    store = _open(s3_bucket, tmp_path, settings)
    _send(store, "c", data[: 2 * DEFAULT_PART - 1], 0, MiB)  # part 1 stored, part 2 in the tail
    mpu = seaweedfs.client().list_multipart_uploads(Bucket=s3_bucket)["Uploads"][0]
    seaweedfs.client().upload_part(  # a truncated part 2, as a cut connection leaves it
        Bucket=s3_bucket,
        Key=mpu["Key"],
        UploadId=mpu["UploadId"],
        PartNumber=2,
        Body=data[DEFAULT_PART : DEFAULT_PART + MiB],
    )
    again = _open(s3_bucket, tmp_path, settings)
    assert again.offset("c") == 2 * DEFAULT_PART - 1
    assert _send(again, "c", data, 2 * DEFAULT_PART - 1, MiB) == len(data)
    assert again.commit("c", hashlib.sha256(data).hexdigest()) == len(data)
    body = (
        seaweedfs.client()
        .get_object(Bucket=s3_bucket, Key=again.object_key(hashlib.sha256(data).hexdigest()))[
            "Body"
        ]
        .read()
    )
    assert body == data


def test_discard_aborts_and_stale_writers_are_refused(
    seaweedfs: s3kit.SeaweedServer, s3_bucket: str, tmp_path: Path, settings: S3Settings
) -> None:
    store = _open(s3_bucket, tmp_path, settings)
    data = os.urandom(DEFAULT_PART + MiB)
    old = store.claim("d", 0, None)
    store.append("d", 0, [data[:MiB]], old)
    new = store.claim("d", MiB, None)
    with pytest.raises(OffsetMismatch):
        store.append("d", MiB, [data[MiB:]], old)  # the older writer lost the upload
    store.append("d", MiB, [data[MiB:]], new)
    assert _mpus(seaweedfs, s3_bucket) == ["pre/fix/uploads/d"]
    store.discard("d")
    assert _mpus(seaweedfs, s3_bucket) == [] and _keys(seaweedfs, s3_bucket) == []
    assert store.offset("d") == 0
    with pytest.raises(OffsetMismatch):
        store.append("d", MiB, [b"late"], new)


def test_part_size_adapts_to_the_part_limit() -> None:
    assert part_size_for(None, 10_000) == DEFAULT_PART
    assert part_size_for(DEFAULT_PART * 10_000, 10_000) == DEFAULT_PART
    big = 2**40  # 1 TiB on AWS: 10,000 parts of 105 MiB (whole MiB)
    assert part_size_for(big, 10_000) * 10_000 >= big
    assert part_size_for(big, 10_000) % MiB == 0
    assert part_size_for(8 * 2**30, 1000) * 1000 >= 8 * 2**30  # e.g. Scaleway's 1,000


def test_bad_urls_and_missing_buckets_are_configuration_errors(
    tmp_path: Path, settings: S3Settings
) -> None:
    with pytest.raises(ConfigurationError, match="bucket name"):
        blobs.open_blob_store("s3://No_Such/x", work_dir=tmp_path, s3=settings)
    with pytest.raises(ConfigurationError, match="bucket"):
        blobs.open_blob_store("s3://no-such-bucket-here/x", work_dir=tmp_path, s3=settings)
    with pytest.raises(ConfigurationError, match="s3://"):
        blobs.open_blob_store("gs://bucket/x")


def test_missing_object(s3_bucket: str, tmp_path: Path, settings: S3Settings) -> None:
    store = _open(s3_bucket, tmp_path, settings)
    with pytest.raises(NotFound):
        store.open("0" * 64)
    assert not store.exists("0" * 64)


def _silent_client(port: int, settings: S3Settings) -> Any:
    """A boto3 client of an endpoint that accepts connections and never answers."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=1,
            read_timeout=0.5,
            retries={"max_attempts": 1},
        ),
    )


def test_a_store_that_does_not_answer_is_unavailable_and_the_upload_resumes(
    seaweedfs: s3kit.SeaweedServer, s3_bucket: str, tmp_path: Path, settings: S3Settings
) -> None:
    store = _open(s3_bucket, tmp_path, settings)
    data = os.urandom(DEFAULT_PART + MiB)
    sha = hashlib.sha256(data).hexdigest()
    owner = store.claim("out", 0, len(data))
    working = store.client
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the backlog; nothing ever answers
        store.client = _silent_client(silent.getsockname()[1], settings)
        with pytest.raises(Unavailable):  # the part is due: its UploadPart times out
            store.append("out", 0, [data], owner)
        with pytest.raises(Unavailable):
            store.offset("other")  # (a new upload: its state comes from S3)
        with pytest.raises(Unavailable):
            store.exists(sha)
        with pytest.raises(Unavailable):
            store.commit("out", sha)
    store.client = working
    held = store.offset("out")
    assert held == DEFAULT_PART  # the full tail, not yet a part: kept
    owner = store.claim("out", held, len(data))
    assert store.append("out", held, [data[held:]], owner) == len(data)
    assert store.commit("out", sha) == len(data)
    body = seaweedfs.client().get_object(Bucket=s3_bucket, Key=store.object_key(sha))["Body"]
    assert body.read() == data
    assert _mpus(seaweedfs, s3_bucket) == []


def test_the_sweep_deletes_upload_objects_left_behind(
    seaweedfs: s3kit.SeaweedServer, s3_bucket: str, tmp_path: Path, settings: S3Settings
) -> None:
    """A server killed after publishing an object at its content address, before deleting
    the upload's object: the retry records the asset without it; the sweep removes it."""
    store = _open(s3_bucket, tmp_path, settings)
    data = os.urandom(MiB)
    sha = hashlib.sha256(data).hexdigest()
    _send(store, "kept", data, 0, MiB)
    assert store.commit("kept", sha) == len(data)
    seaweedfs.client().put_object(Bucket=s3_bucket, Key=store.upload_key("left"), Body=data)
    store.sweep(older_than=3600.0)
    assert sorted(_keys(seaweedfs, s3_bucket)) == sorted(
        [store.object_key(sha), store.upload_key("left")]
    )  # recent: could be an upload being verified
    store.sweep(older_than=-3600.0)  # (as if an hour from now)
    assert _keys(seaweedfs, s3_bucket) == [store.object_key(sha)]
