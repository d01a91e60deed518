"""Engine setup for the store: :func:`make_engine` (SQLite in WAL mode with a busy timeout and
``BEGIN IMMEDIATE`` write transactions, read-only opens of files this process may not write;
PostgreSQL with a pre-pinged pool) and the translation of database errors into
:class:`~chronicle_integrations._errors.ServerError`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.exc import OperationalError

from .._config import (
    ENV_DB_MAX_OVERFLOW,
    ENV_DB_POOL_SIZE,
    ENV_DB_PREPARE_THRESHOLD,
    env_count,
)
from .._config import prepare_threshold as parse_prepare_threshold
from .._errors import ConfigurationError, ServerError


@contextlib.contextmanager
def _translate_db_errors() -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        raise ServerError(f"database error: {exc.orig}") from exc


#: The PostgreSQL pool of one store (one server replica): at most ``pool_size +
#: max_overflow`` connections, which is the figure the connection budget counts per replica.
DEFAULT_POOL_SIZE = 10
DEFAULT_MAX_OVERFLOW = 20
#: The URL query flag that says a pgbouncer in transaction mode is in front of PostgreSQL
#: (``postgresql://.../db?pgbouncer=true``): statements are never prepared (see below).
PGBOUNCER_FLAG = "pgbouncer"


@dataclasses.dataclass(frozen=True)
class DatabaseOptions:
    """How a store talks to PostgreSQL (ignored on SQLite).

    ``prepare_threshold``: psycopg 3 prepares a statement server-side after it ran this many
    times on a connection (psycopg's default: 5). Behind pgbouncer in transaction mode the
    next transaction may run on another server connection, where that prepared statement
    does not exist (``prepared statement "_pg3_0" does not exist``), so it must be None (never
    prepare); ``"auto"`` means None when the URL carries ``?pgbouncer=true``, psycopg's default
    otherwise. The heartbeat fast path runs one statement thousands of times a second: exactly
    what psycopg prepares.

    Example::

        make_engine("postgresql://chronicle@pgbouncer:6432/chronicle?pgbouncer=true",
                    DatabaseOptions(pool_size=5, max_overflow=5))
    """

    pool_size: int = DEFAULT_POOL_SIZE
    max_overflow: int = DEFAULT_MAX_OVERFLOW
    prepare_threshold: int | Literal["auto"] | None = "auto"

    def __post_init__(self) -> None:
        if self.pool_size < 1 or self.max_overflow < 0:
            raise ConfigurationError("the database pool needs pool_size >= 1, max_overflow >= 0")
        threshold = self.prepare_threshold
        if threshold not in ("auto", None) and (not isinstance(threshold, int) or threshold < 0):
            raise ConfigurationError(
                f"invalid prepare_threshold {threshold!r}: a count >= 0, None or 'auto'"
            )

    @classmethod
    def resolve(
        cls,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        prepare_threshold: int | str | None = "",
    ) -> DatabaseOptions:
        """The options a server runs with: each given value, else its environment variable
        (``CHRONICLE_DB_POOL_SIZE``, ``_MAX_OVERFLOW``, ``_PREPARE_THRESHOLD``), else the
        default. ``prepare_threshold=""`` means not given (None is a value: never prepare)."""
        if pool_size is None:
            pool_size = env_count(ENV_DB_POOL_SIZE)
        if max_overflow is None:
            max_overflow = env_count(ENV_DB_MAX_OVERFLOW, zero_ok=True)
        if prepare_threshold == "":
            raw = os.environ.get(ENV_DB_PREPARE_THRESHOLD, "").strip()
            prepare_threshold = parse_prepare_threshold(raw) if raw else "auto"
        return cls(
            pool_size=DEFAULT_POOL_SIZE if pool_size is None else pool_size,
            max_overflow=DEFAULT_MAX_OVERFLOW if max_overflow is None else max_overflow,
            prepare_threshold=prepare_threshold,  # type: ignore[arg-type]
        )

    @property
    def max_connections(self) -> int:
        """The most connections one store (one replica) opens."""
        return self.pool_size + self.max_overflow


def make_engine(url: str, options: DatabaseOptions | None = None) -> sa.Engine:
    """A SQLAlchemy engine tuned for the store: SQLite in WAL mode with a busy timeout and
    ``BEGIN IMMEDIATE`` for write transactions; PostgreSQL with a pre-pinged pool sized and
    prepared as ``options`` say (:class:`DatabaseOptions`)."""
    options = options or DatabaseOptions()
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
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        behind_pgbouncer = _truthy(parsed.query.get(PGBOUNCER_FLAG))
        parsed = parsed.difference_update_query([PGBOUNCER_FLAG])  # not a libpq parameter
        threshold = options.prepare_threshold
        if threshold == "auto":
            threshold = None if behind_pgbouncer else _PSYCOPG_DEFAULT
        if threshold != _PSYCOPG_DEFAULT and parsed.drivername == "postgresql+psycopg":
            connect_args["prepare_threshold"] = threshold
    try:
        return sa.create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=options.pool_size,
            max_overflow=options.max_overflow,
            connect_args=connect_args,
        )
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the driver for {parsed.drivername} is not installed: "
            "pip install 'chronicle-integrations[postgres]'"
        ) from exc
    except sa.exc.NoSuchModuleError as exc:  # an unknown dialect, e.g. "nonsense://"
        raise ConfigurationError(f"unsupported store URL {url!r}: {exc}") from exc


#: psycopg 3's own default prepare threshold (left unset when wanted).
_PSYCOPG_DEFAULT = 5


def _truthy(value: Any) -> bool:
    if isinstance(value, tuple):
        value = value[-1] if value else ""
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


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
