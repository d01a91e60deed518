"""Pydantic models of the HTTP API: request bodies (validated) and responses (documented).

Request bodies are *strict* (a JSON string is not silently turned into a number or a boolean)
and ignore unknown fields, so older servers accept newer clients. The store remains the law for
names, numbers, tokens and transitions; these models only check shapes and types.

Response models document the wire format in ``/openapi.json``. The routes send the records'
``to_dict()`` as is (so the wire format *is* :mod:`chronicle_integrations._models`); a test
checks that every response model has exactly the fields of its record.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..lifecycle import RunState

__all__ = [
    "AddVariationRequest",
    "Asset",
    "AssetList",
    "BeginUploadRequest",
    "BestRun",
    "CompleteUploadRequest",
    "CreateExperimentRequest",
    "CreateRunRequest",
    "ErrorDetail",
    "ErrorResponse",
    "Event",
    "EventList",
    "Experiment",
    "ExperimentList",
    "FailRequest",
    "Health",
    "HeartbeatRequest",
    "LeaseRequest",
    "ObjectiveRequest",
    "Run",
    "RunList",
    "StartRequest",
    "SucceedRequest",
    "UploadStatus",
    "Variation",
    "VariationCreated",
]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------------------- requests
class CreateExperimentRequest(_Request):
    name: str = Field(description="Human-readable name (1-256 printable characters).")
    variations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="One config object per variation; they are numbered 0, 1, ... in order.",
    )
    experiment_id: str | None = Field(
        default=None,
        description="Chosen id (`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`); derived from the name when "
        "absent. Re-creating an id with the same definition returns it again.",
    )
    objective: dict[str, Any] | None = Field(
        default=None,
        description='What "best" means for its runs: `{"metric": "val/loss", "mode": "min"}` '
        "(`mode` `min` or `max`).",
    )


class ObjectiveRequest(_Request):
    metric: str | None = Field(
        default=None, description="The metric name; null clears the objective."
    )
    mode: Literal["min", "max"] = Field(default="min", description="`min` or `max`.")


class AddVariationRequest(_Request):
    config: dict[str, Any] = Field(description="The variation's config (a JSON object).")
    request_id: str | None = Field(
        default=None,
        description="Idempotency key (8-128 URL-safe characters): a retried "
        "request returns the variation the first one created.",
    )


class CreateRunRequest(_Request):
    request_id: str | None = Field(
        default=None,
        description="Idempotency key (8-128 URL-safe characters): a retried "
        "request returns the run the first one created.",
    )


class StartRequest(_Request):
    resume: bool = Field(
        default=False, description="Also take over a running or lost run (restarted worker)."
    )
    lease: str | None = Field(
        default=None,
        description="Proposed lease token (8-128 URL-safe characters); generated "
        "when absent. Repeating a start with the run's current lease "
        "is a success with no effect.",
    )
    holder: str | None = Field(
        default=None, description="Who holds the run (host, pid...), for people."
    )


class LeaseRequest(_Request):
    lease: str | None = Field(
        default=None, description="The lease returned by start; required once started."
    )


#: What a heartbeat, ``succeed`` and ``fail`` may carry about training progress.
_PROGRESS = (
    'Training progress, e.g. `{"step": 120, "epoch": 3}` (at most 16 names, finite numbers '
    "or short strings)."
)


_METRICS = (
    'Metric summaries by name (at most 64 per run): a number (`{"val/loss": 0.31}`) or '
    '`{"last": 0.31, "step": 1200, "min": .., "min_step": .., "max": .., "max_step": ..}`; '
    'non-finite values as `"NaN"`, `"Infinity"`, `"-Infinity"`. Merged into the run\'s '
    "summaries under the lease, in the same transaction; never counted as progress."
)
_CHECKPOINTS = (
    "The metric each named checkpoint asset was saved for: "
    '`{"epoch=2.ckpt": {"metric": "val_loss", "value": 0.31, "step": 1200, "epoch": 2}}`.'
)


class _Outcomes(_Request):
    metrics: dict[str, Any] | None = Field(default=None, description=_METRICS)
    checkpoints: dict[str, Any] | None = Field(default=None, description=_CHECKPOINTS)


class HeartbeatRequest(LeaseRequest, _Outcomes):
    progress: dict[str, Any] | None = Field(
        default=None,
        description=_PROGRESS + " A run that keeps beating without new progress is flagged "
        "`stalled`.",
    )


class SucceedRequest(LeaseRequest, _Outcomes):
    progress: dict[str, Any] | None = Field(
        default=None, description=_PROGRESS + " The final one: where the run ended."
    )


class FailRequest(_Outcomes):
    reason: Literal["crash", "abandoned"] = Field(
        description="`crash` (needs the lease once started) or `abandoned` (a cancellation, "
        "no lease needed)."
    )
    message: str | None = Field(
        default=None, description="Free text, e.g. the end of a traceback (64 KiB max)."
    )
    lease: str | None = Field(default=None, description="The lease returned by start.")
    progress: dict[str, Any] | None = Field(
        default=None, description=_PROGRESS + " The final one: where training stopped."
    )


class RecordEventRequest(_Request):
    kind: Literal["teardown", "worker"] = Field(
        description="The kind of event: `teardown`, or `worker` (a managed worker names "
        "itself for its executor)."
    )
    cause: Literal["teardown_requested", "teardown_done", "teardown_failed", "worker_started"]
    detail: dict[str, Any] | None = Field(
        default=None,
        description='A small JSON object (4 KiB max), e.g. `{"signal": "SIGTERM", '
        '"target": "process group 1234", "why": "lost"}`.',
    )
    lease: str | None = Field(default=None, description="The lease the worker runs under.")


class BeginUploadRequest(_Request):
    name: str = Field(
        description="Asset name: a relative POSIX path (no `..`, no leading `/`, "
        "no backslash, no NUL), at most 1024 characters."
    )
    size: int | None = Field(
        default=None, ge=0, description="Total size in bytes, when known (checked on complete)."
    )
    upload_id: str | None = Field(
        default=None,
        description="Client-chosen id (8-128 URL-safe characters); re-opening it "
        "returns the upload's current offset.",
    )
    lease: str | None = Field(
        default=None, description="The run's lease; required once the run was started."
    )


class CompleteUploadRequest(_Request):
    sha256: str = Field(description="SHA-256 of the whole content, 64 lowercase hex characters.")


# ---------------------------------------------------------------------------- responses
class Health(BaseModel):
    status: Literal["ok"]
    version: str


class Ready(BaseModel):
    """The readiness check: this replica's database answers (503 ``unavailable`` if not, or
    once it begins shutting down)."""

    status: Literal["ready"]
    version: str
    schema_version: int = Field(description="The database's chronicle schema version.")


class _Page(BaseModel):
    """What every listing's page carries besides its items."""

    next_cursor: str | None = Field(
        default=None,
        description="Pass it as `cursor` to get the next page; absent (null) on the last page.",
    )


