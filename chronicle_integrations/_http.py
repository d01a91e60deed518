"""The HTTP transport: the server's ``/v1`` API over ``requests``.

Robustness rules (SPEC section 4):

* every request has a (connect, read) timeout: ``requests`` has none by default;
* connection errors, timeouts, 429 and 5xx are retried with exponential backoff and full
  jitter, honouring ``Retry-After``, within a time budget; then :class:`TransportError`;
* every mutating call is idempotent (client-chosen lease tokens, request ids and upload ids),
  so retrying after a lost response never creates a ghost run or a second transition;
* one ``requests.Session`` per thread (sessions are not thread-safe), closed with the transport;
* uploads go in chunks at offsets the server acknowledges; after a dropped connection the
  client asks the server how much it holds and resumes from there instead of restarting.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote

import requests

from ._errors import (
    APIError,
    OffsetMismatch,
    ServerError,
    SourceChanged,
    StorageFull,
    TransportError,
    error_from_body,
)
from ._models import AssetInfo, Event, ExperimentInfo, RunInfo, UploadStatus
from ._transport import READ_BLOCK, Progress
from ._version import __version__

log = logging.getLogger(__name__)

#: Bytes sent per upload request: big enough to amortise a request, small enough that a
#: dropped connection costs little and proxies with body limits can be configured for it.
CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. ``budget`` bounds the total time spent on one call, retries included."""

    budget: float = 60.0
    base: float = 0.25
    cap: float = 8.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    #: Bound each attempt's timeouts by the time left in the budget, so that ``budget`` really
    #: bounds the call even against a server that accepts connections and never answers.
    #: Off for upload chunks, whose bodies legitimately take long to send.
    cap_to_budget: bool = True

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter exponential backoff; a server's ``Retry-After`` takes precedence."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.cap * 4)
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


#: Heartbeats are retried by the keep-alive loop itself: one quick try per beat.
QUICK = RetryPolicy(budget=10.0, read_timeout=10.0)


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return parsed.timestamp() - time.time() if parsed else None


