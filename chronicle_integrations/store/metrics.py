"""Metric summaries and checkpoint metrics in SQL: the statements behind heartbeats,
``succeed`` / ``fail`` that carry metrics, behind ``RunInfo.metrics`` and ``best``.

These are functions over a connection of the caller's transaction, so that metrics are
written in the same transaction as the heartbeat or transition that carried them, under the
same lease check (a stale worker's metrics are refused with its heartbeat), and a refusal
(e.g. a run's 65th name) rolls the whole request back: nothing partial is stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from .. import _metrics as m
from .._errors import InvalidMetric
from . import schema as t

__all__ = ["best_checkpoint", "load_summaries", "record_outcomes"]

_KEY = ("experiment_id", "variation", "run")


def _run_where(table: sa.Table, key: tuple[str, int, int]) -> sa.ColumnElement[bool]:
    c = table.c
    return sa.and_(c.experiment_id == key[0], c.variation == key[1], c.run == key[2])


def _summary(row: Any) -> m.Summary:
    # A NULL last with the row present is NaN (SQLite cannot store NaN; both backends alike).
    last = math.nan if row.last is None else row.last
    return [last, row.last_step, row.min, row.min_step, row.max, row.max_step]


def _stored(value: float | None) -> float | None:
    return None if value is None or value != value else value


def record_outcomes(
    conn: sa.Connection,
    key: tuple[str, int, int],
    metrics: dict[str, m.Summary] | None,
    checkpoints: dict[str, dict[str, Any]] | None,
    now: float,
) -> None:
    """Fold checked ``metrics`` (:func:`~chronicle_integrations._metrics.parse_metrics`) into
    the run's summaries and record ``checkpoints`` (asset name -> what it was saved for).

    The caller holds the run's row lock (the heartbeat's ``UPDATE``, or ``FOR UPDATE``), so
    concurrent requests for one run merge one after the other. Raises :class:`InvalidMetric`
    when the run would have more than :data:`~chronicle_integrations._metrics.MAX_METRICS`
    names."""
    if metrics:
        rm = t.run_metrics
        rows = conn.execute(sa.select(rm).where(_run_where(rm, key))).all()
        existing = {row.name: _summary(row) for row in rows}
        new = [name for name in metrics if name not in existing]
        if len(existing) + len(new) > m.MAX_METRICS:
            raise InvalidMetric(
                f"run {key[0]}/{key[1]}/{key[2]} may have at most {m.MAX_METRICS} metric "
                f"names: it has {len(existing)}, this request adds {len(new)} "
                f"({', '.join(sorted(new))[:200]}); nothing of it was stored",
                field="metrics",
            )
        inserts, updates = [], []
        for name, summary in metrics.items():
            merged = m.merge(existing.get(name), summary)
            values = {
                "last": _stored(merged[0]),
                "last_step": merged[1],
                "min": merged[2],
                "min_step": merged[3],
                "max": merged[4],
                "max_step": merged[5],
                "updated_at": now,
            }
            if name in existing:
                updates.append({"b_name": name, **{f"b_{k}": v for k, v in values.items()}})
            else:
                inserts.append(dict(zip(_KEY, key, strict=True), name=name, **values))
        if inserts:
            conn.execute(rm.insert(), inserts)
        if updates:
            c = rm.c
            statement = (
                rm.update()
                .where(_run_where(rm, key), c.name == sa.bindparam("b_name"))
                .values(
                    {
                        col: sa.bindparam(f"b_{col}")
                        for col in ("last", "last_step", "min", "min_step", "max", "max_step")
                    }
                    | {"updated_at": sa.bindparam("b_updated_at")}
                )
            )
            conn.execute(statement, updates)
    if checkpoints:
        am = t.asset_metrics
        conn.execute(am.delete().where(_run_where(am, key), am.c.name.in_(list(checkpoints))))
        conn.execute(
            am.insert(),
            [
                dict(
                    zip(_KEY, key, strict=True),
                    name=name,
                    metric=record["metric"],
                    value=_stored(record["value"]),
                    step=record["step"],
                    epoch=record["epoch"],
                    recorded_at=now,
                )
                for name, record in checkpoints.items()
            ],
        )


def load_summaries(
    conn: sa.Connection, keys: Iterable[tuple[str, int, int]]
) -> dict[tuple[str, int, int], dict[str, dict[str, Any]]]:
    """The metric summaries of ``keys``' runs (``RunInfo.metrics``), by run: one query per
    experiment among them, over the primary key."""
    by_experiment: dict[str, list[tuple[int, int]]] = {}
    for e, v, r in keys:
        by_experiment.setdefault(e, []).append((v, r))
    out: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    c = t.run_metrics.c
    for e, runs in by_experiment.items():
        low = min(runs)
        high = max(runs)
        wanted = set(runs)
        query = sa.select(t.run_metrics).where(
            c.experiment_id == e,
            sa.tuple_(c.variation, c.run) >= sa.tuple_(*low),
            sa.tuple_(c.variation, c.run) <= sa.tuple_(*high),
        )
        if len(runs) == 1:
            query = sa.select(t.run_metrics).where(
                c.experiment_id == e, c.variation == low[0], c.run == low[1]
            )
        for row in conn.execute(query):
            if (row.variation, row.run) not in wanted:
                continue
            out.setdefault((e, row.variation, row.run), {})[row.name] = {
                "last": math.nan if row.last is None else row.last,
                "last_step": row.last_step,
                "min": row.min,
                "min_step": row.min_step,
                "max": row.max,
                "max_step": row.max_step,
                "updated_at": row.updated_at,
            }
    return out


def best_checkpoint(
    conn: sa.Connection, key: tuple[str, int, int], metric: str, mode: str
) -> dict[str, Any] | None:
    """The run's complete checkpoint asset recorded with the best value of ``metric`` (a
    file, or a directory of assets under that name), or None."""
    am = t.asset_metrics
    col = am.c.value
    rows = conn.execute(
        sa.select(am)
        .where(_run_where(am, key), am.c.metric == metric, col.is_not(None))
        .order_by(col.asc() if mode == "min" else col.desc(), am.c.recorded_at.desc())
    ).all()
    a = t.assets.c
    for row in rows:
        exact = conn.execute(
            sa.select(a.sha256, a.size).where(_run_where(t.assets, key), a.name == row.name)
        ).first()
        record = {
            "name": row.name,
            "metric": row.metric,
            "value": row.value,
            "step": row.step,
            "epoch": row.epoch,
        }
        if exact is not None:
            return {**record, "sha256": exact.sha256, "size": exact.size, "directory": False}
        files = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(a.size), 0)).where(
                _run_where(t.assets, key), a.name.startswith(row.name + "/", autoescape=True)
            )
        ).one()
        if files[0]:
            return {
                **record,
                "sha256": None,
                "size": int(files[1]),
                "files": int(files[0]),
                "directory": True,
            }
    return None
