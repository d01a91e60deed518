"""The store itself, on SQLite and PostgreSQL: every row of the transition table, leases, the
watchdog, concurrency across processes, uploads, schema versioning.

The store is real (real database files / a real PostgreSQL); only its clock is a controllable
function, so watchdog timing is exact without sleeping.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import multiprocessing
import os

import pytest
import sqlalchemy as sa

from chronicle_integrations import (
    DigestMismatch,
    InvalidRequest,
    InvalidTransition,
    LeaseConflict,
    NotFound,
    OffsetMismatch,
)
from chronicle_integrations._errors import ConfigurationError
from chronicle_integrations.lifecycle import (
    TERMINAL_TARGET,
    TRANSITIONS,
    Action,
    RunState,
    is_valid_path,
)
from chronicle_integrations.store import Store
from chronicle_integrations.store import schema as t

TIMEOUT, GRACE = 100.0, 1000.0


class Clock:
    """A settable clock for the store (the store's clock is the only one that counts)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(store_url: str, tmp_path, clock: Clock) -> Store:
    s = Store.open(
        store_url, tmp_path / "assets", heartbeat_timeout=TIMEOUT, lost_grace=GRACE, clock=clock
    )
    yield s
    s.close()


def make_run(store: Store, clock: Clock, state: RunState) -> tuple[tuple[str, int, int], str]:
    """A fresh run brought into ``state``; returns its key and lease (if started)."""
    exp = store.create_experiment("table", [{}]).experiment_id
    key = (exp, 0, store.create_run(exp, 0).run)
    lease = None
    if state is RunState.PENDING:
        return key, lease
    if state is RunState.FAILED_ABANDONED:
        store.fail(*key, "abandoned")
        return key, lease
    lease = store.start(*key).lease
    if state is RunState.SUCCEEDED:
        store.succeed(*key, lease)
    elif state is RunState.FAILED_CRASH:
        store.fail(*key, "crash", "boom", lease)
    elif state is RunState.LOST:
        clock.now += TIMEOUT + 1
    elif state is RunState.FAILED_LOST:
        clock.now += TIMEOUT + GRACE + 1
    assert store.get_run(*key).state is state
    return key, lease


def apply(store: Store, action: Action, key, lease):
    if action is Action.START:
        return store.start(*key)
    if action is Action.RESUME:
        return store.start(*key, resume=True)
    if action is Action.HEARTBEAT:
        return store.heartbeat(*key, lease)
    if action is Action.SUCCEED:
        return store.succeed(*key, lease)
    if action is Action.FAIL_CRASH:
        return store.fail(*key, "crash", "msg", lease)
    return store.fail(*key, "abandoned")


CLIENT_ACTIONS = [a for a in Action if not a.value.startswith("watchdog")]


@pytest.mark.parametrize(
    ("state", "action"), list(itertools.product(RunState, CLIENT_ACTIONS)), ids=lambda x: x.value
)
def test_every_row_of_the_transition_table(
    store: Store, clock: Clock, state: RunState, action: Action
) -> None:
    key, lease = make_run(store, clock, state)
    before = store.events(*key)
    target = TRANSITIONS[action].get(state)
    repeat = TERMINAL_TARGET.get(action) is state
    if target is None and not repeat:
        with pytest.raises(InvalidTransition) as err:
            apply(store, action, key, lease)
        assert err.value.state == state.value
        assert store.get_run(*key).state is state
        assert store.events(*key) == before  # nothing persisted
        return
    info = apply(store, action, key, lease)
    expected = state if repeat else target
    assert info.state is expected
    assert store.get_run(*key).state is expected
    edges = [(e.from_state, e.to_state) for e in store.events(*key) if e.kind == "transition"]
    assert is_valid_path(edges), edges
    if repeat:
        assert len(store.events(*key)) == len(before)  # no effect


def test_terminal_states_never_change(store: Store, clock: Clock) -> None:
    for state in (s for s in RunState if s.is_terminal):
        key, lease = make_run(store, clock, state)
        for action in CLIENT_ACTIONS:
            if TERMINAL_TARGET.get(action) is state:
                continue
            with pytest.raises(InvalidTransition):
                apply(store, action, key, lease)
        clock.now += 10 * (TIMEOUT + GRACE)
        store.sweep()
        assert store.get_run(*key).state is state


def test_leases(store: Store, clock: Clock) -> None:
    key, lease = make_run(store, clock, RunState.RUNNING)
    with pytest.raises(LeaseConflict):
        store.heartbeat(*key, "another-lease-123")
    with pytest.raises(LeaseConflict):
        store.heartbeat(*key, None)
    with pytest.raises(LeaseConflict):
        store.succeed(*key, "another-lease-123")
    with pytest.raises(InvalidTransition):
        store.start(*key)  # a second worker may not start a running run
    # Repeating a start with the lease the run holds is a no-op (a retried request).
    assert store.start(*key, lease=lease).lease == lease
    # Takeover: the stale worker is refused from then on.
    new = store.start(*key, resume=True, holder="worker-2").lease
    assert new != lease
    with pytest.raises(LeaseConflict):
        store.heartbeat(*key, lease)
    with pytest.raises(LeaseConflict):
        store.fail(*key, "crash", None, lease)
    store.heartbeat(*key, new)
    # Cancelling needs no lease.
    assert store.fail(*key, "abandoned").state is RunState.FAILED_ABANDONED
    # A late heartbeat learns the run's state from the error.
    with pytest.raises(InvalidTransition) as err:
        store.heartbeat(*key, new)
    assert err.value.state == "failed_abandoned"
    assert "rerun" in str(err.value)


def test_pending_run_can_crash_without_lease(store: Store, clock: Clock) -> None:
    key, _ = make_run(store, clock, RunState.PENDING)
    assert store.fail(*key, "crash", "failed before start").state is RunState.FAILED_CRASH


def test_watchdog_lost_recovered_and_expired(store: Store, clock: Clock) -> None:
    key, lease = make_run(store, clock, RunState.RUNNING)
    clock.now += TIMEOUT - 1
    assert store.get_run(*key).state is RunState.RUNNING
    clock.now += 2
    assert store.get_run(*key).state is RunState.LOST  # effective on read, before any sweep
    assert [r.run for r in store.list_runs(state="lost")] == [key[2]]
    assert store.sweep() == {"lost": 1, "failed_lost": 0}
    assert store.sweep() == {"lost": 0, "failed_lost": 0}
    assert store.heartbeat(*key, lease).state is RunState.RUNNING  # lost -> running
    clock.now += TIMEOUT + GRACE + 1
    assert store.get_run(*key).state is RunState.FAILED_LOST
    assert store.sweep() == {"lost": 1, "failed_lost": 1}
    info = store.get_run(*key)
    assert info.state is RunState.FAILED_LOST and info.reason == "lost"
    edges = [(e.from_state, e.to_state) for e in store.events(*key)]
    assert edges == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "lost"),
        ("lost", "running"),
        ("running", "lost"),
        ("lost", "failed_lost"),
    ]
    with pytest.raises(InvalidTransition):
        store.heartbeat(*key, lease)


