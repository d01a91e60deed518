"""Streaming asset bytes in and out without ever holding a whole chunk or file in memory.

Uploads: the request body arrives on the event loop as pieces of up to ~256 KiB;
:func:`stream_chunk` hands them over in batches of ~1 MiB (one thread hand-off per batch, and
no copy: the pieces are passed as they are), at most :data:`PIPE_DEPTH` batches in flight, to
:meth:`Store.write_chunk` running on a worker thread, which writes and hashes them (both
release the GIL) while the loop keeps reading the socket. Memory per upload is bounded by about
``(PIPE_DEPTH + 1) * BATCH``, whatever the chunk size.

If the client goes away mid-body, the batches already received are still written (they are in
order, and the store keeps the running digest valid), so the client resumes from the offset
``GET /v1/uploads/{id}`` reports.

Downloads: :func:`blob_response` serves a complete object from its file, 1 MiB per read on a
worker thread, with single-range support (``Range: bytes=a-b``, ``bytes=a-``, ``bytes=-n``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import BinaryIO, TypeVar

import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse

from .._errors import APIError, InvalidRequest, PayloadTooLarge
from .._models import AssetInfo

__all__ = ["BATCH", "PIPE_DEPTH", "RangeNotSatisfiable", "blob_response", "stream_chunk"]

log = logging.getLogger(__name__)

#: Bytes handed to the writer thread at a time.
BATCH = 1024 * 1024
#: Batches in flight between the event loop and the writer thread.
PIPE_DEPTH = 4
#: Bytes per read when serving a file.
READ_BLOCK = 1024 * 1024

T = TypeVar("T")

_END = object()
_ABORT = object()


class _Aborted(Exception):
    """Raised inside the writer when the request stops before its end (disconnect, limit)."""


class _ChunkPipe:
    """A bounded hand-off of byte batches from the event loop to one writer thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = PIPE_DEPTH) -> None:
        self._loop = loop
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._slots = asyncio.Semaphore(depth)
        #: Set by the writer when it stops consuming (finished or failed).
        self.closed = False

    # -- event loop side -------------------------------------------------------------------
    async def put(self, batch: list[bytes]) -> bool:
        """Queue a batch of pieces; False when the writer has stopped (its result says why).

        The pieces are handed over as received, not joined: joining would copy every byte
        once more on the event loop, which is the bottleneck of an upload.
        """
        if self.closed:
            return False
        await self._slots.acquire()
        if self.closed:
            return False
        self._items.put(batch)
        return True

    def finish(self) -> None:
        """No more data: the writer returns normally once the queue is drained."""
        self._items.put(_END)

    def abort(self) -> None:
        """Stop: the writer writes what is queued, then fails with :class:`_Aborted`."""
        self._items.put(_ABORT)

    # -- writer thread side ----------------------------------------------------------------
    def _release(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
            self._loop.call_soon_threadsafe(self._slots.release)

    def chunks(self) -> Iterator[bytes]:
        while True:
            item = self._items.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted()
            assert isinstance(item, list)
            try:
                yield from item
            finally:
                self._release()

    def run(self, write: Callable[[Iterator[bytes]], T]) -> T:
        """Run ``write(chunks)`` (on the writer thread) and mark the pipe closed after it."""
        try:
            return write(self.chunks())
        finally:
            self.closed = True
            self._release()  # wakes a producer blocked in put()


async def stream_chunk(
    request: Request,
    write: Callable[[Iterator[bytes]], T],
    *,
    limit: int,
    executor: concurrent.futures.Executor | None,
    label: str,
) -> T | None:
    """Stream the request body into ``write`` (run on ``executor``), at most ``limit`` bytes.

    Returns ``write``'s result, or None when the client disconnected (the bytes received
    before that are written). Raises what ``write`` raised, or PayloadTooLarge.
    """
    loop = asyncio.get_running_loop()
    pipe = _ChunkPipe(loop)
    writer = loop.run_in_executor(executor, pipe.run, write)
    parts: list[bytes] = []
    pending = received = 0
    try:
        try:
            async for piece in request.stream():
                if received + len(piece) > limit:
                    raise PayloadTooLarge(
                        f"an upload chunk may not exceed {limit} bytes; the bytes before the "
                        "limit were stored: resume from the offset GET /v1/uploads/{id} reports",
                        limit=limit,
                    )
                received += len(piece)
                parts.append(piece)
                pending += len(piece)
                if pending >= BATCH:
                    if not await pipe.put(parts):
                        break  # the writer stopped early: its error is the answer below
                    parts, pending = [], 0
        except (ClientDisconnect, PayloadTooLarge):
            # Keep what arrived (it is in order): the client resumes from the stored offset.
            if parts:
                await pipe.put(parts)
            raise
    except ClientDisconnect:
        pipe.abort()
        await _settle(writer)
        log.info(
            "%s: the client disconnected after sending %d bytes of the chunk (kept)",
            label,
            received,
        )
        return None
    except BaseException:
        pipe.abort()
        await _settle(writer)
        raise
    if parts:
        await pipe.put(parts)  # (a no-op when the writer stopped early)
    pipe.finish()
    return await writer


async def _settle(writer: asyncio.Future[T]) -> None:
    """Wait for an aborted writer, swallowing its (expected) failure."""
    try:
        await asyncio.shield(writer)
    except _Aborted:
        pass
    except APIError as exc:
        log.info("upload write stopped: %s", exc)
    except Exception:
        log.exception("upload write failed after the request ended")


# ------------------------------------------------------------------------------ downloads
class RangeNotSatisfiable(APIError):
    """The requested byte range is outside the asset (416)."""

    code = InvalidRequest.code
    status = 416


_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) for a single-range ``Range`` header, None for the whole
    file (no header, another unit, or several ranges: a server may ignore Range and send all).
    Raises :class:`RangeNotSatisfiable` for a byte range it cannot satisfy."""
    if header is None:
        return None
    unit = header.split("=", 1)[0].strip().lower()
    if unit != "bytes" or "," in header:
        return None
    match = _RANGE.fullmatch(header)
    first, last = (match.group(1), match.group(2)) if match else ("", "")
    if match and first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
        if start < size and (not last or int(last) >= start):
            return start, end
    elif match and last and int(last) > 0 and size > 0:
        return max(size - int(last), 0), size
    raise RangeNotSatisfiable(
        f"range {header.strip()!r} cannot be satisfied: the asset has {size} bytes", size=size
    )


def blob_response(
    opener: Callable[[], BinaryIO], info: AssetInfo, range_header: str | None, if_range: str | None
) -> StreamingResponse:
    """Stream a complete object (``opener()`` opens it), honouring a single byte range."""
    etag = f'"{info.sha256}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "X-Chronicle-SHA256": info.sha256,
        "Cache-Control": "no-cache",
    }
    wanted = parse_range(range_header, info.size)
    if wanted is not None and if_range is not None and if_range.strip() != etag:
        wanted = None  # the client's copy is of another version: send the whole asset
    status = 200
    start, end = 0, info.size
    if wanted is not None:
        start, end = wanted
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{info.size}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(
        _read(opener, start, end),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )


async def _read(opener: Callable[[], BinaryIO], start: int, end: int) -> AsyncIterator[bytes]:
    # Opened lazily so that a response that is never sent (the client left) holds no file.
    fh = await anyio.to_thread.run_sync(opener)
    try:
        if start:
            await anyio.to_thread.run_sync(fh.seek, start)
        position = start
        while position < end:
            block = await anyio.to_thread.run_sync(fh.read, min(READ_BLOCK, end - position))
            if not block:
                raise OSError(f"asset object shorter than expected at byte {position}")
            position += len(block)
            yield block
    finally:
        fh.close()
