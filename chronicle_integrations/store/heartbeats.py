"""The heartbeat path: prebuilt statements for a live run beating under its lease (one round
trip), the slow path for everything else, and :meth:`HeartbeatMixin.heartbeat_many`'s
batching (one write transaction per batch; one statement per batch on PostgreSQL)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import sqlalchemy as sa

from .. import _metrics
from .. import _validation as check
from .._errors import APIError
from .._models import RunInfo
from ..lifecycle import Action, next_state
from . import schema as t
from .base import _dumps, _key, _refused, _run_pk
from .metrics import known_names, record_metrics_many, record_outcomes, remember_names
from .runs import RunsMixin

log = logging.getLogger(__name__)

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


class HeartbeatMixin(RunsMixin):
    """The heartbeats of :class:`~.core.Store`."""

    def heartbeat(
        self,
        experiment_id: str,
        variation: int,
        run: int,
        lease: str | None,
        progress: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        checkpoints: dict[str, Any] | None = None,
    ) -> RunInfo:
        """``running -> running`` / ``lost -> running``. Refused on terminal runs (the error
        carries the state, so a worker learns it was cancelled) and under a stale lease.

        ``progress`` (e.g. ``{"step": 120, "epoch": 3}``) is kept; when it differs from the
        last one, ``progress_at`` moves: a run beating without advancing becomes ``stalled``.
        ``metrics`` (summaries by name, see :func:`~chronicle_integrations._metrics.
        parse_metrics`) and ``checkpoints`` (asset name -> the metric it was saved for) are
        merged in the same transaction, under the same lease; they never count as progress.
        """
        key = _key(experiment_id, variation, run)
        encoded = _dumps(check.progress(progress)) if progress is not None else None
        outcomes = _outcomes(metrics, checkpoints)
        now = self.clock()
        with self._write() as conn:
            # Fast path (one prebuilt statement): a live run beating under its lease.
            if isinstance(lease, str):
                fast = self._heartbeat_rows(
                    conn, [(0, self._fast_params(key, lease, encoded, now))]
                )[0][1]
                if fast is not None:
                    if outcomes is not None:
                        record_outcomes(conn, key, *outcomes, now)
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
            if outcomes is not None:
                record_outcomes(conn, key, *outcomes, now)
            if state is not target:
                self._event(conn, key, state, target, now, "heartbeat")
            return self._info(self._reload(conn, key), now, beat=True)

    def heartbeat_many(
        self,
        beats: Iterable[tuple[Any, ...]],
    ) -> list[RunInfo | APIError]:
        """Many heartbeats ``(experiment_id, variation, run, lease, progress)`` at once, each
        with exactly the effect and result of :meth:`heartbeat` (its record, or the error it
        would raise). A beat may add ``metrics`` and ``checkpoints`` (two more items).

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
        extra: dict[int, tuple[tuple[str, int, int], tuple[Any, Any]]] = {}
        now = self.clock()
        for i, (e, v, r, lease, progress, *more) in enumerate(items):
            if not isinstance(lease, str):
                continue
            try:
                key = _key(e, v, r)
                encoded = _dumps(check.progress(progress)) if progress is not None else None
                outcomes = _outcomes(*more)
            except APIError:
                continue  # heartbeat() raises the same error below
            if key in batched:
                continue  # a run's later heartbeats follow its first, in order, below
            batched.add(key)
            fast.append((i, self._fast_params(key, lease, encoded, now)))
            if outcomes is not None:
                extra[i] = (key, outcomes)
        if fast:
            try:
                with self._write() as conn:
                    rows = (
                        self._heartbeat_rows(conn, fast)
                        if self._sqlite
                        else self._heartbeat_set(conn, fast, now)
                    )
                    # Metrics of the beats that got through, in the same transaction (a
                    # refused one fails the batch: every beat is then retried on its own).
                    live = [(i, extra[i]) for i, row in rows if row is not None and i in extra]
                    known = known_names(self)
                    if not self._sqlite:  # the batch's metrics in one statement
                        record_metrics_many(
                            conn, [(key, out[0]) for _, (key, out) in live if out[0]], now, known
                        )
                    for _, (key, out) in live:
                        if self._sqlite:
                            record_outcomes(conn, key, out[0], out[1], now, known)
                        elif out[1]:
                            record_outcomes(conn, key, None, out[1], now)
            except APIError as exc:
                log.warning(
                    "a batch of %d heartbeats failed (%s); retrying them one by one", len(fast), exc
                )
            else:
                for i, row in rows:
                    if row is not None:
                        results[i] = self._info(row, now, beat=True)
                remember_names(known, [out for _, out in live])
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
            "p_cut": self._lost_cut(now),
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
            "cut": self._lost_cut(now),
            "beats": [i for i, _ in fast],
            "es": [p["p_e"] for _, p in fast],
            "vs": [p["p_v"] for _, p in fast],
            "rs": [p["p_r"] for _, p in fast],
            "leases": [p["p_lease"] for _, p in fast],
            "progress": [p.get("p_progress") for _, p in fast],
        }
        by_beat = {row.beat: row for row in conn.execute(_HEARTBEAT_SET_PG, params)}
        return [(i, by_beat.get(i)) for i, _ in fast]


def _outcomes(
    metrics: dict[str, Any] | None = None, checkpoints: dict[str, Any] | None = None
) -> tuple[Any, Any] | None:
    """Checked ``(metrics, checkpoints)`` of a beat, or None when it carries neither."""
    if metrics is None and checkpoints is None:
        return None
    return (
        _metrics.parse_metrics(metrics) if metrics is not None else None,
        _metrics.parse_checkpoints(checkpoints) if checkpoints is not None else None,
    )
