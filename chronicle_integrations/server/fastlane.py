"""The heartbeat fast lane: ``POST /v1/runs/{e}/{v}/{r}/heartbeat`` without FastAPI's routing.

Heartbeats are nearly all of a busy server's requests (one per run per interval), so their
per-request CPU sets the server's capacity. Through FastAPI a heartbeat costs about 1 ms of
CPU (routing over every route, dependency resolution, body re-validation, response
machinery); the store's part is about 0.15 ms. The lane serves the *happy path* directly
from :class:`~chronicle_integrations.server.middleware.Guard`, after the guard has checked the
API key and read and checked the body:

* the same validation (the path numbers as the route's, the body through the route's own
  :class:`~chronicle_integrations.server.schemas.HeartbeatRequest` model), the same store
  call on the same thread pool, the same JSON response and the same error bodies for store
  errors (409 ``invalid_transition`` / ``lease_conflict``, 404 ...);
* anything the lane is not sure about (a body that does not validate, a number out of range,
  an unusual ``Content-Type``) is handed to the FastAPI route unchanged, so every error a
  client can provoke with a malformed request is still produced in one place.

The FastAPI route stays registered: it documents the endpoint in ``/openapi.json`` and serves
whatever the lane declines. ``tests/server`` runs every heartbeat case through both.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from .. import _validation as check
from .._errors import APIError
from ..store import Store
from . import schemas

__all__ = ["HeartbeatLane"]

log = logging.getLogger(__name__)

_HEARTBEAT_PATH = re.compile(r"/v1/runs/([^/]+)/([0-9]{1,20})/([0-9]{1,20})/heartbeat")


class HeartbeatLane:
    """Serves well-formed heartbeats; :meth:`handle` returns False for anything else."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def handle(self, scope: Scope, receive: Receive, send: Send,
                     headers: dict[bytes, bytes], body: bytes) -> bool:
        """Answer the request if it is a well-formed heartbeat; False to pass it on."""
        if scope["method"] != "POST":
            return False
        match = _HEARTBEAT_PATH.fullmatch(scope["path"])
        if match is None:
            return False
        request = _parse(headers, body)
        variation, run = int(match.group(2)), int(match.group(3))
        if request is None or variation > check.MAX_NUMBER or run > check.MAX_NUMBER:
            return False  # the FastAPI route produces the exact validation error
        try:
            info = await run_in_threadpool(self.store.heartbeat, match.group(1), variation,
                                           run, request.lease, request.progress)
        except APIError as exc:
            if exc.status >= 500:
                log.error("POST %s failed: %s", scope["path"], exc.message, exc_info=exc)
            response: JSONResponse = JSONResponse(exc.to_body(), status_code=exc.status)
        else:
            response = JSONResponse(info.to_dict())
        await response(scope, receive, send)
        return True


def _parse(headers: dict[bytes, bytes], body: bytes) -> schemas.HeartbeatRequest | None:
    """The request body as the route would validate it, or None when the route should judge
    it (the guard already refused bodies that are not a JSON object)."""
    if not body:
        return schemas.HeartbeatRequest()
    content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if content_type != b"application/json":
        return None
    try:
        value: Any = json.loads(body)
        return schemas.HeartbeatRequest.model_validate(value)
    except (ValueError, ValidationError):
        return None
