"""Assets and their resumable uploads: begin / chunk / complete / discard, the
:class:`ChunkWriter`, the expiry of unfinished uploads, ``put_asset``, and reading assets back.
The bytes live in a :class:`~.blobs.BlobStore`; the rows here say what is published."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import sqlalchemy as sa

from .. import _validation as check
from .._errors import INCOMPLETE, InvalidRequest, LeaseConflict, NotFound, PayloadTooLarge
from .._models import AssetInfo, Page, UploadStatus, walk_pages
from . import schema as t
from .base import _fmt, _key, _same_lease
from .pages import _cursor_key, _page
from .runs import RunsMixin

log = logging.getLogger(__name__)


class AssetsMixin(RunsMixin):
    """The assets and uploads of :class:`~.core.Store`."""

    @property
    def expiry_check_interval(self) -> float:
        """How often periodic callers look for expired uploads (a quarter of the expiry, at
        most every five minutes: the check reads every unfinished upload's row)."""
        return min(self.upload_expiry / 4, 300.0)

    def expire_uploads(self, *, every: float = 0.0) -> int:
        """Drop every unfinished upload that received no chunk for ``upload_expiry`` seconds,
        with its partial bytes; return how many. A later request to one gets 404
        ``not_found`` (its client starts a new upload).

        "No chunk" is judged by both clocks that saw the upload: the store's clock for its
        creation, the file system's (wall-clock) for its last written byte. With ``every``
        > 0, does nothing when the last check from this process is more recent than that.
        """
        started = time.monotonic()
        if every > 0 and started - self._last_expiry < every:
            return 0
        self._last_expiry = started
        created_cut = self.clock() - self.upload_expiry
        written_cut = time.time() - self.upload_expiry
        u = t.uploads.c
        with self._read() as conn:
            candidates = conn.execute(
                sa.select(u.upload_id).where(u.completed_at.is_(None), u.created_at < created_cut)
            ).all()
        expired = 0
        for (upload_id,) in candidates:
            last = self.blobs.last_write(upload_id)
            if last is not None and last >= written_cut:
                continue
            with self._write() as conn:
                gone = conn.execute(
                    t.uploads.delete().where(u.upload_id == upload_id, u.completed_at.is_(None))
                ).rowcount
            if gone:
                self.blobs.discard(upload_id)
                expired += 1
        if expired:
            log.info(
                "dropped %d unfinished upload(s) idle for more than %g s",
                expired,
                self.upload_expiry,
            )
        return expired

    # ------------------------------------------------------------------ assets
    def list_assets(self, experiment_id: str, variation: int, run: int) -> list[AssetInfo]:
        """The run's complete assets, by name (walks :meth:`page_assets`)."""
        return list(
            walk_pages(
                lambda cursor: self.page_assets(experiment_id, variation, run, cursor=cursor)
            )
        )

    def page_assets(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[AssetInfo]:
        """One page of the run's complete assets, by name, after ``cursor``: keyset on the
        name within the primary key ``(experiment_id, variation, run, name)``."""
        key = _key(experiment_id, variation, run)
        size = check.page_limit(limit)
        after = _cursor_key(cursor, "assets", check.asset_name)[0] if cursor is not None else None
        self.get_run(*key)
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.assets)
                .where(
                    t.assets.c.experiment_id == key[0],
                    t.assets.c.variation == key[1],
                    t.assets.c.run == key[2],
                    sa.true() if after is None else t.assets.c.name > after,
                )
                .order_by(t.assets.c.name)
                .limit(size + 1)
            ).all()
        assets = [AssetInfo(r.name, r.size, r.sha256, r.created_at) for r in rows]
        return _page(assets, size, "assets", lambda a: (a.name,))

    def get_asset(self, experiment_id: str, variation: int, run: int, name: str) -> AssetInfo:
        """One asset's metadata, or NotFound."""
        key = _key(experiment_id, variation, run)
        check.asset_name(name)
        with self._read() as conn:
            row = conn.execute(
                sa.select(t.assets).where(
                    t.assets.c.experiment_id == key[0],
                    t.assets.c.variation == key[1],
                    t.assets.c.run == key[2],
                    t.assets.c.name == name,
                )
            ).first()
        if row is None:
            raise NotFound(f"run {_fmt(key)} has no asset {name!r}", name=name)
        return AssetInfo(row.name, row.size, row.sha256, row.created_at)

    def open_asset(
        self, experiment_id: str, variation: int, run: int, name: str
    ) -> tuple[AssetInfo, BinaryIO]:
        """An asset's metadata and a binary stream of its bytes (the caller closes it)."""
        info = self.get_asset(experiment_id, variation, run, name)
        return info, self.blobs.open(info.sha256)

    def begin_upload(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        name: str,
        *,
        size: int | None = None,
        upload_id: str | None = None,
        lease: str | None = None,
    ) -> UploadStatus:
        """Open (or, with the same ``upload_id``, re-open) a resumable upload to a run.

        When the run was started under a lease, uploads must carry it: only the worker that
        holds the run writes its assets.
        """
        key = _key(experiment_id, variation, run)
        check.asset_name(name)
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or size < 0 or size > 2**53
        ):
            raise InvalidRequest("size must be an integer >= 0", field="size")
        if size is not None and size > self.max_asset_bytes:
            raise self._too_large()
        upload_id = (
            check.token(upload_id, "upload_id")
            if upload_id is not None
            else secrets.token_urlsafe(18)
        )
        with self._write() as conn:
            existing = conn.execute(
                sa.select(t.uploads).where(t.uploads.c.upload_id == upload_id)
            ).first()
            if existing is not None:
                if (existing.experiment_id, existing.variation, existing.run, existing.name) != (
                    *key,
                    name,
                ):
                    raise InvalidRequest(
                        f"upload id {upload_id} belongs to another asset", field="upload_id"
                    )
                return self._upload_status(existing)
            row = self._lock_run(conn, *key)
            if row.lease is not None and (lease is None or not _same_lease(lease, row.lease)):
                raise LeaseConflict(
                    f"run {_fmt(key)}: uploads must carry the run's lease",
                    state=self.effective_state(row.state, row.alive_at, self.clock()).value,
                )
            conn.execute(
                t.uploads.insert().values(
                    upload_id=upload_id,
                    experiment_id=key[0],
                    variation=key[1],
                    run=key[2],
                    name=name,
                    size=size,
                    created_at=self.clock(),
                )
            )
        return UploadStatus(upload_id=upload_id, name=name, offset=0, size=size)

    def _upload_row(self, upload_id: str) -> Any:
        check.token(upload_id, "upload_id")
        with self._read() as conn:
            row = conn.execute(
                sa.select(t.uploads).where(t.uploads.c.upload_id == upload_id)
            ).first()
        if row is None:
            raise NotFound(
                f"upload {upload_id} does not exist (an unfinished upload expires after "
                f"{self.upload_expiry:g} s without a chunk): begin a new upload",
                upload_id=upload_id,
            )
        return row

    def _upload_status(self, row: Any) -> UploadStatus:
        done = row.completed_at is not None
        offset = row.size if done and row.size is not None else self.blobs.offset(row.upload_id)
        return UploadStatus(
            upload_id=row.upload_id,
            name=row.name,
            offset=offset,
            size=row.size,
            completed=done,
            sha256=row.sha256,
        )

    def upload_digest(self, upload_id: str) -> str | None:
        """The SHA-256 of the upload's bytes as the blob store wrote them, when it kept one
        over all of them (see :meth:`BlobStore.digest`); None otherwise. For an in-process
        writer (the embedded store), whose bytes are the ones the blob store hashed."""
        self._upload_row(upload_id)
        return self.blobs.digest(upload_id)

    def upload_status(self, upload_id: str) -> UploadStatus:
        """Where an upload stands (``offset`` = bytes safely stored)."""
        return self._upload_status(self._upload_row(upload_id))

    def write_chunk(self, upload_id: str, offset: int, chunks: Iterable[bytes]) -> UploadStatus:
        """Append a chunk at ``offset`` (the stored size, else OffsetMismatch)."""
        writer = self.open_chunk(upload_id, offset)
        writer.write(chunks)
        return writer.status()

    def write_file(
        self,
        upload_id: str,
        offset: int,
        source: int,
        length: int,
        progress: Callable[[int], None] | None = None,
    ) -> UploadStatus:
        """Append bytes ``offset`` to ``offset + length`` of the open file ``source`` (a file
        descriptor) at ``offset`` (the stored size, else OffsetMismatch): the embedded client's
        path for an upload that mirrors a file; the local blob store copies it in the kernel.
        The status's offset falls short of ``offset + length`` when the source ended early."""
        writer = self.open_chunk(upload_id, offset)
        writer.write_file(source, length, progress)
        return writer.status()

    def open_chunk(self, upload_id: str, offset: int) -> ChunkWriter:
        """Start a chunk at ``offset`` (the stored size, else OffsetMismatch): the returned
        writer appends it in as many :meth:`ChunkWriter.write` calls as convenient.

        The writer takes the upload over: from now on, writes of any older writer (a request
        that stalled, then woke up) are refused with OffsetMismatch, so two requests never
        interleave their bytes. Nothing is locked between writes.
        """
        row = self._upload_row(upload_id)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidRequest("offset must be an integer >= 0", field="offset")
        if row.completed_at is not None:
            raise InvalidRequest(f"upload {upload_id} is already complete", field="upload_id")
        # (The claim refuses any offset but the stored size, which never passes the declared
        # size: an offset past it gets the OffsetMismatch that names the right one.)
        owner = self.blobs.claim(upload_id, offset, row.size)
        return ChunkWriter(self, row, offset, owner)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"an asset may not exceed {self.max_asset_bytes} bytes (the server's limit)",
            limit=self.max_asset_bytes,
        )

    def complete_upload(self, upload_id: str, sha256: str) -> AssetInfo:
        """Verify the SHA-256 and publish the asset atomically (replacing one of that name).

        Completing an already completed upload with the same digest returns the asset again.
        """
        check.sha256_hex(sha256)
        row = self._upload_row(upload_id)
        if row.completed_at is not None:
            if row.sha256 != sha256:
                raise InvalidRequest(f"upload {upload_id} was completed with another digest")
            return AssetInfo(row.name, int(row.size), sha256, row.completed_at)
        stored = self.blobs.offset(upload_id)
        if (
            stored == 0
            and row.size
            and self.blobs.exists(sha256)
            and self.blobs.size(sha256) == row.size
        ):
            # The bytes were verified and published, then we died before recording the
            # asset (or the SQL write failed): the object is there, only the rows are owed.
            size = row.size
        elif row.size is not None and stored != row.size:
            raise InvalidRequest(
                f"upload {upload_id} holds {stored} of {row.size} declared bytes",
                field="size",
                offset=stored,
                reason=INCOMPLETE,
            )
        else:
            size = self.blobs.commit(upload_id, sha256)
        return self._publish_asset(row, sha256, size)

    def _publish_asset(self, row: Any, sha256: str, size: int) -> AssetInfo:
        """Record a verified upload's bytes as the run's asset of that name (replacing one),
        mark the upload complete and log the event: the asset becomes visible here."""
        key = (row.experiment_id, row.variation, row.run)
        upload_id = row.upload_id
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                t.assets.delete().where(
                    t.assets.c.experiment_id == key[0],
                    t.assets.c.variation == key[1],
                    t.assets.c.run == key[2],
                    t.assets.c.name == row.name,
                )
            )
            conn.execute(
                t.assets.insert().values(
                    experiment_id=key[0],
                    variation=key[1],
                    run=key[2],
                    name=row.name,
                    sha256=sha256,
                    size=size,
                    created_at=now,
                )
            )
            conn.execute(
                t.uploads.update()
                .where(t.uploads.c.upload_id == upload_id)
                .values(completed_at=now, sha256=sha256, size=size)
            )
            self._event(
                conn,
                key,
                None,
                None,
                now,
                "upload",
                kind="asset",
                detail={"name": row.name, "sha256": sha256, "size": size},
            )
        return AssetInfo(row.name, size, sha256, now)

    def discard_upload(self, upload_id: str) -> None:
        """Drop an unfinished upload and its bytes (a capture the client abandoned). A
        completed upload is left alone: its asset is published."""
        row = self._upload_row(upload_id)
        if row.completed_at is not None:
            return
        self.blobs.discard(upload_id)
        with self._write() as conn:
            conn.execute(
                t.uploads.delete().where(
                    t.uploads.c.upload_id == upload_id, t.uploads.c.completed_at.is_(None)
                )
            )

    def put_asset(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        name: str,
        source: BinaryIO,
        sha256: str,
        *,
        lease: str | None = None,
        upload_id: str | None = None,
    ) -> AssetInfo:
        """Upload a whole stream in one go (the embedded client's path)."""
        status = self.begin_upload(
            experiment_id, variation, run, name, upload_id=upload_id, lease=lease
        )
        if status.completed:
            return self.complete_upload(status.upload_id, sha256)
        if status.offset:
            source.seek(status.offset)
        self.write_chunk(
            status.upload_id, status.offset, iter(lambda: source.read(1024 * 1024), b"")
        )
        return self.complete_upload(status.upload_id, sha256)


