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

The retry policy and the per-call deadlines are in ``_deadline``; reading and decoding the
answers in ``_answers``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote

import requests
import requests.adapters

from .._errors import (
    INCOMPLETE,
    APIError,
    InvalidRequest,
    OffsetMismatch,
    ProtocolError,
    RequestTimeout,
    ServerError,
    SourceChanged,
    StorageFull,
    TransportError,
    Unavailable,
    chronicle_error,
)
from .._models import (
    AssetInfo,
    BestRun,
    Event,
    ExperimentInfo,
    Page,
    RunInfo,
    UploadStatus,
    _Record,
)
from .._version import __version__
from ._answers import (
    _answer,
    _json_or_none,
    _looks_cut,
    _read_capped,
    _reading,
    _snippet,
)
from ._deadline import _CUTOFFS, QUICK, RetryPolicy, _Adapter, _retry_after
from ._direct import DirectUploader
from ._sessions import ThreadSessions
from ._transport import READ_BLOCK, Outcomes, TransferProgress

log = logging.getLogger(__name__)

_R = TypeVar("_R", bound=_Record)

#: Bytes sent per upload request: big enough to amortise a request, small enough that a
#: dropped connection costs little and proxies with body limits can be configured for it.
CHUNK_BYTES = 64 * 1024 * 1024
#: How often one upload sends bytes again that the server acknowledged and then lost.
MAX_RESENDS = 3
#: Seconds a transfer keeps retrying without progress (at least the call budget) before it
#: gives up with a TransportError (an upload's staged copy is spooled for ``chronicle sync``).
TRANSFER_PATIENCE = 300.0


