"""Outcomes: an experiment's objective and "which run (and checkpoint) is best".

``best`` walks ``ix_run_metrics_min`` / ``ix_run_metrics_max`` (``experiment_id, name, min|max``)
in the objective's direction and stops at the first run in an accepted state: an index range
scan of a few rows, not a scan of the experiment's runs (BENCHMARKS: 100,000 runs).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from .. import _metrics as m
from .. import _validation as check
from .._errors import InvalidMetric, NotFound
from .._models import BestRun, ExperimentInfo
from ..lifecycle import RunState
from . import schema as t
from .metrics import best_checkpoint
from .runs import RunsMixin

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
        if mode is None:
            mode = row.objective_mode if metric == row.objective_metric else None
        return metric, m.mode(mode or "min")

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
