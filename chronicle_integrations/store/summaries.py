"""Aggregate reads for overviews (the web view's experiments list and experiment header):
runs counted per effective state, and a range of variation configs in one query.

The counts use the store's own SQL forms of the rules (:meth:`~.watchdog.WatchdogMixin.
_effective_sql`, the one the state filter of :meth:`~.runs.RunsMixin.page_runs` uses, and
:meth:`~.runs.RunsMixin._stalled_sql`, beside the Python form in ``_info``), so an overview
never disagrees with the records ``get_run`` / ``page_runs`` return. The database does the
counting: an experiment of 10,000 runs costs one index range aggregate, no rows in Python.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from .. import _validation as check
from ..lifecycle import RunState
from . import schema as t
from .runs import RunsMixin

__all__ = ["MAX_CONFIG_RANGE", "ExperimentSummary", "SummariesMixin"]

#: Most variation configs one :meth:`SummariesMixin.variation_configs` call returns.
MAX_CONFIG_RANGE = 1000


@dataclass(frozen=True)
class ExperimentSummary:
    """An experiment's runs at a glance: how many are in each effective state (every state
    is a key, zero included), how many of the running ones are ``stalled``, and the latest
    activity (the newest creation, start, heartbeat, progress or end; store clock)."""

    experiment_id: str
    counts: dict[str, int] = field(default_factory=dict)
    stalled: int = 0
    last_activity: float | None = None

    @property
    def runs(self) -> int:
        """Every run of the experiment."""
        return sum(self.counts.values())

    @property
    def live(self) -> int:
        """Runs that may still change state by themselves (pending, running or lost)."""
        return sum(self.counts.get(s.value, 0) for s in RunState if not s.is_terminal)


class SummariesMixin(RunsMixin):
    """The overview reads of :class:`~.core.Store`."""

    def experiment_summaries(self, experiment_ids: Iterable[str]) -> dict[str, ExperimentSummary]:
        """The :class:`ExperimentSummary` of each experiment named (a page of them: at most
        :data:`~chronicle_integrations._validation.MAX_PAGE_SIZE`), in one grouped query."""
        ids = [check.experiment_id(e) for e in experiment_ids]
        if len(ids) > check.MAX_PAGE_SIZE:
            raise ValueError(f"at most {check.MAX_PAGE_SIZE} experiments at a time")
        now = self.clock()
        c = t.runs.c
        state = self._effective_sql(now).label("effective")
        stalled = sa.func.sum(sa.case((self._stalled_sql(now), 1), else_=0))
        query = (
            sa.select(
                c.experiment_id,
                state,
                sa.func.count().label("n"),
                stalled.label("stalled"),
                sa.func.max(c.created_at).label("created"),
                sa.func.max(c.alive_at).label("alive"),
                sa.func.max(c.ended_at).label("ended"),
                sa.func.max(c.progress_at).label("progress"),
            )
            .where(c.experiment_id.in_(ids))
            .group_by(c.experiment_id, state)
        )
        counts: dict[str, dict[str, int]] = {e: dict.fromkeys(_STATES, 0) for e in ids}
        stalls = dict.fromkeys(ids, 0)
        latest: dict[str, float | None] = dict.fromkeys(ids)
        if ids:
            with self._read() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                counts[row.experiment_id][row.effective] = int(row.n)
                stalls[row.experiment_id] += int(row.stalled or 0)
                times = [x for x in (row.created, row.alive, row.ended, row.progress) if x]
                best = latest[row.experiment_id]
                if times and (best is None or max(times) > best):
                    latest[row.experiment_id] = max(times)
        return {e: ExperimentSummary(e, counts[e], stalls[e], latest[e]) for e in ids}

    def variation_configs(
        self, experiment_id: str, start: int = 0, limit: int = MAX_CONFIG_RANGE
    ) -> dict[int, dict[str, Any]]:
        """The configs of variations ``start`` to ``start + limit - 1`` (those that exist),
        by number, in one range query (``limit`` at most :data:`MAX_CONFIG_RANGE`)."""
        check.experiment_id(experiment_id)
        check.number(start, "variation")
        if not 1 <= limit <= MAX_CONFIG_RANGE:
            raise ValueError(f"limit must be 1 to {MAX_CONFIG_RANGE}")
        v = t.variations.c
        query = (
            sa.select(v.variation, v.config)
            .where(
                v.experiment_id == experiment_id,
                v.variation >= start,
                v.variation < start + limit,
            )
            .order_by(v.variation)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return {int(r.variation): json.loads(r.config) for r in rows}


_STATES = [s.value for s in RunState]