def test_liveness_uses_started_at_when_no_heartbeat(store: Store, clock: Clock) -> None:
    # The Airflow bug: NULL last_heartbeat_at must not keep a run alive forever.
    key, _ = make_run(store, clock, RunState.RUNNING)
    assert store.get_run(*key).last_heartbeat_at is None
    clock.now += TIMEOUT + 1
    assert store.sweep()["lost"] == 1


def test_late_transition_within_grace_is_accepted(store: Store, clock: Clock) -> None:
    key, lease = make_run(store, clock, RunState.RUNNING)
    clock.now += TIMEOUT + GRACE / 2
    store.sweep()
    assert store.succeed(*key, lease).state is RunState.SUCCEEDED
    edges = [(e.from_state, e.to_state) for e in store.events(*key)]
    assert edges[-2:] == [("running", "lost"), ("lost", "succeeded")]


def test_bad_input_is_refused_and_nothing_persisted(store: Store, clock: Clock) -> None:
    for bad in ("", "-x", "a/b", "x" * 129, "ü", 5):
        with pytest.raises(InvalidRequest):
            store.create_experiment("n", [], experiment_id=bad)
    with pytest.raises(InvalidRequest):
        store.create_experiment("n", ["not-a-dict"])
    assert store.list_experiments() == []
    exp = store.create_experiment("n", [{}]).experiment_id
    for v, r in ((-1, 0), (0, -1), (2**31, 0), (0, 2**63), (True, 0)):
        with pytest.raises(InvalidRequest):
            store.get_run(exp, v, r)
    with pytest.raises(NotFound):
        store.create_run(exp, 7)
    with pytest.raises(NotFound):
        store.get_run(exp, 0, 0)
    with pytest.raises(InvalidRequest):
        store.fail(exp, 0, 0, "bored")
    assert store.list_runs() == []