class HttpTransport:
    """Talks to a Chronicle server. Thread-safe: one session per thread."""

    def __init__(
        self, url: str, api_key: str | None = None, policy: RetryPolicy | None = None
    ) -> None:
        self.base = url.rstrip("/")
        self.target = self.base
        self.policy = policy or RetryPolicy()
        self._headers = {"User-Agent": f"chronicle-integrations/{__version__}"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._headers)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        policy: RetryPolicy | None = None,
        decode: bool = False,
        **kwargs: Any,
    ) -> requests.Response:
        """One API call with retries; returns a 2xx response or raises a typed error.

        With ``decode``, the JSON body is read inside the retry loop (``response.decoded``):
        a connection cut after the status line can look like a 2xx with an empty body, and
        that is a transport failure to retry, not an answer.
        """
        policy = policy or self.policy
        deadline = time.monotonic() + policy.budget
        attempt = 0
        url = self.base + path
        while True:
            retry_after = None
            connect, read = policy.connect_timeout, policy.read_timeout
            if policy.cap_to_budget:
                left = max(0.5, deadline - time.monotonic())
                connect, read = min(connect, left), min(read, left)
            try:
                response = self._session().request(
                    method, url, json=json, params=params, timeout=(connect, read), **kwargs
                )
            except requests.RequestException as exc:
                failure: str = f"{type(exc).__name__}: {exc}"
                error: Exception = exc
            else:
                if response.status_code < 400:
                    if not decode:
                        return response
                    try:
                        response.decoded = response.json()  # type: ignore[attr-defined]
                        return response
                    except (ValueError, requests.RequestException) as exc:
                        failure = f"HTTP {response.status_code} with an unreadable body: {exc}"
                        error = exc
                else:
                    body = _json_or_none(response)
                    api_error = error_from_body(response.status_code, body)
                    truncated = body is None and _looks_cut(response)
                    if truncated:  # an error answer cut in transit: its code is unknown
                        failure = f"HTTP {response.status_code} with a truncated body"
                        error = TransportError(failure)
                    elif response.status_code != 429 and response.status_code < 500:
                        raise api_error
                    else:
                        failure = f"HTTP {response.status_code}: {api_error}"
                        error = api_error
                    retry_after = _retry_after(response)
            wait = policy.delay(attempt, retry_after)
            if time.monotonic() + wait > deadline:
                if isinstance(error, APIError):  # a 5xx/429 that outlasted the budget
                    raise error
                raise TransportError(
                    f"{method} {url} failed after {attempt + 1} attempt(s) over "
                    f"{policy.budget:.0f}s: {failure}"
                ) from error
            log.debug("%s %s: %s; retrying in %.2fs", method, path, failure, wait)
            time.sleep(wait)
            attempt += 1

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, decode=True, **kwargs).decoded  # type: ignore[attr-defined]

    @staticmethod
    def _run_path(e: str, v: int, r: int) -> str:
        return f"/v1/runs/{quote(e, safe='')}/{int(v)}/{int(r)}"

    # ------------------------------------------------------------------ experiments
    def create_experiment(
        self, name: str, variations: list[dict[str, Any]], experiment_id: str | None
    ) -> ExperimentInfo:
        body = {"name": name, "variations": variations, "experiment_id": experiment_id}
        return ExperimentInfo.from_dict(self._json("POST", "/v1/experiments", json=body))

    def list_experiments(self) -> list[ExperimentInfo]:
        data = self._json("GET", "/v1/experiments")
        return [ExperimentInfo.from_dict(x) for x in data["experiments"]]

    def get_experiment(self, experiment_id: str) -> ExperimentInfo:
        return ExperimentInfo.from_dict(
            self._json("GET", f"/v1/experiments/{quote(experiment_id, safe='')}")
        )

    def add_variation(self, experiment_id: str, config: dict[str, Any], request_id: str) -> int:
        data = self._json(
            "POST",
            f"/v1/experiments/{quote(experiment_id, safe='')}/variations",
            json={"config": config, "request_id": request_id},
        )
        return int(data["variation"])

    def get_variation_config(self, experiment_id: str, variation: int) -> dict[str, Any]:
        data = self._json(
            "GET", f"/v1/experiments/{quote(experiment_id, safe='')}/variations/{int(variation)}"
        )
        config: dict[str, Any] = data["config"]
        return config

    # ------------------------------------------------------------------ runs
    def create_run(self, experiment_id: str, variation: int, request_id: str) -> RunInfo:
        path = f"/v1/experiments/{quote(experiment_id, safe='')}/variations/{int(variation)}/runs"
        return RunInfo.from_dict(self._json("POST", path, json={"request_id": request_id}))

    def get_run(self, e: str, v: int, r: int) -> RunInfo:
        return RunInfo.from_dict(self._json("GET", self._run_path(e, v, r)))

    def list_runs(self, experiment_id: str | None, state: str | None) -> list[RunInfo]:
        params = {k: v for k, v in (("experiment_id", experiment_id), ("state", state)) if v}
        data = self._json("GET", "/v1/runs", params=params)
        return [RunInfo.from_dict(x) for x in data["runs"]]

    def start(
        self, e: str, v: int, r: int, *, resume: bool, lease: str, holder: str | None
    ) -> RunInfo:
        body = {"resume": resume, "lease": lease, "holder": holder}
        return RunInfo.from_dict(self._json("POST", self._run_path(e, v, r) + "/start", json=body))

    def heartbeat(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        *,
        quick: bool = False,
        progress: dict[str, Any] | None = None,
    ) -> RunInfo:
        body: dict[str, Any] = {"lease": lease}
        if progress is not None:
            body["progress"] = progress
        return RunInfo.from_dict(
            self._json(
                "POST",
                self._run_path(e, v, r) + "/heartbeat",
                json=body,
                policy=QUICK if quick else None,
            )
        )

    def succeed(
        self, e: str, v: int, r: int, lease: str | None, progress: dict[str, Any] | None = None
    ) -> RunInfo:
        body: dict[str, Any] = {"lease": lease}
        if progress is not None:
            body["progress"] = progress
        path = self._run_path(e, v, r) + "/succeed"
        return RunInfo.from_dict(self._json("POST", path, json=body))

    def fail(
        self,
        e: str,
        v: int,
        r: int,
        reason: str,
        message: str | None,
        lease: str | None,
        progress: dict[str, Any] | None = None,
    ) -> RunInfo:
        body: dict[str, Any] = {"reason": reason, "message": message, "lease": lease}
        if progress is not None:
            body["progress"] = progress
        return RunInfo.from_dict(self._json("POST", self._run_path(e, v, r) + "/fail", json=body))

    def events(self, e: str, v: int, r: int) -> list[Event]:
        data = self._json("GET", self._run_path(e, v, r) + "/events")
        return [Event.from_dict(x) for x in data["events"]]

    # ------------------------------------------------------------------ assets
    def list_assets(self, e: str, v: int, r: int) -> list[AssetInfo]:
        data = self._json("GET", self._run_path(e, v, r) + "/assets")
        return [AssetInfo.from_dict(x) for x in data["assets"]]

    def upload_file(
        self,
        e: str,
        v: int,
        r: int,
        name: str,
        path: str,
        *,
        lease: str | None,
        upload_id: str,
        progress: Progress | None = None,
        verify: Callable[[], None] | None = None,
        size: int | None = None,
    ) -> AssetInfo:
        """Upload a file in acknowledged chunks, resuming after failures, SHA-256 verified.

        The digest is computed in the same pass that reads the file for sending: each byte is
        hashed once, the first time it is read, even when a resume re-sends it. The deadline
        for giving up moves forward whenever a chunk is acknowledged: a slow but healthy
        transfer is never abandoned, a stuck one is.
        """
        size = os.path.getsize(path) if size is None else size
        patience = max(self.policy.budget, 300.0)
        status = UploadStatus.from_dict(
            self._json(
                "POST",
                self._run_path(e, v, r) + "/uploads",
                json={"name": name, "size": size, "upload_id": upload_id, "lease": lease},
            )
        )
        hasher = hashlib.sha256()
        hashed = 0  # bytes [0, hashed) are in the hasher
        offset = status.offset
        deadline = time.monotonic() + patience
        attempt = 0
        with open(path, "rb") as fh:
            while not status.completed and offset < size:
                if hashed < offset:  # resuming past bytes we never read: hash them first
                    fh.seek(hashed)
                    hashed += _hash_range(fh, hasher, offset - hashed)
                length = min(CHUNK_BYTES, size - offset)
                fh.seek(offset)
                state = {"hashed": hashed}
                body = _chunk_body(fh, offset, length, hasher, state, progress)
                try:
                    response = self._request(
                        "PUT",
                        f"/v1/uploads/{upload_id}",
                        params={"offset": offset},
                        decode=True,
                        data=body,
                        headers={"Content-Type": "application/octet-stream"},
                        policy=RetryPolicy(
                            budget=0.0, read_timeout=self.policy.read_timeout, cap_to_budget=False
                        ),
                    )
                    offset = int(response.decoded["offset"])  # type: ignore[attr-defined]
                    hashed = state["hashed"]
                    attempt = 0
                    deadline = time.monotonic() + patience
                except OffsetMismatch as exc:
                    hashed = state["hashed"]
                    offset = int(exc.details.get("offset", self._offset(upload_id)))
                except (TransportError, ServerError, StorageFull) as exc:
                    hashed = state["hashed"]
                    if time.monotonic() > deadline:
                        raise TransportError(f"upload of {name!r} gave up: {exc}") from exc
                    wait = self.policy.delay(attempt)
                    log.info(
                        "upload of %r interrupted at byte %d (%s); resuming in %.1fs",
                        name,
                        offset,
                        exc,
                        wait,
                    )
                    time.sleep(wait)
                    attempt += 1
                    offset = self._offset(upload_id)
            if hashed < size:
                fh.seek(hashed)
                if _hash_range(fh, hasher, size - hashed) < size - hashed:
                    raise SourceChanged(name)
            if fh.read(1):
                raise SourceChanged(name)  # it grew: not the file captured
        if progress is not None:
            progress(size)
        if verify is not None:
            verify()
        data = self._json(
            "POST", f"/v1/uploads/{upload_id}/complete", json={"sha256": hasher.hexdigest()}
        )
        return AssetInfo.from_dict(data)

    def abort_upload(self, upload_id: str) -> None:
        """Drop an unfinished upload's bytes on the server (best effort)."""
        try:
            self._request("DELETE", f"/v1/uploads/{upload_id}", policy=QUICK)
        except (APIError, TransportError) as exc:
            log.debug("could not discard upload %s: %s", upload_id, exc)

    def _offset(self, upload_id: str) -> int:
        data = self._json("GET", f"/v1/uploads/{upload_id}")
        return int(data["offset"])

    def download_asset(
        self,
        e: str,
        v: int,
        r: int,
        name: str,
        dest: BinaryIO,
        *,
        offset: int = 0,
        progress: Progress | None = None,
    ) -> AssetInfo:
        """Stream an asset into ``dest``, resuming with HTTP Range after a dropped connection."""
        path = self._run_path(e, v, r) + "/assets/" + quote(name, safe="/")
        info = None
        attempt = 0
        deadline = time.monotonic() + max(self.policy.budget, 300.0)
        while True:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                with self._request("GET", path, stream=True, headers=headers) as response:
                    if info is None:
                        length = int(response.headers.get("Content-Length") or 0)
                        if response.status_code == 206:
                            length += offset
                        info = AssetInfo(
                            name=name,
                            size=length,
                            sha256=response.headers.get("X-Chronicle-SHA256", ""),
                            created_at=0.0,
                        )
                    if offset and response.status_code != 206:
                        dest.seek(0)
                        dest.truncate()
                        offset = 0
                    for block in response.iter_content(READ_BLOCK):
                        dest.write(block)
                        offset += len(block)
                        if progress is not None:
                            progress(offset)
                return info
            except (requests.RequestException, TransportError) as exc:
                if time.monotonic() > deadline:
                    raise TransportError(f"download of {name!r} gave up: {exc}") from exc
                time.sleep(self.policy.delay(attempt))
                attempt += 1


