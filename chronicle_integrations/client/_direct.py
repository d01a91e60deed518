"""Direct uploads from the worker to the server's S3 bucket, on ``requests`` alone (no AWS SDK,
no AWS credentials: the server presigns every request). The protocol is in
:mod:`chronicle_integrations.store.direct`; here, the worker's half:

1. ``GET /v1/uploads/{id}/direct``: the part size (a server without direct uploads answers
   ``direct_unavailable``: the caller sends the bytes through the server instead);
2. one pass over the staged file: the whole SHA-256 and one SHA-256 per part;
3. ``POST /v1/uploads/{id}/direct`` with the digests: presigned URLs for the next missing
   parts (or ``completed``: the server has this content already);
4. each part ``PUT`` with ``Content-Length`` (never chunked: S3 refuses it) and its signed
   ``x-amz-checksum-sha256``, a few at a time; an expired URL (403) asks for fresh ones; a
   part refused as ``BadDigest`` is hashed again: changed -> the file was rewritten in place
   (``SourceChanged``: the caller captures it again), unchanged -> sent again; a cut, a
   5xx or a store that stopped answering is retried with backoff for the transport's
   patience (an outage of the store is waited out), then ``TransportError`` (spooled);
5. ``POST /v1/uploads/{id}/complete``: the server completes with every part's checksum and
   checks the size before publishing.

If the worker cannot reach the signed endpoint at all (another network, a wrong public
endpoint: no connection opens in :data:`PART_ATTEMPTS` attempts and the store never answered
this transport), it falls back to the proxied path, logged once per transport.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import requests

from .._errors import InvalidRequest, NotFound, SourceChanged, TransportError, UploadError
from .._models import AssetInfo
from ._sessions import ThreadSessions
from ._transport import READ_BLOCK

log = logging.getLogger(__name__)

#: Below this size a file goes through the server (one request; no hashing pass).
DIRECT_MIN_BYTES = 8 * 2**20
#: Bytes read and hashed at a time by :func:`hash_parts`.
HASH_BLOCK = 4 * 2**20
#: Parts sent at once (each its own connection to the store).
PARALLEL_PARTS = 4
#: Attempts per part for transient failures (connection cut, 5xx) and refused digests, at
#: least (retries go on for the transport's patience); also how many connections that never
#: open make the store "unreachable" (fallback), unless it answered this transport before.
PART_ATTEMPTS = 10


class _Unreachable(Exception):
    """The signed endpoint could not be reached at all: fall back to the proxied path."""


class _Expired(Exception):
    """A presigned URL expired (403): ask the server for fresh ones."""


class _Slice:
    """``length`` bytes of a file from ``offset``, as a ``requests`` body with a known length
    (so it is sent with ``Content-Length``, streamed, never whole in memory)."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._fh.seek(offset)
        self._left = length
        self.len = length

    def __len__(self) -> int:
        return self.len

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if n is None or n < 0 else min(n, self._left)
        data = self._fh.read(min(want, READ_BLOCK))
        if not data:
            raise SourceChanged("the file shrank while uploading")
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._fh.close()


def hash_parts(path: str, size: int, part_size: int) -> tuple[str, list[str]]:
    """One read of the file: the whole file's SHA-256 and each part's (hex).

    The two digests of each block are computed at once, the whole file's on a helper thread
    while this one hashes the part (hashlib releases the GIL): on two cores the pass takes
    about as long as one SHA-256 of the file instead of two."""
    whole = hashlib.sha256()
    parts: list[str] = []
    with (
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chronicle-sha") as pool,
        open(path, "rb", buffering=0) as fh,
    ):
        pending: concurrent.futures.Future[None] | None = None
        done = 0
        while done < size or not parts:
            part = hashlib.sha256()
            length = min(part_size, size - done)
            got = 0
            while got < length:
                block = fh.read(min(HASH_BLOCK, length - got))
                if not block:
                    raise SourceChanged("the file shrank while hashing")
                if pending is not None:
                    pending.result()
                pending = pool.submit(whole.update, block)
                part.update(block)
                got += len(block)
            parts.append(part.hexdigest())
            done += length
            if length == 0:
                break
        if pending is not None:
            pending.result()
        if fh.read(1):
            raise SourceChanged("the file grew while hashing")
    return whole.hexdigest(), parts


