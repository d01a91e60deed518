"""Engine setup for the store: :func:`make_engine` (SQLite in WAL mode with a busy timeout and
``BEGIN IMMEDIATE`` write transactions, read-only opens of files this process may not write;
PostgreSQL with a pre-pinged pool) and the translation of database errors into
:class:`~chronicle_integrations._errors.ServerError`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.exc import OperationalError

from .._errors import ConfigurationError, ServerError


@contextlib.contextmanager
def _translate_db_errors() -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        raise ServerError(f"database error: {exc.orig}") from exc


def make_engine(url: str) -> sa.Engine:
    """A SQLAlchemy engine tuned for the store: SQLite in WAL mode with a busy timeout and
    ``BEGIN IMMEDIATE`` for write transactions; PostgreSQL with a pre-pinged pool."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigurationError(f"invalid store URL {url!r}: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        read_only = False
        if parsed.database and parsed.database != ":memory:" and "uri" not in parsed.query:
            path = Path(parsed.database)
            read_only = path.exists() and not (
                os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
            )
            if read_only:
                parsed = _read_only_url(parsed, path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 60, "check_same_thread": False})
        _configure_sqlite(engine, read_only=read_only)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        return sa.create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the driver for {parsed.drivername} is not installed: "
            "pip install 'chronicle-integrations[postgres]'"
        ) from exc
    except sa.exc.NoSuchModuleError as exc:  # an unknown dialect, e.g. "nonsense://"
        raise ConfigurationError(f"unsupported store URL {url!r}: {exc}") from exc


def _read_only_url(url: sa.URL, path: Path) -> sa.URL:
    """A SQLite URI opening ``path`` read-only (the file or its directory is not writable).

    A WAL database is read through its ``-shm`` index, which a reader must be able to create
    when it is missing (after a clean shutdown it is): where it cannot, the file is opened
    ``immutable`` (no one can be writing it without that index)."""
    query = {"mode": "ro", "uri": "true"}
    shm = path.with_name(path.name + "-shm")
    if not shm.exists() and not os.access(path.parent, os.W_OK):
        query["immutable"] = "1"
    return url.set(database="file:" + quote(str(path.resolve())), query=query)


def _configure_sqlite(engine: sa.Engine, *, read_only: bool = False) -> None:
    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 60000")
        if not read_only:  # the journal mode is the file's: only a writer sets it
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("chronicle_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
