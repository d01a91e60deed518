"""Asset bytes in an S3-compatible bucket: :class:`S3BlobStore`, behind :class:`~.blobs.BlobStore`.

Selected by ``--assets s3://bucket/prefix`` (see :func:`~.blobs.open_blob_store`). boto3 (the
``s3`` extra) is imported only here, and this module only when an ``s3://`` URL is used.

Layout under ``<prefix>/``::

    uploads/<upload_id>          an upload in progress: an S3 multipart upload at this key,
                                 then, once complete, the object being verified
    objects/<sha[:2]>/<sha>      complete objects, immutable, shared by equal content

**Proxied uploads** (the server streams the bytes it receives into S3; the chunk protocol
of :class:`~.blobs.LocalBlobStore` unchanged). The bytes of the part being filled wait in a
local *tail* file (``<work_dir>/<upload_id>.<part number>``, at most one part: the server
keeps no full local copy); when it reaches the part size it is sent as the next
``UploadPart`` and dropped. So an acknowledged offset is always safe: parts stored in S3
(``ListParts`` is the truth, so a restarted server resumes) plus the tail on local disk. The
tail's name carries the number of the part it will become: a crash between "part stored"
and "tail dropped" is recognised on restart (the part is listed), and the tail is not
counted twice.

The server's own SHA-256 is the truth: it is kept running while chunks arrive in order (as in
the local store); after a restart it is recomputed by reading the completed object back once.
``commit`` completes the multipart upload at ``uploads/<id>``, checks its size with a HEAD,
verifies the digest, then copies it (server-side) to its content address and deletes the
temporary object. Only then does the asset become visible (the SQL row is written after
``commit`` returns). A digest mismatch deletes the temporary object: nothing is published.

Several server replicas may share the bucket; the tail of a part being filled is local to the
replica that received it, so a proxied upload should stick to one replica (a takeover by
another one resumes from the last stored part, after an :class:`OffsetMismatch`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from .._errors import (
    APIError,
    ConfigurationError,
    DigestMismatch,
    InvalidRequest,
    NotFound,
    OffsetMismatch,
    ServerError,
    Unavailable,
)
from .blobs import BUFFER, _storage_error, read_file

log = logging.getLogger(__name__)

#: S3's smallest part (all parts but the last).
MIN_PART = 5 * 2**20
#: The part size when the size is unknown or small; larger uploads get larger parts so that
#: they fit in :attr:`S3Settings.max_parts`.
DEFAULT_PART = 16 * 2**20
#: S3's largest part.
MAX_PART = 5 * 2**30
#: Parts per multipart upload on AWS (other stores allow fewer: set ``max_parts``).
DEFAULT_MAX_PARTS = 10_000
#: The part size of direct uploads (larger parts: fewer requests for the worker).
DIRECT_PART = 64 * 2**20
#: Seconds a presigned part URL lives: short, since the worker asks for more as it goes.
DEFAULT_URL_EXPIRY = 900

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """How to reach the bucket. Every field left ``None`` falls back to boto3's own chain
    (``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``~/.aws/config``,
    instance roles).

    ``public_endpoint_url``: the host that presigned URLs name, when workers reach the store by
    another name than the server does (defaults to ``endpoint_url``).
    """

    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    public_endpoint_url: str | None = None
    max_parts: int = DEFAULT_MAX_PARTS
    #: Workers upload straight to the bucket through presigned URLs (``--uploads direct``).
    direct_uploads: bool = False
    #: Seconds a presigned part URL stays valid (the worker asks for fresh ones after).
    url_expiry: int = DEFAULT_URL_EXPIRY
    #: The part size of direct uploads (larger when the part-count limit needs it).
    part_size: int = DIRECT_PART


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``(bucket, prefix)`` (prefix without slashes at its ends)."""
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ConfigurationError(
            f"invalid S3 asset URL {url!r}: expected s3://bucket/prefix with a valid bucket "
            "name (3-63 characters: lower-case letters, digits, '.', '-')"
        )
    return bucket, prefix.strip("/")


