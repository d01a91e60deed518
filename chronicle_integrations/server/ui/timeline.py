"""A run's timeline, drawn from its event log: state spans, heartbeat gaps and marks on one
time axis, laid out for an inline SVG (the template only draws what this computes).

* **Spans**: every transition starts a span of its ``to_state``, which lasts until the next
  transition (consecutive spans of one state, e.g. a ``resume`` of a running run, are
  merged). A terminal transition ends the last span; a live run's last span ends at the
  store's ``now``.
* **Gaps**: the silences the watchdog saw. A watchdog ``running -> lost`` transition comes
  ``heartbeat_timeout`` (or its ``silent_for``) after the last sign of life, so the gap is
  ``[at - silent_for, at]``; a run
  that is still ``running`` or ``lost`` shows the silence since its last sign of life
  (``COALESCE(last_heartbeat_at, started_at)``, the store's rule) up to ``now``. Heartbeats
  themselves are not events, so this is all a timeline can honestly show of them.
* **Marks**: every transition, asset upload and worker event (``teardown``...) at its time.

Nothing here reads the store: the view passes the events (one bounded page), the run's
record and the store's clock, so the timeline cannot disagree with ``chronicle events``.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..._models import Event, RunInfo
from ...lifecycle import RunState

__all__ = ["Gap", "Mark", "Span", "Timeline", "build_timeline", "utc"]

#: Drawing area of the SVG, in its own units (it scales to the page's width).
WIDTH = 960.0
LEFT = 10.0
RIGHT = 10.0
#: Shorter than this (units) is drawn this wide, so that a brief span stays visible.
MIN_WIDTH = 1.5
#: Axis ticks drawn (evenly spaced, labelled with UTC times).
TICKS = 5


def utc(ts: float | None) -> str:
    """``2026-12-01 13:45:02 UTC`` (pages show UTC: the store's clock, no browser zone)."""
    if ts is None:
        return "-"
    moment = _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Span:
    """A stretch of time the run spent in ``state`` (``live``: still going at ``now``)."""

    state: str
    start: float
    end: float
    live: bool = False
    x: float = 0.0
    width: float = 0.0


@dataclass(frozen=True)
class Gap:
    """A silence: no heartbeat from ``start`` to ``end`` (``live``: still silent)."""

    start: float
    end: float
    live: bool = False
    x: float = 0.0
    width: float = 0.0


@dataclass(frozen=True)
class Mark:
    """An event at a moment: ``kind`` is the event's (``transition``, ``asset``, ...)."""

    at: float
    kind: str
    label: str
    event_id: int
    x: float = 0.0


@dataclass(frozen=True)
class Tick:
    at: float
    x: float
    label: str


@dataclass
class Timeline:
    """Everything the run page's SVG draws, already placed on the x axis."""

    start: float
    end: float
    spans: list[Span] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    #: The event log had more entries than the page that was drawn.
    truncated: bool = False
    #: The terminal state the run ended in (drawn as a cap where it ended), if it ended.
    ended: Mark | None = None
    width: float = WIDTH


def build_timeline(
    events: Sequence[Event],
    info: RunInfo,
    now: float,
    *,
    heartbeat_timeout: float,
    truncated: bool = False,
) -> Timeline:
    """Lay out the timeline of ``info``'s run from ``events`` (oldest first) at ``now``;
    ``heartbeat_timeout``: the store's, the silence behind a watchdog ``lost`` whose event
    does not say (the set-based sweep records none)."""
    spans: list[tuple[str, float, float, bool]] = []
    gaps: list[tuple[float, float, bool]] = []
    marks: list[tuple[float, str, str, int]] = []
    for event in events:
        marks.append((event.at, event.kind, _mark_label(event), event.id))
        if event.kind != "transition" or event.to_state is None:
            continue
        if spans:
            state, start, _, _ = spans[-1]
            spans[-1] = (state, start, event.at, False)
        if RunState(event.to_state).is_terminal:
            continue
        if not spans or spans[-1][0] != event.to_state:  # (same state: the span goes on)
            spans.append((event.to_state, event.at, event.at, False))
        if event.cause == "watchdog" and event.to_state == RunState.LOST.value:
            silent = (event.detail or {}).get("silent_for", heartbeat_timeout)
            if isinstance(silent, (int, float)) and not isinstance(silent, bool):
                gaps.append((event.at - float(silent), event.at, False))
    live = not info.state.is_terminal and not truncated
    if spans and live and not RunState(spans[-1][0]).is_terminal:
        state, start, _, _ = spans[-1]
        spans[-1] = (state, start, max(now, start), True)
    if live and info.state in (RunState.RUNNING, RunState.LOST):
        alive_at = info.last_heartbeat_at or info.started_at
        if alive_at is not None:
            # The current silence replaces the watchdog's gap of the same stint.
            gaps = [g for g in gaps if abs(g[0] - alive_at) > 1e-6]
            gaps.append((alive_at, max(now, alive_at), True))

    times = [s[1] for s in spans] + [s[2] for s in spans] + [m[0] for m in marks]
    times += [g[0] for g in gaps] + [g[1] for g in gaps]
    start = min(times) if times else info.created_at
    end = max(times) if times else now
    if end - start < 1e-3:
        end = start + 1.0
    scale = (WIDTH - LEFT - RIGHT) / (end - start)

    def x(at: float) -> float:
        return round(LEFT + (at - start) * scale, 2)

    def width(a: float, b: float) -> float:
        return round(max(MIN_WIDTH, (b - a) * scale), 2)

    timeline = Timeline(start=start, end=end, truncated=truncated)
    timeline.spans = [Span(s, a, b, lv, x(a), width(a, b)) for s, a, b, lv in spans]
    timeline.gaps = [Gap(a, b, lv, x(a), width(a, b)) for a, b, lv in gaps]
    timeline.marks = [Mark(at, kind, label, eid, x(at)) for at, kind, label, eid in marks]
    for event in events:
        if event.kind == "transition" and event.to_state and RunState(event.to_state).is_terminal:
            timeline.ended = Mark(
                event.at, event.to_state, _mark_label(event), event.id, x(event.at)
            )
    step = (end - start) / (TICKS - 1)
    timeline.ticks = [
        Tick(start + i * step, x(start + i * step), utc(start + i * step)[11:19])
        for i in range(TICKS)
    ]
    return timeline


def _mark_label(event: Event) -> str:
    """A short description of an event for its tooltip."""
    when = utc(event.at)
    if event.kind == "transition":
        src = event.from_state or "-"
        return f"{when}: {src} -> {event.to_state} ({event.cause})"
    detail = event.detail or {}
    if event.kind == "asset":
        return f"{when}: asset {detail.get('name', '?')} uploaded ({detail.get('size', '?')} B)"
    return f"{when}: {event.kind} ({event.cause})"
