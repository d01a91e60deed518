"""The application factory: routes, error handlers, the guard middleware and the watchdog.

::

    app = create_app(Store.open("sqlite:///chronicle.db", "assets"), api_key="s3cret")
    uvicorn.run(app)

Nothing is created at import time: the caller builds the :class:`Store` (engine and blob store)
and owns it. The app's lifespan runs the watchdog, a daemon thread that calls
:meth:`Store.sweep` periodically so the watchdog's transitions appear in the event log (reads
are correct without it: the effective state is computed from timestamps on every read).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._errors import APIError, InvalidRequest, NotFound, PayloadTooLarge, Unauthorized
from .._version import __version__
from ..store import Store
from .direct import build_direct_router
from .drain import DRAIN_FLOOR, Drain
from .fastlane import HeartbeatLane
from .middleware import RequestGuard, error_response
from .routes import build_router
from .streaming import DEFAULT_UPLOAD_IDLE_TIMEOUT, DEFAULT_UPLOAD_MIN_RATE

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "DEFAULT_MAX_JSON_BYTES",
    "DEFAULT_UPLOAD_IDLE_TIMEOUT",
    "DEFAULT_UPLOAD_MIN_RATE",
    "create_app",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_JSON_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_CHUNK_BYTES = 256 * 1024 * 1024
#: Upload batches written at once (a chunk holds a worker thread only while a batch of bytes
#: it has already received is written, never while it waits for the network).
UPLOAD_WORKERS = 16

_DESCRIPTION = """\
The Chronicle run-lifecycle API. Every error is `{"error": {"code", "message", ...}}` with a
stable `code`. When the server has an API key, every route but `GET /v1/health` needs
`Authorization: Bearer <key>`.
"""


def create_app(
    store: Store,
    *,
    api_key: str | None = None,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    sweep_interval: float | None = None,
    heartbeat_lane: bool = True,
    upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT,
    upload_min_rate: float = DEFAULT_UPLOAD_MIN_RATE,
    hosts: Iterable[str] = (),
    api_docs: bool = False,
    ui: bool = True,
    drain_timeout: float = 10.0,
) -> FastAPI:
    """Build the HTTP API over ``store``.

    ``api_key``: required as a bearer token on every route but the health check.
    ``max_json_bytes`` / ``max_chunk_bytes``: body limits (413 beyond).
    ``sweep_interval``: seconds between watchdog sweeps (default
    ``min(30, heartbeat_timeout / 4)``).
    ``heartbeat_lane``: serve well-formed heartbeats from the fast lane (``fastlane.py``);
    False sends every heartbeat through its FastAPI route, which the lane must agree with.
    ``upload_idle_timeout`` / ``upload_min_rate``: an upload chunk body silent for that many
    seconds, or slower than that many bytes per second (over windows of the idle timeout), is
    abandoned with 408 ``request_timeout``; the bytes received are kept for the resume.
    Unfinished uploads expire, and uploads are bounded, by the store's ``upload_expiry`` and
    ``max_asset_bytes`` (the embedded store applies them too); the watchdog drops expired
    uploads.
    ``hosts``: without an API key, the ``Host`` names answered besides the loopback ones
    (``serve`` passes its ``--host``); other names and cross-site ``Origin`` s get 403.
    ``api_docs``: also serve the interactive docs (``/docs``, ``/redoc``); off by default,
    as those pages load their scripts from a third-party CDN. ``/openapi.json`` is always
    served.
    ``ui``: also serve the read-only web view under ``/ui`` (``/`` redirects there; see
    :mod:`.ui`); its pages need the API key too (a login form exchanges it for a cookie).
    ``drain_timeout``: the bound of a shutdown (``--shutdown-timeout``, see :mod:`.drain`),
    from the moment the ASGI server starts draining (``serve`` tells the app's
    :class:`~.drain.Drain`, ``app.state.drain``; under another ASGI server, from the
    lifespan's shutdown): the requests in flight, then the heartbeat lane's pending group
    commit, the watchdog and the upload writers share it, the latter at least
    :data:`~.drain.DRAIN_FLOOR` seconds.
    """
    interval = (
        float(sweep_interval)
        if sweep_interval is not None
        else min(30.0, store.heartbeat_timeout / 4)
    )
    if interval <= 0:
        raise ValueError("sweep_interval must be > 0")
    if max_json_bytes <= 0 or max_chunk_bytes <= 0:
        raise ValueError("max_json_bytes and max_chunk_bytes must be > 0")
    if not upload_idle_timeout > 0 or not upload_min_rate >= 0:
        raise ValueError("upload_idle_timeout must be > 0 and upload_min_rate >= 0")
    uploads: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
    lane = HeartbeatLane(store) if heartbeat_lane else None
    drain = Drain(drain_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        uploads["executor"] = concurrent.futures.ThreadPoolExecutor(
            UPLOAD_WORKERS, thread_name_prefix="chronicle-upload"
        )
        stop = threading.Event()
        watchdog = threading.Thread(
            target=_watchdog, args=(store, interval, stop), name="chronicle-watchdog", daemon=True
        )
        watchdog.start()
        try:
            yield
        finally:
            drain.start()  # (already started by serve's server when it began draining)
            stop.set()
            executor = uploads.pop("executor")
            # What is left of the bound (at least DRAIN_FLOOR s), shared by the three steps.
            loop = asyncio.get_running_loop()
            until = loop.time() + max(drain.remaining(), DRAIN_FLOOR)

            def left() -> float:
                return max(0.0, until - loop.time())

            if lane is not None:  # the pending group commit is applied before we exit
                await anyio.to_thread.run_sync(lane.close, left())
            await anyio.to_thread.run_sync(watchdog.join, left())
            # Upload batches already handed to a writer finish (bounded); none start.
            drained = threading.Thread(
                target=executor.shutdown, kwargs={"cancel_futures": True}, daemon=True
            )
            drained.start()
            await anyio.to_thread.run_sync(drained.join, left())
            if drained.is_alive():
                log.warning(
                    "upload writers still busy at the end of the %.1f s shutdown bound; exiting",
                    drain.timeout,
                )

    app = FastAPI(
        title="Chronicle",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url="/docs" if api_docs else None,
        redoc_url="/redoc" if api_docs else None,
    )
    app.state.store = store
    app.state.sweep_interval = interval
    app.state.drain = drain
    app.include_router(
        build_router(
            store,
            max_chunk_bytes=max_chunk_bytes,
            upload_executor=lambda: uploads.get("executor"),
            upload_idle_timeout=upload_idle_timeout,
            upload_min_rate=upload_min_rate,
            drain=drain,
        )
    )
    app.include_router(build_direct_router(store), prefix="/v1")
    if ui:
        from .ui.views import install_ui  # (imports Jinja2: only for a server with the view)

        install_ui(app, store)
    app.add_middleware(
        RequestGuard,
        api_key=api_key,
        max_json_bytes=max_json_bytes,
        max_chunk_bytes=max_chunk_bytes,
        fast_lane=lane,
        hosts=hosts,
    )
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


# ---------------------------------------------------------------------------- watchdog
def _watchdog(store: Store, interval: float, stop: threading.Event) -> None:
    """Sweep every ``interval`` seconds until ``stop`` (and drop expired uploads, at the
    store's :attr:`~Store.expiry_check_interval`); failures are logged, never fatal."""
    failing = False
    while not stop.wait(interval):
        try:
            store.sweep_if_due(interval)  # replicas take turns (watchdog.py)
            store.expire_uploads(every=store.expiry_check_interval)
        except Exception:
            # Log the first failure of a streak with its traceback, later ones briefly.
            if failing:
                log.warning("watchdog sweep failed again", exc_info=False)
            else:
                log.exception("watchdog sweep failed; retrying every %.1f s", interval)
            failing = True
        else:
            if failing:
                log.info("watchdog sweep recovered")
            failing = False


# ---------------------------------------------------------------------------- errors
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    if exc.status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.message, exc_info=exc)
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        where = loc[0] if loc else ""
        field = ".".join(loc[1:]) or where or "body"
        kind = error.get("type", "")
        if kind == "missing":
            text = (
                f"missing {where} field {field!r}"
                if where != "body" or loc[1:]
                else "missing request body (a JSON object)"
            )
        elif where == "body" and not loc[1:]:
            text = "the request body must be a JSON object sent with Content-Type: application/json"
        else:
            msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            text = f"invalid {field}: {msg}"
        problems.append({"field": field, "message": text})
    first = problems[0] if problems else {"field": "body", "message": "invalid request"}
    details: dict[str, Any] = {"field": first["field"]}
    if len(problems) > 1:
        details["errors"] = problems
    body = InvalidRequest(first["message"], **details)
    return error_response(body)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    error: APIError
    if exc.status_code == 404:
        error = NotFound(f"no such route: {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = InvalidRequest(
            f"method {request.method} is not allowed on "
            f"{request.url.path} (allowed: {headers.get('Allow', '?')})"
        )
        return JSONResponse(error.to_body(), status_code=405, headers=headers)
    elif exc.status_code == 401:
        error = Unauthorized(str(exc.detail))
    elif exc.status_code == 413:
        error = PayloadTooLarge(str(exc.detail))
    elif exc.status_code < 500:
        detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
        error = InvalidRequest(f"{detail} ({request.method} {request.url.path})")
        return JSONResponse(error.to_body(), status_code=exc.status_code, headers=headers)
    else:
        log.error(
            "%s %s: HTTP %d %s", request.method, request.url.path, exc.status_code, exc.detail
        )
        return JSONResponse(
            {"error": {"code": "internal", "message": str(exc.detail)}},
            status_code=exc.status_code,
            headers=headers,
        )
    return JSONResponse(error.to_body(), status_code=error.status, headers=headers)


# ---------------------------------------------------------------------------- openapi
def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, corrected: our validation errors are 400 with the standard error body
    (not FastAPI's 422), and the bearer key is declared."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            auto = responses.get("422")
            if auto and "HTTPValidationError" in str(auto):
                del responses["422"]
    components = schema.setdefault("components", {})
    schemas = components.get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "The server's API key (only when it was started with one).",
        }
    }
    schema["security"] = [{"bearerAuth": []}]
    app.openapi_schema = schema
    return schema