def test_create_experiment_is_idempotent(store: Store) -> None:
    a = store.create_experiment("n", [{"lr": 1}], experiment_id="exp-1")
    b = store.create_experiment("n", [{"lr": 1}], experiment_id="exp-1")
    assert a.experiment_id == b.experiment_id and b.variations == 1
    from chronicle_integrations import AlreadyExists

    with pytest.raises(AlreadyExists):
        store.create_experiment("n", [{"lr": 2}], experiment_id="exp-1")


def test_request_ids_make_creations_idempotent(store: Store) -> None:
    exp = store.create_experiment("n", [{}]).experiment_id
    assert store.add_variation(exp, {"a": 1}, "req-aaaaaaaa") == 1
    assert store.add_variation(exp, {"a": 1}, "req-aaaaaaaa") == 1
    assert store.create_run(exp, 1, "req-bbbbbbbb").run == 0
    assert store.create_run(exp, 1, "req-bbbbbbbb").run == 0
    assert store.create_run(exp, 1).run == 1
    assert [r.run for r in store.list_runs(exp)] == [0, 1]


# -------------------------------------------------------------------- uploads
def test_upload_resume_digest_and_atomic_replace(store: Store, clock: Clock) -> None:
    key, lease = make_run(store, clock, RunState.RUNNING)
    data = os.urandom(3 * 2**20 + 17)
    status = store.begin_upload(*key, "dir/model.ckpt", size=len(data), lease=lease)
    assert store.write_chunk(status.upload_id, 0, [data[: 2**20]]).offset == 2**20
    with pytest.raises(OffsetMismatch) as err:
        store.write_chunk(status.upload_id, 5, [data[5:10]])
    assert err.value.details["offset"] == 2**20
    assert store.list_assets(*key) == []  # not visible before completion
    store.write_chunk(status.upload_id, 2**20, [data[2**20 :]])
    with pytest.raises(DigestMismatch):
        store.complete_upload(status.upload_id, "0" * 64)
    assert store.list_assets(*key) == []
    # After a digest mismatch the partial is gone: the client starts over.
    assert store.upload_status(status.upload_id).offset == 0
    store.write_chunk(status.upload_id, 0, [data])
    info = store.complete_upload(status.upload_id, hashlib.sha256(data).hexdigest())
    assert info.size == len(data)
    # Completing again (a retry after a lost response) returns the same asset.
    assert store.complete_upload(status.upload_id, info.sha256).sha256 == info.sha256
    # Replace atomically under the same name; the event log keeps both digests.
    new = os.urandom(1000)
    s2 = store.begin_upload(*key, "dir/model.ckpt", lease=lease)
    store.write_chunk(s2.upload_id, 0, [new])
    store.complete_upload(s2.upload_id, hashlib.sha256(new).hexdigest())
    (asset,) = store.list_assets(*key)
    assert asset.sha256 == hashlib.sha256(new).hexdigest()
    _, stream = store.open_asset(*key, "dir/model.ckpt")
    with stream:
        assert stream.read() == new
    digests = [e.detail["sha256"] for e in store.events(*key) if e.kind == "asset"]
    assert digests == [hashlib.sha256(data).hexdigest(), hashlib.sha256(new).hexdigest()]