class ChunkWriter:
    """One chunk of an upload being written (from :meth:`~.core.Store.open_chunk`): the upload's
    row is checked once, then every :meth:`write` appends at the offset reached so far,
    bounded by the declared size (or, without one, by the store's ``max_asset_bytes``)."""

    def __init__(self, store: AssetsMixin, row: Any, offset: int, owner: int) -> None:
        self._store = store
        self._row = row
        self._owner = owner
        #: Bytes of the upload stored after the writes so far.
        self.offset = offset

    def write(self, chunks: Iterable[bytes]) -> int:
        """Append ``chunks`` (blocking file I/O: call it off the event loop); return the new
        offset. The bytes before an error stay written (in order): the client resumes."""
        declared = self._row.size
        limit = declared if declared is not None else self._store.max_asset_bytes
        try:
            self.offset = self._store.blobs.append(
                self._row.upload_id,
                self.offset,
                _bounded(chunks, limit - self.offset, declared is not None, self._store),
                self._owner,
            )
        except BaseException:
            self.offset = self._store.blobs.offset(self._row.upload_id)
            raise
        return self.offset

    def write_file(
        self, source: int, length: int, progress: Callable[[int], None] | None = None
    ) -> int:
        """Append ``length`` bytes of the open file ``source`` from this writer's offset (see
        :meth:`AssetsMixin.write_file`); return the new offset."""
        declared = self._row.size
        room = (declared if declared is not None else self._store.max_asset_bytes) - self.offset
        if length > room:
            raise _past_limit(declared is not None, self._store)
        try:
            self.offset = self._store.blobs.append_file(
                self._row.upload_id, self.offset, source, length, self._owner, progress
            )
        except BaseException:
            self.offset = self._store.blobs.offset(self._row.upload_id)
            raise
        return self.offset

    def status(self) -> UploadStatus:
        """Where the upload stands after this writer's writes (no I/O)."""
        row = self._row
        return UploadStatus(
            upload_id=row.upload_id, name=row.name, offset=self.offset, size=row.size
        )


def _bounded(
    chunks: Iterable[bytes], room: int, declared: bool, store: AssetsMixin
) -> Iterator[bytes]:
    """Pass chunks through, refusing to go past the declared size (400) or, for an upload
    that declared none, past the largest asset the store takes (413)."""
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > room:
            raise _past_limit(declared, store)
        yield chunk


def _past_limit(declared: bool, store: AssetsMixin) -> Exception:
    """The refusal of bytes past the declared size (400) or, for an upload that declared
    none, past the largest asset the store takes (413)."""
    if declared:
        return InvalidRequest("the upload is larger than its declared size", field="size")
    return store._too_large()
