"""The ``/v1`` routes: one thin handler per store method.

Handlers translate HTTP to a :class:`~chronicle_integrations.store.Store` call and its record to
JSON, nothing more: validation, transitions, leases and idempotency all live in the store, so the
server and the embedded client cannot disagree. Store calls block (SQL, file I/O), so handlers
are plain ``def`` functions, which FastAPI runs on its thread pool; only the streaming upload
route is ``async`` (it reads the socket on the event loop and writes on a worker thread).
"""

from __future__ import annotations

import concurrent.futures
import functools
import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BeforeValidator
from starlette.concurrency import run_in_threadpool

from .. import _validation as check
from .._errors import (
    SHUTTING_DOWN,
    AlreadyExists,
    APIError,
    DigestMismatch,
    InvalidRequest,
    InvalidTransition,
    LeaseConflict,
    NotFound,
    OffsetMismatch,
    PayloadTooLarge,
    RequestTimeout,
    ServerError,
    StorageFull,
    Unauthorized,
    Unavailable,
)
from .._models import Page
from .._version import __version__
from ..lifecycle import RunState
from ..store import Store
from . import wire
from .drain import Drain
from .middleware import error_response
from .streaming import (
    DEFAULT_UPLOAD_IDLE_TIMEOUT,
    DEFAULT_UPLOAD_MIN_RATE,
    RangeNotSatisfiable,
    blob_response,
    stream_chunk,
)

__all__ = ["build_router"]

#: Most bytes one upload may hold (the store's own bound on a declared size).
MAX_OFFSET = 2**53


def _digits(limit: int) -> Callable[[Any], Any]:
    """Path and query numbers are plain decimal digits: no sign, spaces, ``_`` or ``1.0``."""

    def parse(value: Any) -> Any:
        if isinstance(value, str):
            if not re.fullmatch(r"[0-9]{1,20}", value):
                raise ValueError(f"must be an integer from 0 to {limit}, written with digits")
            return int(value)
        return value

    return parse


ExperimentId = Annotated[
    str, Path(description="`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`", examples=["lr-sweep-1a2b3c4d"])
]
# (The validator comes after Path so that the schema keeps minimum/maximum; it still runs
# before the integer parsing.)
VariationNo = Annotated[
    int,
    Path(ge=0, le=check.MAX_NUMBER, description="Variation number."),
    BeforeValidator(_digits(check.MAX_NUMBER)),
]
RunNo = Annotated[
    int,
    Path(ge=0, le=check.MAX_NUMBER, description="Run number."),
    BeforeValidator(_digits(check.MAX_NUMBER)),
]
UploadId = Annotated[str, Path(description="The id returned by POST .../uploads.")]
Offset = Annotated[
    int,
    Query(ge=0, le=MAX_OFFSET, description="Where this chunk starts: the upload's current offset."),
    BeforeValidator(_digits(MAX_OFFSET)),
]

Limit = Annotated[
    int | None,
    Query(
        ge=1,
        le=check.MAX_PAGE_SIZE,
        description=f"Page size (default {check.DEFAULT_PAGE_SIZE}, at most "
        f"{check.MAX_PAGE_SIZE}); a page also stops at about "
        f"{check.MAX_PAGE_BYTES // 2**20} MiB.",
    ),
    BeforeValidator(_digits(check.MAX_PAGE_SIZE)),
]
Cursor = Annotated[
    str | None,
    Query(
        description="The `next_cursor` of the previous page (opaque); absent for the first page."
    ),
]

