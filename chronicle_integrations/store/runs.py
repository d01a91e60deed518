"""Run records: creating runs, reading them (with their effective state and asset count) and
listing them page by page."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from .. import _validation as check
from .._errors import NotFound
from .._models import Page, RunInfo, walk_pages
from ..lifecycle import RunState
from . import schema as t
from .base import _request_key, _run_pk
from .metrics import load_summaries
from .pages import _cursor_key, _page
from .watchdog import WatchdogMixin


class RunsMixin(WatchdogMixin):
    """The run records of :class:`~.core.Store`."""

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
        now = self.clock()
        after = None
        if cursor is not None:
            after = tuple(_cursor_key(cursor, "runs", *RUN_KEY_CHECKS))
        where = self._runs_filter(experiment_id, state, now, after)
        infos = self._select_runs(where, now=now, limit=size + 1)
        return _page(
            infos, size, "runs", lambda i: (i.experiment_id, i.variation, i.run), _run_bytes
        )

    def _runs_filter(
        self,
        experiment_id: str | None,
        state: str | RunState | None,
        now: float,
        after: tuple[Any, ...] | None = None,
    ) -> sa.ColumnElement[bool]:
        """The ``WHERE`` of a runs listing: of ``experiment_id``, in the effective ``state``,
        and (keyset) after the run key ``after``, each when given."""
        conditions: list[sa.ColumnElement[bool]] = []
        c = t.runs.c
        if experiment_id is not None:
            check.experiment_id(experiment_id)
            conditions.append(c.experiment_id == experiment_id)
        if after is not None:
            conditions.append(after_run(experiment_id, after))
        if state is not None:
            conditions.append(self._effective_sql(now) == check.run_state(state).value)
        return sa.and_(sa.true(), *conditions)

    def _select_runs(
        self, where: sa.ColumnElement[bool], now: float | None = None, limit: int | None = None
    ) -> list[RunInfo]:
        now = self.clock() if now is None else now
        c = t.runs.c
        query = (
            _runs_with_asset_count()
            .where(where)
            .order_by(c.experiment_id, c.variation, c.run)
            .limit(limit)
        )
        with self._read() as conn:
            return self._records(conn, conn.execute(query).all(), now)

    def _records(self, conn: sa.Connection, rows: Sequence[Any], now: float) -> list[RunInfo]:
        """The records of ``runs`` rows (with ``asset_count``), with their metric summaries
        read on ``conn``."""
        summaries = load_summaries(conn, [(r.experiment_id, r.variation, r.run) for r in rows])
        infos = [self._info(row, now) for row in rows]
        return [
            dataclasses.replace(i, metrics=summaries[k]) if (k := i.key_tuple) in summaries else i
            for i in infos
        ]

    def _info(self, row: Any, now: float, lease: str | None = None, beat: bool = False) -> RunInfo:
        """The record of ``row`` at ``now``. ``beat``: an answer to ``start`` or
        ``heartbeat``, which tells the worker the watchdog's ``heartbeat_timeout``."""
        state = self.effective_state(row.state, row.alive_at, now)
        ended_at, reason = self._effective_end(row, state)
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

    def _stalled_sql(self, now: float) -> sa.ColumnElement[bool]:
        """The SQL form of :meth:`_info`'s ``stalled`` rule (the two sit side by side so they
        cannot drift): effectively ``running`` with progress older than ``stall_timeout``."""
        c = t.runs.c
        return sa.and_(
            self._effective_sql(now) == RunState.RUNNING.value,
            c.progress_at.is_not(None),
            c.progress_at < now - self.stall_timeout,
        )

    def _reload(self, conn: sa.Connection, key: tuple[str, int, int]) -> Any:
        return conn.execute(_runs_with_asset_count().where(_run_pk(*key))).one()


#: Checks of the run key ``(experiment_id, variation, run)`` in a cursor.
RUN_KEY_CHECKS = (
    check.experiment_id,
    lambda x: check.number(x, "variation"),
    lambda x: check.number(x, "run"),
)


def after_run(
    experiment_id: str | None, key: tuple[Any, ...], table: sa.Table = t.runs
) -> sa.ColumnElement[bool]:
    """Rows of ``table`` after the run ``key`` in ``experiment_id, variation, run`` order,
    in a listing of ``experiment_id`` (None: of every experiment)."""
    c = table.c
    e, v, r = key
    if experiment_id is None:
        return sa.tuple_(c.experiment_id, c.variation, c.run) > sa.tuple_(e, v, r)
    if e == experiment_id:
        # (variation, run) within the experiment: an index range, not a scan of the
        # experiment's runs from its first one.
        return sa.tuple_(c.variation, c.run) > sa.tuple_(v, r)
    return sa.false() if e > experiment_id else sa.true()


def _runs_with_asset_count() -> sa.Select[Any]:
    """``SELECT runs.*, <the run's asset count> AS asset_count FROM runs``: what
    :meth:`RunsMixin._info` reads a record from."""
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
    return sa.select(t.runs, asset_count.label("asset_count"))


def _run_bytes(info: RunInfo) -> int:
    """About how many bytes of JSON a run takes: its free text, plus the fixed fields."""
    return 512 + (len(json.dumps(info.message)) if info.message else 0)