def _part_digest(path: str, offset: int, length: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left > 0:
            block = fh.read(min(READ_BLOCK, left))
            if not block:
                break
            hasher.update(block)
            left -= len(block)
    return hasher.hexdigest()


class DirectUploader:
    """The direct path of one ``HttpTransport`` (``json_call(method, path, **kw)`` makes its
    API calls); :meth:`upload` returns None when the caller must use the proxied path."""

    def __init__(
        self,
        json_call: Callable[..., Any],
        read_timeout: float,
        delay: Callable[[int], float],
        patience: float,
    ) -> None:
        self._call = json_call
        self._read_timeout = read_timeout
        self._delay = delay
        self._patience = patience
        # No API key: a presigned URL carries its own signature.
        self._sessions = ThreadSessions(requests.Session)
        #: False once the server said it takes no direct uploads, or the store was unreachable.
        self.enabled = True
        #: True once the object store answered (or accepted a connection from) this transport:
        #: from then on, connections that do not open are an outage to wait out, not a
        #: reason to fall back to the proxied path.
        self.reached = False

    def _session(self) -> requests.Session:
        return self._sessions.get()

    def close(self) -> None:
        self._sessions.close()

    def upload(
        self,
        upload_id: str,
        name: str,
        path: str,
        size: int,
        verify: Callable[[], None] | None,
    ) -> AssetInfo | None:
        """Upload ``path`` directly; None: not possible here (use the proxied path)."""
        if not self.enabled or size < DIRECT_MIN_BYTES:
            return None
        try:
            plan = self._call("GET", f"/v1/uploads/{upload_id}/direct")
        except InvalidRequest as exc:
            if exc.details.get("reason") != "direct_unavailable":
                raise
            self.enabled = False
            return None
        except NotFound as exc:
            if "upload_id" in exc.details:
                raise
            self.enabled = False  # a server that predates direct uploads
            return None
        part_size = int(plan["part_size"])
        sha256, digests = hash_parts(path, size, part_size)
        body = {"sha256": sha256, "parts": digests}
        try:
            answer = self._send_parts(upload_id, path, part_size, body)
        except _Unreachable as exc:
            self.enabled = False
            log.warning(
                "cannot reach the object store at the URLs the server signs (%s); "
                "uploading through the server instead from now on",
                exc,
            )
            return None
        if verify is not None:
            verify()
        if answer is None:
            answer = self._call(
                "POST", f"/v1/uploads/{upload_id}/complete", json={"sha256": sha256}
            )
        else:
            answer = answer["asset"]
        return AssetInfo.from_dict(answer)

    def _send_parts(
        self, upload_id: str, path: str, part_size: int, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Send every part the store lacks, :data:`PARALLEL_PARTS` at a time, with no pause
        between batches: whenever a part is done the server is asked again, and its answer
        (presigned URLs for the parts still missing, in order) tops up the queue with those
        not already on their way. An expired URL comes back fresh with the next answer.
        Returns the server's answer when it says the upload is complete (the content was
        there already), None once every part is stored; the first failure of a part stops
        the rest (parts not started are dropped) and is raised."""
        parts: dict[int, concurrent.futures.Future[None]] = {}
        with concurrent.futures.ThreadPoolExecutor(
            PARALLEL_PARTS, thread_name_prefix="chronicle-part"
        ) as pool:
            try:
                while True:
                    answer = self._call("POST", f"/v1/uploads/{upload_id}/direct", json=body)
                    if answer.get("completed"):
                        return dict(answer)
                    for entry in answer.get("urls") or []:
                        number = int(entry["part"])
                        if number not in parts:
                            parts[number] = pool.submit(
                                self._send_part, path, part_size, entry, body["parts"]
                            )
                    if not parts:
                        return None
                    concurrent.futures.wait(
                        parts.values(), return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    for number in [n for n, f in parts.items() if f.done()]:
                        error = parts.pop(number).exception()
                        if error is not None and not isinstance(error, _Expired):
                            raise error
            finally:
                for future in parts.values():
                    future.cancel()

    def _send_part(
        self, path: str, part_size: int, entry: dict[str, Any], digests: list[str]
    ) -> None:
        number, length = int(entry["part"]), int(entry["size"])
        offset = (number - 1) * part_size
        last: BaseException | None = None
        deadline = time.monotonic() + self._patience
        attempt = 0
        while True:
            if attempt:
                time.sleep(self._delay(attempt - 1))
            attempt += 1
            failure = self._put_part(path, offset, length, number, entry, digests)
            if failure is None:
                return
            last = failure
            if not self.reached and attempt >= PART_ATTEMPTS:
                raise _Unreachable(f"{type(last).__name__}: {last}")
            if attempt >= PART_ATTEMPTS and time.monotonic() >= deadline:
                raise TransportError(
                    f"part {number} failed {attempt} times over {self._patience:.0f}s: "
                    f"{type(last).__name__}: {last}"
                ) from last

    def _put_part(
        self,
        path: str,
        offset: int,
        length: int,
        number: int,
        entry: dict[str, Any],
        digests: list[str],
    ) -> BaseException | None:
        """One ``PUT`` of a part: None when stored, the transient failure to retry otherwise;
        raises what ends the attempt (an expired URL, a changed file, a refusal)."""
        body = _Slice(path, offset, length)
        try:
            response = self._session().put(
                entry["url"],
                data=body,
                headers=dict(entry.get("headers") or {}),
                timeout=(10.0, self._read_timeout),
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            # Reached but cut (mid-body, a reset, a read timeout) shows the store is there;
            # only a connection that could never be opened may mean "unreachable".
            if not _never_connected(exc):
                self.reached = True
            return exc
        finally:
            body.close()
        self.reached = True
        text = response.text[:500]
        if response.status_code == 200:
            return None
        if response.status_code == 403 and "expired" in text.lower():
            raise _Expired(text)
        if response.status_code == 400 and "BadDigest" in text:
            if _part_digest(path, offset, length) != digests[number - 1]:
                raise SourceChanged(f"part {number} changed since it was hashed")
            # the bytes were damaged on the way: send them again
            return UploadError(f"part {number} was refused as BadDigest: {text}")
        if response.status_code >= 500 or response.status_code == 429:
            return UploadError(f"part {number}: {response.status_code} {text}")
        raise UploadError(f"the object store refused part {number}: {response.status_code} {text}")


def _never_connected(exc: BaseException) -> bool:
    """True for a failure to open the connection at all (refused, no route, DNS, connect
    timeout), as opposed to one that was cut or timed out once open."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    text = repr(exc)
    return any(
        s in text for s in ("NewConnectionError", "NameResolutionError", "Connection refused")
    )


__all__ = ["DIRECT_MIN_BYTES", "DirectUploader", "hash_parts"]
