"""The one store implementation: the run lifecycle, leases, watchdog, events and assets, on SQL.

Both the reference server (a thin HTTP layer) and the embedded client call this class, so the
two behave identically by construction.

Layout
------
:class:`Store` is the facade: this module holds construction, experiments and variations, the
lease transitions (``start``, ``succeed``, ``fail``) and the run timeline. Its other parts are
mixins, each in its own module, layered on the shared state of :class:`~.base.StoreBase`
(settings, write/read transactions, the run lock and lease check, events, idempotency):

* :mod:`.watchdog`: the watchdog rule in all its forms (Python, SQL, materialising, sweep);
* :mod:`.runs`: run records (create, get, list and page runs);
* :mod:`.heartbeats`: the heartbeat fast path and ``heartbeat_many``'s batching;
* :mod:`.assets`: assets, resumable uploads and their expiry;
* :mod:`.direct`: direct uploads to S3 through presigned URLs;
* :mod:`.summaries`: overviews (runs counted per effective state, ranges of variation configs);
* :mod:`.pages` (cursors and page cutting) and :mod:`.engine` (``make_engine``) are functions.

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

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from .. import _metrics
from .. import _validation as check
from .._errors import AlreadyExists, LeaseConflict, NotFound
from .._models import Event, ExperimentInfo, Page, RunInfo, walk_pages
from ..lifecycle import TERMINAL_TARGET, Action, RunState, next_state
from . import schema as t
from .assets import ChunkWriter
from .base import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_LOST_GRACE,
    DEFAULT_MAX_ASSET_BYTES,
    DEFAULT_STALL_TIMEOUT,
    DEFAULT_UPLOAD_EXPIRY,
    _dumps,
    _fmt,
    _key,
    _refused,
    _request_key,
    _run_pk,
    _same_lease,
)
from .blobs import open_blob_store
from .direct import DirectMixin
from .engine import DatabaseOptions, make_engine
from .heartbeats import HeartbeatMixin
from .metrics import record_outcomes
from .outcomes import OutcomesMixin, experiment_info
from .pages import MAX_CURSOR, _cursor_key, _event_id, _finite, _page
from .summaries import SummariesMixin

if TYPE_CHECKING:
    from .s3 import S3Settings

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_LOST_GRACE",
    "DEFAULT_MAX_ASSET_BYTES",
    "DEFAULT_STALL_TIMEOUT",
    "DEFAULT_UPLOAD_EXPIRY",
    "MAX_CURSOR",
    "ChunkWriter",
    "DatabaseOptions",
    "Store",
    "make_engine",
]


class Store(HeartbeatMixin, DirectMixin, SummariesMixin, OutcomesMixin):
    """The Chronicle store over a SQLAlchemy engine and a blob store.

    Example::

        store = Store.open("sqlite:///chronicle/chronicle.db", "chronicle/assets")
        exp = store.create_experiment("sweep", [{"lr": 0.1}])
        run = store.create_run(exp.experiment_id, 0)
        lease = store.start(exp.experiment_id, 0, run.run).lease
    """

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(
        cls,
        url: str,
        assets: str | os.PathLike[str],
        *,
        database: DatabaseOptions | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        s3: S3Settings | None = None,
        **kwargs: Any,
    ) -> Store:
        """Open (creating and migrating as needed) the store at a SQLAlchemy ``url``
        (``database``: PostgreSQL pool and prepared statements, see :class:`DatabaseOptions`),
        its asset bytes in ``assets`` (a directory or ``s3://bucket/prefix``; ``work_dir``
        and ``s3``: see :func:`~.blobs.open_blob_store`)."""
        blobs = open_blob_store(assets, work_dir=work_dir, s3=s3)
        return cls(make_engine(url, database), blobs, **kwargs)

    @classmethod
    def open_home(cls, home: str | os.PathLike[str], **kwargs: Any) -> Store:
        """Open the embedded store in a Chronicle home directory (SQLite + local assets)."""
        root = Path(home).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls.open(f"sqlite:///{root / 'chronicle.db'}", root / "assets", **kwargs)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

    # ------------------------------------------------------------------ experiments
    def create_experiment(
        self,
        name: str,
        variations: Iterable[dict[str, Any]] = (),
        experiment_id: str | None = None,
        objective: dict[str, Any] | None = None,
    ) -> ExperimentInfo:
        """Create an experiment with numbered variations (0, 1, ...).

        Creating an experiment whose id exists with the same name and the same variations is
        a success with no effect (a retried request); a different definition is refused.
        ``objective`` (``{"metric": "val/loss", "mode": "min"}``) says what "best" means for
        its runs; a repeated creation that names another objective sets it.
        """
        check.name(name)
        configs = [check.config(c) for c in variations]
        goal = _metrics.objective(objective)
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
                        objective_metric=goal["metric"] if goal else None,
                        objective_mode=goal["mode"] if goal else None,
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
                if goal is not None and existing.objective != goal:
                    return self.set_objective(experiment_id, goal)
                return existing
            raise AlreadyExists(
                f"experiment {experiment_id!r} exists with a different definition",
                experiment_id=experiment_id,
            ) from None
        return ExperimentInfo(experiment_id, name, now, len(configs), goal)

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
        return experiment_info(row)

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
        infos = [experiment_info(r) for r in rows]
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

    def succeed(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        lease: str | None,
        progress: dict[str, Any] | None = None,
        *,
        metrics: dict[str, Any] | None = None,
        checkpoints: dict[str, Any] | None = None,
    ) -> RunInfo:
        """``running|lost -> succeeded``, under the run's lease. ``progress`` is the final
        one (e.g. ``{"step": 1200, "epoch": 9}``): a finished run shows where it ended.
        ``metrics`` / ``checkpoints``: the last ones, as a heartbeat carries them."""
        return self._terminate(
            Action.SUCCEED,
            _key(experiment_id, variation, run),
            lease,
            None,
            None,
            progress,
            (metrics, checkpoints),
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
        *,
        metrics: dict[str, Any] | None = None,
        checkpoints: dict[str, Any] | None = None,
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
            (metrics, checkpoints),
        )

    def _terminate(
        self,
        action: Action,
        key: tuple[str, int, int],
        lease: str | None,
        message: str | None,
        reason: str | None,
        progress: dict[str, Any] | None = None,
        outcomes: tuple[dict[str, Any] | None, dict[str, Any] | None] = (None, None),
    ) -> RunInfo:
        encoded = _dumps(check.progress(progress)) if progress is not None else None
        metrics = _metrics.parse_metrics(outcomes[0]) if outcomes[0] is not None else None
        checkpoints = _metrics.parse_checkpoints(outcomes[1]) if outcomes[1] is not None else None
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
            if metrics or checkpoints:
                # Metrics are the worker's: they need its lease even where the transition
                # itself does not (an abandoned fail by an operator carries none).
                if row.lease is not None and not _same_lease(lease, row.lease):
                    raise LeaseConflict(
                        f"run {_fmt(key)}: metrics must carry the run's lease", state=state.value
                    )
                record_outcomes(conn, key, metrics, checkpoints, now)
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

    # ------------------------------------------------------------------ events
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
        self._materialise_on_read(key, row, now)
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
