"""The heartbeat fast lane: ``POST /v1/runs/{e}/{v}/{r}/heartbeat`` without FastAPI's routing.

Heartbeats are nearly all of a busy server's requests (one per run per interval), so their
per-request CPU sets the server's capacity. Through FastAPI a heartbeat costs about 1 ms of
CPU (routing over every route, dependency resolution, body re-validation, response
machinery); the store's part is about 0.15 ms. The lane serves the *happy path* directly
from :class:`~chronicle_integrations.server.middleware.RequestGuard`, after the guard has
checked the API key and read and decoded the body (at most :data:`MAX_HEARTBEAT_BYTES`,
decoded once: the lane validates the guard's decoded value):

* the same validation (the path numbers as the route's, the body through the route's own
  :class:`~chronicle_integrations.server.wire.HeartbeatRequest` model), the same store
  call on the same thread pool, the same JSON response and the same error bodies for store
  errors (409 ``invalid_transition`` / ``lease_conflict``, 404 ...);
* anything the lane is not sure about (a body that does not validate, a number out of range,
  an unusual ``Content-Type``) is handed to the FastAPI route unchanged, so every error a
  client can provoke with a malformed request is still produced in one place.

Heartbeats that arrive together are *group-committed*: the lane hands them to one writer
thread, which applies everything waiting as one batch (:meth:`Store.heartbeat_many`: one
transaction for the live ones, each still answered with its own record or error) and wakes
the waiting requests. Under load a batch holds dozens of heartbeats, so the fixed cost of a
transaction and of a thread hand-off is paid once per batch; alone, a heartbeat waits for
nothing but its own statement.

The FastAPI route stays registered: it documents the endpoint in ``/openapi.json`` and serves
whatever the lane declines. ``tests/server`` runs every heartbeat case through both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections import deque
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from .. import _validation as check
from .._errors import APIError
from ..store import Store
from . import wire

__all__ = ["HEARTBEAT_PATH", "MAX_HEARTBEAT_BYTES", "HeartbeatLane"]

log = logging.getLogger(__name__)

HEARTBEAT_PATH = re.compile(r"/v1/runs/([^/]+)/([0-9]{1,20})/([0-9]{1,20})/heartbeat")
#: Largest heartbeat body (413 beyond, before it is decoded). A heartbeat is a lease and at
#: most 16 progress entries of 64-character names and values: under 13 KiB even with every
#: character escaped. Heartbeats are most of the traffic; a few clients sending megabytes of
#: ignored fields each must not cost the others their latency.
MAX_HEARTBEAT_BYTES = 16 * 1024
#: Most heartbeats applied in one transaction (bounds how long the write lock is held).
MAX_BATCH = 256

_Beat = tuple[str, int, int, str | None, dict[str, Any] | None]
_Waiter = tuple[_Beat, asyncio.Future[Any], asyncio.AbstractEventLoop]


class HeartbeatLane:
    """Serves well-formed heartbeats; :meth:`handle` returns False for anything else."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._waiting: deque[_Waiter] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def close(self, timeout: float = 10.0) -> None:
        """Stop the writer thread once the heartbeats already handed to it are applied
        (waiting at most ``timeout`` seconds)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    async def handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
        body: bytes,
        value: Any,
    ) -> bool:
        """Answer the request if it is a well-formed heartbeat; False to pass it on.

        ``value`` is the JSON object the guard decoded from ``body`` (None when blank)."""
        if scope["method"] != "POST":
            return False
        match = HEARTBEAT_PATH.fullmatch(scope["path"])
        if match is None:
            return False
        request = _parse(headers, body, value)
        variation, run = int(match.group(2)), int(match.group(3))
        if request is None or variation > check.MAX_NUMBER or run > check.MAX_NUMBER:
            return False  # the FastAPI route produces the exact validation error
        try:
            info = await self._apply(
                (match.group(1), variation, run, request.lease, request.progress)
            )
        except APIError as exc:
            if exc.status >= 500:
                log.error("POST %s failed: %s", scope["path"], exc.message, exc_info=exc)
            response: JSONResponse = JSONResponse(exc.to_body(), status_code=exc.status)
        else:
            response = JSONResponse(info.to_dict())
        await response(scope, receive, send)
        return True

    async def _apply(self, beat: _Beat) -> Any:
        """Queue one heartbeat for the writer thread and wait for its own result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._writer, daemon=True, name="chronicle-heartbeats"
                )
                self._thread.start()
            self._waiting.append((beat, future, loop))
            self._wake.notify()
        return await future

    def _writer(self) -> None:
        """Apply what is waiting as one batch, hand each request its result, repeat."""
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if not self._waiting:
                    return  # closed and drained
                batch = [self._waiting.popleft() for _ in range(min(MAX_BATCH, len(self._waiting)))]
            outcomes: list[Any]
            try:
                outcomes = list(self.store.heartbeat_many([beat for beat, _, _ in batch]))
            except Exception as exc:  # not an API error: each request becomes a logged 500
                outcomes = [exc] * len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
            for (_, future, loop), outcome in zip(batch, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, settled in by_loop.items():
                # One wake-up per batch; a closed loop means nobody is waiting any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in settled:
        if future.done():  # the client went away; its heartbeat was applied all the same
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _parse(headers: dict[bytes, bytes], body: bytes, value: Any) -> wire.HeartbeatRequest | None:
    """The decoded body as the route would validate it, or None when the route should judge
    it (the guard already refused bodies that are not a JSON object)."""
    if not body:
        return wire.HeartbeatRequest()
    if value is None:  # blank but not empty: the route's error
        return None
    content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if content_type != b"application/json":
        return None
    try:
        return wire.HeartbeatRequest.model_validate(value)
    except (ValueError, ValidationError):
        return None
