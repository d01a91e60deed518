"""The client walks the listings' pages, over the embedded store and a real server:
``runs()`` / ``experiments()`` / ``events()`` / ``assets()`` still return everything,
``iter_runs()`` / ``iter_experiments()`` fetch lazily, ``runs_page()`` hands out cursors, and a
bad limit or cursor is a typed :class:`InvalidRequest`.

The runs, events and asset records beyond one page are seeded in bulk into the backend's own
database through the store (creating thousands one by one would dominate the time).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from testkit import seed_runs

from chronicle_integrations import Chronicle, InvalidRequest
from chronicle_integrations._validation import DEFAULT_PAGE_SIZE
from chronicle_integrations.store import Store
from chronicle_integrations.store import schema as t


@contextlib.contextmanager
def backend_store(backend: Any, chronicle: Chronicle) -> Iterator[Store]:
    """The store behind the backend: the embedded client's own, or the server's database."""
    if backend.kind == "embedded":
        yield chronicle.transport.store  # type: ignore[attr-defined]
        return
    store = Store.open(backend.server.store_url, backend.home.parent / "seed-assets")
    try:
        yield store
    finally:
        store.close()


def _key(info: Any) -> tuple[str, int, int]:
    return (info.experiment_id, info.variation, info.run)


def test_runs_returns_every_run_and_iter_runs_fetches_lazily(
    backend: Any, chronicle: Chronicle
) -> None:
    prefix = f"c{secrets.token_hex(3)}"
    with backend_store(backend, chronicle) as store:
        seeded = seed_runs(store, experiments=3, variations=4, runs=100, prefix=prefix)
    assert len(seeded) > 2 * DEFAULT_PAGE_SIZE
    everything = [_key(r) for r in chronicle.runs() if r.experiment_id.startswith(prefix)]
    assert everything == seeded  # all of them, in order, over several pages
    assert [_key(r) for r in chronicle.runs(experiment_id=f"{prefix}-001")] == seeded[400:800]

    walk = chronicle.iter_runs(page_size=100)
    first = next(walk)
    # Created after the first page was fetched, sorting after everything: a lazy walk that
    # fetches page by page still finds it; a listing fetched up front would not.
    late = chronicle.create_experiment("late", [{}], experiment_id=f"zzzz-{prefix}")
    chronicle.create_run(late, 0)
    rest = [_key(r) for r in walk]
    keys = [_key(first), *rest]
    assert len(keys) == len(set(keys)) and keys == sorted(keys)
    assert (late, 0, 0) in rest
    assert [k for k in keys if k[0].startswith(prefix)] == seeded


def test_runs_page_hands_out_cursors_and_bad_input_is_invalid_request(
    backend: Any, chronicle: Chronicle
) -> None:
    prefix = f"p{secrets.token_hex(3)}"
    with backend_store(backend, chronicle) as store:
        seeded = seed_runs(store, experiments=1, variations=1, runs=250, prefix=prefix)
    eid = seeded[0][0]
    got, cursor = [], None
    while True:
        page = chronicle.runs_page(eid, limit=60, cursor=cursor)
        assert len(page.items) <= 60
        got += [_key(r) for r in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert got == seeded
    assert [_key(r) for r in chronicle.runs_page(eid, "pending", limit=3).items] == seeded[:3]
    for kwargs in ({"limit": 0}, {"limit": 5000}, {"cursor": "garbage!"}, {"cursor": "W10"}):
        with pytest.raises(InvalidRequest) as info:
            chronicle.runs_page(eid, **kwargs)  # type: ignore[arg-type]
        assert info.value.code == "invalid_request"
    with pytest.raises(InvalidRequest):
        chronicle.iter_runs(state="bogus")  # at once, not at the first next()
    with pytest.raises(InvalidRequest):
        list(chronicle.iter_runs(page_size=0))


def test_experiments_events_and_assets_are_walked_page_by_page(
    backend: Any, chronicle: Chronicle
) -> None:
    ids = [chronicle.create_experiment(f"e{i}", [{}]) for i in range(7)]
    walked = [e.experiment_id for e in chronicle.iter_experiments(page_size=2)]
    assert [i for i in walked if i in ids] == ids
    assert [e.experiment_id for e in chronicle.experiments()] == walked

    run = chronicle.create_run(ids[0], 0).start()
    many = DEFAULT_PAGE_SIZE + 150
    with backend_store(backend, chronicle) as store, store.engine.begin() as conn:
        where = dict(experiment_id=ids[0], variation=0, run=0)
        conn.execute(
            t.assets.insert(),
            [
                {**where, "name": f"a/{i:04d}", "sha256": "0" * 64, "size": i, "created_at": 1.0}
                for i in range(many)
            ],
        )
        conn.execute(
            t.events.insert(),
            [
                {**where, "kind": "transition", "at": 2.0, "cause": "test", "to_state": "running"}
                for _ in range(many)
            ],
        )
        total_events = conn.execute(
            sa.select(sa.func.count())
            .select_from(t.events)
            .where(t.events.c.experiment_id == ids[0])
        ).scalar()
    page = chronicle.transport.list_assets(*run.key_tuple, limit=50)
    assert len(page.items) == 50 and page.next_cursor is not None
    assets = run.assets()
    assert [a.name for a in assets] == [f"a/{i:04d}" for i in range(many)]
    page = chronicle.transport.events(*run.key_tuple, limit=50)
    assert len(page.items) == 50 and page.next_cursor is not None
    events = run.events()
    assert len(events) == total_events and [e.id for e in events] == sorted({e.id for e in events})
