"""Plain records returned by the store and the client: runs, experiments, events, assets.

They are frozen dataclasses with ``to_dict`` / ``from_dict`` so the same objects travel through
the HTTP API as JSON and come back identical on the client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from .lifecycle import RunState

__all__ = [
    "AssetInfo",
    "BestRun",
    "Event",
    "ExperimentInfo",
    "Page",
    "RunInfo",
    "RunKey",
    "UploadStatus",
    "walk_pages",
]


class RunKey(NamedTuple):
    """A run's identity, ``(experiment_id, variation, run)``; a tuple, so it unpacks and
    compares like one. ``str(key)`` is the ``E/V/R`` form the CLI and logs use."""

    experiment_id: str
    variation: int
    run: int

    def __str__(self) -> str:
        return f"{self.experiment_id}/{self.variation}/{self.run}"


T = TypeVar("T", bound="_Record")
R = TypeVar("R")


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (enums become their string values)."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, RunState) else value
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build from a dict, ignoring keys this version does not know (forward compatible)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ExperimentInfo(_Record):
    """An experiment: a name and numbered variations (one config each)."""

    experiment_id: str
    name: str
    created_at: float
    variations: int = 0
    #: What "best" means for its runs: ``{"metric": "val/loss", "mode": "min"}``, or None.
    objective: dict[str, str] | None = None


@dataclass(frozen=True)
class RunInfo(_Record):
    """A snapshot of one run. ``state`` is the effective state at the time of the read."""

    experiment_id: str
    variation: int
    run: int
    state: RunState
    created_at: float
    started_at: float | None = None
    last_heartbeat_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None
    message: str | None = None
    lease_holder: str | None = None
    asset_count: int = 0
    #: The latest progress a heartbeat carried (e.g. ``{"step": 120, "epoch": 3}``).
    progress: dict[str, Any] | None = None
    #: When that progress last advanced (store clock).
    progress_at: float | None = None
    #: True for a running run whose heartbeats stopped carrying new progress for longer than
    #: the store's ``stall_timeout``: alive, but perhaps hung. A flag, not a state.
    stalled: bool = False
    #: Only set in the answer to ``start``: the token later calls must carry.
    lease: str | None = field(default=None, repr=False)
    #: Only set in the answers to ``start`` and ``heartbeat``: the store's watchdog timeout,
    #: in seconds (a run silent for longer goes ``lost``). Clients beat well inside it.
    heartbeat_timeout: float | None = None
    #: Per metric name, the run's summary: ``{"last", "last_step", "min", "min_step", "max",
    #: "max_step", "updated_at"}`` (``min``/``max`` over finite values only; ``last`` may be
    #: NaN or infinite). Set on reads of runs (``info()``, listings); None in the answers to
    #: transitions and heartbeats.
    metrics: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.state, RunState):
            object.__setattr__(self, "state", RunState(self.state))
        if self.metrics:
            _decode_metrics(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite metric values become ``"NaN"`` / ``"Infinity"`` /
        ``"-Infinity"`` (JSON has no NaN), turned back into floats by ``from_dict``."""
        out = super().to_dict()
        if self.metrics:
            out["metrics"] = {
                name: {k: _encode(v) for k, v in summary.items()}
                for name, summary in self.metrics.items()
            }
        return out

    @property
    def key(self) -> str:
        """``experiment/variation/run``, as the CLI prints and accepts it."""
        return f"{self.experiment_id}/{self.variation}/{self.run}"

    @property
    def key_tuple(self) -> RunKey:
        """``(experiment_id, variation, run)`` as a :class:`RunKey`."""
        return RunKey(self.experiment_id, self.variation, self.run)


@dataclass(frozen=True)
class BestRun(_Record):
    """The answer to "which run is best" (``chronicle best``): the run with the best value
    of ``metric`` in direction ``mode`` (``min``: its smallest value, ``max``: its largest),
    and its best checkpoint: the asset an integration recorded as saved for that metric with
    the best value (``{"name", "value", "step", "epoch", "metric", "sha256", "size",
    "directory"}``; a directory asset such as HF's ``checkpoint-500`` has ``directory`` true
    and no digest), or None."""

    experiment_id: str
    variation: int
    run: int
    state: RunState
    metric: str
    mode: str
    value: float
    step: int | None = None
    last: float | None = None
    checkpoint: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.state, RunState):
            object.__setattr__(self, "state", RunState(self.state))
        for name in ("value", "last"):
            object.__setattr__(self, name, _decode(getattr(self, name)))
        if self.checkpoint and "value" in self.checkpoint:
            self.checkpoint["value"] = _decode(self.checkpoint["value"])

    @property
    def key(self) -> str:
        """``experiment/variation/run``."""
        return f"{self.experiment_id}/{self.variation}/{self.run}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite values as in :meth:`RunInfo.to_dict`)."""
        out = super().to_dict()
        out["key"] = self.key
        out["value"], out["last"] = _encode(self.value), _encode(self.last)
        if self.checkpoint:
            out["checkpoint"] = {**self.checkpoint, "value": _encode(self.checkpoint.get("value"))}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BestRun:
        """Build from a dict (``key`` and unknown keys ignored)."""
        return super().from_dict({k: v for k, v in data.items() if k != "key"})


_SPECIAL = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _encode(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode(value: Any) -> Any:
    return _SPECIAL.get(value, value) if isinstance(value, str) else value


def _decode_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    for summary in metrics.values():
        for k, v in summary.items():
            if isinstance(v, str):
                summary[k] = _decode(v)


@dataclass(frozen=True)
class Event(_Record):
    """One entry of a run's timeline: a transition (``kind="transition"``) or a completed
    asset upload (``kind="asset"``, with name, size and sha256 in ``detail``)."""

    id: int
    kind: str
    from_state: str | None
    to_state: str | None
    at: float
    cause: str
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class AssetInfo(_Record):
    """A complete, verified asset of a run."""

    name: str
    size: int
    sha256: str
    created_at: float


@dataclass(frozen=True)
class UploadStatus(_Record):
    """Where a resumable upload stands: ``offset`` bytes are safely stored."""

    upload_id: str
    name: str
    offset: int
    size: int | None = None
    completed: bool = False
    sha256: str | None = None


@dataclass(frozen=True)
class Page(Generic[R]):
    """One page of a listing, in the listing's order, and the opaque cursor of the next page
    (``None`` at the end). Pages are cut on keys, not offsets: an item that exists for the
    whole walk is returned exactly once whatever is inserted meanwhile."""

    items: list[R]
    next_cursor: str | None = None


def walk_pages(fetch: Callable[[str | None], Page[R]]) -> Iterator[R]:
    """Every item of a listing, lazily: ``fetch(cursor)`` gives one page (``None`` for the
    first); the next page is fetched only when the previous one is used up."""
    cursor: str | None = None
    while True:
        page = fetch(cursor)
        yield from page.items
        if page.next_cursor is None or not page.items:
            return
        cursor = page.next_cursor
