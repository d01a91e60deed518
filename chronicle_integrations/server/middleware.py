"""The guard in front of every route: API key, body limits, JSON sanity, last-resort 500.

It is plain ASGI middleware so that it runs before routing and before FastAPI reads a body:

* an unauthenticated client gets 401 before the server reads a single byte of its body;
* the web view (``/ui``) is admitted by :class:`~.ui.auth.UiAuth`: its login form, and a
  session cookie that authorises reads (``GET``/``HEAD``) as the key would;
* a server without an API key (loopback only) answers only requests addressed to it: a
  ``Host`` that is not a loopback name (DNS rebinding: a web page's own name resolving to
  127.0.0.1) or a cross-site ``Origin`` (a page's ``fetch`` or ``<form>`` POST) gets 403
  ``forbidden``, so a browser tab cannot drive the server;
* a JSON body is read here, bounded by ``max_json_bytes`` whether or not it declares a
  ``Content-Length`` (chunked bodies do not), checked (UTF-8, well-formed, an object, nesting
  depth), then replayed to FastAPI; so no bad body can reach a route and become a 5xx;
* heartbeat bodies are bounded by :data:`~.fastlane.MAX_HEARTBEAT_BYTES` (413 beyond), and
  the guard's decoded JSON is what the lane validates (one parse);
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
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import (
    APIError,
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
)
from .fastlane import HEARTBEAT_PATH, MAX_HEARTBEAT_BYTES, HeartbeatLane
from .ui.auth import UiAuth, is_ui_path, with_security_headers

__all__ = ["LOOPBACK_HOSTS", "MAX_JSON_DEPTH", "RequestGuard", "error_response"]

log = logging.getLogger(__name__)

#: Deepest nesting a JSON body may have (variation configs are the only nested values).
MAX_JSON_DEPTH = 64

#: Paths anyone may read, with or without the API key: liveness probes and the API's own
#: description (it documents the API; it holds no data).
PUBLIC_PATHS = frozenset(
    {"/v1/health", "/v1/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)

#: The names a keyless (loopback) server answers to, besides the ``--host`` it listens on.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})

#: JSON bodies larger than this are checked on a worker thread, not on the event loop.
_INLINE_CHECK_BYTES = 64 * 1024
_CHUNK_PATH = re.compile(r"/v1/uploads/[^/]+")
#: Escapes that decode to characters no response or database could take: lone UTF-16
#: surrogates, and NUL (PostgreSQL text cannot hold it, and no field of the API needs it).
_SUSPICIOUS_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The standard error response for an :class:`APIError`."""
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


