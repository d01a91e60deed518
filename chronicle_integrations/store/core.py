"""The one store implementation: the run lifecycle, leases, watchdog, events and assets, on SQL.

Both the reference server (a thin HTTP layer) and the embedded client call this class, so the
two behave identically by construction.

Concurrency model
-----------------
Every mutation runs in one write transaction that first locks what it changes:

* SQLite: ``BEGIN IMMEDIATE`` takes the database's write lock up front (WAL mode lets readers
  carry on), with a busy timeout, so several processes can write the same file safely.
* PostgreSQL: ``SELECT ... FOR UPDATE`` on the run row, so racing ``start`` calls on one run
  serialise and exactly one gets the lease, while unrelated runs proceed in parallel.

Counters (``next_variation``, ``next_run``) are bumped with one atomic ``UPDATE``, which makes
run numbers unique under concurrent ``create_run`` on either database.

Time
----
Only the store's clock counts (``clock``, ``time.time`` by default); clients never send times.
Liveness is ``alive_at = COALESCE(last_heartbeat_at, started_at)``. The effective state is
computed from it on every read; :meth:`Store.sweep` persists the watchdog's transitions with
their events, and every write first *materialises* any transition the watchdog owes the run,
so the event log is always a valid walk through the transition table.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError, OperationalError

from .. import _validation as check
from .._errors import (
    AlreadyExists,
    APIError,
    ConfigurationError,
    InvalidRequest,
    InvalidTransition,
    LeaseConflict,
    NotFound,
    PayloadTooLarge,
    ServerError,
)
from .._models import AssetInfo, Event, ExperimentInfo, Page, RunInfo, UploadStatus, walk_pages
from ..lifecycle import (
    LEASED_ACTIONS,
    TERMINAL_TARGET,
    Action,
    RunState,
    next_state,
)
from . import schema as t
from .blobs import BlobStore, open_blob_store

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TIMEOUT = 900.0
DEFAULT_LOST_GRACE = 172800.0
#: A running run whose heartbeats carry progress that has not advanced for this long is
#: flagged ``stalled`` (a flag, not a state).
DEFAULT_STALL_TIMEOUT = 1800.0
#: An unfinished upload that received no chunk for this long is dropped with its bytes.
DEFAULT_UPLOAD_EXPIRY = 86400.0
#: The largest asset: the bound of an upload that declared no size (and of declared sizes).
DEFAULT_MAX_ASSET_BYTES = 2**40

_RUNNING, _LOST = RunState.RUNNING.value, RunState.LOST.value


#: The run's asset count, in a ``RETURNING`` clause of an ``UPDATE runs``. Written out:
#: SQLAlchemy's SQLite dialect renders RETURNING columns unqualified, which would turn the
#: correlation into ``experiment_id = experiment_id`` (a count of every asset).
_RETURNING_RUN = (
    "RETURNING "
    + ", ".join(f"runs.{c.name}" for c in t.runs.c)
    + """,
    (SELECT count(*) FROM assets WHERE assets.experiment_id = runs.experiment_id
        AND assets.variation = runs.variation AND assets.run = runs.run) AS asset_count"""
)


def _heartbeat_fast_statement(with_progress: bool) -> sa.TextClause:
    """The heartbeat fast path as one prebuilt statement: a live run beating under its
    lease is updated and read back (with its asset count) in a single round trip.

    Built once at import: building an ``UPDATE`` expression per call (SQLAlchemy coercion
    and cache-key generation) plus a second ``SELECT`` cost about three quarters of a
    heartbeat's store time (BENCHMARKS.md, F2.2). Parameters: ``p_e``, ``p_v``, ``p_r``,
    ``p_lease``, ``p_cut`` (oldest ``alive_at`` still running), ``p_now`` and, with
    progress, ``p_progress`` (canonical JSON; ``progress_at`` moves only when it changed).
    """
    progress = (
        """, progress = :p_progress,
    progress_at = CASE WHEN runs.progress IS NULL OR runs.progress <> :p_progress
                       THEN :p_now ELSE runs.progress_at END"""
        if with_progress
        else ""
    )
    return sa.text(f"""
UPDATE runs SET last_heartbeat_at = :p_now, alive_at = :p_now{progress}
WHERE runs.experiment_id = :p_e AND runs.variation = :p_v AND runs.run = :p_r
  AND runs.state = 'running' AND runs.lease = :p_lease AND runs.alive_at >= :p_cut
{_RETURNING_RUN}""")


_HEARTBEAT_FAST = {True: _heartbeat_fast_statement(True), False: _heartbeat_fast_statement(False)}

#: PostgreSQL: a batch of fast-path heartbeats in one statement (see
#: ``Store._heartbeat_set``): the same predicate and assignments as ``_HEARTBEAT_FAST``, one
#: row per array position; a NULL progress leaves the run's progress as it was.
_HEARTBEAT_SET_PG = sa.text(
    """
UPDATE runs SET last_heartbeat_at = :now, alive_at = :now,
    progress = COALESCE(b.progress, runs.progress),
    progress_at = CASE WHEN b.progress IS NOT NULL
                        AND runs.progress IS DISTINCT FROM b.progress
                       THEN :now ELSE runs.progress_at END
FROM unnest(CAST(:beats AS integer[]), CAST(:es AS text[]), CAST(:vs AS integer[]),
            CAST(:rs AS integer[]), CAST(:leases AS text[]), CAST(:progress AS text[]))
     AS b(beat, experiment_id, variation, run, lease, progress)
WHERE runs.experiment_id = b.experiment_id AND runs.variation = b.variation
  AND runs.run = b.run AND runs.state = 'running' AND runs.lease = b.lease
  AND runs.alive_at >= :cut
