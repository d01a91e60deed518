"""The state every part of the store shares, and its transaction helpers.

:class:`StoreBase` holds the engine, the blob store, the settings and the clock, opens (and
migrates) the schema, and gives the parts (the mixins of :class:`~.core.Store`) their write
and read transactions, the run lock, the lease check, the event log and idempotency keys."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

from .. import _validation as check
from .._config import DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_LOST_GRACE, DEFAULT_STALL_TIMEOUT
from .._errors import (
    ConfigurationError,
    InvalidTransition,
    LeaseConflict,
    NotFound,
    Unavailable,
)
from ..lifecycle import LEASED_ACTIONS, Action, RunState
from . import schema as t
from .blobs import BlobStore
from .clock import store_clock
from .engine import _translate_db_errors

log = logging.getLogger(__name__)

# The watchdog's defaults live with every other setting (a running run whose heartbeats
# carry progress that has not advanced for DEFAULT_STALL_TIMEOUT is flagged ``stalled``).
#: PostgreSQL advisory lock keys: schema migrations, and the watchdog's fleet-wide sweep.
MIGRATION_LOCK = 727001
SWEEP_LOCK = 727002
#: An unfinished upload that received no chunk for this long is dropped with its bytes.
DEFAULT_UPLOAD_EXPIRY = 86400.0
#: The largest asset: the bound of an upload that declared no size (and of declared sizes).
DEFAULT_MAX_ASSET_BYTES = 2**40


class StoreBase:
    """The store's state and transaction helpers (see :class:`~.core.Store`, the facade)."""

    def __init__(
        self,
        engine: sa.Engine,
        blobs: BlobStore,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        lost_grace: float = DEFAULT_LOST_GRACE,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        upload_expiry: float = DEFAULT_UPLOAD_EXPIRY,
        max_asset_bytes: int = DEFAULT_MAX_ASSET_BYTES,
        clock: Callable[[], float] | None = None,
        migrate: bool = True,
    ) -> None:
        if heartbeat_timeout <= 0 or lost_grace < 0:
            raise ConfigurationError("heartbeat_timeout must be > 0 and lost_grace >= 0")
        if not upload_expiry > 0 or isinstance(max_asset_bytes, bool) or max_asset_bytes < 0:
            raise ConfigurationError("upload_expiry must be > 0 and max_asset_bytes >= 0")
        self.engine = engine
        self.blobs = blobs
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.lost_grace = float(lost_grace)
        self.stall_timeout = float(stall_timeout)
        #: Seconds an unfinished upload may go without a chunk before it expires.
        self.upload_expiry = float(upload_expiry)
        #: Most bytes one asset may have (413 ``payload_too_large`` beyond).
        self.max_asset_bytes = int(max_asset_bytes)
        #: "Now" for everything the store records and judges (see :mod:`.clock`: the
        #: database's clock on PostgreSQL, the process clock on SQLite, unless injected).
        self.clock: Callable[[], float] = clock if clock is not None else store_clock(engine)
        self._sqlite = engine.dialect.name == "sqlite"
        #: A SQLite file this process may not write (see :func:`make_engine`): reads only.
        self.read_only = self._sqlite and engine.url.query.get("mode") == "ro"
        self._write_lock = threading.Lock() if self._sqlite else None
        self._last_sweep = 0.0
        self._last_expiry = -math.inf  # (time.monotonic() of the last expire_uploads)
        self._sweep_lock = threading.Lock()
        #: This replica's name in the fleet (who made the last sweep).
        self.replica = f"{socket.gethostname()}:{os.getpid()}"[:256]
        where = engine.url.render_as_string(hide_password=True)
        with self._read() as conn:
            info = t.schema_info(conn)
        version = info.version
        if not t.check_version(info, may_migrate=migrate or self.read_only, url=where):
            return  # nothing to create or migrate: no write lock taken
        if self.read_only:
            raise ConfigurationError(
                f"the store {engine.url.database} is read-only here, and its schema (version "
                f"{version}) is not this chronicle's ({t.SCHEMA_VERSION}): open it once with "
                "write access (or with the matching chronicle-integrations version)"
            )
        self.upgrade_schema()

    def upgrade_schema(self) -> int:
        """Bring the schema to this code's version (``chronicle db upgrade``); idempotent, a
        no-op on a current or newer compatible schema. Returns the database's version."""
        with self._write_lock or contextlib.nullcontext():
            return upgrade_schema(self.engine)

    def ready(self) -> int:
        """The readiness check (``GET /v1/ready``): the database answers and its schema is one
        this code serves. Returns the schema version; :class:`Unavailable` otherwise."""
        try:
            with self.engine.connect() as conn:
                info = t.schema_info(conn)
                conn.rollback()
            t.check_version(info, may_migrate=True)
        except Exception as exc:
            raise Unavailable(f"the database does not answer: {exc}") from exc
        if info.version < t.MIN_SCHEMA_VERSION:
            raise Unavailable(f"the database's schema (version {info.version}) is not served")
        return info.version

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        # SQLite admits one writer at a time anyway: queue this process's writers on a lock
        # instead of letting them sleep and poll in SQLite's busy handler (p99 latency).
        if self.read_only:
            raise ConfigurationError(
                f"the store {self.engine.url.database} is read-only here (no write permission "
                "on the database file or its directory): it can be listed, not changed"
            )
        with self._write_lock or contextlib.nullcontext(), self.engine.connect() as raw:
            conn = raw.execution_options(chronicle_write=True)
            with _translate_db_errors(), conn.begin():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn, _translate_db_errors(), conn.begin():
            yield conn

    def _lock_run(self, conn: sa.Connection, e: str, v: int, r: int) -> sa.Row[Any]:
        query = sa.select(t.runs).where(_run_pk(e, v, r))
        if not self._sqlite:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"run {e}/{v}/{r} does not exist", experiment_id=e, variation=v, run=r)
        return row

    def _check_lease(
        self,
        action: Action,
        state: RunState,
        row: Any,
        lease: str | None,
        key: tuple[str, int, int],
    ) -> None:
        if action not in LEASED_ACTIONS or row.lease is None or state.is_terminal:
            return
        if lease is None:
            raise LeaseConflict(
                f"run {_fmt(key)} was started under a lease; {action} must carry it",
                state=state.value,
            )
        if not _same_lease(lease, row.lease):
            raise LeaseConflict(
                f"run {_fmt(key)} is held by another worker"
                + (f" ({row.lease_holder})" if row.lease_holder else "")
                + ": it was started or resumed under a different lease",
                state=state.value,
                holder=row.lease_holder,
            )

    # ------------------------------------------------------------------ events
    def _event(
        self,
        conn: sa.Connection,
        key: tuple[str, int, int],
        src: RunState | None,
        dst: RunState | None,
        at: float,
        cause: str,
        detail: dict[str, Any] | None = None,
        kind: str = "transition",
    ) -> None:
        conn.execute(
            t.events.insert().values(
                experiment_id=key[0],
                variation=key[1],
                run=key[2],
                kind=kind,
                from_state=src.value if src else None,
                to_state=dst.value if dst else None,
                at=at,
                cause=cause,
                detail=_dumps(detail) if detail else None,
            )
        )

    # ------------------------------------------------------------------ idempotency
    def _request_done(self, conn: sa.Connection, request_id: str) -> dict[str, Any] | None:
        result = conn.execute(
            sa.select(t.requests_done.c.result).where(t.requests_done.c.request_id == request_id)
        ).scalar()
        return json.loads(result) if result is not None else None

    def _remember(self, conn: sa.Connection, request_id: str, result: dict[str, Any]) -> None:
        conn.execute(
            t.requests_done.insert().values(
                request_id=request_id, result=_dumps(result), created_at=self.clock()
            )
        )


