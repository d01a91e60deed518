"""Metric summaries, objectives, checkpoint metrics and ``best`` in the store, on SQLite and
PostgreSQL: the merge rule (last by step, NaN kept out of min/max), the per-run name cap with
nothing partial stored, the lease, the stall clock, and the migration of an older database."""

from __future__ import annotations

import hashlib
import io
import math

import pytest
import sqlalchemy as sa

from chronicle_integrations import InvalidMetric, InvalidRequest, LeaseConflict, NotFound
from chronicle_integrations._metrics import MAX_METRICS
from chronicle_integrations.lifecycle import RunState
from chronicle_integrations.store import Store
from chronicle_integrations.store import schema as t


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(store_url: str, tmp_path, clock: Clock) -> Store:
    s = Store.open(store_url, tmp_path / "assets", heartbeat_timeout=100.0, clock=clock)
    yield s
    s.close()


def _started(store: Store, name: str = "m", runs: int = 1, **kw) -> tuple[str, list[str]]:
    exp = store.create_experiment(name, [{"i": i} for i in range(runs)], **kw).experiment_id
    leases = []
    for v in range(runs):
        store.create_run(exp, v)
        leases.append(store.start(exp, v, 0).lease)
    return exp, leases


def test_summary_last_min_max_with_steps(store: Store, clock: Clock) -> None:
    exp, (lease,) = _started(store)
    store.heartbeat(exp, 0, 0, lease, metrics={"val/loss": {"last": 0.5, "step": 10}})
    clock.now += 1
    store.heartbeat(
        exp,
        0,
        0,
        lease,
        metrics={
            "val/loss": {
                "last": 0.4,
                "step": 30,
                "min": 0.2,
                "min_step": 20,
                "max": 0.9,
                "max_step": 5,
            }
        },
    )
    summary = store.get_run(exp, 0, 0).metrics["val/loss"]
    assert summary == {
        "last": 0.4,
        "last_step": 30,
        "min": 0.2,
        "min_step": 20,
        "max": 0.9,
        "max_step": 5,
        "updated_at": clock.now,
    }


def test_replayed_lower_steps_do_not_overwrite_a_later_last(store: Store, clock: Clock) -> None:
    exp, (lease,) = _started(store)
    store.heartbeat(exp, 0, 0, lease, metrics={"loss": {"last": 0.1, "step": 1000}})
    # A restarted worker resumes from an older checkpoint and replays steps 500..
    lease2 = store.start(exp, 0, 0, resume=True).lease
    clock.now += 5
    store.heartbeat(exp, 0, 0, lease2, metrics={"loss": {"last": 0.05, "step": 500}})
    summary = store.get_run(exp, 0, 0).metrics["loss"]
    assert (summary["last"], summary["last_step"]) == (0.1, 1000)
    assert (summary["min"], summary["min_step"]) == (0.05, 500)  # a better value still counts
    store.heartbeat(exp, 0, 0, lease2, metrics={"loss": {"last": 0.3, "step": 1001}})
    assert store.get_run(exp, 0, 0).metrics["loss"]["last"] == 0.3


def test_nan_and_inf_kept_as_last_never_min_max(store: Store) -> None:
    exp, (lease,) = _started(store)
    store.heartbeat(exp, 0, 0, lease, metrics={"a": 1.5, "b": "NaN", "c": "Infinity"})
    store.heartbeat(exp, 0, 0, lease, metrics={"a": "NaN"})
    metrics = store.get_run(exp, 0, 0).metrics
    assert math.isnan(metrics["a"]["last"]) and metrics["a"]["min"] == metrics["a"]["max"] == 1.5
    assert math.isnan(metrics["b"]["last"]) and metrics["b"]["min"] is None
    assert metrics["c"]["last"] == math.inf and metrics["c"]["max"] is None
    # The record survives JSON and back.
    again = type(store.get_run(exp, 0, 0)).from_dict(store.get_run(exp, 0, 0).to_dict())
    assert math.isnan(again.metrics["b"]["last"]) and again.metrics["c"]["last"] == math.inf


@pytest.mark.parametrize(
    "bad",
    [
        {"a/../b": 1.0},
        {"a\x00b": 1.0},
        {"tab\tname": 1.0},
        {"": 1.0},
        {"x" * 300: 1.0},
        {"s": "fast"},
        {"t": True},
        {"m": {"last": 1.0, "min": "NaN"}},
        {"st": {"last": 1.0, "step": -1}},
    ],
)
def test_invalid_metrics_refuse_the_whole_beat(store: Store, clock: Clock, bad: dict) -> None:
    exp, (lease,) = _started(store)
    before = store.get_run(exp, 0, 0)
    clock.now += 3
    with pytest.raises(InvalidMetric) as info:
        store.heartbeat(exp, 0, 0, lease, metrics={"ok": 1.0, **bad})
    assert info.value.code == "invalid_request" and info.value.details["field"] == "metrics"
    after = store.get_run(exp, 0, 0)
    assert after.metrics is None
    assert after.last_heartbeat_at == before.last_heartbeat_at  # nothing partial


