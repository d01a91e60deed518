"""Streaming asset bytes in and out without ever holding a whole chunk or file in memory.

Uploads: the request body arrives on the event loop as pieces of up to ~256 KiB;
:func:`stream_chunk` gathers them into batches of ~1 MiB and hands each batch (no copy: the
pieces are passed as they are) to the chunk's writer (:meth:`ChunkWriter.write`), which
writes and hashes it on a worker thread (both release the GIL) while the loop keeps reading
the socket. While one write runs, the batches that arrive meanwhile wait (at most
:data:`PIPE_DEPTH` of them) and go to the next write together. Memory per upload is bounded
by about ``(2 * PIPE_DEPTH + 1) * BATCH``, whatever the chunk size.

A worker thread (and the partial file's lock) is taken only for a batch that has fully
arrived, never to wait for the network: a peer that sends headers and then nothing, or
trickles, holds no thread and no lock, only its connection. And it does not hold that for
ever: a body that stays silent for ``idle_timeout`` seconds, or that delivers less than
``min_rate`` bytes per second over such a window, is abandoned with 408 ``request_timeout``
(and ``Connection: close``). While the server shuts down, a chunk still arriving shortly before
the end of its drain is stopped the same way, answered 408 with ``reason: shutting_down``
(see :mod:`.drain`): its client resumes on another replica.

Whenever a chunk stops before its end (the client disconnected or was too slow, a limit was
hit), the bytes received are still written (they are in order, and the store keeps the
running digest valid), so the client resumes from the offset ``GET /v1/uploads/{id}``
reports. A newer ``PUT`` of the same upload takes it over (see :meth:`Store.open_chunk`):
whatever the older one still receives is dropped.

Downloads: :func:`blob_response` serves a complete object from its file, 1 MiB per read on a
worker thread, with single-range support (``Range: bytes=a-b``, ``bytes=a-``, ``bytes=-n``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse

from .._errors import SHUTTING_DOWN, APIError, InvalidRequest, PayloadTooLarge, RequestTimeout
from .._models import AssetInfo, UploadStatus
from ..store import ChunkWriter
from .drain import Drain

__all__ = [
    "BATCH",
    "DEFAULT_UPLOAD_IDLE_TIMEOUT",
    "DEFAULT_UPLOAD_MIN_RATE",
    "PIPE_DEPTH",
    "RangeNotSatisfiable",
    "blob_response",
    "stream_chunk",
]

log = logging.getLogger(__name__)

#: Bytes handed to the writer thread at a time.
BATCH = 1024 * 1024
#: Batches that may wait while a write runs (then the loop stops reading: back-pressure).
PIPE_DEPTH = 4
#: Bytes per read when serving a file.
READ_BLOCK = 1024 * 1024
#: Seconds a chunk body may stay silent before it is abandoned.
DEFAULT_UPLOAD_IDLE_TIMEOUT = 30.0
#: Bytes per second a chunk body must deliver, measured over windows of the idle timeout.
DEFAULT_UPLOAD_MIN_RATE = 1024.0


class _Stalled(Exception):
    """The body went silent, or slower than the minimum rate."""


class _ShuttingDown(_Stalled):
    """The server's drain reached the time at which upload chunks stop."""