# ---------------------------------------------------------------------- helpers
def upgrade_schema(engine: sa.Engine) -> int:
    """Migrate the database behind ``engine`` (made by :func:`.engine.make_engine`) to this
    code's schema, in one write transaction under the migration lock (a PostgreSQL advisory
    lock: transaction-scoped, so it holds through pgbouncer's transaction pooling; SQLite's
    ``BEGIN IMMEDIATE``). Idempotent, also on an empty database; concurrent callers serialise
    and only the first migrates. Returns the database's schema version."""
    with engine.connect() as raw:
        conn = raw.execution_options(chronicle_write=True)
        with _translate_db_errors(), conn.begin():
            if engine.dialect.name != "sqlite":
                conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            return t.migrate(conn)


def _request_key(kind: str, request_id: str, *params: str) -> str:
    """An idempotency key bound to the request's parameters: a request id replayed with other
    parameters (another variation, another config) is a new request, never the old answer."""
    check.token(request_id, "request_id")
    digest = hashlib.sha256("\x00".join((request_id, *params)).encode()).hexdigest()
    return f"{kind}:{digest}"


def _key(experiment_id: str, variation: int, run: int) -> tuple[str, int, int]:
    return (
        check.experiment_id(experiment_id),
        check.number(variation, "variation"),
        check.number(run, "run"),
    )


def _fmt(key: tuple[str, int, int]) -> str:
    return f"{key[0]}/{key[1]}/{key[2]}"


def _same_lease(given: Any, held: str) -> bool:
    """Constant-time lease comparison that also refuses (instead of crashing on) non-ASCII or
    non-string input: ``compare_digest(str, str)`` raises TypeError for non-ASCII text."""
    if not isinstance(given, str):
        return False
    return secrets.compare_digest(
        given.encode("utf-8", "surrogatepass"), held.encode("utf-8", "surrogatepass")
    )


def _run_pk(e: str, v: int, r: int) -> sa.ColumnElement[bool]:
    c = t.runs.c
    return sa.and_(c.experiment_id == e, c.variation == v, c.run == r)


_HINTS = {
    RunState.FAILED_ABANDONED: "it was cancelled; create a rerun with `chronicle rerun {e} {v}`",
    RunState.FAILED_LOST: "it stopped heartbeating and its recovery window passed; "
    "create a rerun with `chronicle rerun {e} {v}`",
    RunState.SUCCEEDED: "it already succeeded; terminal states never change",
    RunState.FAILED_CRASH: "it already failed; create a rerun with `chronicle rerun {e} {v}`",
    RunState.PENDING: "start it first",
    RunState.RUNNING: "it is already running; pass resume=True to take it over",
}


def _refused(action: Action, state: RunState, key: tuple[str, int, int]) -> InvalidTransition:
    hint = _HINTS.get(state, "")
    hint = hint.format(e=key[0], v=key[1]) if hint else ""
    return InvalidTransition(
        f"cannot {action} run {_fmt(key)}: it is {state.value}" + (f"; {hint}" if hint else ""),
        state=state.value,
        action=action.value,
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
