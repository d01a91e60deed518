"""Listings come in keyset pages, on SQLite and PostgreSQL: every item exactly once and in
order (also while items are created between pages), bounded pages, refused bad cursors and
limits, and the v3 index behind the experiments order.

The store is real (a real database file / a real PostgreSQL); only its clock is settable.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
import test_store as store_suite
from testkit import seed_runs

from chronicle_integrations import InvalidRequest
from chronicle_integrations._models import Page
from chronicle_integrations._validation import DEFAULT_PAGE_SIZE, MAX_PAGE_BYTES, MAX_PAGE_SIZE
from chronicle_integrations.lifecycle import RunState
from chronicle_integrations.store import Store
from chronicle_integrations.store import schema as t

# The store suite's settable clock and store fixtures (on ``store_url``: both backends).
Clock = store_suite.Clock
clock = store_suite.clock
store = store_suite.store


def walk(fetch: Callable[[str | None], Page[Any]], between: Callable[[int], None] | None = None):
    """Every page of a listing; ``between(i)`` runs after page ``i`` (inserts meanwhile)."""
    pages, cursor = [], None
    while True:
        page = fetch(cursor)
        pages.append(page)
        if page.next_cursor is None:
            return pages
        assert page.items, "a page with a next_cursor holds at least one item"
        if between is not None:
            between(len(pages) - 1)
        cursor = page.next_cursor


def key(info: Any) -> tuple[str, int, int]:
    return (info.experiment_id, info.variation, info.run)


def _cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).rstrip(b"=").decode()


def test_runs_pages_give_every_run_once_in_order_while_runs_are_created(store: Store) -> None:
    seeded = seed_runs(store, experiments=5, variations=5, runs=100)  # 2,500 runs
    created: list[tuple[str, int, int]] = []

    def insert(i: int) -> None:
        # Behind the cursor, ahead of it, in a new first and a new last experiment.
        created.append(key(store.create_run("seed-000", 0)))
        created.append(key(store.create_run("seed-004", 4)))
        for eid in (f"aaa-{i:03d}", f"zzz-{i:03d}"):
            store.create_experiment(eid, [{}], eid)
            created.append(key(store.create_run(eid, 0)))

    pages = walk(lambda c: store.page_runs(limit=300, cursor=c), insert)
    keys = [key(r) for p in pages for r in p.items]
    assert all(len(p.items) <= 300 for p in pages) and len(pages) >= 9
    assert len(keys) == len(set(keys)), "a run came twice"
    assert keys == sorted(keys), "pages are in (experiment_id, variation, run) order"
    assert set(seeded) <= set(keys), "a run that existed for the whole walk was skipped"
    # What was created ahead of the cursor shows up; nothing else that is new does.
    assert set(keys) - set(seeded) <= set(created)
    assert any(k[0].startswith("zzz-") for k in keys)


def test_runs_pages_within_one_experiment_and_state(store: Store) -> None:
    seed_runs(store, experiments=3, variations=4, runs=150)
    for r in range(0, 150, 3):  # a third of seed-001's variation 2 succeeded
        lease = store.start("seed-001", 2, r).lease
        store.succeed("seed-001", 2, r, lease)
    pages = walk(lambda c: store.page_runs("seed-001", limit=70, cursor=c))
    keys = [(r.experiment_id, r.variation, r.run) for p in pages for r in p.items]
    assert keys == [("seed-001", v, r) for v in range(4) for r in range(150)]
    done = walk(lambda c: store.page_runs("seed-001", RunState.SUCCEEDED, limit=7, cursor=c))
    assert [r.run for p in done for r in p.items] == list(range(0, 150, 3))
    assert {r.state for p in done for r in p.items} == {RunState.SUCCEEDED}
    # A cursor of another experiment's listing: before it, the whole; after it, nothing.
    seed_000 = store.page_runs(cursor=_cursor("runs", "seed-000", 3, 5), limit=5)
    assert seed_000.items[0].key == "seed-000/3/6"
    assert store.page_runs("seed-001", cursor=_cursor("runs", "seed-000", 3, 5)).items
    assert store.page_runs("seed-001", cursor=_cursor("runs", "seed-002", 0, 0)).items == []
    assert len(store.list_runs()) == 3 * 4 * 150  # the full walk, many pages


def test_page_sizes_default_and_bounds(store: Store) -> None:
    seed_runs(store, experiments=1, variations=1, runs=MAX_PAGE_SIZE + 5)
    first = store.page_runs()
    assert len(first.items) == DEFAULT_PAGE_SIZE and first.next_cursor
    full = store.page_runs(limit=MAX_PAGE_SIZE)
    assert len(full.items) == MAX_PAGE_SIZE and full.next_cursor is not None
    end = store.page_runs(limit=MAX_PAGE_SIZE, cursor=full.next_cursor)
    assert [r.run for r in end.items] == list(range(MAX_PAGE_SIZE, MAX_PAGE_SIZE + 5))
    assert end.next_cursor is None
    exact = store.page_runs(limit=5, cursor=_cursor("runs", "seed-000", 0, MAX_PAGE_SIZE - 1))
    assert len(exact.items) == 5 and exact.next_cursor is None  # the last page says so
    for bad in (0, -1, MAX_PAGE_SIZE + 1, True, "10", 2.0):
        with pytest.raises(InvalidRequest) as info:
            store.page_runs(limit=bad)  # type: ignore[arg-type]
        assert info.value.details.get("field") == "limit"


def test_a_page_of_runs_stays_bounded_in_bytes_with_long_messages(store: Store) -> None:
    seed_runs(store, experiments=1, variations=1, runs=200)
    message = "Traceback: " + "x" * (64 * 1024 - 100)
    with store.engine.begin() as conn:
        conn.execute(t.runs.update().values(state="failed_crash", reason="crash", message=message))
    pages = walk(lambda c: store.page_runs(limit=MAX_PAGE_SIZE, cursor=c))
    sizes = [len(json.dumps([r.to_dict() for r in p.items])) for p in pages]
    assert max(sizes) <= MAX_PAGE_BYTES + 70 * 1024, sizes  # one run past the budget at most
    assert len(pages) >= 3 and sum(len(p.items) for p in pages) == 200


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not base64!",
        "WyJydW5zIl0=",  # padded: not the spelling the store hands out
        _cursor("runs"),
        _cursor("runs", "seed-000", 0),
        _cursor("runs", "seed-000", 0, 0, 0),
        _cursor("events", 3),  # another listing's cursor
        _cursor("runs", "bad id!", 0, 0),
        _cursor("runs", "seed-000", -1, 0),
        _cursor("runs", "seed-000", 0, 2**40),  # beyond a 32-bit column: no SQL error
        _cursor("runs", "seed-000", 0, True),
        _cursor("runs", "seed-000", "0", 0),
        base64.urlsafe_b64encode(b"\xff\xfe").rstrip(b"=").decode(),
        base64.urlsafe_b64encode(b'["runs","seed-000",NaN,0]').rstrip(b"=").decode(),
        "A" * 5000,
    ],
)
def test_a_malformed_cursor_is_an_invalid_request(store: Store, cursor: str) -> None:
    seed_runs(store, experiments=1, variations=1, runs=3)
    with pytest.raises(InvalidRequest) as info:
        store.page_runs(cursor=cursor)
    assert info.value.details.get("field") == "cursor" and "next_cursor" in str(info.value)


def test_experiments_pages_with_equal_timestamps_and_inserts(store: Store, clock: Clock) -> None:
    ids = [f"e-{i:03d}" for i in range(60)]
    for i, eid in enumerate(ids):
        clock.now = 1_000_000.0 + i // 10  # ten experiments per instant: ties broken by id
        store.create_experiment(eid, [{}], eid)
    later: list[str] = []

    def insert(i: int) -> None:
        clock.now += 1
        later.append(f"a-later-{i}")  # sorts first by id, but is newest: comes at the end
        store.create_experiment(later[-1], [], later[-1])

    pages = walk(lambda c: store.page_experiments(limit=7, cursor=c), insert)
    got = [e.experiment_id for p in pages for e in p.items]
    assert got == ids + later
    with pytest.raises(InvalidRequest):
        store.page_experiments(cursor=_cursor("experiments", float("1e400"), "e-000"))
    with pytest.raises(InvalidRequest):
        store.page_experiments(cursor=_cursor("experiments", "1", "e-000"))
    with pytest.raises(InvalidRequest):
        store.page_experiments(cursor=_cursor("runs", "e-000", 0, 0))
    assert [e.experiment_id for e in store.list_experiments()] == got


def test_events_and_assets_pages(store: Store) -> None:
    eid = store.create_experiment("x", [{}]).experiment_id
    run = store.create_run(eid, 0)
    lease = store.start(eid, 0, run.run).lease
    names = [f"ckpt/{i:02d}.bin" for i in range(23)]
    for name in names:
        data = name.encode()
        store.put_asset(
            eid, 0, 0, name, io.BytesIO(data), hashlib.sha256(data).hexdigest(), lease=lease
        )
    assets = walk(lambda c: store.page_assets(eid, 0, 0, limit=5, cursor=c))
    assert [a.name for p in assets for a in p.items] == names and len(assets) == 5
    events = walk(lambda c: store.page_events(eid, 0, 0, limit=4, cursor=c))
    ids = [e.id for p in events for e in p.items]
    assert ids == sorted(set(ids)) and len(ids) == 2 + len(names)  # create, start, uploads
    assert [e.id for e in store.events(eid, 0, 0)] == ids
    assert [a.name for a in store.list_assets(eid, 0, 0)] == names
    with pytest.raises(InvalidRequest):
        store.page_events(eid, 0, 0, cursor=_cursor("assets", "ckpt/00.bin"))
    with pytest.raises(InvalidRequest):
        store.page_assets(eid, 0, 0, cursor=_cursor("assets", "../etc/passwd"))
    with pytest.raises(InvalidRequest):
        store.page_events(eid, 0, 0, cursor=_cursor("events", 2**64))


def test_migration_v3_adds_the_experiments_index(store_url: str, tmp_path: Any) -> None:
    store = Store.open(store_url, tmp_path / "a")
    store.create_experiment("old", [{}], "old")
    with store.engine.begin() as conn:  # turn the database back into a version-2 one
        conn.execute(sa.text("DROP INDEX ix_experiments_created"))
        conn.execute(t.schema_version.update().values(version=2))
    store.close()
    store = Store.open(store_url, tmp_path / "a")
    with store.engine.begin() as conn:
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("experiments")}
        assert conn.execute(sa.select(t.schema_version.c.version)).scalar() == t.SCHEMA_VERSION
    assert "ix_experiments_created" in indexes
    assert [e.experiment_id for e in store.page_experiments().items] == ["old"]
    store.close()