class HttpTransport:
    """Talks to a Chronicle server. Thread-safe: one session per thread."""

    def __init__(
        self, url: str, api_key: str | None = None, policy: RetryPolicy | None = None
    ) -> None:
        self.base = url.rstrip("/")
        self.target = self.base
        self.policy = policy or RetryPolicy()
        #: True once the server sent any answer (see ``RetryPolicy.first_contact``).
        self.answered = False
        self._headers = {"User-Agent": f"chronicle-integrations/{__version__}"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._sessions = ThreadSessions(self._new_session)
        #: Seconds a transfer retries without progress (chunks, direct parts, downloads).
        self.transfer_patience = max(self.policy.budget, TRANSFER_PATIENCE)
        #: Direct uploads to the server's S3 bucket, when it offers them (see ``_direct``).
        self.direct = DirectUploader(
            self._json, self.policy.read_timeout, self.policy.delay, self.transfer_patience
        )

    # ------------------------------------------------------------------ plumbing
    def _new_session(self) -> requests.Session:
        session = requests.Session()
        session.mount("http://", _Adapter())
        session.mount("https://", _Adapter())
        session.headers.update(self._headers)
        return session

    def _session(self) -> requests.Session:
        return self._sessions.get()

    def close(self) -> None:
        self._sessions.close()
        self.direct.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        policy: RetryPolicy | None = None,
        decode: bool = False,
        stream: bool = False,
        **kwargs: Any,
    ) -> requests.Response:
        """One API call with retries; returns a 2xx response or raises a typed error.

        The budget bounds the whole call, answers included: each attempt's connection is shut
        down when the time left runs out, however slowly the answer trickles in (``requests``
        applies its read timeout to each socket read, not to the answer). The body is read
        here (unless ``stream``), at most :data:`MAX_ANSWER_BYTES` of it.

        Only an answer with a Chronicle error code (``{"error": {"code": ...}}``) is a final
        refusal. Redirects are not followed (a redirected ``succeed`` would become a ``GET``
        whose 200 looks like an acknowledgement): a 3xx is a :class:`ProtocolError`. A 4xx
        without a Chronicle code (a proxy's page), 408, 429 and 5xx are retried; when they
        outlast the budget the call raises :class:`TransportError`, so a terminal transition
        is spooled, as when the server is down.

        With ``decode``, the JSON body is read inside the retry loop (``response.decoded``):
        a connection cut after the status line can look like a 2xx with an empty body, and
        that is a transport failure to retry, not an answer.
        """
        policy = policy or self.policy
        budget = policy.budget
        if not self.answered and policy.cap_to_budget and policy.first_contact is not None:
            budget = min(budget, policy.first_contact)
        deadline = time.monotonic() + budget
        attempt = 0
        url = self.base + path
        previous: Exception | None = None
        while True:
            retry_after = None
            connect, read = policy.connect_timeout, policy.read_timeout
            cutoff = None
            if policy.cap_to_budget:
                left = max(0.5, deadline - time.monotonic())
                connect, read = min(connect, left), min(read, left)
                cutoff = time.monotonic() + left
            try:
                with _CUTOFFS.bounded(cutoff):
                    response = self._session().request(
                        method,
                        url,
                        json=json,
                        params=params,
                        timeout=(connect, read),
                        allow_redirects=False,
                        stream=True,
                        **kwargs,
                    )
                    if not stream:
                        _read_capped(response, method, url)
            except requests.RequestException as exc:
                failure: str = f"{type(exc).__name__}: {exc}"
                if cutoff is not None and time.monotonic() >= cutoff:
                    failure = f"no complete answer within {budget:.0f}s ({failure})"
                error: Exception = exc
            else:
                self.answered = True
                status = response.status_code
                if 200 <= status < 300:
                    if not decode:
                        return response
                    try:
                        response.decoded = response.json()  # type: ignore[attr-defined]
                        return response
                    except (ValueError, requests.RequestException) as exc:
                        failure = f"HTTP {status} with an unreadable body: {exc}"
                        error = exc
                elif status < 400:
                    response.close()
                    where = response.headers.get("Location")
                    raise ProtocolError(
                        f"{method} {url} answered HTTP {status}"
                        + (f" (to {where})" if where else "")
                        + ": API calls are not redirected; point the client at the server's "
                        "own address"
                    )
                else:
                    body = _json_or_none(response)
                    api_error = chronicle_error(status, body)
                    if api_error is None:
                        if body is None and _looks_cut(response):
                            # an error answer cut in transit: its code is unknown
                            failure = f"HTTP {status} with a truncated body"
                            error = TransportError(failure)
                        else:  # a proxy's or a foreign server's page: not the store's verdict
                            failure = (
                                f"HTTP {status} without a Chronicle error code "
                                f"({_snippet(response)}): a proxy, or not a Chronicle server?"
                            )
                            error = ProtocolError(failure)
                            if not isinstance(previous, ProtocolError):
                                log.info("%s %s: %s; retrying", method, path, failure)
                    elif status in (408, 429) or status >= 500:
                        failure = f"HTTP {status}: {api_error}"
                        error = api_error
                    else:
                        raise api_error
                    retry_after = _retry_after(response)
            previous = error
            wait = policy.delay(attempt, retry_after)
            if time.monotonic() + wait > deadline:
                if (
                    isinstance(error, APIError)
                    and error.status >= 500
                    and not isinstance(error, (ServerError, Unavailable))
                ):
                    raise error  # a definite verdict (storage_full), not an outage
                message = (
                    f"{method} {url} failed after {attempt + 1} attempt(s) over "
                    f"{budget:.0f}s: {failure}"
                    + ("" if self.answered else " (the server has never answered this client)")
                )
                if isinstance(error, ProtocolError):
                    raise ProtocolError(message) from error
                raise TransportError(message) from error
            log.debug("%s %s: %s; retrying in %.2fs", method, path, failure, wait)
            time.sleep(wait)
            attempt += 1

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, decode=True, **kwargs).decoded  # type: ignore[attr-defined]

    @staticmethod
    def _run_path(e: str, v: int, r: int) -> str:
        return f"/v1/runs/{quote(e, safe='')}/{int(v)}/{int(r)}"

    @_answer
    def record_event(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        kind: str,
        cause: str,
        detail: dict[str, Any] | None,
    ) -> Event:
        body = {"lease": lease, "kind": kind, "cause": cause, "detail": detail}
        return Event.from_dict(self._json("POST", self._run_path(e, v, r) + "/events", json=body))

    # ------------------------------------------------------------------ experiments
    @_answer
    def create_experiment(
        self,
        name: str,
        variations: list[dict[str, Any]],
        experiment_id: str | None,
        objective: dict[str, Any] | None = None,
    ) -> ExperimentInfo:
        body: dict[str, Any] = {
            "name": name,
            "variations": variations,
            "experiment_id": experiment_id,
        }
        if objective is not None:  # (a server that predates objectives ignores the field)
            body["objective"] = objective
        return ExperimentInfo.from_dict(self._json("POST", "/v1/experiments", json=body))

    @_answer
    def set_objective(self, experiment_id: str, objective: dict[str, Any] | None) -> ExperimentInfo:
        body = objective or {"metric": None}
        path = f"/v1/experiments/{quote(experiment_id, safe='')}/objective"
        return ExperimentInfo.from_dict(self._json("PUT", path, json=body))

    @_answer
    def best(
        self, experiment_id: str, metric: str | None, mode: str | None, include_running: bool
    ) -> BestRun:
        params: dict[str, Any] = {"include_running": "true" if include_running else "false"}
        if metric is not None:
            params["metric"] = metric
        if mode is not None:
            params["mode"] = mode
        path = f"/v1/experiments/{quote(experiment_id, safe='')}/best"
        return BestRun.from_dict(self._json("GET", path, params=params))

    def list_experiments(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[ExperimentInfo]:
        return self._page("/v1/experiments", "experiments", ExperimentInfo, limit, cursor)

    @_answer
    def get_experiment(self, experiment_id: str) -> ExperimentInfo:
        return ExperimentInfo.from_dict(
            self._json("GET", f"/v1/experiments/{quote(experiment_id, safe='')}")
        )

    @_answer
    def add_variation(self, experiment_id: str, config: dict[str, Any], request_id: str) -> int:
        data = self._json(
            "POST",
            f"/v1/experiments/{quote(experiment_id, safe='')}/variations",
            json={"config": config, "request_id": request_id},
        )
        return int(data["variation"])

    @_answer
    def get_variation_config(self, experiment_id: str, variation: int) -> dict[str, Any]:
        data = self._json(
            "GET", f"/v1/experiments/{quote(experiment_id, safe='')}/variations/{int(variation)}"
        )
        config: dict[str, Any] = data["config"]
        return config

    # ------------------------------------------------------------------ runs
    @_answer
    def create_run(self, experiment_id: str, variation: int, request_id: str) -> RunInfo:
        path = f"/v1/experiments/{quote(experiment_id, safe='')}/variations/{int(variation)}/runs"
        return RunInfo.from_dict(self._json("POST", path, json={"request_id": request_id}))

    @_answer
    def get_run(self, e: str, v: int, r: int) -> RunInfo:
        return RunInfo.from_dict(self._json("GET", self._run_path(e, v, r)))

    def list_runs(
        self,
        experiment_id: str | None,
        state: str | None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        sort: str | None = None,
        mode: str | None = None,
    ) -> Page[RunInfo]:
        filters = {"experiment_id": experiment_id, "state": state, "sort": sort, "mode": mode}
        return self._page("/v1/runs", "runs", RunInfo, limit, cursor, filters)

    @_answer
    def start(
        self, e: str, v: int, r: int, *, resume: bool, lease: str, holder: str | None
    ) -> RunInfo:
        body = {"resume": resume, "lease": lease, "holder": holder}
        return RunInfo.from_dict(self._json("POST", self._run_path(e, v, r) + "/start", json=body))

    @_answer
    def heartbeat(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        *,
        quick: bool = False,
        progress: dict[str, Any] | None = None,
        outcomes: Outcomes = (None, None),
        budget: float | None = None,
    ) -> RunInfo:
        body: dict[str, Any] = {"lease": lease}
        if progress is not None:
            body["progress"] = progress
        _add_outcomes(body, outcomes)
        policy = QUICK if quick else self.policy
        if budget is not None:
            policy = dataclasses.replace(policy, budget=min(policy.budget, max(budget, 0.0)))
        return RunInfo.from_dict(
            self._json("POST", self._run_path(e, v, r) + "/heartbeat", json=body, policy=policy)
        )

    @_answer
    def succeed(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        progress: dict[str, Any] | None = None,
        outcomes: Outcomes = (None, None),
    ) -> RunInfo:
        body: dict[str, Any] = {"lease": lease}
        if progress is not None:
            body["progress"] = progress
        _add_outcomes(body, outcomes)
        path = self._run_path(e, v, r) + "/succeed"
        return RunInfo.from_dict(self._json("POST", path, json=body))

    @_answer
    def fail(
        self,
        e: str,
        v: int,
        r: int,
        reason: str,
        message: str | None,
        lease: str | None,
        progress: dict[str, Any] | None = None,
        outcomes: Outcomes = (None, None),
    ) -> RunInfo:
        body: dict[str, Any] = {"reason": reason, "message": message, "lease": lease}
        if progress is not None:
            body["progress"] = progress
        _add_outcomes(body, outcomes)
        return RunInfo.from_dict(self._json("POST", self._run_path(e, v, r) + "/fail", json=body))

    def events(
        self, e: str, v: int, r: int, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[Event]:
        return self._page(self._run_path(e, v, r) + "/events", "events", Event, limit, cursor)

    @_answer
    def _page(
        self,
        path: str,
        field: str,
        record: type[_R],
        limit: int | None,
        cursor: str | None,
        filters: dict[str, Any] | None = None,
    ) -> Page[_R]:
        """One page of a listing. A server that predates pages sends no ``next_cursor``:
        its answer is the whole listing, i.e. the last page."""
        params = {
            k: v
            for k, v in {**(filters or {}), "limit": limit, "cursor": cursor}.items()
            if v is not None
        }
        data = self._json("GET", path, params=params)
        return Page([record.from_dict(x) for x in data[field]], data.get("next_cursor"))

    # ------------------------------------------------------------------ assets
    def list_assets(
        self, e: str, v: int, r: int, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[AssetInfo]:
        return self._page(self._run_path(e, v, r) + "/assets", "assets", AssetInfo, limit, cursor)

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
        progress: TransferProgress | None = None,
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
        patience = self.transfer_patience
        begun = self._json(
            "POST",
            self._run_path(e, v, r) + "/uploads",
            json={"name": name, "size": size, "upload_id": upload_id, "lease": lease},
        )
        with _reading("begin upload"):
            status = UploadStatus.from_dict(begun)
        if not status.completed and status.offset == 0:
            direct = self.direct.upload(upload_id, name, path, size, verify)
            if direct is not None:
                if progress is not None:
                    progress(size)
                return direct
        hasher = hashlib.sha256()
        hashed = 0  # bytes [0, hashed) are in the hasher
        offset = status.offset
        deadline = time.monotonic() + patience
        attempt = 0
        resends = 0
        with open(path, "rb") as fh:
            while True:
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
                                budget=0.0,
                                read_timeout=self.policy.read_timeout,
                                cap_to_budget=False,
                            ),
                        )
                        with _reading("upload chunk"):
                            offset = int(response.decoded["offset"])  # type: ignore[attr-defined]
                        hashed = state["hashed"]
                        attempt = 0
                        deadline = time.monotonic() + patience
                    except OffsetMismatch as exc:
                        hashed = state["hashed"]
                        offset = int(exc.details.get("offset", self._offset(upload_id)))
                    except (TransportError, ServerError, StorageFull, RequestTimeout) as exc:
                        # (RequestTimeout: the server abandoned a chunk that stalled; it kept
                        # the bytes it received, so this resumes like a dropped connection.)
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
                fh.seek(size)
                if fh.read(1):
                    raise SourceChanged(name)  # it grew: not the file captured
                if progress is not None:
                    progress(size)
                if verify is not None:
                    verify()
                try:
                    data = self._json(
                        "POST",
                        f"/v1/uploads/{upload_id}/complete",
                        json={"sha256": hasher.hexdigest()},
                    )
                except InvalidRequest as exc:
                    held = exc.details.get("offset")
                    if (
                        exc.details.get("reason") != INCOMPLETE
                        or not isinstance(held, int)
                        or not 0 <= held < size
                        or resends >= MAX_RESENDS
                    ):
                        raise
                    # Acknowledged bytes the server no longer holds: a replica that had the
                    # unfinished tail of a proxied S3 part died. The staged file is still
                    # here: send that tail again.
                    resends += 1
                    log.warning(
                        "upload of %r: the server holds %d of %d bytes (the replica that had "
                        "the rest went away); sending them again",
                        name,
                        held,
                        size,
                    )
                    offset = held
                    continue
                with _reading("complete upload"):
                    return AssetInfo.from_dict(data)

    def abort_upload(self, upload_id: str) -> None:
        """Drop an unfinished upload's bytes on the server (best effort)."""
        try:
            self._request("DELETE", f"/v1/uploads/{upload_id}", policy=QUICK)
        except (APIError, TransportError) as exc:
            log.debug("could not discard upload %s: %s", upload_id, exc)

    @_answer
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
        progress: TransferProgress | None = None,
    ) -> AssetInfo:
        """Stream an asset into ``dest``, resuming with HTTP Range after a dropped connection."""
        path = self._run_path(e, v, r) + "/assets/" + quote(name, safe="/")
        info = None
        attempt = 0
        deadline = time.monotonic() + self.transfer_patience
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
    progress: TransferProgress | None,
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


def _add_outcomes(body: dict[str, Any], outcomes: Outcomes) -> None:
    """Put a beat's or a transition's metrics and checkpoint records in its body."""
    if outcomes[0] is not None:
        body["metrics"] = outcomes[0]
    if outcomes[1] is not None:
        body["checkpoints"] = outcomes[1]