class Experiment(BaseModel):
    experiment_id: str
    name: str
    created_at: float = Field(description="Seconds since the epoch (server clock).")
    variations: int = Field(description="Number of variations (they are numbered from 0).")
    objective: dict[str, str] | None = Field(
        default=None, description='`{"metric": "val/loss", "mode": "min"}`, or null.'
    )


class ExperimentList(_Page):
    experiments: list[Experiment]


class VariationCreated(BaseModel):
    experiment_id: str
    variation: int


class Variation(BaseModel):
    experiment_id: str
    variation: int
    config: dict[str, Any]


class Run(BaseModel):
    experiment_id: str
    variation: int
    run: int
    state: RunState = Field(description="The effective state at the time of the read.")
    created_at: float
    started_at: float | None = None
    last_heartbeat_at: float | None = None
    ended_at: float | None = None
    reason: str | None = Field(default=None, description="`crash`, `abandoned` or `lost`.")
    message: str | None = None
    lease_holder: str | None = None
    asset_count: int = 0
    progress: dict[str, Any] | None = Field(
        default=None, description="The latest progress a heartbeat carried."
    )
    progress_at: float | None = Field(default=None, description="When that progress last advanced.")
    stalled: bool = Field(
        default=False,
        description="Running, beating, but without new progress for longer "
        "than the server's stall timeout (a flag, not a state).",
    )
    lease: str | None = Field(
        default=None,
        description="Only in the answer to start: the lease token "
        "later calls must carry. Null otherwise.",
    )
    heartbeat_timeout: float | None = Field(
        default=None,
        description="Only in the answers to start and heartbeat: the server's watchdog "
        "timeout in seconds (a run silent for longer goes lost); clients beat well inside it.",
    )
    metrics: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="Per metric name: `last`, `last_step`, `min`, `min_step`, `max`, "
        "`max_step`, `updated_at` (min/max over finite values; `last` may be `NaN`, "
        "`Infinity`, `-Infinity`). Set on reads of runs, null in answers to transitions.",
    )


class BestRun(BaseModel):
    experiment_id: str
    variation: int
    run: int
    key: str = Field(description="`E/V/R`.")
    state: RunState
    metric: str
    mode: Literal["min", "max"]
    value: float | str = Field(description="The run's best (min or max) value of `metric`.")
    step: int | None = Field(default=None, description="The step of that value.")
    last: float | str | None = Field(default=None, description="The run's last value.")
    checkpoint: dict[str, Any] | None = Field(
        default=None,
        description="The run's checkpoint asset recorded with the best value of `metric`: "
        "`name`, `value`, `step`, `epoch`, `metric`, `sha256`, `size`, `directory` "
        "(a directory of assets, e.g. `checkpoint-500`: no `sha256`, `files` counted).",
    )


class RunList(_Page):
    runs: list[Run]


class Event(BaseModel):
    id: int
    kind: Literal["transition", "asset", "teardown", "worker"]
    from_state: str | None
    to_state: str | None
    at: float
    cause: str = Field(
        description="What caused it: start, resume, heartbeat, succeed, "
        "fail_crash, fail_abandoned, watchdog, create, upload; for a `teardown` event "
        "(recorded by the supervisor of a Chronicle-managed worker, never a state change): "
        "teardown_requested, teardown_done, teardown_failed; for a `worker` event (a "
        "managed worker naming its process or SLURM job): worker_started."
    )
    detail: dict[str, Any] | None = None


class EventList(_Page):
    events: list[Event]


class Asset(BaseModel):
    name: str
    size: int
    sha256: str
    created_at: float


class AssetList(_Page):
    assets: list[Asset]


class UploadStatus(BaseModel):
    upload_id: str
    name: str
    offset: int = Field(description="Bytes safely stored: send the next chunk at this offset.")
    size: int | None = None
    completed: bool = False
    sha256: str | None = None


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="Stable machine-readable code, e.g. `invalid_transition`.")
    message: str = Field(description="What went wrong, for people.")


class ErrorResponse(BaseModel):
    """Every error has this shape; extra keys in ``error`` carry details (``state``,
    ``offset``, ``field``...)."""

    error: ErrorDetail