class RequestGuard:
    """ASGI middleware enforcing authentication and body limits (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_json_bytes: int,
        max_chunk_bytes: int,
        fast_lane: HeartbeatLane | None = None,
        hosts: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.fast_lane = fast_lane
        self.api_key = api_key.encode("utf-8") if api_key else None
        #: Without a key: the ``Host`` names (lowercase, no port) requests must carry.
        self.hosts = (
            LOOPBACK_HOSTS | {_host_name(h) for h in hosts} if self.api_key is None else None
        )
        self.max_json_bytes = max_json_bytes
        self.max_chunk_bytes = max_chunk_bytes
        #: The web view's sessions (``ui/auth.py``): its login, and the cookie that lets a
        #: browser read what the key would.
        self.ui = UiAuth(self.api_key)

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
        refusal = self._foreign(headers)
        if refusal is not None:
            await error_response(Forbidden(refusal))(scope, receive, send)
            return
        if is_ui_path(path):  # the web view: GET pages, its login form; no JSON bodies
            secured = with_security_headers(send)
            bearer = self.api_key is not None and self._authorised(headers.get(b"authorization"))
            if await self.ui.admit(scope, receive, secured, headers, bearer):
                await self.app(scope, receive, secured)
            return
        if (
            self.api_key is not None
            and path not in PUBLIC_PATHS
            and not self._authorised(headers.get(b"authorization"))
            and not self.ui.has_session(method, headers)
        ):
            await error_response(
                Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'"),
                headers={"WWW-Authenticate": 'Bearer realm="chronicle"'},
            )(scope, receive, send)
            return

        is_chunk = method == "PUT" and _CHUNK_PATH.fullmatch(path) is not None
        is_heartbeat = method == "POST" and HEARTBEAT_PATH.fullmatch(path) is not None
        limit = (
            self.max_chunk_bytes
            if is_chunk
            else min(MAX_HEARTBEAT_BYTES, self.max_json_bytes)
            if is_heartbeat
            else self.max_json_bytes
        )
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
                # The body is not read: the connection cannot carry another request (its
                # unread bytes would be taken for the next request's head), so it closes.
                await error_response(_too_large(limit, path), {"Connection": "close"})(
                    scope, receive, send
                )
                return
        if is_chunk:
            await self.app(scope, receive, send)  # the route streams and counts the body
            return

        body, value, error = await _read_json_body(receive, limit, path)
        if error is not None:
            unread = {"Connection": "close"} if isinstance(error, PayloadTooLarge) else None
            await error_response(error, unread)(scope, receive, send)
            return
        if (
            is_heartbeat
            and self.fast_lane is not None
            and await self.fast_lane.handle(scope, receive, send, headers, body, value)
        ):
            return
        await self.app(scope, _replay(body, receive), send)

    def _foreign(self, headers: dict[bytes, bytes]) -> str | None:
        """Why a keyless server refuses this request (a foreign Host or Origin), or None."""
        if self.hosts is None:
            return None
        host = headers.get(b"host")
        if host is not None and _host_name(host.decode("latin-1")) not in self.hosts:
            return (
                f"this server answers only to {', '.join(sorted(self.hosts))}, not to the Host "
                f"{host.decode('latin-1')[:100]!r} (without an API key it serves only this "
                "machine; start it with --api-key to serve other names)"
            )
        origin = headers.get(b"origin")
        if origin is not None:
            parts = urlsplit(origin.decode("latin-1"))
            if parts.scheme not in ("http", "https") or _host_name(parts.netloc) not in self.hosts:
                return (
                    f"cross-site request refused (Origin {origin.decode('latin-1')[:100]!r}): "
                    "without an API key this server accepts no requests from web pages of "
                    "other sites"
                )
        return None

    def _authorised(self, header: bytes | None) -> bool:
        assert self.api_key is not None
        if not header:
            return False
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", ())}


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header or URL netloc, lowercase: ``[::1]:80`` -> ``[::1]``,
    ``LocalHost:8765`` -> ``localhost``; a bare IPv6 address gets its brackets."""
    host = host.strip().lower().rpartition("@")[2]
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    if host.count(":") > 1:  # a bare IPv6 address (a configured --host such as ::1)
        return f"[{host}]"
    return host.partition(":")[0]


def _too_large(limit: int, path: str) -> PayloadTooLarge:
    if _CHUNK_PATH.fullmatch(path):
        what, hint = "an upload chunk", "; send smaller chunks"
    elif HEARTBEAT_PATH.fullmatch(path):
        what, hint = "a heartbeat body", " (a lease and a small progress object)"
    else:
        what, hint = "a JSON body", ""
    return PayloadTooLarge(f"{what} may not exceed {limit} bytes{hint}", limit=limit)


async def _read_json_body(
    receive: Receive, limit: int, path: str
) -> tuple[bytes, Any, APIError | None]:
    """Read a whole (small) body, bounded by ``limit``; check it is a JSON object if present.

    Returns the body, its decoded value (None for an empty body) and the error, if any."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", None, _too_large(limit, path)
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(parts)
    if not body.strip():
        return body, None, None
    if len(body) > _INLINE_CHECK_BYTES:  # keep the event loop free for other requests
        value, error = await run_in_threadpool(_check_json, body)
    else:
        value, error = _check_json(body)
    return body, value, error


def _check_json(body: bytes) -> tuple[Any, APIError | None]:
    """``(decoded value, None)`` for a body that is a sane JSON object, else ``(None, error)``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, InvalidRequest(
            f"the request body is not valid UTF-8 (byte {exc.start})", field="body"
        )
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return None, InvalidRequest(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", field="body"
        )
    except RecursionError:
        return None, _too_deep()
    except ValueError as exc:  # e.g. an integer literal with more digits than Python allows
        return None, InvalidRequest(f"malformed JSON: {exc}", field="body")
    if _SUSPICIOUS_ESCAPE.search(text):
        bad = _bad_string(value)
        if bad:
            problem, field = bad
            return None, InvalidRequest(f"invalid {field}: it contains {problem}", field=field)
    if not isinstance(value, dict):
        return None, InvalidRequest(
            f"the request body must be a JSON object, not {_json_type(value)}", field="body"
        )
    if _depth(value) > MAX_JSON_DEPTH:
        return None, _too_deep()
    return value, None


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