def test_uploads_need_the_lease_and_valid_names(store: Store, clock: Clock) -> None:
    key, lease = make_run(store, clock, RunState.RUNNING)
    with pytest.raises(LeaseConflict):
        store.begin_upload(*key, "a.bin", lease="not-the-lease")
    for bad in ("../x", "/etc/passwd", "a\\b", "a/../b", "a//b", "nul\x00", "", "x" * 2000):
        with pytest.raises(InvalidRequest):
            store.begin_upload(*key, bad, lease=lease)
    with pytest.raises(InvalidRequest):
        store.write_chunk(
            store.begin_upload(*key, "small", size=3, lease=lease).upload_id, 0, [b"toolong"]
        )


# -------------------------------------------------------------------- schema
def test_schema_version_recorded_and_newer_refused(store_url: str, tmp_path) -> None:
    store = Store.open(store_url, tmp_path / "a")
    with store.engine.begin() as conn:
        assert conn.execute(sa.select(t.schema_version.c.version)).scalar() == t.SCHEMA_VERSION
        conn.execute(
            t.schema_version.update().values(
                version=t.SCHEMA_VERSION + 1, compatible_from=t.SCHEMA_VERSION + 1
            )
        )
    store.close()
    with pytest.raises(ConfigurationError, match="newer"):
        Store.open(store_url, tmp_path / "a")


# -------------------------------------------------------------------- concurrency
def _race_start(url: str, assets: str, key: tuple[str, int, int], barrier) -> str | None:
    store = Store.open(url, assets)
    barrier.wait()
    try:
        return store.start(*key).lease
    except InvalidTransition:
        return None
    finally:
        store.close()


def _race_create(url: str, assets: str, exp: str, n: int, barrier) -> list[int]:
    store = Store.open(url, assets)
    barrier.wait()
    try:
        return [store.create_run(exp, 0).run for _ in range(n)]
    finally:
        store.close()


def test_racing_starts_from_processes_give_one_lease(store_url: str, tmp_path) -> None:
    store = Store.open(store_url, tmp_path / "assets")
    exp = store.create_experiment("race", [{}]).experiment_id
    key = (exp, 0, store.create_run(exp, 0).run)
    ctx = multiprocessing.get_context("spawn")
    procs = 6
    with ctx.Manager() as manager:
        barrier = manager.Barrier(procs)
        with ctx.Pool(procs) as pool:
            leases = pool.starmap(
                _race_start, [(store_url, str(tmp_path / "assets"), key, barrier)] * procs
            )
    winners = [x for x in leases if x]
    assert len(winners) == 1
    events = [e for e in store.events(*key) if e.to_state == "running"]
    assert len(events) == 1
    store.close()


def test_racing_create_run_gives_distinct_numbers(store_url: str, tmp_path) -> None:
    store = Store.open(store_url, tmp_path / "assets")
    exp = store.create_experiment("race", [{}]).experiment_id
    ctx = multiprocessing.get_context("spawn")
    procs, each = 4, 10
    with ctx.Manager() as manager:
        barrier = manager.Barrier(procs)
        with ctx.Pool(procs) as pool:
            numbers = pool.starmap(
                _race_create, [(store_url, str(tmp_path / "assets"), exp, each, barrier)] * procs
            )
    flat = sorted(itertools.chain.from_iterable(numbers))
    assert flat == list(range(procs * each))
    assert sorted(r.run for r in store.list_runs(exp)) == flat
    store.close()