def test_name_cap_per_run_nothing_partial(store: Store) -> None:
    exp, (lease,) = _started(store)
    store.heartbeat(exp, 0, 0, lease, metrics={f"m{i}": float(i) for i in range(MAX_METRICS - 2)})
    with pytest.raises(InvalidMetric):
        store.heartbeat(exp, 0, 0, lease, metrics={"m0": 9.0, "n1": 1.0, "n2": 2.0, "n3": 3.0})
    metrics = store.get_run(exp, 0, 0).metrics
    assert len(metrics) == MAX_METRICS - 2 and metrics["m0"]["last"] == 0.0
    with pytest.raises(InvalidRequest):  # 10,000 names in one request
        store.heartbeat(exp, 0, 0, lease, metrics={f"x{i}": 1.0 for i in range(10_000)})
    store.heartbeat(exp, 0, 0, lease, metrics={"n1": 1.0, "n2": 2.0})  # exactly the cap
    assert len(store.get_run(exp, 0, 0).metrics) == MAX_METRICS
    # Known names still update at the cap.
    store.succeed(exp, 0, 0, lease, metrics={"n1": 0.5})
    assert store.get_run(exp, 0, 0).metrics["n1"]["min"] == 0.5


def test_metrics_need_the_lease(store: Store) -> None:
    exp, (lease,) = _started(store)
    store.start(exp, 0, 0, resume=True)  # taken over
    with pytest.raises(LeaseConflict):
        store.heartbeat(exp, 0, 0, lease, metrics={"loss": 1.0})
    with pytest.raises(LeaseConflict):
        store.succeed(exp, 0, 0, lease, metrics={"loss": 1.0})
    # An operator's cancellation (no lease) may not carry metrics either.
    with pytest.raises(LeaseConflict):
        store.fail(exp, 0, 0, "abandoned", metrics={"loss": 1.0})
    assert store.get_run(exp, 0, 0).metrics is None


def test_metrics_do_not_count_as_progress(store: Store, clock: Clock) -> None:
    exp, (lease,) = _started(store)
    store.heartbeat(exp, 0, 0, lease, progress={"step": 1})
    at = store.get_run(exp, 0, 0).progress_at
    for i in range(3):
        clock.now += 10
        store.heartbeat(exp, 0, 0, lease, progress={"step": 1}, metrics={"val": float(i)})
    assert store.get_run(exp, 0, 0).progress_at == at


def test_heartbeat_many_with_metrics(store: Store, clock: Clock) -> None:
    exp, leases = _started(store, runs=3)
    results = store.heartbeat_many(
        [
            (exp, 0, 0, leases[0], None, {"loss": 0.3}, None),
            (exp, 1, 0, leases[1], {"step": 2}, {"loss": {"last": 0.2, "step": 2}}, None),
            (exp, 2, 0, leases[2], None),  # the old 5-tuple still works
        ]
    )
    assert all(r.state is RunState.RUNNING for r in results)
    assert store.get_run(exp, 1, 0).metrics["loss"]["last_step"] == 2
    assert store.get_run(exp, 2, 0).metrics is None
    # One bad beat in a batch fails alone.
    results = store.heartbeat_many(
        [
            (exp, 0, 0, leases[0], None, {"loss": 0.1}, None),
            (exp, 1, 0, "stale-lease-xxxx", None, {"loss": 0.0}, None),
            (exp, 2, 0, leases[2], None, {f"k{i}": 1.0 for i in range(MAX_METRICS + 1)}, None),
        ]
    )
    assert results[0].state is RunState.RUNNING
    assert isinstance(results[1], LeaseConflict) and isinstance(results[2], InvalidMetric)
    assert store.get_run(exp, 0, 0).metrics["loss"]["min"] == 0.1
    assert store.get_run(exp, 1, 0).metrics["loss"]["min"] == 0.2
    assert store.get_run(exp, 2, 0).metrics is None
    # Over the cap only across requests (the batch's one statement sees it): that beat
    # alone is refused, the others of the batch go through.
    store.heartbeat(exp, 2, 0, leases[2], metrics={f"k{i}": 1.0 for i in range(MAX_METRICS - 1)})
    results = store.heartbeat_many(
        [
            (exp, 0, 0, leases[0], None, {"loss": 0.05}, None),
            (exp, 2, 0, leases[2], None, {"new1": 1.0, "new2": 2.0}, None),
        ]
    )
    assert results[0].state is RunState.RUNNING and isinstance(results[1], InvalidMetric)
    assert store.get_run(exp, 0, 0).metrics["loss"]["min"] == 0.05
    assert len(store.get_run(exp, 2, 0).metrics) == MAX_METRICS - 1


