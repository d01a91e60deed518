"""The overview reads (the web view's counts per state and config ranges) agree with the
records the API returns, on SQLite and PostgreSQL, across every state and the stalled flag."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from chronicle_integrations.lifecycle import RunState
from chronicle_integrations.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_counts_per_state_agree_with_the_records(store_url: str, tmp_path: Path) -> None:
    clock = Clock()
    store = Store.open(
        store_url,
        tmp_path / "assets",
        heartbeat_timeout=10,
        lost_grace=100,
        stall_timeout=5,
        clock=clock,
    )
    try:
        eid = store.create_experiment("s", [{"v": 0}, {"v": 1}], "summary-1").experiment_id
        other = store.create_experiment("o", [{"v": 0}], "summary-2").experiment_id
        empty = store.create_experiment("e", [], "summary-3").experiment_id
        leases = {}
        for r in range(8):
            store.create_run(eid, r % 2)
        store.create_run(other, 0)
        for v, r in [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]:
            leases[(v, r)] = store.start(eid, v, r).lease
        store.heartbeat(eid, 0, 1, lease=leases[(0, 1)], progress={"step": 1})  # -> stalled
        store.heartbeat(eid, 1, 1, lease=leases[(1, 1)], progress={"step": 1})  # advances
        store.succeed(eid, 0, 3, leases[(0, 3)])
        store.fail(eid, 1, 3, "crash", "boom", lease=leases[(1, 3)])
        store.fail(eid, 0, 0, "abandoned")
        clock.now += 8
        store.heartbeat(eid, 0, 1, lease=leases[(0, 1)], progress={"step": 1})
        store.heartbeat(eid, 1, 1, lease=leases[(1, 1)], progress={"step": 2})
        clock.now += 4  # (0,2), (1,2): silent 12 s > 10 -> lost
        store.heartbeat(eid, 0, 1, lease=leases[(0, 1)], progress={"step": 1})
        store.heartbeat(eid, 1, 1, lease=leases[(1, 1)], progress={"step": 3})
        for step in range(23):  # 115 s: (0,2), (1,2) silent 127 s > 110: failed_lost
            clock.now += 5
            store.heartbeat(eid, 0, 1, lease=leases[(0, 1)], progress={"step": 1})
            store.heartbeat(eid, 1, 1, lease=leases[(1, 1)], progress={"step": 4 + step})
        quiet = store.create_run(eid, 0)
        store.start(eid, 0, quiet.run)
        for step in range(2):  # 12 s: the new run is lost (not yet failed_lost)
            clock.now += 6
            store.heartbeat(eid, 0, 1, lease=leases[(0, 1)], progress={"step": 1})
            store.heartbeat(eid, 1, 1, lease=leases[(1, 1)], progress={"step": 100 + step})

        records = store.list_runs(eid)
        summaries = store.experiment_summaries([eid, other, empty])
        got = summaries[eid]
        want = collections.Counter(r.state.value for r in records)
        assert {k: v for k, v in got.counts.items() if v} == dict(want)
        assert set(got.counts) == {s.value for s in RunState}
        assert got.stalled == sum(r.stalled for r in records) == 1
        assert {RunState.LOST.value, RunState.FAILED_LOST.value} <= set(want)
        assert got.runs == len(records)
        assert got.live == sum(not r.state.is_terminal for r in records)
        assert got.last_activity == clock.now  # the latest heartbeat
        assert summaries[other].counts["pending"] == 1 and summaries[other].runs == 1
        assert summaries[empty].runs == 0 and summaries[empty].last_activity is None
        # the per-state filter of the listing (the API's) agrees too
        for state, count in want.items():
            assert len(store.list_runs(eid, state)) == count
    finally:
        store.close()


def test_variation_configs_is_a_bounded_range(store_url: str, tmp_path: Path) -> None:
    store = Store.open(store_url, tmp_path / "assets")
    try:
        eid = store.create_experiment("c", [{"i": i} for i in range(30)], "configs-1").experiment_id
        assert store.variation_configs(eid, 0, 5) == {i: {"i": i} for i in range(5)}
        assert store.variation_configs(eid, 28) == {28: {"i": 28}, 29: {"i": 29}}
        assert store.variation_configs(eid, 100) == {}
        with pytest.raises(ValueError):
            store.variation_configs(eid, 0, 0)
    finally:
        store.close()