def part_size_for(size: int | None, max_parts: int, base: int = DEFAULT_PART) -> int:
    """The part size of an upload of ``size`` bytes: ``base``, or larger (whole MiB) when
    that many parts would not fit in ``max_parts``."""
    if size is None or size <= base * max_parts:
        return base
    needed = -(-size // max_parts)
    return min(MAX_PART, -(-needed // 2**20) * 2**20)


def make_client(settings: S3Settings, *, public: bool = False) -> Any:
    """A boto3 S3 client for ``settings`` (``public``: for presigning, on the public host).

    SigV4 always (a custom endpoint otherwise gets SigV2 URLs, which carry no checksum);
    checksums only when asked for (boto3 >= 1.36 defaults break S3-compatible stores).
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "S3 asset storage needs boto3: pip install 'chronicle-integrations[s3]'"
        ) from exc
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if settings.path_style else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=32,
    )
    endpoint = (settings.public_endpoint_url if public else None) or settings.endpoint_url
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint or None, region_name=settings.region or None, config=config
    )


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _missing(exc: BaseException) -> bool:
    return _code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


def _unavailable(what: str, exc: BaseException) -> Unavailable:
    """A failure of the object store (unreachable, cut, 5xx after boto3's own retries): 503
    ``unavailable``, which the client retries (the upload resumes), never a 500 ``internal``
    (that one is a bug)."""
    return Unavailable(f"the object store failed to {what}: {type(exc).__name__}: {exc}")


@dataclasses.dataclass
class _Upload:
    """What this process knows of one upload in progress (rebuilt from S3 after a restart)."""

    mpu_id: str | None
    parts: list[dict[str, Any]]
    last_write: float | None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    generation: int = 0
    part_size: int = DEFAULT_PART
    #: (bytes covered, running SHA-256 of bytes [0, covered)), while chunks came in order.
    hasher: tuple[int, Any] | None = None

    @property
    def stored(self) -> int:
        return sum(int(p["Size"]) for p in self.parts)


class S3BlobStore:
    """A :class:`~.blobs.BlobStore` in an S3 bucket (see the module docstring).

    Example::

        blobs = S3BlobStore("s3://chronicle/assets", work_dir="/var/lib/chronicle/s3-tails",
                            settings=S3Settings(endpoint_url="http://127.0.0.1:8333",
                                                path_style=True))
    """

    def __init__(
        self,
        url: str,
        *,
        work_dir: str | os.PathLike[str],
        settings: S3Settings | None = None,
        client: Any = None,
    ) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.settings = settings or S3Settings()
        self.client = client if client is not None else make_client(self.settings)
        self._public: Any = None  # the presigning client, made on first use
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot use the bucket of {url!r}: {type(exc).__name__}: {exc} (check the "
                "endpoint, the credentials and that the bucket exists)"
            ) from exc

    # -- keys ------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def upload_key(self, upload_id: str) -> str:
        """Where an upload's multipart upload (then its unverified object) lives."""
        return self._key("uploads", upload_id)

    def object_key(self, sha256: str) -> str:
        """Where a complete object lives."""
        return self._key("objects", sha256[:2], sha256)

    def _tail(self, upload_id: str, part_number: int) -> Path:
        return self.work_dir / f"{upload_id}.{part_number}"

    # -- state -----------------------------------------------------------------------------
    def _state(self, upload_id: str) -> _Upload:
        """This process's view of the upload, loaded from S3 (and the tails) when absent."""
        with self._lock:
            state = self._uploads.get(upload_id)
        if state is not None:
            return state
        key = self.upload_key(upload_id)
        mpu_id, initiated = None, None
        try:
            listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        except Exception as exc:
            raise _unavailable("list multipart uploads", exc) from exc
        for item in listing.get("Uploads", []):
            if item["Key"] == key:
                mpu_id, initiated = item["UploadId"], item.get("Initiated")
                break
        parts: list[dict[str, Any]] = []
        if mpu_id is not None:
            parts = self._list_parts(key, mpu_id)
        stamps = [_stamp(p.get("LastModified")) for p in parts] + [_stamp(initiated)]
        last = max((t for t in stamps if t is not None), default=None)
        # A tail whose part is listed: either it was stored (a crash after UploadPart, before
        # the unlink: the tail goes), or the store kept a part cut short by the crash (seen
        # on SeaweedFS: a part of the bytes that arrived): that part is sent again from the
        # tail, which replaces it.
        for tail in self.work_dir.glob(f"{upload_id}.*"):
            number = tail.name.rsplit(".", 1)[-1]
            if not number.isdigit() or int(number) > len(parts):
                continue
            if int(parts[int(number) - 1]["Size"]) == tail.stat().st_size:
                tail.unlink(missing_ok=True)
            else:
                parts = parts[: int(number) - 1]
        state = _Upload(mpu_id=mpu_id, parts=parts, last_write=last)
        with self._lock:
            return self._uploads.setdefault(upload_id, state)

    def _list_parts(self, key: str, mpu_id: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        marker = 0
        while True:
            try:
                page = self.client.list_parts(
                    Bucket=self.bucket, Key=key, UploadId=mpu_id, PartNumberMarker=marker
                )
            except Exception as exc:
                if _missing(exc):
                    return []
                raise _unavailable("list the parts of an upload", exc) from exc
            parts.extend(
                {"PartNumber": p["PartNumber"], "ETag": p["ETag"], "Size": p["Size"]}
                | {"LastModified": p.get("LastModified")}
                for p in page.get("Parts", [])
            )
            if not page.get("IsTruncated"):
                break
            marker = int(page["NextPartNumberMarker"])
        parts.sort(key=lambda p: int(p["PartNumber"]))
        # Only the contiguous run 1..n counts (a gap would be a part we never acknowledged).
        for i, part in enumerate(parts):
            if int(part["PartNumber"]) != i + 1:
                return parts[:i]
        return parts

    def _tail_size(self, upload_id: str, state: _Upload) -> int:
        try:
            return self._tail(upload_id, len(state.parts) + 1).stat().st_size
        except FileNotFoundError:
            return 0

    def _forget(self, upload_id: str) -> None:
        with self._lock:
            self._uploads.pop(upload_id, None)

    # -- uploads ---------------------------------------------------------------------------
    def offset(self, upload_id: str) -> int:
        state = self._state(upload_id)
        return state.stored + self._tail_size(upload_id, state)

    def last_write(self, upload_id: str) -> float | None:
        state = self._state(upload_id)
        try:
            tail = self._tail(upload_id, len(state.parts) + 1).stat().st_mtime
        except FileNotFoundError:
            tail = None
        times = [t for t in (tail, state.last_write) if t is not None]
        return max(times) if times else None

    def claim(self, upload_id: str, offset: int, size: int | None = None) -> int:
        state = self._state(upload_id)
        with state.lock:
            _check(upload_id, offset, state.stored + self._tail_size(upload_id, state))
            state.generation += 1
            state.part_size = part_size_for(size, self.settings.max_parts)
            return state.generation

    def append(self, upload_id: str, offset: int, chunks: Iterable[bytes], owner: int) -> int:
        state = self._state(upload_id)
        with state.lock:
            stored = state.stored + self._tail_size(upload_id, state)
            _check(upload_id, offset, stored)
            if state.generation != owner:
                raise OffsetMismatch(
                    f"upload {upload_id} was taken over by a newer request; it holds {stored} "
                    f"bytes: send the next chunk at offset {stored}",
                    offset=stored,
                )
            hasher = state.hasher[1] if state.hasher and state.hasher[0] == offset else None
            if hasher is None and offset == 0:
                hasher = hashlib.sha256()
            state.hasher = None
            written = offset
            tail = self._tail(upload_id, len(state.parts) + 1)
            fh = tail.open("ab")
            try:
                for chunk in chunks:
                    if not chunk:
                        continue
                    view = memoryview(chunk)
                    while view:
                        room = state.part_size - fh.tell()
                        piece = view[:room]
                        fh.write(piece)
                        if hasher is not None:
                            hasher.update(piece)
                        written += len(piece)
                        view = view[len(piece) :]
                        if fh.tell() >= state.part_size:
                            fh.close()
                            self._send_part(upload_id, state, tail)
                            tail = self._tail(upload_id, len(state.parts) + 1)
                            fh = tail.open("ab")
                    state.last_write = time.time()
            except OSError as exc:
                raise _storage_error(exc) from exc
            finally:
                fh.close()
                # The bytes received stay in order (tail + parts): the digest covers them.
                if hasher is not None:
                    state.hasher = (written, hasher)
            return written

    def append_file(
        self,
        upload_id: str,
        offset: int,
        source: int,
        length: int,
        owner: int,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        return self.append(
            upload_id, offset, read_file(source, offset, offset + length, progress), owner
        )

    def _send_part(self, upload_id: str, state: _Upload, tail: Path) -> None:
        """Store the tail as the next part, then drop it (see the module docstring)."""
        key = self.upload_key(upload_id)
        number = len(state.parts) + 1
        size = tail.stat().st_size
        with tail.open("rb") as body:
            # Content-MD5: the store verifies the part as it received it (BadDigest
            # otherwise), over HTTPS too, where SigV4 leaves the payload unsigned.
            md5 = hashlib.md5(usedforsecurity=False)
            for block in iter(lambda: body.read(BUFFER), b""):
                md5.update(block)
            body.seek(0)
            # (Local disk errors are raised above; below, every failure is the store's,
            # botocore's timeouts included, which are OSErrors too.)
            try:
                if state.mpu_id is None:
                    state.mpu_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)[
                        "UploadId"
                    ]
                answer = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=state.mpu_id,
                    PartNumber=number,
                    Body=body,
                    ContentLength=size,
                    ContentMD5=base64.b64encode(md5.digest()).decode(),
                )
            except Exception as exc:
                raise _unavailable(f"store part {number} of upload {upload_id}", exc) from exc
        state.parts.append({"PartNumber": number, "ETag": answer["ETag"], "Size": size})
        state.last_write = time.time()
        tail.unlink(missing_ok=True)

    def digest(self, upload_id: str) -> str | None:
        state = self._state(upload_id)
        with state.lock:
            cached = state.hasher
            if cached is None or cached[0] != self.offset(upload_id):
                return None
            return str(cached[1].hexdigest())

    def commit(self, upload_id: str, sha256: str) -> int:
        state = self._state(upload_id)
        key = self.upload_key(upload_id)
        with state.lock:
            tail = self._tail(upload_id, len(state.parts) + 1)
            if tail.exists() and (tail.stat().st_size or not state.parts):
                self._send_part(upload_id, state, tail)  # the last part may be small
            tail.unlink(missing_ok=True)
            expected = state.stored
            try:
                if state.mpu_id is not None:
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=state.mpu_id,
                        MultipartUpload={
                            "Parts": [
                                {"PartNumber": p["PartNumber"], "ETag": p["ETag"]}
                                for p in state.parts
                            ]
                        },
                    )
                    state.mpu_id = None
                    size = self._head(key)
                elif (found := self._head(key, missing=-1)) >= 0:
                    size = found  # completed before a crash: verify and publish it now
                    expected = found
                else:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
                    size = 0
            except APIError:
                raise
            except Exception as exc:
                raise _unavailable(f"complete upload {upload_id}", exc) from exc
            if size != expected:
                self._delete(key)
                self._forget(upload_id)
                raise ServerError(
                    f"upload {upload_id}: the object store holds {size} bytes after completing "
                    f"{expected}; nothing was published, start the upload again"
                )
            cached = state.hasher
            if cached is not None and cached[0] == size:
                digest = cached[1].hexdigest()
            else:
                digest = self._digest(key)
            if digest != sha256:
                self._delete(key)
                self._forget(upload_id)
                raise DigestMismatch(
                    f"upload {upload_id}: received {size} bytes with SHA-256 {digest}, "
                    f"but {sha256} was declared; nothing was stored",
                    received_sha256=digest,
                    size=size,
                )
            self._publish(key, sha256, size)
            self._delete(key)
            self._forget(upload_id)
            return size

    def _publish(self, key: str, sha256: str, size: int) -> None:
        """Copy the verified object to its content address (server-side), unless equal
        content is there already; the HEAD afterwards checks the size."""
        target = self.object_key(sha256)
        if self._head(target, missing=-1) == size:
            return
        try:
            self.client.copy(
                {"Bucket": self.bucket, "Key": key}, self.bucket, target
            )  # managed: multipart copy above 8 MiB parts, no bytes through this process
        except Exception as exc:
            raise _unavailable(f"publish object {sha256}", exc) from exc
        if self._head(target) != size:
            raise ServerError(f"object {sha256} has the wrong size after publishing; retry")

    def _digest(self, key: str) -> str:
        """SHA-256 of a stored object, read back once (after a restart lost the running one)."""
        hasher = hashlib.sha256()
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                for block in iter(lambda: body.read(BUFFER), b""):
                    hasher.update(block)
        except Exception as exc:
            raise _unavailable("read an upload back", exc) from exc
        return hasher.hexdigest()

    def _head(self, key: str, missing: int | None = None) -> int:
        """The object's size; ``missing`` (or NotFound when None) if it does not exist."""
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except Exception as exc:
            if _missing(exc):
                if missing is not None:
                    return missing
                raise NotFound(f"object {key} is missing from the bucket") from exc
            raise _unavailable(f"look up {key}", exc) from exc

    def _delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            log.warning("could not delete s3://%s/%s: %s", self.bucket, key, exc)

    def discard(self, upload_id: str) -> None:
        state = self._state(upload_id)
        key = self.upload_key(upload_id)
        with state.lock:
            if state.mpu_id is not None:
                self.abort(key, state.mpu_id)
            for tail in self.work_dir.glob(f"{upload_id}.*"):
                tail.unlink(missing_ok=True)
            self._delete(key)
            state.generation += 1  # a late append of the discarded upload is refused
            self._forget(upload_id)

    def abort(self, key: str, mpu_id: str) -> None:
        """Abort one multipart upload (its parts stop costing storage)."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=mpu_id)
        except Exception as exc:
            if not _missing(exc):
                log.warning("could not abort the multipart upload of %s: %s", key, exc)

    # -- direct uploads (presigned parts, see store/direct.py) ------------------------------
    def direct_part_size(self, size: int) -> int:
        """The part size of a direct upload of ``size`` bytes (fits in ``max_parts``)."""
        return part_size_for(size, self.settings.max_parts, self.settings.part_size)

    def create_direct(self, sha256: str) -> str:
        """A multipart upload at the object's content address whose parts must carry their
        SHA-256 (``ChecksumAlgorithm=SHA256``: COMPOSITE); returns its UploadId."""
        try:
            answer = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.object_key(sha256), ChecksumAlgorithm="SHA256"
            )
        except Exception as exc:
            raise _unavailable("create a multipart upload", exc) from exc
        return str(answer["UploadId"])

    def direct_parts(self, sha256: str, mpu_id: str) -> dict[int, int] | None:
        """The stored parts of a direct upload, number -> size; None if it is gone."""
        key = self.object_key(sha256)
        try:
            self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=mpu_id, MaxParts=1)
        except Exception as exc:
            if _missing(exc):
                return None
            raise _unavailable("list the parts of an upload", exc) from exc
        return {int(p["PartNumber"]): int(p["Size"]) for p in self._list_all_parts(key, mpu_id)}

    def _list_all_parts(self, key: str, mpu_id: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        marker = 0
        while True:
            page = self.client.list_parts(
                Bucket=self.bucket, Key=key, UploadId=mpu_id, PartNumberMarker=marker
            )
            parts.extend(page.get("Parts", []))
            if not page.get("IsTruncated"):
                return parts
            marker = int(page["NextPartNumberMarker"])

    def presign_part(
        self, sha256: str, mpu_id: str, number: int, digest: str, size: int
    ) -> dict[str, Any]:
        """A presigned ``UploadPart`` of part ``number`` that signs its SHA-256 (hex
        ``digest``) as ``x-amz-checksum-sha256``: the store refuses other bytes (BadDigest)."""
        if self._public is None:
            self._public = make_client(self.settings, public=True)
        checksum = _b64(digest)
        try:
            url = self._public.generate_presigned_url(
                "upload_part",
                Params={
                    "Bucket": self.bucket,
                    "Key": self.object_key(sha256),
                    "UploadId": mpu_id,
                    "PartNumber": number,
                    "ChecksumSHA256": checksum,
                    "ContentLength": size,
                },
                ExpiresIn=self.settings.url_expiry,
            )
        except Exception as exc:
            raise _unavailable("presign a part", exc) from exc
        return {
            "part": number,
            "size": size,
            "url": url,
            "headers": {"x-amz-checksum-sha256": checksum},
        }

    def complete_direct(
        self, sha256: str, mpu_id: str, digests: list[str], part_size: int, size: int
    ) -> int:
        """Complete a direct upload with every part's checksum once each part is stored with
        its size; check the composite checksum and the size (HEAD). Returns the size."""
        key = self.object_key(sha256)
        stored = self.direct_parts(sha256, mpu_id)
        if stored is None:
            if self._head(key, missing=-1) == size:
                return size  # completed before a crash: only the rows are owed
            raise NotFound(f"the multipart upload of {sha256} is gone: begin the upload again")
        expected = _part_sizes(size, part_size)
        missing = [n for n, want in enumerate(expected, 1) if stored.get(n) != want]
        if missing:
            raise InvalidRequest(
                f"{len(missing)} part(s) of the upload are missing or of the wrong size "
                f"(first: part {missing[0]}); send them before completing",
                field="parts",
                missing=missing[:100],
            )
        try:
            parts = self._list_all_parts(key, mpu_id)
            answer = self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=mpu_id,
                MultipartUpload={
                    "Parts": [
                        {
                            "PartNumber": p["PartNumber"],
                            "ETag": p["ETag"],
                            "ChecksumSHA256": _b64(digests[int(p["PartNumber"]) - 1]),
                        }
                        for p in sorted(parts, key=lambda p: int(p["PartNumber"]))
                    ]
                },
            )
        except Exception as exc:
            if _code(exc) in ("InvalidPart", "BadDigest", "InvalidPartOrder"):
                raise InvalidRequest(
                    f"the object store refused to complete the upload: {exc}", field="parts"
                ) from exc
            raise _unavailable(f"complete the upload of {sha256}", exc) from exc
        composite = answer.get("ChecksumSHA256")
        want = composite_sha256(digests)
        if composite and composite.split("-")[0] != want.split("-")[0]:
            self._delete(key)
            raise DigestMismatch(
                f"the object store's composite SHA-256 {composite} of {sha256} is not "
                f"{want}; nothing was published",
                size=size,
            )
        got = self._head(key)
        if got != size:
            self._delete(key)
            raise InvalidRequest(
                f"the object holds {got} bytes, not the {size} declared; nothing was "
                "published: begin the upload again",
                field="size",
            )
        return size

    def abort_direct(self, sha256: str, mpu_id: str) -> None:
        """Abort a direct upload's multipart upload (best effort)."""
        self.abort(self.object_key(sha256), mpu_id)

    def sweep(self, older_than: float) -> int:
        """Abort every multipart upload under the prefix started more than ``older_than``
        seconds ago with no part stored since (abandoned by a worker, a killed server, a
        fallback); return how many. The bucket lifecycle rule
        ``AbortIncompleteMultipartUpload`` is the second net. Also deletes the objects under
        ``uploads/`` as old (see :meth:`_sweep_upload_objects`)."""
        cut = time.time() - older_than
        self._sweep_upload_objects(cut)
        aborted = 0
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key("") + "/"}
        if not self.prefix:
            params.pop("Prefix")
        while True:
            try:
                page = self.client.list_multipart_uploads(**params)
            except Exception as exc:
                log.warning("could not list the multipart uploads to sweep: %s", exc)
                return aborted
            for item in page.get("Uploads", []):
                started = _stamp(item.get("Initiated"))
                if started is None or started >= cut:
                    continue
                try:
                    parts = self._list_all_parts(item["Key"], item["UploadId"])
                except Exception:
                    parts = []
                stamps = [_stamp(p.get("LastModified")) for p in parts]
                if any(t is not None and t >= cut for t in stamps):
                    continue
                self.abort(item["Key"], item["UploadId"])
                aborted += 1
            if not page.get("IsTruncated"):
                break
            params["KeyMarker"] = page.get("NextKeyMarker")
            params["UploadIdMarker"] = page.get("NextUploadIdMarker")
        if aborted:
            log.info("aborted %d abandoned multipart upload(s) in s3://%s", aborted, self.bucket)
        return aborted

    def _sweep_upload_objects(self, cut: float) -> None:
        """Delete the completed-but-unpublished objects under ``uploads/`` last written
        before ``cut``: a server killed between publishing one at its content address and
        deleting it leaves it behind (the retry of ``complete`` then finds the content
        published and records the asset without coming back here). One that old belongs
        to no live upload: its upload expired (after as long without a chunk) or is done."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.upload_key("") + "/"}
        while True:
            try:
                page = self.client.list_objects_v2(**params)
            except Exception as exc:
                log.warning("could not list the upload objects to sweep: %s", exc)
                return
            for item in page.get("Contents", []):
                written = _stamp(item.get("LastModified"))
                if written is not None and written < cut:
                    log.info(
                        "deleting the leftover upload object s3://%s/%s", self.bucket, item["Key"]
                    )
                    self._delete(item["Key"])
            if not page.get("IsTruncated"):
                return
            params["ContinuationToken"] = page["NextContinuationToken"]

    # -- objects ---------------------------------------------------------------------------
    def open(self, sha256: str) -> BinaryIO:
        key = self.object_key(sha256)
        size = self._head(key, missing=-1)
        if size < 0:
            raise NotFound(f"asset object {sha256} is missing from the blob store")
        return S3Reader(self.client, self.bucket, key, size)  # type: ignore[return-value]

    def exists(self, sha256: str) -> bool:
        return self._head(self.object_key(sha256), missing=-1) >= 0

    def size(self, sha256: str) -> int:
        return self._head(self.object_key(sha256))


class S3Reader:
    """A read-only, seekable stream over one object: each read continues one ranged
    ``GetObject`` from the current position (a seek elsewhere starts another), so serving a
    ``Range`` request downloads only that range."""

    def __init__(self, client: Any, bucket: str, key: str, size: int) -> None:
        self._client, self._bucket, self._key, self.size = client, bucket, key, size
        self._position = 0
        self._body: Any = None

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        target = base + position
        if target != self._position:
            self._drop()
            self._position = target
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, n: int = -1) -> bytes:
        if self._position >= self.size:
            return b""
        if self._body is None:
            try:
                self._body = self._client.get_object(
                    Bucket=self._bucket, Key=self._key, Range=f"bytes={self._position}-"
                )["Body"]
            except Exception as exc:
                raise OSError(f"cannot read s3://{self._bucket}/{self._key}: {exc}") from exc
        data: bytes = self._body.read(None if n < 0 else n)
        self._position += len(data)
        return data

    def _drop(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> S3Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check(upload_id: str, offset: int, size: int) -> None:
    if offset != size:
        raise OffsetMismatch(
            f"upload {upload_id} holds {size} bytes; send the next chunk at offset {size}",
            offset=size,
        )


def _b64(digest: str) -> str:
    """A hex SHA-256 as S3 wants it (base64 of the 32 bytes)."""
    return base64.b64encode(bytes.fromhex(digest)).decode()


def composite_sha256(digests: list[str]) -> str:
    """S3's COMPOSITE checksum of a multipart object: base64(sha256(concat(part digests)))
    with the part count (``-N``). Not the SHA-256 of the object (that one is the asset's)."""
    joined = b"".join(bytes.fromhex(d) for d in digests)
    return f"{base64.b64encode(hashlib.sha256(joined).digest()).decode()}-{len(digests)}"


def _part_sizes(size: int, part_size: int) -> list[int]:
    """The sizes of the parts of ``size`` bytes cut in ``part_size`` (at least one part)."""
    full, rest = divmod(size, part_size)
    return [part_size] * full + ([rest] if rest or not full else [])


def part_count(size: int, part_size: int) -> int:
    """How many parts ``size`` bytes make (at least one)."""
    return len(_part_sizes(size, part_size))


def _stamp(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else None