def _put(store: Store, exp: str, v: int, lease: str, name: str, data: bytes) -> None:
    store.put_asset(
        exp, v, 0, name, io.BytesIO(data), hashlib.sha256(data).hexdigest(), lease=lease
    )


def test_objective_and_best_with_checkpoint(store: Store, clock: Clock) -> None:
    exp, leases = _started(store, runs=4, objective={"metric": "val/loss", "mode": "min"})
    assert store.get_experiment(exp).objective == {"metric": "val/loss", "mode": "min"}
    losses = [0.5, 0.2, 0.3, 0.1]
    for v, lease in enumerate(leases):
        for name in ("a.ckpt", "b.ckpt"):
            _put(store, exp, v, lease, name, f"{v}-{name}".encode())
        store.heartbeat(
            exp,
            v,
            0,
            lease,
            metrics={"val/loss": losses[v], "acc": 1 - losses[v]},
            checkpoints={
                "a.ckpt": {"metric": "val/loss", "value": losses[v], "step": 10, "epoch": 0},
                "b.ckpt": {"metric": "val/loss", "value": losses[v] + 0.1, "step": 20, "epoch": 1},
                "never-uploaded.ckpt": {"metric": "val/loss", "value": -1.0},
            },
        )
    for v in (0, 1, 2):
        store.succeed(exp, v, 0, leases[v])
    # Run 3 (best value) is still running: not counted unless asked.
    best = store.best(exp)
    assert (best.variation, best.value, best.state) == (1, 0.2, RunState.SUCCEEDED)
    assert best.checkpoint["name"] == "a.ckpt" and best.checkpoint["epoch"] == 0
    assert best.checkpoint["sha256"] == hashlib.sha256(b"1-a.ckpt").hexdigest()
    running = store.best(exp, include_running=True)
    assert (running.variation, running.state) == (3, RunState.RUNNING)
    assert store.best(exp, "acc").value == 0.5  # another metric: ascending by default
    assert store.best(exp, "acc", "max").variation == 1
    store.set_objective(exp, {"metric": "acc", "mode": "max"})
    assert store.best(exp).metric == "acc" and store.best(exp).variation == 1
    with pytest.raises(NotFound):
        store.best(exp, "no-such-metric")
    with pytest.raises(InvalidMetric):
        store.best(exp, "acc", "sideways")
    store.set_objective(exp, None)
    with pytest.raises(InvalidMetric):
        store.best(exp)
    with pytest.raises(InvalidMetric):
        store.set_objective(exp, {"metric": "x", "mode": "up"})


def test_best_checkpoint_of_a_directory_asset(store: Store) -> None:
    exp, (lease,) = _started(store)
    _put(store, exp, 0, lease, "checkpoint-500/model.bin", b"weights")
    _put(store, exp, 0, lease, "checkpoint-500/config.json", b"{}")
    store.succeed(
        exp,
        0,
        0,
        lease,
        metrics={"eval_loss": 0.7},
        checkpoints={"checkpoint-500": {"metric": "eval_loss", "value": 0.7, "step": 500}},
    )
    best = store.best(exp, "eval_loss")
    assert best.checkpoint["directory"] is True and best.checkpoint["files"] == 2


def test_best_uses_the_index(tmp_path) -> None:
    """The plan of ``best``'s query walks ix_run_metrics_min (SQLite's EXPLAIN QUERY PLAN;
    PostgreSQL chooses by statistics: measured over 100,000 runs in the benchmark instead)."""
    store = Store.open(f"sqlite:///{tmp_path / 'plan.db'}", tmp_path / "assets")
    rm = t.run_metrics.c
    query = (
        sa.select(rm.run)
        .where(rm.experiment_id == "e", rm.name == "m", rm.min.is_not(None))
        .order_by(rm.min)
        .limit(64)
    )
    compiled = query.compile(store.engine, compile_kwargs={"literal_binds": True})
    with store.engine.connect() as conn:
        plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
    store.close()
    assert "ix_run_metrics_min" in plan and "TEMP B-TREE" not in plan, plan


def _sorted_keys(store: Store, exp: str | None, limit: int, **kw) -> list[tuple[str, int]]:
    """Walk a sorted runs listing page by page (each page at most ``limit`` runs)."""
    keys: list[tuple[str, int]] = []
    cursor = None
    while True:
        page = store.page_runs(exp, limit=limit, cursor=cursor, **kw)
        assert 0 < len(page.items) <= limit or (not page.items and page.next_cursor is None)
        keys += [(i.experiment_id, i.variation) for i in page.items]
        cursor = page.next_cursor
        if cursor is None:
            return keys


