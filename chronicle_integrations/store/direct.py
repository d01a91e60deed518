"""Direct uploads: the worker sends an asset's bytes straight to the S3 bucket through URLs the
server presigns, and the SHA-256 still holds end to end (see ``research/s3.md`` §5).

1. The worker hashes the staged file: the whole SHA-256, and one SHA-256 per part of
   :meth:`DirectMixin.direct_plan`'s part size (which fits the store's part-count limit).
2. ``direct_upload(upload_id, sha256, parts)``: if the object is already stored (same content
   uploaded before) the asset is published at once (dedup). Otherwise a multipart upload is
   created at the object's content address with ``ChecksumAlgorithm=SHA256``, and the
   digests are recorded in ``direct_uploads`` (SQL: any replica can take over, and a
   worker's retry must announce the same digests). The answer carries presigned
   ``UploadPart`` URLs for the next few parts not yet stored, each signing that part's
   ``x-amz-checksum-sha256`` and ``Content-Length``, valid a short while: the worker asks
   again for more (or fresh ones) as it goes.
3. The store refuses a part whose bytes differ from the signed digest (``BadDigest``) or
   whose size differs (the signature does not match): only the bytes that were hashed can
   be stored, even if the file was rewritten in between.
4. ``complete_upload``: every part stored with its size (``ListParts``), then
   ``CompleteMultipartUpload`` with every part's checksum, the composite checksum compared
   with ``sha256(concat(part digests))``, the size checked with a HEAD; only then are the
   rows written and the asset visible.

The server never sees the bytes: its CPU and memory stay flat whatever the size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Any

import sqlalchemy as sa

from .. import _validation as check
from .._errors import InvalidRequest, PayloadTooLarge
from .._models import AssetInfo
from .assets import AssetsMixin
from .schema import direct_uploads

log = logging.getLogger(__name__)

#: Part URLs handed out per answer (the worker asks again for the next ones).
URL_BATCH = 8

_HEX = re.compile(r"[0-9a-f]{64}")


class DirectMixin(AssetsMixin):
    """Direct (presigned) uploads of :class:`~.core.Store`, on an S3 blob store."""

    _last_mpu_sweep = 0.0

    # -- capability ------------------------------------------------------------------------
    @property
    def direct_enabled(self) -> bool:
        """True when the asset store takes direct uploads (S3 with ``--uploads direct``)."""
        settings = getattr(self.blobs, "settings", None)
        return bool(getattr(settings, "direct_uploads", False))

    def _direct_blobs(self) -> Any:
        if not self.direct_enabled:
            raise InvalidRequest(
                "this server takes no direct uploads (its assets are not in S3, or it runs "
                "with --uploads proxied): send the bytes with PUT /v1/uploads/{id}",
                field="direct",
                reason="direct_unavailable",
            )
        return self.blobs

    def _direct_row(self, upload_id: str) -> Any:
        if not self.direct_enabled:
            return None
        self._direct_blobs()
        with self._read() as conn:
            return conn.execute(
                sa.select(direct_uploads).where(direct_uploads.c.upload_id == upload_id)
            ).first()

    # -- the protocol ----------------------------------------------------------------------
    def direct_plan(self, upload_id: str) -> dict[str, Any]:
        """The part size the worker must hash with (from the upload's declared size)."""
        blobs = self._direct_blobs()
        row = self._upload_row(upload_id)
        if row.size is None:
            raise InvalidRequest("a direct upload must declare its size", field="size")
        from .s3 import MAX_PART, part_count

        if int(row.size) > MAX_PART * blobs.settings.max_parts:
            raise PayloadTooLarge(
                f"an object of {row.size} bytes does not fit in {blobs.settings.max_parts} "
                f"parts of at most {MAX_PART} bytes (the store's limits)",
                limit=MAX_PART * blobs.settings.max_parts,
            )
        part_size = blobs.direct_part_size(int(row.size))

        return {"part_size": part_size, "parts": part_count(int(row.size), part_size)}

    def direct_upload(
        self, upload_id: str, sha256: str, parts: list[str], *, batch: int = URL_BATCH
    ) -> dict[str, Any]:
        """Start or continue a direct upload (see the module docstring). The answer:
        ``completed`` (with ``asset``: deduplicated, or already complete), else ``urls`` (the
        next missing parts, presigned), ``stored`` / ``parts`` (counts), ``part_size``,
        ``expires_in``. Repeating it is safe: it hands out URLs for what is still missing."""
        check.sha256_hex(sha256)
        blobs = self._direct_blobs()
        row = self._upload_row(upload_id)
        if row.completed_at is not None:
            if row.sha256 != sha256:
                raise InvalidRequest(f"upload {upload_id} was completed with another digest")
            info = AssetInfo(row.name, int(row.size), sha256, row.completed_at)
            return {"completed": True, "asset": info}
        plan = self.direct_plan(upload_id)
        if not isinstance(parts, list) or len(parts) != plan["parts"]:
            raise InvalidRequest(
                f"expected {plan['parts']} part digests (parts of {plan['part_size']} bytes)",
                field="parts",
                part_size=plan["part_size"],
            )
        if not all(isinstance(p, str) and _HEX.fullmatch(p) for p in parts):
            raise InvalidRequest("part digests must be 64 lowercase hex characters", field="parts")
        size = int(row.size)
        if blobs.exists(sha256) and blobs.size(sha256) == size:
            self._drop_direct(upload_id)
            return {"completed": True, "asset": self._publish_asset(row, sha256, size)}
        record = self._direct_row(upload_id)
        if record is not None and (record.sha256 != sha256 or json.loads(record.parts) != parts):
            raise InvalidRequest(
                f"upload {upload_id} was announced with other digests (the file changed?): "
                "discard it and begin a new upload",
                field="parts",
            )
        stored = None if record is None else blobs.direct_parts(sha256, record.mpu_id)
        if stored is None:  # new, or its multipart upload was swept: (re)create it
            mpu_id = blobs.create_direct(sha256)
            with self._write() as conn:
                conn.execute(direct_uploads.delete().where(direct_uploads.c.upload_id == upload_id))
                conn.execute(
                    direct_uploads.insert().values(
                        upload_id=upload_id,
                        sha256=sha256,
                        size=size,
                        part_size=plan["part_size"],
                        mpu_id=mpu_id,
                        parts=json.dumps(parts),
                        created_at=self.clock(),
                    )
                )
            stored = {}
        else:
            mpu_id = record.mpu_id
        from .s3 import _part_sizes

        sizes = _part_sizes(size, plan["part_size"])
        missing = [n for n, want in enumerate(sizes, 1) if stored.get(n) != want]
        urls = [
            blobs.presign_part(sha256, mpu_id, n, parts[n - 1], sizes[n - 1])
            for n in missing[: max(1, batch)]
        ]
        return {
            "completed": False,
            "urls": urls,
            "stored": len(sizes) - len(missing),
            "parts": len(sizes),
            "part_size": plan["part_size"],
            "expires_in": blobs.settings.url_expiry,
        }

    def _drop_direct(self, upload_id: str) -> None:
        if not self.direct_enabled:
            return
        self._direct_blobs()
        with self._write() as conn:
            conn.execute(direct_uploads.delete().where(direct_uploads.c.upload_id == upload_id))

    # -- completion, discard, sweep (the proxied paths otherwise) --------------------------
    def complete_upload(self, upload_id: str, sha256: str) -> AssetInfo:
        record = self._direct_row(upload_id)
        if record is None:
            return super().complete_upload(upload_id, sha256)
        check.sha256_hex(sha256)
        row = self._upload_row(upload_id)
        if row.completed_at is not None:
            return super().complete_upload(upload_id, sha256)
        if record.sha256 != sha256:
            raise InvalidRequest(
                f"upload {upload_id} was announced with SHA-256 {record.sha256}, not {sha256}",
                field="sha256",
            )
        size = self.blobs.complete_direct(  # type: ignore[attr-defined]
            sha256, record.mpu_id, json.loads(record.parts), int(record.part_size), int(row.size)
        )
        info = self._publish_asset(row, sha256, size)
        self._drop_direct(upload_id)
        return info

    def _upload_status(self, row: Any) -> Any:
        """For a direct upload in progress, ``offset`` counts the bytes of the parts stored
        from part 1 on (progress; the worker resumes from the parts listed, not from it)."""
        status = super()._upload_status(row)
        if status.completed or not self.direct_enabled:
            return status
        record = self._direct_row(row.upload_id)
        if record is None:
            return status
        stored = self.blobs.direct_parts(record.sha256, record.mpu_id) or {}  # type: ignore[attr-defined]
        offset, number = 0, 1
        while number in stored:
            offset += stored[number]
            number += 1
        return dataclasses.replace(status, offset=offset)

    def open_chunk(self, upload_id: str, offset: int) -> Any:
        """A proxied chunk for an upload begun directly (a worker that fell back because it
        cannot reach the bucket): the direct attempt is abandoned, its parts aborted."""
        record = self._direct_row(upload_id)
        if record is not None:
            self.blobs.abort_direct(record.sha256, record.mpu_id)  # type: ignore[attr-defined]
            self._drop_direct(upload_id)
        return super().open_chunk(upload_id, offset)

    def discard_upload(self, upload_id: str) -> None:
        record = self._direct_row(upload_id)
        if record is not None:
            row = self._upload_row(upload_id)
            if row.completed_at is None:
                self.blobs.abort_direct(record.sha256, record.mpu_id)  # type: ignore[attr-defined]
            self._drop_direct(upload_id)
        super().discard_upload(upload_id)

    def expire_uploads(self, *, every: float = 0.0) -> int:
        """Also sweep the bucket's abandoned multipart uploads (S3 only), as often."""
        expired = super().expire_uploads(every=every)
        sweep = getattr(self.blobs, "sweep", None)
        now = time.monotonic()
        if sweep is not None and (every <= 0 or now - self._last_mpu_sweep >= every):
            self._last_mpu_sweep = now
            try:
                sweep(self.upload_expiry)
            except Exception as exc:  # a sweep never takes the server down
                log.warning("sweeping abandoned multipart uploads failed: %s", exc)
        return expired


__all__ = ["URL_BATCH", "DirectMixin", "direct_uploads"]