def _looks_cut(response: requests.Response) -> bool:
    """True when an unreadable body is a JSON answer that did not arrive whole (the
    connection was cut), rather than a foreign one (a proxy's HTML error page)."""
    kind = response.headers.get("Content-Type", "")
    try:
        empty = not response.content
    except (requests.RequestException, RuntimeError):
        return True  # reading it failed: cut
    return empty or kind.startswith("application/json")


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except (ValueError, requests.RequestException, RuntimeError):
        return None


def _hash_range(fh: BinaryIO, hasher: Any, length: int) -> int:
    done = 0
    while done < length:
        block = fh.read(min(READ_BLOCK, length - done))
        if not block:
            break
        hasher.update(block)
        done += len(block)
    return done


def _chunk_body(
    fh: BinaryIO,
    offset: int,
    length: int,
    hasher: Any,
    state: dict[str, int],
    progress: Progress | None,
) -> Iterator[bytes]:
    """Yield one chunk's blocks; hash bytes beyond ``state["hashed"]`` exactly once."""
    position, end = offset, offset + length
    while position < end:
        block = fh.read(min(READ_BLOCK, end - position))
        if not block:  # the file shrank: it was rewritten in place since the capture
            raise SourceChanged(f"the file shrank while uploading (at byte {position})")
        if position + len(block) > state["hashed"]:
            skip = max(0, state["hashed"] - position)
            hasher.update(memoryview(block)[skip:])
            state["hashed"] = position + len(block)
        position += len(block)
        if progress is not None:
            progress(position)
        yield block