_ERRORS: dict[int, tuple[str, str]] = {
    400: (InvalidRequest.code, "Malformed request: bad name, number, JSON or field."),
    401: (Unauthorized.code, "Missing or wrong API key (when the server has one)."),
    404: (NotFound.code, "Unknown experiment, variation, run, asset or upload."),
    409: (
        f"{InvalidTransition.code}, {LeaseConflict.code}, {AlreadyExists.code}, "
        f"{OffsetMismatch.code}",
        "Refused: see `code` and the details (`state`, `offset`).",
    ),
    408: (
        RequestTimeout.code,
        "The chunk body stalled (silent, or below the minimum rate), or the server stopped it "
        "to shut down (`reason: shutting_down`); the bytes received were kept: resume at "
        "`offset`.",
    ),
    413: (PayloadTooLarge.code, "The body (or the asset) exceeds the server's limit."),
    416: (RangeNotSatisfiable.code, "The byte range is outside the asset."),
    422: (
        DigestMismatch.code,
        "The bytes received do not hash to the declared SHA-256; nothing was stored.",
    ),
    500: (ServerError.code, "A server bug or database outage; retry later."),
    503: (
        Unavailable.code,
        "This replica's database or object store does not answer, or it is shutting down "
        "(`reason: shutting_down`); try another replica, or again later.",
    ),
    507: (StorageFull.code, "The asset store is full; the upload can resume later."),
}


def _errors(*statuses: int, auth: bool = True, body: bool = False) -> dict[int | str, Any]:
    """OpenAPI documentation of the error responses a route may give."""
    wanted = {400, 500, *statuses}
    if auth:
        wanted.add(401)
    if body:
        wanted.add(413)
    return {
        status: {
            "model": wire.ErrorResponse,
            "description": f"`{_ERRORS[status][0]}`: {_ERRORS[status][1]}",
        }
        for status in sorted(wanted)
    }


