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

__all__ = ["best_checkpoint", "load_summaries", "record_metrics_many", "record_outcomes"]

_KEY = ("experiment_id", "variation", "run")


def _run_where(table: sa.Table, key: tuple[str, int, int]) -> sa.ColumnElement[bool]:
    c = table.c
    return sa.and_(c.experiment_id == key[0], c.variation == key[1], c.run == key[2])


def _stored(value: float | None) -> float | None:
    return None if value is None or value != value else value


#: :func:`~chronicle_integrations._metrics.merge` in SQL, as one prebuilt upsert per name
#: (SQLite >= 3.24 and PostgreSQL): built once, so a beat's metrics cost one executemany
#: of a cached statement instead of a read and per-row ORM-style updates. In ``DO UPDATE``
#: every right-hand column is the row's old value. A NULL ``last`` with the row present is
#: NaN; ``min``/``max`` are finite or NULL.
_SET = """
ON CONFLICT (experiment_id, variation, run, name) DO UPDATE SET
    "last" = CASE WHEN excluded.last_step IS NULL OR m.last_step IS NULL
                       OR excluded.last_step >= m.last_step
                  THEN excluded."last" ELSE m."last" END,
    last_step = CASE WHEN excluded.last_step IS NULL OR m.last_step IS NULL
                          OR excluded.last_step >= m.last_step
                     THEN excluded.last_step ELSE m.last_step END,
    "min" = CASE WHEN excluded."min" < m."min" OR m."min" IS NULL
                 THEN COALESCE(excluded."min", m."min") ELSE m."min" END,
    min_step = CASE WHEN excluded."min" < m."min"
                         OR (m."min" IS NULL AND excluded."min" IS NOT NULL)
                    THEN excluded.min_step ELSE m.min_step END,
    "max" = CASE WHEN excluded."max" > m."max" OR m."max" IS NULL
                 THEN COALESCE(excluded."max", m."max") ELSE m."max" END,
    max_step = CASE WHEN excluded."max" > m."max"
                         OR (m."max" IS NULL AND excluded."max" IS NOT NULL)
                    THEN excluded.max_step ELSE m.max_step END,
    updated_at = excluded.updated_at
"""
_COLUMNS = """INSERT INTO run_metrics AS m (experiment_id, variation, run, name, "last",
    last_step, "min", min_step, "max", max_step, updated_at)"""
_UPSERT = sa.text(
    _COLUMNS
    + """
VALUES (:e, :v, :r, :name, :last, :last_step, :min, :min_step, :max, :max_step, :at)"""
    + _SET
)

#: PostgreSQL: the metrics of a whole batch of heartbeats as one upsert over arrays (one
#: round trip; ``heartbeat_many`` holds at most one beat per run), then one count of the
#: runs over the cap.
_UPSERT_SET_PG = sa.text(
    _COLUMNS
    + """
SELECT e, v, r, name, last, last_step, mn, min_step, mx, max_step, CAST(:at AS double precision)
FROM unnest(CAST(:es AS text[]), CAST(:vs AS integer[]), CAST(:rs AS integer[]),
            CAST(:names AS text[]), CAST(:lasts AS double precision[]),
            CAST(:last_steps AS bigint[]), CAST(:mins AS double precision[]),
            CAST(:min_steps AS bigint[]), CAST(:maxs AS double precision[]),
            CAST(:max_steps AS bigint[]))
     AS u(e, v, r, name, last, last_step, mn, min_step, mx, max_step)"""
    + _SET
)
_OVER_CAP_PG = sa.text("""
SELECT c.experiment_id, c.variation, c.run, count(*) AS names FROM run_metrics c
JOIN unnest(CAST(:es AS text[]), CAST(:vs AS integer[]), CAST(:rs AS integer[])) AS k(e, v, r)
  ON c.experiment_id = k.e AND c.variation = k.v AND c.run = k.r
GROUP BY c.experiment_id, c.variation, c.run HAVING count(*) > :cap
""")

_COUNT = sa.text(
    "SELECT count(*) FROM run_metrics WHERE experiment_id = :e AND variation = :v AND run = :r"
)


#: Metric names known to be stored, by run: a lower bound (summaries are never deleted), so a
#: beat whose names are all in it adds no row and needs no cap count. One per store object,
#: filled after commits; cleared when large.
Known = dict[tuple[str, int, int], frozenset[str]]
_KNOWN_LIMIT = 100_000