def test_runs_sorted_by_a_metric_in_the_store(store: Store, clock: Clock) -> None:
    """``page_runs(sort=M)``: best first by each run's min (max in mode max), ties and the
    runs without a value (none logged, only NaN, another metric only) in key order, those
    last; the same order over pages of any size, across the boundary between the two."""
    exp, leases = _started(store, "sorted", runs=7, objective={"metric": "val/loss", "mode": "max"})
    summaries: dict[int, dict] = {
        0: {"val/loss": 0.3},
        1: {"val/loss": {"last": 0.5, "step": 2, "min": 0.1, "min_step": 1, "max": 0.5}},
        2: {"val/loss": 0.3},  # ties with variation 0
        4: {"val/loss": float("nan")},  # a value, but no min / max
        5: {"val/loss": 0.2},
        6: {"acc": 0.9},  # another metric only; variation 3 logs nothing
    }
    for v, metrics in summaries.items():
        store.heartbeat(exp, v, 0, leases[v], metrics=metrics)
    other, (lease,) = _started(store, "other")
    store.heartbeat(other, 0, 0, lease, metrics={"val/loss": 0.15})
    by_min = [1, 5, 0, 2, 3, 4, 6]
    by_max = [1, 0, 2, 5, 3, 4, 6]
    for limit in (1, 2, 3, 100):
        assert _sorted_keys(store, exp, limit, sort="val/loss", mode="min") == [
            (exp, v) for v in by_min
        ]
        # The objective is val/loss, max: its mode by default.
        assert _sorted_keys(store, exp, limit, sort="val/loss") == [(exp, v) for v in by_max]
    assert [v for _, v in _sorted_keys(store, exp, 2, sort="acc")] == [6, 0, 1, 2, 3, 4, 5]
    # Every experiment: ranked together, ties and the rest by (experiment, variation, run).
    everything = _sorted_keys(store, None, 2, sort="val/loss", mode="min")
    assert everything[:3] == [(exp, 1), (other, 0), (exp, 5)]
    assert len(everything) == 8 and everything[-3:] == [(exp, 3), (exp, 4), (exp, 6)]
    # The effective state filters both parts; a run's record is complete.
    for v in (2, 3):
        store.succeed(exp, v, 0, leases[v])
    succeeded = store.page_runs(exp, "succeeded", sort="val/loss", mode="min").items
    assert [i.variation for i in succeeded] == [2, 3]
    assert succeeded[0].metrics["val/loss"]["min"] == 0.3 and succeeded[1].metrics is None
    # An unknown experiment is an empty listing, as without sort.
    assert store.page_runs("no-such-experiment", sort="val/loss").items == []


def test_sorted_runs_bad_input(store: Store) -> None:
    exp, (lease,) = _started(store, "bad-sort", runs=1)
    store.heartbeat(exp, 0, 0, lease, metrics={"m": 1.0})
    store.create_run(exp, 0)
    page = store.page_runs(exp, limit=1, sort="m")
    assert page.next_cursor is not None
    with pytest.raises(InvalidRequest):  # a cursor belongs to its sort and mode
        store.page_runs(exp, limit=1, cursor=page.next_cursor, sort="other")
    with pytest.raises(InvalidRequest):
        store.page_runs(exp, limit=1, cursor=page.next_cursor, sort="m", mode="max")
    with pytest.raises(InvalidRequest):  # nor is a plain listing's cursor a sorted one's
        store.page_runs(exp, limit=1, cursor=store.page_runs(exp, limit=1).next_cursor, sort="m")
    with pytest.raises(InvalidRequest):
        store.page_runs(exp, limit=1, cursor=page.next_cursor)
    with pytest.raises(InvalidMetric):
        store.page_runs(exp, sort="a/../b")
    with pytest.raises(InvalidMetric):
        store.page_runs(exp, sort="m", mode="sideways")
    with pytest.raises(InvalidRequest):
        store.page_runs(exp, mode="max")


def test_older_database_is_migrated(store_url: str, tmp_path) -> None:
    """A version-3 database (before metrics) opens, migrates, and keeps its experiments."""
    s = Store.open(store_url, tmp_path / "assets")
    exp = s.create_experiment("old", [{}]).experiment_id
    with s.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE run_metrics"))
        conn.execute(sa.text("DROP TABLE asset_metrics"))
        conn.execute(sa.text("ALTER TABLE experiments DROP COLUMN objective_metric"))
        conn.execute(sa.text("ALTER TABLE experiments DROP COLUMN objective_mode"))
        conn.execute(t.schema_version.update().values(version=3))
    s.close()
    s = Store.open(store_url, tmp_path / "assets")
    try:
        assert s.get_experiment(exp).objective is None
        s.set_objective(exp, {"metric": "loss"})
        assert s.get_experiment(exp).objective == {"metric": "loss", "mode": "min"}
    finally:
        s.close()