def _json(record: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse(record.to_dict(), status_code=status_code)


def _page_json(field: str, page: Page[Any]) -> JSONResponse:
    """A page of a listing: ``{field: [...], "next_cursor": C}``. The last page has no
    ``next_cursor`` (read as null), so it is exactly the answer of a server that predates
    pages, and a short listing keeps its old shape."""
    body: dict[str, Any] = {field: [item.to_dict() for item in page.items]}
    if page.next_cursor is not None:
        body["next_cursor"] = page.next_cursor
    return JSONResponse(body)


def build_router(
    store: Store,
    *,
    max_chunk_bytes: int,
    upload_executor: Callable[[], concurrent.futures.Executor | None],
    upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT,
    upload_min_rate: float = DEFAULT_UPLOAD_MIN_RATE,
    drain: Drain | None = None,
) -> APIRouter:
    """The ``/v1`` API over ``store``. ``upload_executor`` gives the thread pool that writes
    upload chunks (a separate pool, so long uploads never starve heartbeats);
    ``upload_idle_timeout`` / ``upload_min_rate``: when a chunk body counts as stalled;
    ``drain``: the server's shutdown (the readiness check fails and upload chunks stop)."""
    router = APIRouter(prefix="/v1")

    def refuse_while_draining() -> None:
        if drain is not None and drain.begun:
            raise Unavailable(
                "this replica is shutting down: send new work to another one",
                reason=SHUTTING_DOWN,
            )

    # ------------------------------------------------------------------ health
    @router.get(
        "/health",
        response_model=wire.Health,
        tags=["health"],
        openapi_extra={"security": []},
        responses=_errors(auth=False),
    )
    async def health() -> JSONResponse:
        """Liveness probe; needs no API key."""
        return JSONResponse({"status": "ok", "version": __version__})

    @router.get(
        "/ready",
        response_model=wire.Ready,
        tags=["health"],
        openapi_extra={"security": []},
        responses=_errors(503, auth=False),
    )
    def ready() -> JSONResponse:
        """Readiness probe for a load balancer: 200 when this replica's database answers,
        503 ``unavailable`` otherwise (send the traffic elsewhere), and from the moment it
        begins shutting down (``reason: shutting_down``, while the requests in flight
        drain); needs no API key."""
        refuse_while_draining()
        version = store.ready()
        refuse_while_draining()  # (the shutdown may have begun while the database answered)
        return JSONResponse({"status": "ready", "version": __version__, "schema_version": version})

    # ------------------------------------------------------------------ experiments
    @router.post(
        "/experiments",
        status_code=201,
        response_model=wire.Experiment,
        tags=["experiments"],
        responses=_errors(409, body=True),
    )
    def create_experiment(body: wire.CreateExperimentRequest) -> JSONResponse:
        """Create an experiment with numbered variations (0, 1, ...). Repeating the request
        with the same ``experiment_id`` and definition returns it again (409
        ``already_exists`` for a different definition)."""
        info = store.create_experiment(
            body.name, body.variations or [], body.experiment_id, objective=body.objective
        )
        return _json(info, 201)

    @router.get(
        "/experiments",
        response_model=wire.ExperimentList,
        tags=["experiments"],
        responses=_errors(),
    )
    def list_experiments(limit: Limit = None, cursor: Cursor = None) -> JSONResponse:
        """Experiments, oldest first, a page at a time: follow ``next_cursor`` until null."""
        return _page_json("experiments", store.page_experiments(limit=limit, cursor=cursor))

    @router.get(
        "/experiments/{experiment_id}",
        response_model=wire.Experiment,
        tags=["experiments"],
        responses=_errors(404),
    )
    def get_experiment(experiment_id: ExperimentId) -> JSONResponse:
        """One experiment."""
        return _json(store.get_experiment(experiment_id))

    @router.put(
        "/experiments/{experiment_id}/objective",
        response_model=wire.Experiment,
        tags=["experiments"],
        responses=_errors(404, body=True),
    )
    def set_objective(experiment_id: ExperimentId, body: wire.ObjectiveRequest) -> JSONResponse:
        """Set what "best" means for the experiment's runs (``metric`` null: clear it)."""
        objective = {"metric": body.metric, "mode": body.mode} if body.metric else None
        return _json(store.set_objective(experiment_id, objective))

    @router.get(
        "/experiments/{experiment_id}/best",
        response_model=wire.BestRun,
        tags=["experiments"],
        responses=_errors(404),
    )
    def best(
        experiment_id: ExperimentId,
        metric: Annotated[
            str | None, Query(description="The metric (default: the objective's).")
        ] = None,
        mode: Annotated[
            str | None,
            Query(description="`min` or `max` (default: the objective's, else `min`)."),
        ] = None,
        include_running: Annotated[
            bool, Query(description="Also count running and lost runs (default: succeeded).")
        ] = False,
    ) -> JSONResponse:
        """The best run by a metric, with its state, value and best checkpoint asset (404
        when no run qualifies). An index walk: as fast over 100,000 runs as over ten."""
        return _json(store.best(experiment_id, metric, mode, include_running=include_running))

    @router.post(
        "/experiments/{experiment_id}/variations",
        status_code=201,
        response_model=wire.VariationCreated,
        tags=["experiments"],
        responses=_errors(404, body=True),
    )
    def add_variation(experiment_id: ExperimentId, body: wire.AddVariationRequest) -> JSONResponse:
        """Append a variation; its number is the next one. ``request_id`` makes a retry return
        the same variation instead of adding another."""
        number = store.add_variation(experiment_id, body.config, body.request_id)
        return JSONResponse({"experiment_id": experiment_id, "variation": number}, status_code=201)

    @router.get(
        "/experiments/{experiment_id}/variations/{variation}",
        response_model=wire.Variation,
        tags=["experiments"],
        responses=_errors(404),
    )
    def get_variation(experiment_id: ExperimentId, variation: VariationNo) -> JSONResponse:
        """A variation and its config."""
        config = store.get_variation_config(experiment_id, variation)
        return JSONResponse(
            {"experiment_id": experiment_id, "variation": variation, "config": config}
        )

    @router.post(
        "/experiments/{experiment_id}/variations/{variation}/runs",
        status_code=201,
        response_model=wire.Run,
        tags=["runs"],
        responses=_errors(404, body=True),
    )
    def create_run(
        experiment_id: ExperimentId,
        variation: VariationNo,
        body: wire.CreateRunRequest | None = None,
    ) -> JSONResponse:
        """Create the variation's next run (``max(run) + 1``, 0 for the first), pending."""
        request_id = body.request_id if body else None
        return _json(store.create_run(experiment_id, variation, request_id), 201)

    # ------------------------------------------------------------------ runs
    @router.get("/runs", response_model=wire.RunList, tags=["runs"], responses=_errors())
    def list_runs(
        experiment_id: Annotated[str | None, Query(description="Only this experiment.")] = None,
        state: Annotated[
            str | None,
            Query(
                description="Only runs in this effective state: "
                + ", ".join(s.value for s in RunState)
            ),
        ] = None,
        limit: Limit = None,
        cursor: Cursor = None,
        sort: Annotated[
            str | None,
            Query(
                description="Best first by this metric (each run's min, or max with "
                "`mode=max`); runs without a value of it last."
            ),
        ] = None,
        mode: Annotated[
            str | None,
            Query(
                description="The direction of `sort`: `min` or `max` (default: the "
                "objective's when `sort` is the experiment's objective, else `min`)."
            ),
        ] = None,
    ) -> JSONResponse:
        """Runs by ``experiment_id, variation, run`` (or, with ``sort``, best first by a
        metric, ties in that order), optionally filtered by experiment and effective state,
        a page at a time: follow ``next_cursor`` until null. Every run that exists for the
        whole walk comes exactly once, whatever is created meanwhile (sorted: whose value
        does not change meanwhile)."""
        page = store.page_runs(
            experiment_id, state, limit=limit, cursor=cursor, sort=sort, mode=mode
        )
        return _page_json("runs", page)

    run_path = "/runs/{experiment_id}/{variation}/{run}"

    @router.get(run_path, response_model=wire.Run, tags=["runs"], responses=_errors(404))
    def get_run(experiment_id: ExperimentId, variation: VariationNo, run: RunNo) -> JSONResponse:
        """A run with its effective state (computed from the server's clock on every read)."""
        return _json(store.get_run(experiment_id, variation, run))

    @router.post(
        run_path + "/start",
        response_model=wire.Run,
        tags=["runs"],
        responses=_errors(404, 409, body=True),
    )
    def start(
        experiment_id: ExperimentId,
        variation: VariationNo,
        run: RunNo,
        body: wire.StartRequest | None = None,
    ) -> JSONResponse:
        """``pending -> running``; with ``resume``, also take over a running or lost run. The
        answer carries the ``lease`` later calls must send."""
        body = body or wire.StartRequest()
        return _json(
            store.start(
                experiment_id,
                variation,
                run,
                resume=body.resume,
                lease=body.lease,
                holder=body.holder,
            )
        )

    @router.post(
        run_path + "/heartbeat",
        response_model=wire.Run,
        tags=["runs"],
        responses=_errors(404, 409, body=True),
    )
    def heartbeat(
        experiment_id: ExperimentId,
        variation: VariationNo,
        run: RunNo,
        body: wire.HeartbeatRequest | None = None,
    ) -> JSONResponse:
        """``running -> running``, ``lost -> running``. Refused (409 ``invalid_transition``
        with ``state``) on a terminal run, 409 ``lease_conflict`` under a stale lease.
        ``progress`` is kept; a run beating without new progress is flagged ``stalled``."""
        body = body or wire.HeartbeatRequest()
        return _json(
            store.heartbeat(
                experiment_id,
                variation,
                run,
                lease=body.lease,
                progress=body.progress,
                metrics=body.metrics,
                checkpoints=body.checkpoints,
            )
        )

    @router.post(
        run_path + "/succeed",
        response_model=wire.Run,
        tags=["runs"],
        responses=_errors(404, 409, body=True),
    )
    def succeed(
        experiment_id: ExperimentId,
        variation: VariationNo,
        run: RunNo,
        body: wire.SucceedRequest | None = None,
    ) -> JSONResponse:
        """``running|lost -> succeeded`` (idempotent); ``progress`` is kept as the final one."""
        body = body or wire.SucceedRequest()
        return _json(
            store.succeed(
                experiment_id,
                variation,
                run,
                lease=body.lease,
                progress=body.progress,
                metrics=body.metrics,
                checkpoints=body.checkpoints,
            )
        )

    @router.post(
        run_path + "/fail",
        response_model=wire.Run,
        tags=["runs"],
        responses=_errors(404, 409, body=True),
    )
    def fail(
        experiment_id: ExperimentId, variation: VariationNo, run: RunNo, body: wire.FailRequest
    ) -> JSONResponse:
        """``pending|running|lost -> failed_crash|failed_abandoned`` (idempotent). ``crash``
        needs the lease once started; ``abandoned`` (a cancellation) does not."""
        return _json(
            store.fail(
                experiment_id,
                variation,
                run,
                reason=body.reason,
                message=body.message,
                lease=body.lease,
                progress=body.progress,
                metrics=body.metrics,
                checkpoints=body.checkpoints,
            )
        )

    @router.get(
        run_path + "/events",
        response_model=wire.EventList,
        tags=["runs"],
        responses=_errors(404),
    )
    def events(
        experiment_id: ExperimentId,
        variation: VariationNo,
        run: RunNo,
        limit: Limit = None,
        cursor: Cursor = None,
    ) -> JSONResponse:
        """The run's timeline, oldest first: transitions (with the watchdog's) and uploads,
        a page at a time (follow ``next_cursor`` until null)."""
        page = store.page_events(experiment_id, variation, run, limit=limit, cursor=cursor)
        return _page_json("events", page)

    @router.post(
        run_path + "/events",
        response_model=wire.Event,
        status_code=201,
        tags=["runs"],
        responses=_errors(404, 409, body=True),
    )
    def record_event(
        experiment_id: ExperimentId,
        variation: VariationNo,
        run: RunNo,
        body: wire.RecordEventRequest,
    ) -> JSONResponse:
        """Add a supervisor's event (a ``teardown`` of the worker) to the timeline. It never
        changes the run's state; it needs the lease the run is held under."""
        event = store.record_event(
            experiment_id,
            variation,
            run,
            lease=body.lease,
            kind=body.kind,
            cause=body.cause,
            detail=body.detail,
        )
        return _json(event, status_code=201)

    # ------------------------------------------------------------------ assets
    @router.get(
        run_path + "/assets",
        response_model=wire.AssetList,
        tags=["assets"],
        responses=_errors(404),
    )
    def list_assets(
        experiment_id: ExperimentId,
        variation: VariationNo,
        run: RunNo,
        limit: Limit = None,
        cursor: Cursor = None,
    ) -> JSONResponse:
        """The run's complete assets, by name, a page at a time (follow ``next_cursor``)."""
        page = store.page_assets(experiment_id, variation, run, limit=limit, cursor=cursor)
        return _page_json("assets", page)

    @router.get(
        run_path + "/assets/{name:path}",
        tags=["assets"],
        response_class=Response,
        responses={
            200: {
                "description": "The asset's bytes.",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            },
            206: {
                "description": "The requested byte range (`Content-Range`).",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            },
            **_errors(404, 416),
        },
    )
    def download_asset(
        experiment_id: ExperimentId,
        variation: VariationNo,
        run: RunNo,
        name: Annotated[str, Path(description="The asset's name (a relative path).")],
        range_header: Annotated[
            str | None, Header(alias="range", description="`bytes=a-b`, `bytes=a-` or `bytes=-n`")
        ] = None,
        if_range: Annotated[str | None, Header(alias="if-range")] = None,
    ) -> Response:
        """The asset's bytes, streamed. Headers: ``Content-Length``, ``ETag`` and
        ``X-Chronicle-SHA256`` (the SHA-256), ``Accept-Ranges: bytes``."""
        info = store.get_asset(experiment_id, variation, run, name)
        if not store.blobs.exists(info.sha256):
            raise ServerError(
                f"the bytes of asset {name!r} ({info.sha256}) are missing from the blob store"
            )
        opener = functools.partial(store.blobs.open, info.sha256)
        try:
            return blob_response(opener, info, range_header, if_range)
        except RangeNotSatisfiable as exc:
            return error_response(exc, headers={"Content-Range": f"bytes */{info.size}"})

    # ------------------------------------------------------------------ uploads
    @router.post(
        run_path + "/uploads",
        status_code=201,
        response_model=wire.UploadStatus,
        tags=["uploads"],
        responses=_errors(404, 409, body=True),
    )
    def begin_upload(
        experiment_id: ExperimentId,
        variation: VariationNo,
        run: RunNo,
        body: wire.BeginUploadRequest,
    ) -> JSONResponse:
        """Open a resumable upload (or re-open one by ``upload_id``: the answer says where it
        stands). Needs the run's lease once the run was started."""
        status = store.begin_upload(
            experiment_id,
            variation,
            run,
            body.name,
            size=body.size,
            upload_id=body.upload_id,
            lease=body.lease,
        )
        return _json(status, 201)

    @router.get(
        "/uploads/{upload_id}",
        response_model=wire.UploadStatus,
        tags=["uploads"],
        responses=_errors(404),
    )
    def upload_status(upload_id: UploadId) -> JSONResponse:
        """Where an upload stands: ``offset`` bytes are safely stored."""
        return _json(store.upload_status(upload_id))

    @router.put(
        "/uploads/{upload_id}",
        response_model=wire.UploadStatus,
        tags=["uploads"],
        responses=_errors(404, 408, 409, 507, body=True),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def put_chunk(upload_id: UploadId, offset: Offset, request: Request) -> JSONResponse:
        """Append the raw body at ``offset``, which must be the upload's current offset (else
        409 ``offset_mismatch`` with the right ``offset``). The body is streamed to disk; if
        the connection drops, the bytes received are kept: read the offset back and resume.
        A new ``PUT`` takes the upload over from an older one still open (a stalled client
        resuming on a new connection): the older one's later bytes are refused. A body that
        stalls, or still arrives when the server's shutdown stops uploads, is abandoned with
        408 ``request_timeout`` (the bytes received are kept)."""
        try:
            # Checked and claimed before reading the body: a wrong offset is answered at once.
            writer = await run_in_threadpool(store.open_chunk, upload_id, offset)
            written = await stream_chunk(
                request,
                writer,
                limit=max_chunk_bytes,
                executor=upload_executor(),
                label=f"upload {upload_id}",
                idle_timeout=upload_idle_timeout,
                min_rate=upload_min_rate,
                drain=drain,
            )
        except APIError as exc:
            # Refused (wrong offset, a newer writer, too large, stalled) before the body was
            # read to its end: its unread bytes would be taken for the next request's head,
            # so this connection carries no other request.
            return error_response(exc, headers={"Connection": "close"})
        if written is None:  # the client is gone; this answer is never sent
            return JSONResponse({}, status_code=400)
        return _json(written)

    @router.post(
        "/uploads/{upload_id}/complete",
        response_model=wire.Asset,
        tags=["uploads"],
        responses=_errors(404, 422, 507, body=True),
    )
    def complete_upload(
        upload_id: UploadId, body: Annotated[wire.CompleteUploadRequest, Body()]
    ) -> JSONResponse:
        """Verify the SHA-256 of everything received and publish the asset atomically
        (replacing an asset of the same name). Repeating it returns the asset again."""
        return _json(store.complete_upload(upload_id, body.sha256))

    @router.delete(
        "/uploads/{upload_id}", status_code=204, tags=["uploads"], responses=_errors(404)
    )
    def discard_upload(upload_id: UploadId) -> Response:
        """Drop an unfinished upload and the bytes received (the client abandoned this capture,
        e.g. its file was rewritten in place). A completed upload is left as it is."""
        store.discard_upload(upload_id)
        return Response(status_code=204)

    return router
