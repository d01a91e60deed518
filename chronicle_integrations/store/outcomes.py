"""Outcomes: an experiment's objective, "which run (and checkpoint) is best", and the runs
listing sorted by a metric (``runs --sort``).

``best`` walks ``ix_run_metrics_min`` / ``ix_run_metrics_max`` (``experiment_id, name, min|max``)
in the objective's direction and stops at the first run in an accepted state: an index range
scan of a few rows, not a scan of the experiment's runs (BENCHMARKS: 100,000 runs).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import sqlalchemy as sa

from .. import _metrics as m
from .. import _validation as check
from .._errors import InvalidMetric, InvalidRequest, NotFound
from .._models import BestRun, ExperimentInfo, Page, RunInfo
from ..lifecycle import RunState
from . import schema as t
from .metrics import best_checkpoint
from .pages import _cursor_key, _finite, _page
from .runs import RUN_KEY_CHECKS, RunsMixin, _run_bytes, _runs_with_asset_count, after_run

#: Rows read per step of the walk (runs in a refused state are skipped).
_WALK = 64


def experiment_info(row: Any) -> ExperimentInfo:
    """The record of an ``experiments`` row."""
    objective = (
        {"metric": row.objective_metric, "mode": row.objective_mode or "min"}
        if row.objective_metric
        else None
    )
    return ExperimentInfo(
        row.experiment_id, row.name, row.created_at, row.next_variation, objective
    )


class OutcomesMixin(RunsMixin):
    """Objectives and ``best`` of :class:`~.core.Store`."""

    def set_objective(self, experiment_id: str, objective: dict[str, Any] | None) -> ExperimentInfo:
        """Set (or, with None, clear) what "best" means for the experiment's runs:
        ``{"metric": "val/loss", "mode": "min"}``."""
        check.experiment_id(experiment_id)
        checked = m.objective(objective)
        c = t.experiments.c
        with self._write() as conn:
            done = conn.execute(
                t.experiments.update()
                .where(c.experiment_id == experiment_id)
                .values(
                    objective_metric=checked["metric"] if checked else None,
                    objective_mode=checked["mode"] if checked else None,
                )
            ).rowcount
            if not done:
                raise NotFound(
                    f"experiment {experiment_id!r} does not exist", experiment_id=experiment_id
                )
            row = conn.execute(sa.select(t.experiments).where(c.experiment_id == experiment_id))
            return experiment_info(row.one())

    def _direction(
        self, experiment_id: str, metric: str | None, mode: str | None
    ) -> tuple[str, str]:
        """The metric and mode a ranking uses: the arguments, else the objective's, else
        ``min`` (ascending)."""
        c = t.experiments.c
        with self._read() as conn:
            row = conn.execute(
                sa.select(c.objective_metric, c.objective_mode).where(
                    c.experiment_id == check.experiment_id(experiment_id)
                )
            ).first()
        if row is None:
            raise NotFound(
                f"experiment {experiment_id!r} does not exist", experiment_id=experiment_id
            )
        if metric is None:
            if not row.objective_metric:
                raise InvalidMetric(
                    f"experiment {experiment_id!r} has no objective: name the metric "
                    "(--metric M) or set one (chronicle objective E M --mode min|max)",
                    field="metrics",
                )
            metric = row.objective_metric
        m.metric_name(metric)
        goal = {"metric": row.objective_metric, "mode": row.objective_mode}
        return metric, m.ranking_mode(metric, mode, goal)

    def page_runs(
        self,
        experiment_id: str | None = None,
        state: str | RunState | None = None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        sort: str | None = None,
        mode: str | None = None,
    ) -> Page[RunInfo]:
        """One page of runs (see :meth:`RunsMixin.page_runs`); with ``sort``, best first by
        that metric instead.

        Sorted: by each run's ``min`` of ``sort`` (``max`` in ``mode="max"``; ``mode``
        defaults to the objective's when ``sort`` is the experiment's objective, else
        ``min``), ties and the runs without a value of it (none logged, or only NaN) in
        ``experiment_id, variation, run`` order, those last. Keyset pages like the plain
        listing: the runs with a value along ``ix_run_metrics_min`` / ``_max`` (an index
        range per page within an experiment), then the others by primary key; the cursor
        holds the last value and run key, and belongs to this ``sort`` and ``mode``."""
        if sort is None:
            if mode is not None:
                raise InvalidRequest("mode is the direction of sort: pass sort too", field="mode")
            return super().page_runs(experiment_id, state, limit=limit, cursor=cursor)
        m.metric_name(sort)
        if mode is None and experiment_id is not None:
            with contextlib.suppress(NotFound):  # an unknown experiment: an empty listing
                mode = self._direction(experiment_id, sort, None)[1]
        mode = m.mode(mode or "min")
        size = check.page_limit(limit)
        now = self.clock()
        after: tuple[Any, ...] | None = None
        if cursor is not None:
            after = tuple(
                _cursor_key(
                    cursor,
                    _BY_METRIC,
                    functools.partial(_same, sort),
                    functools.partial(_same, mode),
                    _value_or_none,
                    *RUN_KEY_CHECKS,
                )[2:]
            )
        valued, unvalued = self._ranked_queries(experiment_id, state, sort, mode, now, after)
        with self._read() as conn:
            rows: list[Any] = []
            if after is None or after[0] is not None:
                rows = list(conn.execute(valued.limit(size + 1)).all())
            values = [row.sort_value for row in rows]
            if len(rows) <= size:
                rest = conn.execute(unvalued.limit(size + 1 - len(rows))).all()
                rows += rest
                values += [None] * len(rest)
            infos = self._records(conn, rows, now)
        page = _page(
            list(zip(infos, values, strict=True)),
            size,
            _BY_METRIC,
            lambda item: (sort, mode, item[1], *item[0].key_tuple),
            lambda item: _run_bytes(item[0]),
        )
        return Page([info for info, _ in page.items], page.next_cursor)

    def _ranked_queries(
        self,
        experiment_id: str | None,
        state: str | RunState | None,
        sort: str,
        mode: str,
        now: float,
        after: tuple[Any, ...] | None,
    ) -> tuple[sa.Select[Any], sa.Select[Any]]:
        """The two parts of a listing sorted by ``sort`` (see :meth:`page_runs`), after the
        cursor key ``after`` (``value, e, v, r``): the runs with a value of it (with a
        ``sort_value`` column), best first, and the runs without one, by key."""
        rm, c = t.run_metrics.c, t.runs.c
        value = rm.min if mode == "min" else rm.max
        valued = (
            _runs_with_asset_count()
            .add_columns(value.label("sort_value"))
            .join(
                t.run_metrics,
                sa.and_(
                    rm.experiment_id == c.experiment_id,
                    rm.variation == c.variation,
                    rm.run == c.run,
                ),
            )
            .where(rm.name == sort, value.is_not(None), self._runs_filter(None, state, now))
            .order_by(
                value.asc() if mode == "min" else value.desc(),
                rm.experiment_id,
                rm.variation,
                rm.run,
            )
        )
        if experiment_id is not None:
            valued = valued.where(rm.experiment_id == check.experiment_id(experiment_id))
        if after is not None and after[0] is not None:
            # The first condition is implied by the second: it makes the index range start
            # at the cursor's value (an OR alone would be a scan from the first value).
            start, beyond = (
                (value >= after[0], value > after[0])
                if mode == "min"
                else (value <= after[0], value < after[0])
            )
            ties = sa.and_(value == after[0], after_run(experiment_id, after[1:], t.run_metrics))
            valued = valued.where(start, sa.or_(beyond, ties))
        has_value = (
            sa.exists()
            .where(
                rm.experiment_id == c.experiment_id,
                rm.variation == c.variation,
                rm.run == c.run,
                rm.name == sort,
                value.is_not(None),
            )
            .correlate(t.runs)
        )
        unvalued_after = after[1:] if after is not None and after[0] is None else None
        unvalued = (
            _runs_with_asset_count()
            .where(~has_value, self._runs_filter(experiment_id, state, now, unvalued_after))
            .order_by(c.experiment_id, c.variation, c.run)
        )
        return valued, unvalued

    def best(
        self,
        experiment_id: str,
        metric: str | None = None,
        mode: str | None = None,
        *,
        include_running: bool = False,
    ) -> BestRun:
        """The experiment's best run by ``metric`` (default: the objective's) in ``mode``
        (default: the objective's for that metric, else ``min``), with its best checkpoint.

        Only ``succeeded`` runs count, unless ``include_running`` (then also running and
        lost ones: for early-stopping decisions). NotFound when no run qualifies."""
        metric, mode = self._direction(experiment_id, metric, mode)
        base, states = _best_query(experiment_id, metric, mode, include_running)
        now = self.clock()
        wanted = {RunState(s) for s in states}
        offset = 0
        while True:
            with self._read() as conn:
                rows = conn.execute(base.limit(_WALK).offset(offset)).all()
            hits = []
            for row in rows:
                state = self.effective_state(row.state, row.alive_at, now)
                if state in wanted:
                    hits.append((row, state))
            if hits:
                top = hits[0][0].value
                row, state = min(
                    ((h, s) for h, s in hits if h.value == top),
                    key=lambda hs: (hs[0].variation, hs[0].run),
                )
                break
            if len(rows) < _WALK:
                raise NotFound(
                    f"no {'succeeded, running or lost' if include_running else 'succeeded'} "
                    f"run of {experiment_id!r} has a value of {metric!r}",
                    experiment_id=experiment_id,
                    metric=metric,
                )
            offset += _WALK
        key = (experiment_id, row.variation, row.run)
        with self._read() as conn:
            checkpoint = best_checkpoint(conn, key, metric, mode)
        return BestRun(
            experiment_id=experiment_id,
            variation=row.variation,
            run=row.run,
            state=state,
            metric=metric,
            mode=mode,
            value=row.value,
            step=row.step,
            last=float("nan") if row.last is None else row.last,
            checkpoint=checkpoint,
        )


#: The cursor kind of the runs listing sorted by a metric.
_BY_METRIC = "runs-by-metric"


def _same(expected: str, value: Any) -> str:
    """A cursor part that must be ``expected`` (the sort and mode the cursor was made for)."""
    if value != expected:
        raise ValueError(value)
    return expected


def _value_or_none(value: Any) -> float | None:
    """A cursor's sort value: finite (a ``min`` / ``max``), or None past the runs with one."""
    return None if value is None else _finite(value)


def _best_query(
    experiment_id: str, metric: str, mode: str, include_running: bool
) -> tuple[sa.Select[Any], list[str]]:
    """The ranking of ``best``: runs in an accepted stored state with a value of ``metric``,
    best first, along ``ix_run_metrics_min`` / ``_max``; and the accepted states."""
    rm, r = t.run_metrics.c, t.runs.c
    value = rm.min if mode == "min" else rm.max
    step = rm.min_step if mode == "min" else rm.max_step
    states = [RunState.SUCCEEDED.value]
    if include_running:
        states += [RunState.RUNNING.value, RunState.LOST.value]
    base = (
        sa.select(
            rm.variation,
            rm.run,
            value.label("value"),
            step.label("step"),
            rm.last,
            r.state,
            r.alive_at,
        )
        .select_from(
            t.run_metrics.join(
                t.runs,
                sa.and_(
                    r.experiment_id == rm.experiment_id,
                    r.variation == rm.variation,
                    r.run == rm.run,
                ),
            )
        )
        .where(
            rm.experiment_id == experiment_id,
            rm.name == metric,
            value.is_not(None),
            r.state.in_(states),
        )
        .order_by(value.asc() if mode == "min" else value.desc())
    )
    return base, states
