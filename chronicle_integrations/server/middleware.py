"""The guard in front of every route: API key, body limits, JSON sanity, last-resort 500.

It is plain ASGI middleware so that it runs before routing and before FastAPI reads a body:

* an unauthenticated client gets 401 before the server reads a single byte of its body;
* a JSON body is read here, bounded by ``max_json_bytes`` whether or not it declares a
  ``Content-Length`` (chunked bodies do not), checked (UTF-8, well-formed, an object, nesting
  depth), then replayed to FastAPI; so no bad body can reach a route and become a 5xx;
* well-formed heartbeats are answered by the fast lane (``fastlane.py``) without FastAPI's
  routing; everything else, and any heartbeat the lane declines, goes on to the routes;
* upload chunks (``PUT /v1/uploads/{id}``) are *not* read here: the route streams them to disk
  and counts their bytes itself; only a declared ``Content-Length`` is checked up front;
* an exception that escapes everything else becomes a logged 500 with the standard error body
  (instead of uvicorn's plain-text one plus a second traceback).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import APIError, InvalidRequest, PayloadTooLarge, ServerError, Unauthorized
from .fastlane import HeartbeatLane

__all__ = ["MAX_JSON_DEPTH", "Guard", "error_response"]

log = logging.getLogger(__name__)

#: Deepest nesting a JSON body may have (variation configs are the only nested values).
MAX_JSON_DEPTH = 64

#: Paths anyone may read, with or without the API key: liveness probes and the API's own
#: description (it documents the API; it holds no data).
PUBLIC_PATHS = frozenset(
    {"/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)

#: JSON bodies larger than this are checked on a worker thread, not on the event loop.
_INLINE_CHECK_BYTES = 64 * 1024
_CHUNK_PATH = re.compile(r"/v1/uploads/[^/]+")
#: Escapes that decode to characters no response or database could take: lone UTF-16
#: surrogates, and NUL (PostgreSQL text cannot hold it, and no field of the API needs it).
_SUSPICIOUS_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The standard error response for an :class:`APIError`."""
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


class Guard:
    """ASGI middleware enforcing authentication and body limits (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_json_bytes: int,
        max_chunk_bytes: int,
        fast_lane: HeartbeatLane | None = None,
    ) -> None:
        self.app = app
        self.fast_lane = fast_lane
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.max_json_bytes = max_json_bytes
        self.max_chunk_bytes = max_chunk_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self._handle(scope, receive, tracking_send)
        except ClientDisconnect:
            log.debug("%s %s: client disconnected", scope["method"], scope["path"])
        except Exception as exc:
            log.exception("unexpected error in %s %s", scope["method"], scope["path"])
            if not started:
                body = ServerError(
                    f"internal server error ({type(exc).__name__}); see the server log"
                )
                await error_response(body)(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = _headers(scope)
        if (
            self.api_key is not None
            and path not in PUBLIC_PATHS
            and not self._authorised(headers.get(b"authorization"))
        ):
            await error_response(
                Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'"),
                headers={"WWW-Authenticate": 'Bearer realm="chronicle"'},
            )(scope, receive, send)
            return

        is_chunk = method == "PUT" and _CHUNK_PATH.fullmatch(path) is not None
        limit = self.max_chunk_bytes if is_chunk else self.max_json_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
                if length < 0:
                    raise ValueError
            except ValueError:
                await error_response(
                    InvalidRequest("invalid Content-Length header", field="content-length")
                )(scope, receive, send)
                return
            if length > limit:
                await error_response(_too_large(limit, is_chunk))(scope, receive, send)
                return
        if is_chunk:
            await self.app(scope, receive, send)  # the route streams and counts the body
            return

        body, error = await _read_json_body(receive, limit)
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        if self.fast_lane is not None and await self.fast_lane.handle(
            scope, receive, send, headers, body
        ):
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorised(self, header: bytes | None) -> bool:
        assert self.api_key is not None
        if not header:
            return False
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", ())}


def _too_large(limit: int, chunk: bool) -> PayloadTooLarge:
    what = "an upload chunk" if chunk else "a JSON body"
    hint = "; send smaller chunks" if chunk else ""
    return PayloadTooLarge(f"{what} may not exceed {limit} bytes{hint}", limit=limit)


async def _read_json_body(receive: Receive, limit: int) -> tuple[bytes, APIError | None]:
    """Read a whole (small) body, bounded by ``limit``; check it is a JSON object if present."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", _too_large(limit, False)
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(parts)
    if not body.strip():
        return body, None
    if len(body) > _INLINE_CHECK_BYTES:  # keep the event loop free for other requests
        return body, await run_in_threadpool(_check_json, body)
    return body, _check_json(body)


def _check_json(body: bytes) -> APIError | None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidRequest(
            f"the request body is not valid UTF-8 (byte {exc.start})", field="body"
        )
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return InvalidRequest(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", field="body"
        )
    except RecursionError:
        return _too_deep()
    except ValueError as exc:  # e.g. an integer literal with more digits than Python allows
        return InvalidRequest(f"malformed JSON: {exc}", field="body")
    if _SUSPICIOUS_ESCAPE.search(text):
        bad = _bad_string(value)
        if bad:
            problem, field = bad
            return InvalidRequest(f"invalid {field}: it contains {problem}", field=field)
    if not isinstance(value, dict):
        return InvalidRequest(
            f"the request body must be a JSON object, not {_json_type(value)}", field="body"
        )
    if _depth(value) > MAX_JSON_DEPTH:
        return _too_deep()
    return None


def _bad_string(value: Any) -> tuple[str, str] | None:
    """``(problem, field)`` for the first bad string (key or value) of a decoded JSON value."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                path = f"{where}.{key}" if where else str(key)
                stack.append((key, where or "body"))
                stack.append((child, path))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{i}") for i, child in enumerate(item))
        elif isinstance(item, str):
            if "\x00" in item:
                return "a NUL character (\\u0000), which no field accepts", where or "body"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "an unpaired UTF-16 surrogate escape", where or "body"
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _too_deep() -> InvalidRequest:
    return InvalidRequest(
        f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", field="body"
    )


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return deepest


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read body once, then defers to the real one
    (which then reports the client's disconnect to streaming responses)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