"""
    + _RETURNING_RUN.replace("RETURNING ", "RETURNING b.beat AS beat, ")
)


def _now_clock() -> float:
    return time.time()


class Store:
    """The Chronicle store over a SQLAlchemy engine and a blob store.

    Example::

        store = Store.open("sqlite:///chronicle/chronicle.db", "chronicle/assets")
        exp = store.create_experiment("sweep", [{"lr": 0.1}])
        run = store.create_run(exp.experiment_id, 0)
        lease = store.start(exp.experiment_id, 0, run.run).lease
    """

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
        clock: Callable[[], float] = _now_clock,
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
        self.clock = clock
        self._sqlite = engine.dialect.name == "sqlite"
        #: A SQLite file this process may not write (see :func:`make_engine`): reads only.
        self.read_only = self._sqlite and engine.url.query.get("mode") == "ro"
        self._write_lock = threading.Lock() if self._sqlite else None
        self._last_sweep = 0.0
        self._last_expiry = -math.inf  # (time.monotonic() of the last expire_uploads)
        self._sweep_lock = threading.Lock()
        with self._read() as conn:
            version = t.current_version(conn)
        if version == t.SCHEMA_VERSION:
            return  # nothing to create or migrate: no write lock taken
        if self.read_only:
            raise ConfigurationError(
                f"the store {engine.url.database} is read-only here, and its schema (version "
                f"{version}) is not this chronicle's ({t.SCHEMA_VERSION}): open it once with "
                "write access (or with the matching chronicle-integrations version)"
            )
        with self._write() as conn:
            if not self._sqlite:
                # Serialise concurrent first opens: only one process creates the schema.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(727001)"))
            t.migrate(conn)

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(
        cls,
        url: str,
        assets: str | os.PathLike[str],
        **kwargs: Any,
    ) -> Store:
        """Open (creating and migrating as needed) the store at a SQLAlchemy ``url``."""
        return cls(make_engine(url), open_blob_store(assets), **kwargs)

    @classmethod
    def open_home(cls, home: str | os.PathLike[str], **kwargs: Any) -> Store:
        """Open the embedded store in a Chronicle home directory (SQLite + local assets)."""
        root = Path(home).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls.open(f"sqlite:///{root / 'chronicle.db'}", root / "assets", **kwargs)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

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

    # ------------------------------------------------------------------ effective state
    def effective_state(self, state: str, alive_at: float | None, now: float) -> RunState:
        """The state a run is really in at ``now``, given what is persisted."""
        if state in (_RUNNING, _LOST) and alive_at is not None:
            silent = now - alive_at
            if silent > self.heartbeat_timeout + self.lost_grace:
                return RunState.FAILED_LOST
            if silent > self.heartbeat_timeout:
                return RunState.LOST
        return RunState(state)

    def _effective_sql(self, now: float) -> sa.ColumnElement[str]:
        c = t.runs.c
        return sa.case(
            (
                sa.and_(
                    c.state.in_([_RUNNING, _LOST]),
                    c.alive_at < now - self.heartbeat_timeout - self.lost_grace,
                ),
                RunState.FAILED_LOST.value,
            ),
            (sa.and_(c.state == _RUNNING, c.alive_at < now - self.heartbeat_timeout), _LOST),
            else_=c.state,
        )

    def _materialise(self, conn: sa.Connection, row: sa.Row[Any], now: float) -> RunState:
        """Persist the watchdog transitions the run is owed (with their events)."""
        state = RunState(row.state)
        effective = self.effective_state(row.state, row.alive_at, now)
        if effective is state:
            return state
        key = (row.experiment_id, row.variation, row.run)
        lost_at = row.alive_at + self.heartbeat_timeout
        if state is RunState.RUNNING:
            self._event(
                conn,
                key,
                state,
                RunState.LOST,
                lost_at,
                "watchdog",
                {"silent_for": self.heartbeat_timeout},
            )
            state = RunState.LOST
        values: dict[str, Any] = {"state": effective.value}
        if effective is RunState.FAILED_LOST:
            expired_at = lost_at + self.lost_grace
            self._event(
                conn,
                key,
                RunState.LOST,
                RunState.FAILED_LOST,
                expired_at,
                "watchdog",
                {"lost_for": self.lost_grace},
            )
            values.update(ended_at=expired_at, reason="lost")
        conn.execute(t.runs.update().where(_run_pk(*key)).values(**values))
        return effective

    # ------------------------------------------------------------------ experiments
    def create_experiment(
        self,
        name: str,
        variations: Iterable[dict[str, Any]] = (),
        experiment_id: str | None = None,
    ) -> ExperimentInfo:
        """Create an experiment with numbered variations (0, 1, ...).

        Creating an experiment whose id exists with the same name and the same variations is
        a success with no effect (a retried request); a different definition is refused.
        """
        check.name(name)
        configs = [check.config(c) for c in variations]
        if experiment_id is None:
            experiment_id = check.derive_experiment_id(name)
        check.experiment_id(experiment_id)
        now = self.clock()
        try:
            with self._write() as conn:
                conn.execute(
                    t.experiments.insert().values(
                        experiment_id=experiment_id,
                        name=name,
                        created_at=now,
                        next_variation=len(configs),
                    )
                )
                if configs:
                    conn.execute(
                        t.variations.insert(),
                        [
                            {
                                "experiment_id": experiment_id,
                                "variation": i,
                                "config": _dumps(c),
                                "created_at": now,
                            }
                            for i, c in enumerate(configs)
                        ],
                    )
        except IntegrityError:
            existing = self.get_experiment(experiment_id)
            with self._read() as conn:
                stored = [
                    json.loads(x)
                    for x in conn.execute(
                        sa.select(t.variations.c.config)
                        .where(t.variations.c.experiment_id == experiment_id)
                        .order_by(t.variations.c.variation)
                    ).scalars()
                ]
            if existing.name == name and stored[: len(configs)] == configs:
                return existing
            raise AlreadyExists(
                f"experiment {experiment_id!r} exists with a different definition",
                experiment_id=experiment_id,
            ) from None
        return ExperimentInfo(experiment_id, name, now, len(configs))

    def get_experiment(self, experiment_id: str) -> ExperimentInfo:
        """One experiment, or NotFound."""
        check.experiment_id(experiment_id)
        with self._read() as conn:
            row = conn.execute(
                sa.select(t.experiments).where(t.experiments.c.experiment_id == experiment_id)
            ).first()
        if row is None:
            raise NotFound(
                f"experiment {experiment_id!r} does not exist", experiment_id=experiment_id
            )
        return ExperimentInfo(row.experiment_id, row.name, row.created_at, row.next_variation)

    def list_experiments(self) -> list[ExperimentInfo]:
        """Every experiment, oldest first (walks :meth:`page_experiments`)."""
        return list(walk_pages(lambda cursor: self.page_experiments(cursor=cursor)))

    def page_experiments(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[ExperimentInfo]:
        """One page of experiments, oldest first, after ``cursor`` (a ``next_cursor``).

        Keyset on ``(created_at, experiment_id)`` over ``ix_experiments_created``.
        """
        size = check.page_limit(limit)
        c = t.experiments.c
        query = sa.select(t.experiments).order_by(c.created_at, c.experiment_id).limit(size + 1)
        if cursor is not None:
            at, after = _cursor_key(cursor, "experiments", _finite, check.experiment_id)
            query = query.where(sa.tuple_(c.created_at, c.experiment_id) > sa.tuple_(at, after))
        with self._read() as conn:
            rows = conn.execute(query).all()
        infos = [
            ExperimentInfo(r.experiment_id, r.name, r.created_at, r.next_variation) for r in rows
        ]
        return _page(infos, size, "experiments", lambda e: (e.created_at, e.experiment_id))

    def add_variation(
        self, experiment_id: str, config: dict[str, Any], request_id: str | None = None
    ) -> int:
        """Append a variation; returns its number. ``request_id`` makes retries safe."""
        check.experiment_id(experiment_id)
        check.config(config)
        rid = (
            _request_key("add_variation", request_id, experiment_id, _dumps(config))
            if request_id
            else None
        )
        with self._write() as conn:
            if rid and (done := self._request_done(conn, rid)) is not None:
                return int(done["variation"])
            number = conn.execute(
                t.experiments.update()
                .where(t.experiments.c.experiment_id == experiment_id)
                .values(next_variation=t.experiments.c.next_variation + 1)
                .returning(t.experiments.c.next_variation)
            ).scalar()
            if number is None:
                raise NotFound(
                    f"experiment {experiment_id!r} does not exist", experiment_id=experiment_id
                )
            variation = number - 1
            conn.execute(
                t.variations.insert().values(
                    experiment_id=experiment_id,
                    variation=variation,
                    config=_dumps(config),
                    created_at=self.clock(),
                )
            )
            if rid:
                self._remember(conn, rid, {"variation": variation})
        return variation

    def get_variation_config(self, experiment_id: str, variation: int) -> dict[str, Any]:
        """The config of one variation."""
        check.experiment_id(experiment_id)
        check.number(variation, "variation")
        with self._read() as conn:
            config = conn.execute(
                sa.select(t.variations.c.config).where(
                    t.variations.c.experiment_id == experiment_id,
                    t.variations.c.variation == variation,
                )
            ).scalar()
        if config is None:
            raise NotFound(
                f"variation {experiment_id}/{variation} does not exist",
                experiment_id=experiment_id,
                variation=variation,
            )
        result: dict[str, Any] = json.loads(config)
        return result

    # ------------------------------------------------------------------ runs
    def create_run(
        self, experiment_id: str, variation: int, request_id: str | None = None
    ) -> RunInfo:
        """Create the next run (``max(run) + 1``, 0 for the first) of a variation, pending."""
        check.experiment_id(experiment_id)
        check.number(variation, "variation")
        rid = (
            _request_key("create_run", request_id, experiment_id, str(variation))
            if request_id
            else None
        )
        now = self.clock()
        with self._write() as conn:
            if rid and (done := self._request_done(conn, rid)) is not None:
                run = int(done["run"])
            else:
                number = conn.execute(
                    t.variations.update()
                    .where(
                        t.variations.c.experiment_id == experiment_id,
                        t.variations.c.variation == variation,
                    )
                    .values(next_run=t.variations.c.next_run + 1)
                    .returning(t.variations.c.next_run)
                ).scalar()
                if number is None:
                    raise NotFound(
                        f"variation {experiment_id}/{variation} does not exist",
                        experiment_id=experiment_id,
                        variation=variation,
                    )
                run = number - 1
                conn.execute(
                    t.runs.insert().values(
                        experiment_id=experiment_id,
                        variation=variation,
                        run=run,
                        state=RunState.PENDING.value,
                        created_at=now,
                    )
                )
                self._event(
                    conn, (experiment_id, variation, run), None, RunState.PENDING, now, "create"
                )
                if rid:
                    self._remember(conn, rid, {"run": run})
        return self.get_run(experiment_id, variation, run)

    def get_run(self, experiment_id: str, variation: int, run: int) -> RunInfo:
        """A run with its effective state, or NotFound."""
        check.experiment_id(experiment_id)
        check.number(variation, "variation")
        check.number(run, "run")
        infos = self._select_runs(_run_pk(experiment_id, variation, run))
        if not infos:
            raise NotFound(
                f"run {experiment_id}/{variation}/{run} does not exist",
                experiment_id=experiment_id,
                variation=variation,
                run=run,
            )
        return infos[0]

    def list_runs(
        self, experiment_id: str | None = None, state: str | RunState | None = None
    ) -> list[RunInfo]:
        """Runs, optionally of one experiment and/or in one (effective) state (walks
        :meth:`page_runs`; prefer that, or the client's ``iter_runs``, on a large store)."""
        return list(walk_pages(lambda cursor: self.page_runs(experiment_id, state, cursor=cursor)))

    def page_runs(
        self,
        experiment_id: str | None = None,
        state: str | RunState | None = None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[RunInfo]:
        """One page of runs, by ``experiment_id, variation, run``, after ``cursor``.

        Keyset pagination on the primary key (never ``OFFSET``): a page costs an index range
        scan however deep the walk is, and every run that exists for the whole walk comes
        exactly once, in order, whatever is created meanwhile. A page holds at most
        ``limit`` runs and about :data:`~chronicle_integrations._validation.MAX_PAGE_BYTES`
        (runs with long failure messages come fewer to a page).
        """
        size = check.page_limit(limit)
        conditions: list[sa.ColumnElement[bool]] = []
        now = self.clock()
        c = t.runs.c
        if experiment_id is not None:
            check.experiment_id(experiment_id)
            conditions.append(c.experiment_id == experiment_id)
        if cursor is not None:
            e, v, r = _cursor_key(
                cursor,
                "runs",
                check.experiment_id,
                lambda x: check.number(x, "variation"),
                lambda x: check.number(x, "run"),
            )
            if experiment_id is None:
                pk = sa.tuple_(c.experiment_id, c.variation, c.run)
                conditions.append(pk > sa.tuple_(e, v, r))
            elif e == experiment_id:
                # (variation, run) within the experiment: an index range, not a scan of
                # the experiment's runs from its first one.
                conditions.append(sa.tuple_(c.variation, c.run) > sa.tuple_(v, r))
            elif e > experiment_id:
                conditions.append(sa.false())
        if state is not None:
            conditions.append(self._effective_sql(now) == check.run_state(state).value)
        infos = self._select_runs(sa.and_(sa.true(), *conditions), now=now, limit=size + 1)
        return _page(
            infos, size, "runs", lambda i: (i.experiment_id, i.variation, i.run), _run_bytes
        )

    def _select_runs(
        self, where: sa.ColumnElement[bool], now: float | None = None, limit: int | None = None
    ) -> list[RunInfo]:
        now = self.clock() if now is None else now
        c = t.runs.c
        asset_count = (
            sa.select(sa.func.count())
            .select_from(t.assets)
            .where(
                t.assets.c.experiment_id == c.experiment_id,
                t.assets.c.variation == c.variation,
                t.assets.c.run == c.run,
            )
            .scalar_subquery()
        )
        query = (
            sa.select(t.runs, asset_count.label("asset_count"))
            .where(where)
            .order_by(c.experiment_id, c.variation, c.run)
            .limit(limit)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [self._info(row, now) for row in rows]

    def _info(self, row: Any, now: float, lease: str | None = None, beat: bool = False) -> RunInfo:
        """The record of ``row`` at ``now``. ``beat``: an answer to ``start`` or
        ``heartbeat``, which tells the worker the watchdog's ``heartbeat_timeout``."""
        state = self.effective_state(row.state, row.alive_at, now)
        ended_at, reason = row.ended_at, row.reason
        if state is RunState.FAILED_LOST and row.state != state.value:
            ended_at = row.alive_at + self.heartbeat_timeout + self.lost_grace
            reason = "lost"
        return RunInfo(
            experiment_id=row.experiment_id,
            variation=row.variation,
            run=row.run,
            state=state,
            created_at=row.created_at,
            started_at=row.started_at,
            last_heartbeat_at=row.last_heartbeat_at,
            ended_at=ended_at,
            reason=reason,
            message=row.message,
            lease_holder=row.lease_holder,
            asset_count=int(getattr(row, "asset_count", 0) or 0),
            lease=lease,
            heartbeat_timeout=self.heartbeat_timeout if beat else None,
            progress=json.loads(row.progress) if row.progress else None,
            progress_at=row.progress_at,
            stalled=(
                state is RunState.RUNNING
                and row.progress_at is not None
                and now - row.progress_at > self.stall_timeout
            ),
        )

    # ------------------------------------------------------------------ transitions
    def start(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        *,
        resume: bool = False,
        lease: str | None = None,
        holder: str | None = None,
    ) -> RunInfo:
        """``pending -> running`` (``resume=True``: also take over a running or lost run).

        Returns the run with ``lease`` set. The caller may propose the lease token; repeating
        a start with the lease the run already holds is a success with no effect, which makes
        retrying a start whose response was lost safe.
        """
        lease = check.token(lease, "lease") if lease is not None else secrets.token_urlsafe(24)
        if holder is not None:
            holder = str(holder)[:256]
        action = Action.RESUME if resume else Action.START
        key = _key(experiment_id, variation, run)
        now = self.clock()
        with self._write() as conn:
            row = self._lock_run(conn, *key)
            state = self._materialise(conn, row, now)
            if state is RunState.RUNNING and row.lease == lease:
                return self._info(self._reload(conn, key), now, lease=lease, beat=True)  # repeat
            target = next_state(action, state)
            if target is None:
                raise _refused(action, state, key)
            values: dict[str, Any] = {
                "state": target.value,
                "lease": lease,
                "lease_holder": holder,
                "alive_at": now,
                "last_heartbeat_at": None,
                # a (re)start opens a new stall window: progress is measured from here
                "progress_at": now if row.progress is not None else None,
            }
            if row.started_at is None:
                values["started_at"] = now
            else:
                values["last_heartbeat_at"] = now  # a takeover counts as a sign of life
            conn.execute(t.runs.update().where(_run_pk(*key)).values(**values))
            self._event(
                conn, key, state, target, now, str(action), {"holder": holder} if holder else None
            )
            return self._info(self._reload(conn, key), now, lease=lease, beat=True)

    def heartbeat(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        lease: str | None,
        progress: dict[str, Any] | None = None,
    ) -> RunInfo:
        """``running -> running`` / ``lost -> running``. Refused on terminal runs (the error
        carries the state, so a worker learns it was cancelled) and under a stale lease.

        ``progress`` (e.g. ``{"step": 120, "epoch": 3}``) is kept; when it differs from the
        last one, ``progress_at`` moves: a run beating without advancing becomes ``stalled``.
        """
        key = _key(experiment_id, variation, run)
        encoded = _dumps(check.progress(progress)) if progress is not None else None
        now = self.clock()
        with self._write() as conn:
            # Fast path (one prebuilt statement): a live run beating under its lease.
            if isinstance(lease, str):
                fast = self._heartbeat_rows(
                    conn, [(0, self._fast_params(key, lease, encoded, now))]
                )[0][1]
                if fast is not None:
                    return self._info(fast, now, beat=True)
            c = t.runs.c
            values: dict[str, Any] = {"last_heartbeat_at": now, "alive_at": now}
            if encoded is not None:
                values["progress"] = encoded
                values["progress_at"] = sa.case(
                    (c.progress.is_distinct_from(encoded), now), else_=c.progress_at
                )
            row = self._lock_run(conn, *key)
            state = self._materialise(conn, row, now)
            self._check_lease(Action.HEARTBEAT, state, row, lease, key)
            target = next_state(Action.HEARTBEAT, state)
            if target is None:
                raise _refused(Action.HEARTBEAT, state, key)
            if state is not target and encoded is not None:
                values["progress_at"] = now  # back from lost: a new stall window
            conn.execute(t.runs.update().where(_run_pk(*key)).values(state=target.value, **values))
            if state is not target:
                self._event(conn, key, state, target, now, "heartbeat")
            return self._info(self._reload(conn, key), now, beat=True)

    def heartbeat_many(
        self,
        beats: Iterable[tuple[str, int, int, str | None, dict[str, Any] | None]],
    ) -> list[RunInfo | APIError]:
        """Many heartbeats ``(experiment_id, variation, run, lease, progress)`` at once, each
        with exactly the effect and result of :meth:`heartbeat` (its record, or the error it
        would raise).

        Live runs beating under their lease (nearly all heartbeats) share one write
        transaction, one prebuilt statement each: the transaction's fixed cost (the write
        lock, ``BEGIN``, the commit) is paid once per batch instead of once per heartbeat.
        The rest (a lost run coming back, a stale lease, a terminal run, bad input) and, if
        the shared transaction fails, every heartbeat of the batch, take :meth:`heartbeat`
        one by one, so no heartbeat's error can affect another's.
        """
        items = list(beats)
        results: list[RunInfo | APIError | None] = [None] * len(items)
        fast: list[tuple[int, dict[str, Any]]] = []
        batched: set[tuple[str, int, int]] = set()
        now = self.clock()
        for i, (e, v, r, lease, progress) in enumerate(items):
            if not isinstance(lease, str):
                continue
            try:
                key = _key(e, v, r)
                encoded = _dumps(check.progress(progress)) if progress is not None else None
            except APIError:
                continue  # heartbeat() raises the same error below
            if key in batched:
                continue  # a run's later heartbeats follow its first, in order, below
            batched.add(key)
            fast.append((i, self._fast_params(key, lease, encoded, now)))
        if fast:
            try:
                with self._write() as conn:
                    rows = (
                        self._heartbeat_rows(conn, fast)
                        if self._sqlite
                        else self._heartbeat_set(conn, fast, now)
                    )
            except APIError as exc:
                log.warning(
                    "a batch of %d heartbeats failed (%s); retrying them one by one", len(fast), exc
                )
            else:
                for i, row in rows:
                    if row is not None:
                        results[i] = self._info(row, now, beat=True)
        for i, item in enumerate(items):
            if results[i] is None:
                try:
                    results[i] = self.heartbeat(*item)
                except APIError as exc:
                    results[i] = exc
        return cast("list[RunInfo | APIError]", results)  # every slot is filled by now

    def _fast_params(
        self, key: tuple[str, int, int], lease: str, progress: str | None, now: float
    ) -> dict[str, Any]:
        """The parameters of the heartbeat fast path (``p_progress`` only with progress)."""
        params: dict[str, Any] = {
            "p_e": key[0],
            "p_v": key[1],
            "p_r": key[2],
            "p_lease": lease,
            "p_now": now,
            "p_cut": now - self.heartbeat_timeout,
        }
        if progress is not None:
            params["p_progress"] = progress
        return params

    @staticmethod
    def _heartbeat_rows(
        conn: sa.Connection,
        fast: list[tuple[int, dict[str, Any]]],
    ) -> list[tuple[int, Any]]:
        """The prebuilt statement once per heartbeat (SQLite batches, and single
        heartbeats: a statement costs microseconds in-process; the transaction is what a
        batch saves)."""
        return [
            (i, conn.execute(_HEARTBEAT_FAST["p_progress" in params], params).first())
            for i, params in fast
        ]

    def _heartbeat_set(
        self, conn: sa.Connection, fast: list[tuple[int, dict[str, Any]]], now: float
    ) -> list[tuple[int, Any]]:
        """PostgreSQL: the whole batch as one prebuilt ``UPDATE ... FROM unnest(arrays)``
        (one round trip and one cached plan instead of one per heartbeat;
        ``heartbeat_many`` puts at most one heartbeat per run in it)."""
        params = {
            "now": now,
            "cut": now - self.heartbeat_timeout,
            "beats": [i for i, _ in fast],
            "es": [p["p_e"] for _, p in fast],
            "vs": [p["p_v"] for _, p in fast],
            "rs": [p["p_r"] for _, p in fast],
            "leases": [p["p_lease"] for _, p in fast],
            "progress": [p.get("p_progress") for _, p in fast],
        }
        by_beat = {row.beat: row for row in conn.execute(_HEARTBEAT_SET_PG, params)}
        return [(i, by_beat.get(i)) for i, _ in fast]

    def succeed(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        lease: str | None,
        progress: dict[str, Any] | None = None,
    ) -> RunInfo:
        """``running|lost -> succeeded``, under the run's lease. ``progress`` is the final
        one (e.g. ``{"step": 1200, "epoch": 9}``): a finished run shows where it ended."""
        return self._terminate(
            Action.SUCCEED, _key(experiment_id, variation, run), lease, None, None, progress
        )

    def fail(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        reason: str = "crash",
        message: str | None = None,
        lease: str | None = None,
        progress: dict[str, Any] | None = None,
    ) -> RunInfo:
        """``pending|running|lost -> failed_crash|failed_abandoned``.

        ``reason="crash"`` needs the lease once the run was started; ``"abandoned"`` (a
        cancellation) does not. ``progress``: where training stopped (as for ``succeed``).
        """
        check.fail_reason(reason)
        action = Action.FAIL_CRASH if reason == "crash" else Action.FAIL_ABANDONED
        return self._terminate(
            action,
            _key(experiment_id, variation, run),
            lease,
            check.message(message),
            reason,
            progress,
        )

    def _terminate(
        self,
        action: Action,
        key: tuple[str, int, int],
        lease: str | None,
        message: str | None,
        reason: str | None,
        progress: dict[str, Any] | None = None,
    ) -> RunInfo:
        encoded = _dumps(check.progress(progress)) if progress is not None else None
        now = self.clock()
        with self._write() as conn:
            row = self._lock_run(conn, *key)
            state = self._materialise(conn, row, now)
            if state is TERMINAL_TARGET[action]:
                return self._info(self._reload(conn, key), now)  # idempotent repeat
            if state.is_terminal:
                raise _refused(action, state, key)
            self._check_lease(action, state, row, lease, key)
            target = next_state(action, state)
            if target is None:
                raise _refused(action, state, key)
            values: dict[str, Any] = {
                "state": target.value,
                "ended_at": now,
                "reason": reason,
                "message": message,
            }
            if encoded is not None and encoded != row.progress:
                values.update(progress=encoded, progress_at=now)
            conn.execute(t.runs.update().where(_run_pk(*key)).values(**values))
            self._event(
                conn,
                key,
                state,
                target,
                now,
                str(action),
                {"message": message[:1000]} if message else None,
            )
            return self._info(self._reload(conn, key), now)

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

    def _reload(self, conn: sa.Connection, key: tuple[str, int, int]) -> Any:
        c = t.runs.c
        count = (
            sa.select(sa.func.count())
            .select_from(t.assets)
            .where(
                t.assets.c.experiment_id == c.experiment_id,
                t.assets.c.variation == c.variation,
                t.assets.c.run == c.run,
            )
            .scalar_subquery()
        )
        return conn.execute(
            sa.select(t.runs, count.label("asset_count")).where(_run_pk(*key))
        ).one()

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

    def events(self, experiment_id: str, variation: int, run: int) -> list[Event]:
        """The run's timeline, oldest first, including watchdog transitions it is owed
        (walks :meth:`page_events`)."""
        return list(
            walk_pages(
                lambda cursor: self.page_events(experiment_id, variation, run, cursor=cursor)
            )
        )

    def page_events(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Event]:
        """One page of the run's timeline, oldest first, after ``cursor``: keyset on the
        event id over ``ix_events_run``."""
        key = _key(experiment_id, variation, run)
        size = check.page_limit(limit)
        after = _cursor_key(cursor, "events", _event_id)[0] if cursor is not None else None
        now = self.clock()
        with self._read() as conn:
            row = conn.execute(sa.select(t.runs).where(_run_pk(*key))).first()
        if row is None:
            raise NotFound(f"run {_fmt(key)} does not exist")
        if self.effective_state(row.state, row.alive_at, now).value != row.state:
            with self._write() as conn:
                self._materialise(conn, self._lock_run(conn, *key), now)
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.events)
                .where(
                    t.events.c.experiment_id == key[0],
                    t.events.c.variation == key[1],
                    t.events.c.run == key[2],
                    sa.true() if after is None else t.events.c.id > after,
                )
                .order_by(t.events.c.id)
                .limit(size + 1)
            ).all()
        events = [
            Event(
                id=r.id,
                kind=r.kind,
                from_state=r.from_state,
                to_state=r.to_state,
                at=r.at,
                cause=r.cause,
                detail=json.loads(r.detail) if r.detail else None,
            )
            for r in rows
        ]
        return _page(events, size, "events", lambda e: (e.id,))

    # ------------------------------------------------------------------ watchdog
    def sweep(self) -> dict[str, int]:
        """Persist the watchdog's transitions for every run that is owed one.

        Set-based, over the ``(state, alive_at)`` index, and done by the database: the rows
        never travel through Python (a sweep over a million runs with ten thousand owed takes
        milliseconds, see BENCHMARKS.md). The events inserted are exactly the rows moved:

        * PostgreSQL: one statement per transition, ``WITH moved AS (UPDATE ... RETURNING)
          INSERT INTO events SELECT ... FROM moved`` (a heartbeat that commits meanwhile is
          either fully before or fully after it);
        * SQLite: ``INSERT ... SELECT`` then the same-condition ``UPDATE``, inside one
          ``BEGIN IMMEDIATE`` transaction, which no other writer can interleave.
        """
        now = self.clock()
        c = t.runs.c
        lost_cut = now - self.heartbeat_timeout
        expire_cut = now - self.heartbeat_timeout - self.lost_grace
        expired_at = c.alive_at + self.heartbeat_timeout + self.lost_grace
        with self._write() as conn:
            lost = self._sweep_step(
                conn,
                sa.and_(c.state == _RUNNING, c.alive_at < lost_cut),
                {"state": _LOST},
                RunState.RUNNING,
                RunState.LOST,
                c.alive_at + self.heartbeat_timeout,
            )
            expired = self._sweep_step(
                conn,
                sa.and_(c.state == _LOST, c.alive_at < expire_cut),
                {"state": RunState.FAILED_LOST.value, "reason": "lost", "ended_at": expired_at},
                RunState.LOST,
                RunState.FAILED_LOST,
                expired_at,
            )
        self._last_sweep = now
        if lost or expired:
            log.info("watchdog: %d run(s) lost, %d expired", lost, expired)
        return {"lost": lost, "failed_lost": expired}

    def _sweep_step(
        self,
        conn: sa.Connection,
        where: sa.ColumnElement[bool],
        values: dict[str, Any],
        src: RunState,
        dst: RunState,
        at: sa.ColumnElement[float],
    ) -> int:
        """Move every run matching ``where`` from ``src`` to ``dst``, logging one event each
        (``at``: when the watchdog's transition really happened, from the run's liveness)."""
        c = t.runs.c
        columns = [
            "experiment_id",
            "variation",
            "run",
            "kind",
            "from_state",
            "to_state",
            "at",
            "cause",
        ]

        def rows(source: Any) -> sa.Select[Any]:
            return sa.select(
                source.c.experiment_id,
                source.c.variation,
                source.c.run,
                sa.literal("transition"),
                sa.literal(src.value),
                sa.literal(dst.value),
                source.c.at,
                sa.literal("watchdog"),
            )

        if self._sqlite:
            conn.execute(
                t.events.insert().from_select(
                    columns,
                    rows(
                        sa.select(c.experiment_id, c.variation, c.run, at.label("at"))
                        .where(where)
                        .subquery()
                    ),
                )
            )
            return int(conn.execute(t.runs.update().where(where).values(**values)).rowcount)
        moved = (
            t.runs.update()
            .where(where)
            .values(**values)
            .returning(c.experiment_id, c.variation, c.run, at.label("at"))
            .cte("moved")
        )
        inserted = conn.execute(
            t.events.insert().from_select(columns, rows(moved)).returning(t.events.c.id)
        )
        return len(inserted.all())  # (psycopg reports no rowcount for INSERT ... SELECT)

    def maybe_sweep(self, every: float = 30.0) -> None:
        """Sweep if the last sweep from this process is older than ``every`` seconds (never
        on a read-only store: reads compute the effective state without it)."""
        if self.read_only:
            return
        if self.clock() - self._last_sweep < every or not self._sweep_lock.acquire(False):
            return
        try:
            self.sweep()
            self.expire_uploads(every=self.expiry_check_interval)
        finally:
            self._sweep_lock.release()

    @property
    def expiry_check_interval(self) -> float:
        """How often periodic callers look for expired uploads (a quarter of the expiry, at
        most every five minutes: the check reads every unfinished upload's row)."""
        return min(self.upload_expiry / 4, 300.0)

    def expire_uploads(self, *, every: float = 0.0) -> int:
        """Drop every unfinished upload that received no chunk for ``upload_expiry`` seconds,
        with its partial bytes; return how many. A later request to one gets 404
        ``not_found`` (its client starts a new upload).

        "No chunk" is judged by both clocks that saw the upload: the store's clock for its
        creation, the file system's (wall-clock) for its last written byte. With ``every``
        > 0, does nothing when the last check from this process is more recent than that.
        """
        started = time.monotonic()
        if every > 0 and started - self._last_expiry < every:
            return 0
        self._last_expiry = started
        created_cut = self.clock() - self.upload_expiry
        written_cut = time.time() - self.upload_expiry
        u = t.uploads.c
        with self._read() as conn:
            candidates = conn.execute(
                sa.select(u.upload_id).where(u.completed_at.is_(None), u.created_at < created_cut)
            ).all()
        expired = 0
        for (upload_id,) in candidates:
            last = self.blobs.last_write(upload_id)
            if last is not None and last >= written_cut:
                continue
            with self._write() as conn:
                gone = conn.execute(
                    t.uploads.delete().where(u.upload_id == upload_id, u.completed_at.is_(None))
                ).rowcount
            if gone:
                self.blobs.discard(upload_id)
                expired += 1
        if expired:
            log.info(
                "dropped %d unfinished upload(s) idle for more than %g s",
                expired,
                self.upload_expiry,
            )
        return expired

    # ------------------------------------------------------------------ assets
    def list_assets(self, experiment_id: str, variation: int, run: int) -> list[AssetInfo]:
        """The run's complete assets, by name (walks :meth:`page_assets`)."""
        return list(
            walk_pages(
                lambda cursor: self.page_assets(experiment_id, variation, run, cursor=cursor)
            )
        )

    def page_assets(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[AssetInfo]:
        """One page of the run's complete assets, by name, after ``cursor``: keyset on the
        name within the primary key ``(experiment_id, variation, run, name)``."""
        key = _key(experiment_id, variation, run)
        size = check.page_limit(limit)
        after = _cursor_key(cursor, "assets", check.asset_name)[0] if cursor is not None else None
        self.get_run(*key)
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.assets)
                .where(
                    t.assets.c.experiment_id == key[0],
                    t.assets.c.variation == key[1],
                    t.assets.c.run == key[2],
                    sa.true() if after is None else t.assets.c.name > after,
                )
                .order_by(t.assets.c.name)
                .limit(size + 1)
            ).all()
        assets = [AssetInfo(r.name, r.size, r.sha256, r.created_at) for r in rows]
        return _page(assets, size, "assets", lambda a: (a.name,))

    def get_asset(self, experiment_id: str, variation: int, run: int, name: str) -> AssetInfo:
        """One asset's metadata, or NotFound."""
        key = _key(experiment_id, variation, run)
        check.asset_name(name)
        with self._read() as conn:
            row = conn.execute(
                sa.select(t.assets).where(
                    t.assets.c.experiment_id == key[0],
                    t.assets.c.variation == key[1],
                    t.assets.c.run == key[2],
                    t.assets.c.name == name,
                )
            ).first()
        if row is None:
            raise NotFound(f"run {_fmt(key)} has no asset {name!r}", name=name)
        return AssetInfo(row.name, row.size, row.sha256, row.created_at)

    def open_asset(
        self, experiment_id: str, variation: int, run: int, name: str
    ) -> tuple[AssetInfo, BinaryIO]:
        """An asset's metadata and a binary stream of its bytes (the caller closes it)."""
        info = self.get_asset(experiment_id, variation, run, name)
        return info, self.blobs.open(info.sha256)

    def begin_upload(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        name: str,
        *,
        size: int | None = None,
        upload_id: str | None = None,
        lease: str | None = None,
    ) -> UploadStatus:
        """Open (or, with the same ``upload_id``, re-open) a resumable upload to a run.

        When the run was started under a lease, uploads must carry it: only the worker that
        holds the run writes its assets.
        """
        key = _key(experiment_id, variation, run)
        check.asset_name(name)
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or size < 0 or size > 2**53
        ):
            raise InvalidRequest("size must be an integer >= 0", field="size")
        if size is not None and size > self.max_asset_bytes:
            raise self._too_large()
        upload_id = (
            check.token(upload_id, "upload_id")
            if upload_id is not None
            else secrets.token_urlsafe(18)
        )
        with self._write() as conn:
            existing = conn.execute(
                sa.select(t.uploads).where(t.uploads.c.upload_id == upload_id)
            ).first()
            if existing is not None:
                if (existing.experiment_id, existing.variation, existing.run, existing.name) != (
                    *key,
                    name,
                ):
                    raise InvalidRequest(
                        f"upload id {upload_id} belongs to another asset", field="upload_id"
                    )
                return self._upload_status(existing)
            row = self._lock_run(conn, *key)
            if row.lease is not None and (lease is None or not _same_lease(lease, row.lease)):
                raise LeaseConflict(
                    f"run {_fmt(key)}: uploads must carry the run's lease",
                    state=self.effective_state(row.state, row.alive_at, self.clock()).value,
                )
            conn.execute(
                t.uploads.insert().values(
                    upload_id=upload_id,
                    experiment_id=key[0],
                    variation=key[1],
                    run=key[2],
                    name=name,
                    size=size,
                    created_at=self.clock(),
                )
            )
        return UploadStatus(upload_id=upload_id, name=name, offset=0, size=size)

    def _upload_row(self, upload_id: str) -> Any:
        check.token(upload_id, "upload_id")
        with self._read() as conn:
            row = conn.execute(
                sa.select(t.uploads).where(t.uploads.c.upload_id == upload_id)
            ).first()
        if row is None:
            raise NotFound(
                f"upload {upload_id} does not exist (an unfinished upload expires after "
                f"{self.upload_expiry:g} s without a chunk): begin a new upload",
                upload_id=upload_id,
            )
        return row

    def _upload_status(self, row: Any) -> UploadStatus:
        done = row.completed_at is not None
        offset = row.size if done and row.size is not None else self.blobs.offset(row.upload_id)
        return UploadStatus(
            upload_id=row.upload_id,
            name=row.name,
            offset=offset,
            size=row.size,
            completed=done,
            sha256=row.sha256,
        )

    def upload_status(self, upload_id: str) -> UploadStatus:
        """Where an upload stands (``offset`` = bytes safely stored)."""
        return self._upload_status(self._upload_row(upload_id))

    def write_chunk(self, upload_id: str, offset: int, chunks: Iterable[bytes]) -> UploadStatus:
        """Append a chunk at ``offset`` (the stored size, else OffsetMismatch)."""
        writer = self.open_chunk(upload_id, offset)
        writer.write(chunks)
        return writer.status()

    def open_chunk(self, upload_id: str, offset: int) -> ChunkWriter:
        """Start a chunk at ``offset`` (the stored size, else OffsetMismatch): the returned
        writer appends it in as many :meth:`ChunkWriter.write` calls as convenient.

        The writer takes the upload over: from now on, writes of any older writer (a request
        that stalled, then woke up) are refused with OffsetMismatch, so two requests never
        interleave their bytes. Nothing is locked between writes.
        """
        row = self._upload_row(upload_id)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidRequest("offset must be an integer >= 0", field="offset")
        if row.completed_at is not None:
            raise InvalidRequest(f"upload {upload_id} is already complete", field="upload_id")
        # (The claim refuses any offset but the stored size, which never passes the declared
        # size: an offset past it gets the OffsetMismatch that names the right one.)
        owner = self.blobs.claim(upload_id, offset)
        return ChunkWriter(self, row, offset, owner)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"an asset may not exceed {self.max_asset_bytes} bytes (the server's limit)",
            limit=self.max_asset_bytes,
        )

    def complete_upload(self, upload_id: str, sha256: str) -> AssetInfo:
        """Verify the SHA-256 and publish the asset atomically (replacing one of that name).

        Completing an already completed upload with the same digest returns the asset again.
        """
        check.sha256_hex(sha256)
        row = self._upload_row(upload_id)
        key = (row.experiment_id, row.variation, row.run)
        if row.completed_at is not None:
            if row.sha256 != sha256:
                raise InvalidRequest(f"upload {upload_id} was completed with another digest")
            return AssetInfo(row.name, int(row.size), sha256, row.completed_at)
        stored = self.blobs.offset(upload_id)
        if (
            stored == 0
            and row.size
            and self.blobs.exists(sha256)
            and self.blobs.size(sha256) == row.size
        ):
            # The bytes were verified and published, then we died before recording the
            # asset (or the SQL write failed): the object is there, only the rows are owed.
            size = row.size
        elif row.size is not None and stored != row.size:
            raise InvalidRequest(
                f"upload {upload_id} holds {stored} of {row.size} declared bytes",
                field="size",
                offset=stored,
            )
        else:
            size = self.blobs.commit(upload_id, sha256)
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                t.assets.delete().where(
                    t.assets.c.experiment_id == key[0],
                    t.assets.c.variation == key[1],
                    t.assets.c.run == key[2],
                    t.assets.c.name == row.name,
                )
            )
            conn.execute(
                t.assets.insert().values(
                    experiment_id=key[0],
                    variation=key[1],
                    run=key[2],
                    name=row.name,
                    sha256=sha256,
                    size=size,
                    created_at=now,
                )
            )
            conn.execute(
                t.uploads.update()
                .where(t.uploads.c.upload_id == upload_id)
                .values(completed_at=now, sha256=sha256, size=size)
            )
            self._event(
                conn,
                key,
                None,
                None,
                now,
                "upload",
                kind="asset",
                detail={"name": row.name, "sha256": sha256, "size": size},
            )
        return AssetInfo(row.name, size, sha256, now)

    def discard_upload(self, upload_id: str) -> None:
        """Drop an unfinished upload and its bytes (a capture the client abandoned). A
        completed upload is left alone: its asset is published."""
        row = self._upload_row(upload_id)
        if row.completed_at is not None:
            return
        self.blobs.discard(upload_id)
        with self._write() as conn:
            conn.execute(
                t.uploads.delete().where(
                    t.uploads.c.upload_id == upload_id, t.uploads.c.completed_at.is_(None)
                )
            )

    def put_asset(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        name: str,
        source: BinaryIO,
        sha256: str,
        *,
        lease: str | None = None,
        upload_id: str | None = None,
    ) -> AssetInfo:
        """Upload a whole stream in one go (the embedded client's path)."""
        status = self.begin_upload(
            experiment_id, variation, run, name, upload_id=upload_id, lease=lease
        )
        if status.completed:
            return self.complete_upload(status.upload_id, sha256)
        if status.offset:
            source.seek(status.offset)
        self.write_chunk(
            status.upload_id, status.offset, iter(lambda: source.read(1024 * 1024), b"")
        )
        return self.complete_upload(status.upload_id, sha256)

    # ------------------------------------------------------------------ worker events
    def record_event(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        lease: str | None,
        kind: str,
        cause: str,
        detail: dict[str, Any] | None = None,
    ) -> Event:
        """Append a supervisor's event (e.g. ``teardown`` / ``teardown_requested``) to the
        run's timeline without touching its state. Bound to the lease: only the worker that
        holds the run (or held it when it ended) may speak for it, so a supervisor whose run
        was taken over by ``start(resume=True)`` cannot write into the new worker's story."""
        key = _key(experiment_id, variation, run)
        detail = check.worker_event(kind, cause, detail)
        now = self.clock()
        with self._write() as conn:
            row = self._lock_run(conn, *key)
            if row.lease is not None and not (
                isinstance(lease, str) and _same_lease(lease, row.lease)
            ):
                raise LeaseConflict(
                    f"run {_fmt(key)} is held under another lease: its events are not yours",
                    state=row.state,
                )
            self._event(conn, key, None, None, now, cause, detail, kind=kind)
            event_id = conn.execute(
                sa.select(sa.func.max(t.events.c.id)).where(
                    t.events.c.experiment_id == key[0],
                    t.events.c.variation == key[1],
                    t.events.c.run == key[2],
                )
            ).scalar_one()
        return Event(
            id=int(event_id),
            kind=kind,
            from_state=None,
            to_state=None,
            at=now,
            cause=cause,
            detail=detail or None,
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


class ChunkWriter:
    """One chunk of an upload being written (from :meth:`Store.open_chunk`): the upload's
    row is checked once, then every :meth:`write` appends at the offset reached so far,
    bounded by the declared size (or, without one, by the store's ``max_asset_bytes``)."""

    def __init__(self, store: Store, row: Any, offset: int, owner: int) -> None:
        self._store = store
        self._row = row
        self._owner = owner
        #: Bytes of the upload stored after the writes so far.
        self.offset = offset

    def write(self, chunks: Iterable[bytes]) -> int:
        """Append ``chunks`` (blocking file I/O: call it off the event loop); return the new
        offset. The bytes before an error stay written (in order): the client resumes."""
        declared = self._row.size
        limit = declared if declared is not None else self._store.max_asset_bytes
        try:
            self.offset = self._store.blobs.append(
                self._row.upload_id,
                self.offset,
                _bounded(chunks, limit - self.offset, declared is not None, self._store),
                self._owner,
            )
        except BaseException:
            self.offset = self._store.blobs.offset(self._row.upload_id)
            raise
        return self.offset

    def status(self) -> UploadStatus:
        """Where the upload stands after this writer's writes (no I/O)."""
        row = self._row
        return UploadStatus(
            upload_id=row.upload_id, name=row.name, offset=self.offset, size=row.size
        )


# ---------------------------------------------------------------------- pages
#: A cursor is short (the longest key is an asset name of 1024 characters).
MAX_CURSOR = 4096

_R = TypeVar("_R")


def _encode_cursor(kind: str, key: tuple[Any, ...]) -> str:
    """The opaque cursor after ``key``: URL-safe base64 of ``[kind, *key]`` as JSON. The
    kind makes a cursor of one listing an error on another instead of a silent misread."""
    return _b64(json.dumps([kind, *key], separators=(",", ":"), allow_nan=False).encode())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _cursor_key(cursor: Any, kind: str, *checks: Callable[[Any], Any]) -> list[Any]:
    """The key a cursor of listing ``kind`` holds, each part checked by its ``checks``
    entry (so a forged cursor is a 400 ``invalid_request``, never a SQL error)."""
    refused = InvalidRequest(
        f"invalid cursor {str(cursor)[:64]!r}: pass the next_cursor of the previous page "
        f"of this listing unchanged",
        field="cursor",
    )
    if not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR:
        raise refused
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        if _b64(raw) != cursor:  # one spelling per key: no padding, no junk
            raise ValueError(cursor)
        value = json.loads(raw, parse_constant=_no_constant)
        if not isinstance(value, list) or len(value) != len(checks) + 1 or value[0] != kind:
            raise ValueError(cursor)
        return [check_part(part) for check_part, part in zip(checks, value[1:], strict=True)]
    except (ValueError, TypeError, InvalidRequest):  # binascii.Error is a ValueError
        raise refused from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(value)
    return float(value)


def _event_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(value)
    return value


def _run_bytes(info: RunInfo) -> int:
    """About how many bytes of JSON a run takes: its free text, plus the fixed fields."""
    return 512 + (len(json.dumps(info.message)) if info.message else 0)


def _page(
    items: list[_R],
    limit: int,
    kind: str,
    key: Callable[[_R], tuple[Any, ...]],
    size: Callable[[_R], int] | None = None,
) -> Page[_R]:
    """Cut the ``limit + 1`` items a query fetched into a page: at most ``limit`` items (and,
    with ``size``, at most about ``MAX_PAGE_BYTES``, never fewer than one); the extra item
    only tells that a next page exists, and the cursor holds the last key kept."""
    kept = items[:limit]
    if size is not None:
        total = 0
        for index, item in enumerate(kept):
            total += size(item)
            if total > check.MAX_PAGE_BYTES and index > 0:
                kept = kept[:index]
                break
    more = len(kept) < len(items)
    return Page(kept, _encode_cursor(kind, key(kept[-1])) if more else None)


def _bounded(chunks: Iterable[bytes], room: int, declared: bool, store: Store) -> Iterator[bytes]:
    """Pass chunks through, refusing to go past the declared size (400) or, for an upload
    that declared none, past the largest asset the store takes (413)."""
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > room:
            if declared:
                raise InvalidRequest("the upload is larger than its declared size", field="size")
            raise store._too_large()
        yield chunk


@contextlib.contextmanager
def _translate_db_errors() -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        raise ServerError(f"database error: {exc.orig}") from exc


# ---------------------------------------------------------------------- engines
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
