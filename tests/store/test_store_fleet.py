"""The store as several server replicas share it: one clock (the database's on PostgreSQL),
the watchdog's sweep taken in turns, and the schema gate of rolling upgrades.

Real databases throughout (SQLite files, a real PostgreSQL); "replicas" here are several
:class:`Store` objects on one database, as several server processes would hold them (the
process-level fleet is in ``tests/scaleout``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from testkit import fresh_store_url

from chronicle_integrations._errors import ConfigurationError
from chronicle_integrations.lifecycle import RunState
from chronicle_integrations.store import Store
from chronicle_integrations.store import schema as t
from chronicle_integrations.store.base import SWEEP_LOCK
from chronicle_integrations.store.clock import DatabaseClock, process_clock


def _is_pg(url: str) -> bool:
    return url.startswith("postgresql")


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL database (what replicas share)."""
    with fresh_store_url("postgres", tmp_path / "store") as url:
        yield url


def _db_now(store: Store) -> float:
    with store.engine.connect() as conn:
        return float(conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar())


# ------------------------------------------------------------------------------ one clock
def test_clock_is_the_databases_on_postgres_and_the_process_on_sqlite(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose host clock is an hour off still stamps liveness on the database's
    clock (PostgreSQL); SQLite, one host by construction, keeps the process clock."""
    store = Store.open(store_url, tmp_path / "assets")
    try:
        if not _is_pg(store_url):
            assert store.clock is process_clock
            return
        assert isinstance(store.clock, DatabaseClock)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600.0)  # a badly skewed host
        store.clock.resync = 0.0  # sample on every call: the host clock is never consulted
        before = _db_now(store)
        now = store.clock()
        after = _db_now(store)
        assert before - 0.05 <= now <= after + 0.05, (before, now, after)
        exp = store.create_experiment("clock", [{}]).experiment_id
        run = store.create_run(exp, 0).run
        started = store.start(exp, 0, run).started_at
        assert started is not None and abs(started - _db_now(store)) < 5.0
    finally:
        store.close()


@pytest.mark.postgres
def test_database_clock_never_goes_back_and_survives_an_outage(pg_url: str, tmp_path: Path) -> None:
    store = Store.open(pg_url, tmp_path / "assets")
    try:
        clock = DatabaseClock(store.engine, resync=0.0)
        readings = [clock() for _ in range(200)]
        assert readings == sorted(readings)
        store.engine.dispose()
        good = clock()
        # An unreachable database: the clock extrapolates instead of failing a heartbeat.
        broken = DatabaseClock(store.engine, resync=0.0)
        broken.engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
        first = broken()
        assert broken() >= first >= good - 1.0
        broken.engine.dispose()
    finally:
        store.close()


# ------------------------------------------------------------------------------ sweeps in turns
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _lost_runs(store: Store, clock: Clock, n: int) -> list[tuple[str, int, int]]:
    exp = store.create_experiment("fleet", [{}]).experiment_id
    keys = []
    for _ in range(n):
        key = (exp, 0, store.create_run(exp, 0).run)
        store.start(*key)
        keys.append(key)
    clock.now += 200.0  # past the heartbeat timeout (100 s)
    return keys


@pytest.mark.postgres
def test_replicas_take_turns_at_the_sweep(pg_url: str, tmp_path: Path) -> None:
    """While one replica sweeps (holds the sweep lock), another skips; right after a sweep
    the others skip too (it is recent on the shared clock); once it is due, one sweeps; every
    owed transition is logged exactly once."""
    clock = Clock()
    kwargs = {"heartbeat_timeout": 100.0, "lost_grace": 1000.0, "clock": clock}
    a = Store.open(pg_url, tmp_path / "assets", **kwargs)
    b = Store.open(pg_url, tmp_path / "assets", **kwargs)
    try:
        keys = _lost_runs(a, clock, 3)
        holder = sa.create_engine(a.engine.url)
        with holder.connect() as conn, conn.begin():
            conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({SWEEP_LOCK})"))
            assert b.sweep_if_due(30.0) is None  # A (here: the holder) is sweeping
        holder.dispose()
        assert b.sweep_if_due(30.0) == {"lost": 3, "failed_lost": 0}
        with a.engine.connect() as conn:
            row = conn.execute(sa.select(t.watchdog)).one()
        assert (row.swept_at, row.swept_by) == (clock.now, b.replica)
        clock.now += 29.0
        assert a.sweep_if_due(30.0) is None  # swept 29 s ago by B
        clock.now += 1.0
        assert a.sweep_if_due(30.0) == {"lost": 0, "failed_lost": 0}  # due (30 s)
        for key in keys:
            events = a.events(*key)
            assert [(e.from_state, e.to_state) for e in events].count(("running", "lost")) == 1
            assert a.get_run(*key).state is RunState.LOST
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------ schema gate
def _set_schema(store: Store, version: int, compatible_from: int) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            t.schema_version.update().values(version=version, compatible_from=compatible_from)
        )


def test_a_newer_additive_schema_is_served_a_contracted_one_refused(
    store_url: str, tmp_path: Path
) -> None:
    store = Store.open(store_url, tmp_path / "assets")
    exp = store.create_experiment("gate", [{}]).experiment_id
    with store.engine.begin() as conn:  # what the next (additive) version would add
        conn.execute(sa.text("ALTER TABLE runs ADD COLUMN note TEXT"))
    _set_schema(store, t.SCHEMA_VERSION + 1, t.COMPATIBLE_FROM)
    store.close()
    for migrate in (True, False):
        old = Store.open(store_url, tmp_path / "assets", migrate=migrate)
        lease = old.start(exp, 0, old.create_run(exp, 0).run).lease
        assert lease
        assert old.upgrade_schema() == t.SCHEMA_VERSION + 1  # never downgraded
        old.close()
    with Store.open(store_url, tmp_path / "assets").engine.connect() as conn:
        assert t.schema_info(conn) == (t.SCHEMA_VERSION + 1, t.COMPATIBLE_FROM)
    contracted = Store.open(store_url, tmp_path / "assets")
    _set_schema(contracted, t.SCHEMA_VERSION + 1, t.SCHEMA_VERSION + 1)
    contracted.close()
    with pytest.raises(ConfigurationError, match=r"upgrade chronicle-integrations"):
        Store.open(store_url, tmp_path / "assets")


def test_no_migrate_refuses_an_empty_or_old_schema_and_upgrade_is_idempotent(
    store_url: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=r"chronicle db upgrade --store URL"):
        Store.open(store_url, tmp_path / "assets", migrate=False)
    store = Store.open(store_url, tmp_path / "assets")  # migrates an empty database
    assert store.upgrade_schema() == t.SCHEMA_VERSION
    assert store.upgrade_schema() == t.SCHEMA_VERSION
    _set_schema(store, t.MIN_SCHEMA_VERSION - 1, t.MIN_SCHEMA_VERSION - 1)
    store.close()
    with pytest.raises(ConfigurationError, match=r"older than the minimum"):
        Store.open(store_url, tmp_path / "assets", migrate=False)
    store = Store.open(store_url, tmp_path / "assets")
    with store.engine.connect() as conn:
        assert t.schema_info(conn) == (t.SCHEMA_VERSION, t.COMPATIBLE_FROM)
    store.close()


# ------------------------------------------------------------------------------ pool options
@pytest.mark.postgres
def test_pool_and_prepare_options_reach_the_driver(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chronicle_integrations.store.engine import DatabaseOptions, make_engine

    def threshold(engine: sa.Engine) -> Any:
        with engine.connect() as conn:
            value = conn.connection.dbapi_connection.prepare_threshold  # type: ignore[union-attr]
        engine.dispose()
        return value

    assert threshold(make_engine(pg_url)) == 5  # psycopg's default, untouched
    flagged = make_engine(pg_url + "?pgbouncer=true", DatabaseOptions(pool_size=3, max_overflow=1))
    assert flagged.pool.size() == 3 and "pgbouncer" not in str(flagged.url)  # type: ignore[attr-defined]
    assert threshold(flagged) is None
    assert threshold(make_engine(pg_url, DatabaseOptions(prepare_threshold=None))) is None
    monkeypatch.setenv("CHRONICLE_DB_POOL_SIZE", "7")
    monkeypatch.setenv("CHRONICLE_DB_PREPARE_THRESHOLD", "none")
    resolved = DatabaseOptions.resolve(max_overflow=0)
    assert (resolved.pool_size, resolved.max_overflow, resolved.prepare_threshold) == (7, 0, None)
    assert resolved.max_connections == 7
    assert DatabaseOptions.resolve(pool_size=2).pool_size == 2  # the option wins
    monkeypatch.setenv("CHRONICLE_DB_POOL_SIZE", "lots")
    with pytest.raises(ConfigurationError, match="CHRONICLE_DB_POOL_SIZE"):
        DatabaseOptions.resolve()


def test_server_options_parse_and_refuse(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from chronicle_integrations._server_options import add_server_options, serve_kwargs

    parser = argparse.ArgumentParser()
    add_server_options(parser)
    args = parser.parse_args(
        [
            *("--db-pool-size", "4", "--db-max-overflow", "0"),
            *("--db-prepare-threshold", "None", "--no-migrate", "--shutdown-timeout", "3"),
        ]
    )
    kwargs = serve_kwargs(args)
    assert kwargs["db_pool_size"] == 4 and kwargs["db_max_overflow"] == 0
    assert kwargs["db_prepare_threshold"] == "none" and kwargs["migrate"] is False
    assert kwargs["shutdown_timeout"] == 3.0
    assert "migrate" not in serve_kwargs(parser.parse_args([]))
    for bad in (["--db-pool-size", "0"], ["--db-prepare-threshold", "sometimes"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "prepare threshold" in capsys.readouterr().err