# -------------------------------------------------------------------- progress (liveness)
def test_progress_is_kept_and_a_run_that_stops_advancing_is_flagged_stalled(
    store_url: str, tmp_path, clock: Clock
) -> None:
    store = Store.open(
        store_url,
        tmp_path / "assets",
        heartbeat_timeout=TIMEOUT,
        lost_grace=GRACE,
        stall_timeout=50.0,
        clock=clock,
    )
    key, lease = make_run(store, clock, RunState.RUNNING)
    assert store.get_run(*key).progress is None and not store.get_run(*key).stalled
    store.heartbeat(*key, lease, {"step": 1, "epoch": 0})
    first = store.get_run(*key)
    assert first.progress == {"step": 1, "epoch": 0} and first.progress_at == clock.now
    clock.now += 30
    store.heartbeat(*key, lease, {"step": 1, "epoch": 0})  # beating, not advancing
    assert store.get_run(*key).progress_at == first.progress_at
    clock.now += 30
    store.heartbeat(*key, lease, {"step": 1, "epoch": 0})
    info = store.get_run(*key)
    assert info.stalled and info.state is RunState.RUNNING  # a flag, not a state
    store.heartbeat(*key, lease, {"step": 2, "epoch": 0})
    assert not store.get_run(*key).stalled
    with pytest.raises(InvalidRequest):
        store.heartbeat(*key, lease, {"step": [1, 2]})
    with pytest.raises(InvalidRequest):
        store.heartbeat(*key, lease, {f"k{i}": i for i in range(40)})
    store.close()


def test_migration_from_schema_v1_adds_progress(store_url: str, tmp_path) -> None:
    store = Store.open(store_url, tmp_path / "a")
    exp = store.create_experiment("old", [{}]).experiment_id
    store.create_run(exp, 0)
    with store.engine.begin() as conn:  # turn the database back into a version-1 one
        for column in ("progress", "progress_at"):
            conn.execute(sa.text(f"ALTER TABLE runs DROP COLUMN {column}"))
        conn.execute(t.schema_version.update().values(version=1))
    store.close()
    store = Store.open(store_url, tmp_path / "a")
    with store.engine.begin() as conn:
        # (was ``== 2``: the latest version when this test was written; v3 adds an index)
        assert conn.execute(sa.select(t.schema_version.c.version)).scalar() == t.SCHEMA_VERSION
    assert store.get_run(exp, 0, 0).progress is None  # data kept, new columns usable
    lease = store.start(exp, 0, 0).lease
    assert store.heartbeat(exp, 0, 0, lease, {"step": 3}).progress == {"step": 3}
    store.close()


def test_migration_logs_info_only_when_an_existing_store_is_upgraded(
    store_url: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """Creating a fresh store (every new home, every Hydra job) is routine: DEBUG only.
    Upgrading an existing store's schema is worth an INFO line."""
    caplog.set_level(logging.DEBUG, logger="chronicle_integrations.store.schema")

    def migrations(level: int) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "chronicle_integrations.store.schema" and r.levelno == level
        ]

    store = Store.open(store_url, tmp_path / "a")
    exp = store.create_experiment("old", [{}]).experiment_id
    store.create_run(exp, 0)
    assert migrations(logging.INFO) == []
    assert "migrating the chronicle schema to version 2" in migrations(logging.DEBUG)
    with store.engine.begin() as conn:  # turn the database back into a version-1 one
        for column in ("progress", "progress_at"):
            conn.execute(sa.text(f"ALTER TABLE runs DROP COLUMN {column}"))
        conn.execute(t.schema_version.update().values(version=1))
    store.close()
    caplog.clear()
    store = Store.open(store_url, tmp_path / "a")
    store.close()
    assert migrations(logging.INFO) == [
        f"migrating the chronicle schema to version {v}" for v in range(2, t.SCHEMA_VERSION + 1)
    ]


# -------------------------------------------------------------------- batched heartbeats
def _twin_beats(store: Store, clock: Clock) -> tuple[list[tuple], list[tuple]]:
    """Two identical batches on twin runs, covering every kind of heartbeat: live runs (with
    and without progress, the same run three times), every other state, a stale and a
    missing lease, bad input. Lost and expired runs are made first: making them moves the
    clock, which must not age the others."""
    twins: tuple[list[tuple], list[tuple]] = ([], [])
    order = [
        RunState.FAILED_LOST,
        RunState.LOST,
        *(s for s in RunState if s not in (RunState.FAILED_LOST, RunState.LOST)),
    ]
    for state in order:
        for beats in twins:
            key, lease = make_run(store, clock, state)
            beats.append((*key, lease, {"step": 1}))
    for beats in twins:
        key, lease = make_run(store, clock, RunState.RUNNING)
        beats += [
            (*key, lease, {"step": 2}),
            (*key, lease, {"step": 3}),
            (*key, lease, None),
            (*key, "another-lease-123", {"step": 4}),
            (*key, None, None),
            (*key, lease, {"step": [1, 2]}),
            (key[0], 99, 0, lease, None),
            ("bad id!", 0, 0, lease, None),
            (*key, 12345, None),
        ]
        other, other_lease = make_run(store, clock, RunState.RUNNING)
        store.put_asset(
            *other, "a.bin", io.BytesIO(b"x"), hashlib.sha256(b"x").hexdigest(), lease=other_lease
        )
        beats += [(*other, other_lease, None), (*other, other_lease, {"epoch": 1})]
    return twins