def known_names(store: Any) -> Known:
    """The :data:`Known` cache of ``store`` (created on first use)."""
    cache: Known = store.__dict__.setdefault("_known_metric_names", {})
    return cache


def remember_names(known: Known, outcomes: list[tuple[tuple[str, int, int], Any]]) -> None:
    """After a commit: the names each ``(key, (metrics, checkpoints))`` stored."""
    if len(known) > _KNOWN_LIMIT:
        known.clear()
    for key, (metrics, _) in outcomes:
        if metrics:
            known[key] = known.get(key, frozenset()) | metrics.keys()


def _covered(known: Known | None, key: tuple[str, int, int], metrics: dict[str, Any]) -> bool:
    return known is not None and metrics.keys() <= known.get(key, frozenset())


def record_outcomes(
    conn: sa.Connection,
    key: tuple[str, int, int],
    metrics: dict[str, m.Summary] | None,
    checkpoints: dict[str, dict[str, Any]] | None,
    now: float,
    known: Known | None = None,
) -> None:
    """Fold checked ``metrics`` (:func:`~chronicle_integrations._metrics.parse_metrics`) into
    the run's summaries and record ``checkpoints`` (asset name -> what it was saved for).

    The caller holds the run's row lock (the heartbeat's ``UPDATE``, or ``FOR UPDATE``), so
    concurrent requests for one run merge one after the other. Raises :class:`InvalidMetric`
    when the run would have more than :data:`~chronicle_integrations._metrics.MAX_METRICS`
    names (the caller's transaction then rolls back)."""
    if metrics:
        params = [
            {
                "e": key[0],
                "v": key[1],
                "r": key[2],
                "name": name,
                "last": _stored(summary[0]),
                "last_step": summary[1],
                "min": summary[2],
                "min_step": summary[3],
                "max": summary[4],
                "max_step": summary[5],
                "at": now,
            }
            for name, summary in metrics.items()
        ]
        conn.execute(_UPSERT, params)
        # The cap, checked after the upsert in the same transaction: a refusal rolls the
        # whole request back (one index count instead of reading every summary first).
        # Names known to be stored already add no row: then there is nothing to count.
        if _covered(known, key, metrics):
            count = 0
        else:
            count = conn.execute(_COUNT, {"e": key[0], "v": key[1], "r": key[2]}).scalar_one()
        if count > m.MAX_METRICS:
            raise InvalidMetric(
                f"run {key[0]}/{key[1]}/{key[2]} may have at most {m.MAX_METRICS} metric "
                f"names; this request would make {count} ({', '.join(sorted(metrics))[:200]}); "
                "nothing of it was stored",
                field="metrics",
            )
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


def record_metrics_many(
    conn: sa.Connection,
    items: list[tuple[tuple[str, int, int], dict[str, m.Summary]]],
    now: float,
    known: Known | None = None,
) -> None:
    """PostgreSQL: the metrics of several runs (one entry per run) in one upsert and one
    cap check; raises :class:`InvalidMetric` when one of them goes over the cap (the caller,
    ``heartbeat_many``, then retries each heartbeat on its own)."""
    rows = [(key, name, s) for key, metrics in items for name, s in metrics.items()]
    if not rows:
        return
    conn.execute(
        _UPSERT_SET_PG,
        {
            "at": now,
            "es": [k[0] for k, _, _ in rows],
            "vs": [k[1] for k, _, _ in rows],
            "rs": [k[2] for k, _, _ in rows],
            "names": [n for _, n, _ in rows],
            "lasts": [_stored(s[0]) for _, _, s in rows],
            "last_steps": [s[1] for _, _, s in rows],
            "mins": [s[2] for _, _, s in rows],
            "min_steps": [s[3] for _, _, s in rows],
            "maxs": [s[4] for _, _, s in rows],
            "max_steps": [s[5] for _, _, s in rows],
        },
    )
    keys = [key for key, metrics in items if not _covered(known, key, metrics)]
    if not keys:
        return
    over = conn.execute(
        _OVER_CAP_PG,
        {
            "es": [k[0] for k in keys],
            "vs": [k[1] for k in keys],
            "rs": [k[2] for k in keys],
            "cap": m.MAX_METRICS,
        },
    ).first()
    if over is not None:
        raise InvalidMetric(
            f"run {over.experiment_id}/{over.variation}/{over.run} may have at most "
            f"{m.MAX_METRICS} metric names",
            field="metrics",
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
