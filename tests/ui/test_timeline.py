"""The timeline's layout from an event log, without a server: spans, gaps, marks, the end."""

from __future__ import annotations

from chronicle_integrations._models import Event, RunInfo
from chronicle_integrations.lifecycle import RunState
from chronicle_integrations.server.ui.timeline import WIDTH, build_timeline


def event(
    i: int,
    at: float,
    to: str | None,
    src: str | None = None,
    cause: str = "x",
    kind: str = "transition",
    detail: dict | None = None,
) -> Event:
    return Event(i, kind, src, to, at, cause, detail)


def info(state: RunState, **kw: float) -> RunInfo:
    return RunInfo("e", 0, 0, state, created_at=0.0, **kw)  # type: ignore[arg-type]


def test_spans_follow_transitions_and_merge_repeats() -> None:
    events = [
        event(1, 0, "pending", cause="create"),
        event(2, 10, "running", "pending", "start"),
        event(3, 15, "running", "running", "resume"),  # same state: one span goes on
        event(4, 20, None, kind="asset", cause="upload", detail={"name": "m", "size": 3}),
        event(5, 40, "lost", "running", "watchdog"),  # no detail: the sweep's event
        event(6, 50, "running", "lost", "heartbeat"),
        event(7, 60, "failed_crash", "running", "fail_crash"),
    ]
    t = build_timeline(events, info(RunState.FAILED_CRASH, started_at=10), 99, heartbeat_timeout=25)
    assert [(s.state, s.start, s.end) for s in t.spans] == [
        ("pending", 0, 10),
        ("running", 10, 40),
        ("lost", 40, 50),
        ("running", 50, 60),
    ]
    assert [(g.start, g.end) for g in t.gaps] == [(15, 40)]
    assert [m.event_id for m in t.marks] == [1, 2, 3, 4, 5, 6, 7]
    assert t.ended is not None and t.ended.kind == "failed_crash" and t.ended.at == 60
    assert (t.start, t.end) == (0, 60)
    assert t.spans[0].x == 10 and t.spans[-1].x + t.spans[-1].width <= WIDTH


def test_a_live_run_extends_to_now_with_its_current_silence() -> None:
    events = [
        event(1, 0, "pending"),
        event(2, 10, "running", "pending"),
        event(3, 30, "lost", "running", "watchdog", detail={"silent_for": 15}),
    ]
    run = info(RunState.LOST, started_at=10, last_heartbeat_at=15)
    t = build_timeline(events, run, 100, heartbeat_timeout=15)
    assert t.spans[-1].state == "lost" and t.spans[-1].end == 100 and t.spans[-1].live
    # the watchdog's gap of this stint is replaced by the silence that goes on
    assert [(g.start, g.end, g.live) for g in t.gaps] == [(15, 100, True)]
    assert t.ended is None and t.end == 100


def test_truncated_logs_do_not_invent_an_ending() -> None:
    events = [event(1, 0, "pending"), event(2, 10, "running", "pending")]
    t = build_timeline(
        events, info(RunState.RUNNING, started_at=10), 500, heartbeat_timeout=15, truncated=True
    )
    assert t.truncated and t.spans[-1].end == 10 and not t.spans[-1].live and not t.gaps