async def stream_chunk(
    request: Request,
    writer: ChunkWriter,
    *,
    limit: int,
    executor: concurrent.futures.Executor | None,
    label: str,
    idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT,
    min_rate: float = DEFAULT_UPLOAD_MIN_RATE,
    drain: Drain | None = None,
) -> UploadStatus | None:
    """Stream the request body into ``writer`` (on ``executor``), at most ``limit`` bytes.

    Returns the upload's status, or None when the client disconnected (the bytes received
    before that are written). Raises what the writer raised, PayloadTooLarge, or
    RequestTimeout for a body that stalled or that ``drain`` (the server's shutdown) stopped
    (see the module docstring).
    """
    loop = asyncio.get_running_loop()
    inflight: asyncio.Future[int] | None = None
    parts: list[bytes] = []
    pending = received = 0
    window_start, window_bytes = loop.time(), 0

    async def flush() -> None:
        """Wait for the write in flight (raising its error), then start one for ``parts``."""
        nonlocal inflight, parts, pending
        if inflight is not None:
            current, inflight = inflight, None
            await current
        if parts:
            inflight = loop.run_in_executor(executor, writer.write, parts)
            parts, pending = [], 0

    def stop_if_draining() -> None:
        if drain is not None and drain.stopping_uploads():
            raise _ShuttingDown("the server is shutting down")

    try:
        try:
            async with asyncio.timeout(None) as deadline:
                with _watched(drain, deadline):
                    while True:
                        # Armed only while waiting for the socket, never while a write runs.
                        wake = loop.time() + idle_timeout
                        deadline.reschedule(drain.upload_deadline(wake) if drain else wake)
                        message = await request.receive()
                        deadline.reschedule(None)
                        if message["type"] == "http.disconnect":
                            raise ClientDisconnect()
                        piece: bytes = message.get("body", b"")
                        if piece:
                            if received + len(piece) > limit:
                                raise PayloadTooLarge(
                                    f"an upload chunk may not exceed {limit} bytes; the bytes "
                                    "before the limit were stored: resume from the offset "
                                    "GET /v1/uploads/{id} reports",
                                    limit=limit,
                                )
                            received += len(piece)
                            parts.append(piece)
                            pending += len(piece)
                            window_bytes += len(piece)
                            if pending >= BATCH and (
                                inflight is None or inflight.done() or pending >= PIPE_DEPTH * BATCH
                            ):
                                await flush()
                        now = loop.time()
                        if now - window_start >= idle_timeout:
                            if window_bytes < min_rate * (now - window_start):
                                raise _Stalled(
                                    f"{window_bytes} bytes in {now - window_start:.0f} s, below "
                                    f"the minimum of {min_rate:g} bytes/s"
                                )
                            window_start, window_bytes = now, 0
                        if not message.get("more_body", False):
                            break
                        stop_if_draining()
        except TimeoutError:
            await flush()
            await flush()
            stop_if_draining()
            raise _Stalled(f"no byte for {idle_timeout:g} s") from None
        except (ClientDisconnect, PayloadTooLarge, _Stalled):
            # Keep what arrived (it is in order): the client resumes from the stored offset.
            await flush()
            await flush()
            raise
    except ClientDisconnect:
        log.info(
            "%s: the client disconnected after sending %d bytes of the chunk (kept)",
            label,
            received,
        )
        return None
    except _ShuttingDown:
        status = writer.status()
        log.info("%s: stopped at offset %d (the server is shutting down)", label, status.offset)
        raise RequestTimeout(
            f"the server is shutting down; the {received} bytes of this chunk received were "
            f"kept: resume at offset {status.offset} (on another replica)",
            offset=status.offset,
            reason=SHUTTING_DOWN,
        ) from None
    except _Stalled as exc:
        status = writer.status()
        log.warning("%s: abandoned a stalled chunk body (%s)", label, exc)
        raise RequestTimeout(
            f"the chunk body stalled ({exc}); the {received} bytes received were kept: "
            f"resume at offset {status.offset}",
            offset=status.offset,
        ) from None
    finally:
        if inflight is not None:  # an error left a write running: let it finish quietly
            await _settle(inflight)
    await flush()
    await flush()
    return writer.status()


def _watched(
    drain: Drain | None, deadline: asyncio.Timeout
) -> contextlib.AbstractContextManager[None]:
    """While the chunk streams, let ``drain`` hurry its wait for bytes (see :mod:`.drain`)."""
    return drain.watching(deadline) if drain is not None else contextlib.nullcontext()


async def _settle(write: asyncio.Future[int]) -> None:
    """Wait for an abandoned write, logging (not raising) its failure."""
    try:
        await asyncio.shield(write)
    except APIError as exc:
        log.info("upload write stopped: %s", exc)
    except Exception:
        log.exception("upload write failed after the request ended")


# ------------------------------------------------------------------------------ downloads
class RangeNotSatisfiable(APIError):
    """The requested byte range is outside the asset (416)."""

    code = InvalidRequest.code
    status = 416


#: ``bytes=first-last`` (either side may be empty). Units are case-insensitive and digits are
#: ASCII only (RFC 9110, 14.1); the numbers' length is not bounded here, see _position.
_RANGE = re.compile(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.IGNORECASE)
#: More digits than this is more than any asset can hold (sizes are below 2**53): such a
#: position is treated as "past the end" without converting it (Python refuses to convert
#: numbers of more than 4300 digits, and a huge conversion would cost CPU anyway).
_MAX_DIGITS = 19


def _position(digits: str) -> int:
    """A range position; one too long to matter counts as :data:`_HUGE` (past any end)."""
    significant = digits.lstrip("0")
    return _HUGE if len(significant) > _MAX_DIGITS else int(significant or "0")


_HUGE = 10**_MAX_DIGITS


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) for a single-range ``Range`` header, None for the whole
    file (no header, another unit or several ranges: RFC 9110 lets a server ignore Range and
    send everything). Raises :class:`RangeNotSatisfiable` (416) for a byte range outside the
    asset or one that does not parse (``bytes=abc``).

    Positions of any length are accepted, as RFC 9110 says: a first position beyond the end
    is unsatisfiable (416), a last position beyond it means "to the end", and a suffix longer
    than the asset means all of it. Units are case-insensitive (``BYTES=0-1`` is a range).
    """
    if header is None:
        return None
    unit = header.split("=", 1)[0].strip().lower()
    if unit != "bytes" or "," in header:
        return None
    match = _RANGE.fullmatch(header)
    first, last = (match.group(1), match.group(2)) if match else ("", "")
    if match and first:
        start = _position(first)
        end = min(_position(last) + 1, size) if last else size
        if start < size and (not last or _position(last) >= start):
            return start, end
    elif match and last and _position(last) > 0 and size > 0:
        return max(size - _position(last), 0), size
    raise RangeNotSatisfiable(
        f"range {_shown(header)} cannot be satisfied: the asset has {size} bytes", size=size
    )


def _shown(header: str) -> str:
    """The header for an error message, shortened when it is absurdly long."""
    text = header.strip()
    return repr(text) if len(text) <= 100 else f"{text[:60]!r}... ({len(text)} characters)"


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