def _outcome(result) -> tuple:
    """What a heartbeat answered, without the run's identity (the twins differ in it)."""
    if isinstance(result, Exception):
        return (type(result).__name__, result.code, result.details.get("state"))
    return (
        "ok",
        result.state,
        result.progress,
        result.progress_at,
        result.last_heartbeat_at,
        result.asset_count,
        result.stalled,
    )


def _final(store: Store, beats: list[tuple]) -> list[tuple]:
    """Every beaten run as it ended up: its record and its timeline, without its identity."""
    out = []
    for item in dict.fromkeys(item[:3] for item in beats):
        try:
            info = store.get_run(*item).to_dict()
        except Exception as exc:
            out.append((type(exc).__name__,))
            continue
        # The twins were made at different times; the heartbeats ran at the same time.
        for field in (
            "experiment_id",
            "run",
            "lease_holder",
            "created_at",
            "started_at",
            "ended_at",
        ):
            info.pop(field, None)
        events = [
            (e.from_state, e.to_state, e.cause, e.at if e.cause == "heartbeat" else 0)
            for e in store.events(*item)
        ]
        out.append((info, events))
    return out


def test_heartbeat_many_equals_heartbeat_one_by_one(store: Store, clock: Clock) -> None:
    # Twin batches on twin runs: one beaten one by one, one as a batch; same everything.
    one_by_one, batch = _twin_beats(store, clock)
    expected = []
    for item in one_by_one:
        try:
            expected.append(_outcome(store.heartbeat(*item)))
        except Exception as exc:
            expected.append(_outcome(exc))
    results = store.heartbeat_many(batch)
    assert len(results) == len(batch)
    got = [_outcome(result) for result in results]
    assert got == expected
    assert _final(store, batch) == _final(store, one_by_one)
    kinds = {outcome[0] for outcome in got}
    assert kinds >= {"ok", "InvalidTransition", "LeaseConflict", "InvalidRequest", "NotFound"}
    # A run beaten three times in one batch answers each in order and keeps the last.
    twin = len(RunState)
    assert [got[twin + k][2] for k in range(3)] == [{"step": 2}, {"step": 3}, {"step": 3}]
    # The asset count comes back from the batched statement as well.
    assert got[-1][5] == 1 and got[-1][2] == {"epoch": 1}


def test_heartbeat_many_keeps_runs_alive_and_moves_lost_ones_back(
    store: Store, clock: Clock
) -> None:
    runs = [make_run(store, clock, RunState.RUNNING) for _ in range(20)]
    lost_key, lost_lease = make_run(store, clock, RunState.LOST)
    for step in range(3):
        clock.now += TIMEOUT / 2
        out = store.heartbeat_many(
            [(*key, lease, {"step": step}) for key, lease in runs] + [(*lost_key, lost_lease, None)]
        )
        assert all(info.state is RunState.RUNNING for info in out)
        assert [info.progress for info in out[:-1]] == [{"step": step}] * 20
    assert store.sweep() == {"lost": 0, "failed_lost": 0}
    events = store.events(*lost_key)
    assert [(e.from_state, e.to_state) for e in events if e.kind == "transition"][-1] == (
        RunState.LOST,
        RunState.RUNNING,
    )
    edges = [
        (RunState(e.from_state) if e.from_state else None, RunState(e.to_state))
        for e in events
        if e.kind == "transition"
    ]
    assert is_valid_path(edges), edges
