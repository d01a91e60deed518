"""The watchdog: the one rule that turns silence into ``lost`` then ``failed_lost``, in all its
forms side by side.

A run that is ``running`` (or ``lost``) and silent for more than ``heartbeat_timeout`` is
``lost``; silent for more than ``heartbeat_timeout + lost_grace`` it is ``failed_lost``
(``alive_at = COALESCE(last_heartbeat_at, started_at)``). The rule is:

* computed in Python on every read (:meth:`WatchdogMixin.effective_state`, and
  :meth:`WatchdogMixin._effective_end`: the end a read shows for an expiry not yet persisted),
* computed in SQL to filter listings by state (:meth:`WatchdogMixin._effective_sql`),
* the guard of the heartbeat fast path (:mod:`.heartbeats`), which only touches runs whose
  ``alive_at`` is not older than :meth:`WatchdogMixin._lost_cut` (runs owed nothing),
* persisted for one run, with its events, before any write to it
  (:meth:`WatchdogMixin._materialise`) and before its timeline is read
  (:meth:`WatchdogMixin._materialise_on_read`),
* persisted for every run owed a transition by the set-based :meth:`WatchdogMixin.sweep`,
  which :meth:`WatchdogMixin.maybe_sweep` runs at a cadence (with the expiry of idle uploads);
  a fleet of server replicas takes turns through :meth:`WatchdogMixin.sweep_if_due`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..lifecycle import RunState
from . import schema as t
from .base import SWEEP_LOCK, StoreBase, _run_pk

log = logging.getLogger(__name__)

_RUNNING, _LOST = RunState.RUNNING.value, RunState.LOST.value


class WatchdogMixin(StoreBase):
    """The watchdog part of :class:`~.core.Store`."""

    if TYPE_CHECKING:  # provided by AssetsMixin (assets.py); maybe_sweep runs it too

        @property
        def expiry_check_interval(self) -> float: ...

        def expire_uploads(self, *, every: float = 0.0) -> int: ...

    def effective_state(self, state: str, alive_at: float | None, now: float) -> RunState:
        """The state a run is really in at ``now``, given what is persisted."""
        if state in (_RUNNING, _LOST) and alive_at is not None:
            silent = now - alive_at
            if silent > self.heartbeat_timeout + self.lost_grace:
                return RunState.FAILED_LOST
            if silent > self.heartbeat_timeout:
                return RunState.LOST
        return RunState(state)

    def _lost_cut(self, now: float) -> float:
        """The oldest ``alive_at`` of a run still ``running`` at ``now`` (SQL forms of the
        rule, and the heartbeat fast path's guard: it only touches runs not owed a transition)."""
        return now - self.heartbeat_timeout

    def _expire_cut(self, now: float) -> float:
        """The oldest ``alive_at`` of a run not yet ``failed_lost`` at ``now`` (SQL forms)."""
        return now - self.heartbeat_timeout - self.lost_grace

    def _effective_sql(self, now: float) -> sa.ColumnElement[str]:
        c = t.runs.c
        return sa.case(
            (
                sa.and_(
                    c.state.in_([_RUNNING, _LOST]),
                    c.alive_at < self._expire_cut(now),
                ),
                RunState.FAILED_LOST.value,
            ),
            (sa.and_(c.state == _RUNNING, c.alive_at < self._lost_cut(now)), _LOST),
            else_=c.state,
        )

    def _effective_end(self, row: Any, state: RunState) -> tuple[float | None, str | None]:
        """The ``(ended_at, reason)`` a read shows for ``row`` in its effective ``state``: a
        run the watchdog expired but no write has persisted yet ended when its grace ran out."""
        if state is RunState.FAILED_LOST and row.state != state.value:
            return row.alive_at + self.heartbeat_timeout + self.lost_grace, "lost"
        return row.ended_at, row.reason

    def _materialise_on_read(self, key: tuple[str, int, int], row: Any, now: float) -> None:
        """Before a read that must show the watchdog's events (a run's timeline), persist the
        transitions the run is owed (a write transaction only when there are some)."""
        if self.effective_state(row.state, row.alive_at, now).value != row.state:
            with self._write() as conn:
                self._materialise(conn, self._lock_run(conn, *key), now)

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
        with self._write() as conn:
            if not self._sqlite:  # one sweep at a time across replicas (waits for another)
                conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({SWEEP_LOCK})"))
            moved = self._sweep_in(conn, now)
        return self._swept(now, moved)

    def sweep_if_due(self, every: float) -> dict[str, int] | None:
        """The periodic sweep of a fleet of replicas: sweep unless another replica is
        sweeping right now or swept less than ``every`` seconds ago (None: skipped).

        PostgreSQL: ``pg_try_advisory_xact_lock`` (transaction-scoped, so it holds through
        pgbouncer's transaction pooling) and the fleet's last sweep in ``chronicle_watchdog``,
        on the one clock every replica shares (:mod:`.clock`): however many replicas run their
        timers (each waits ``every`` between calls, so a lone replica never skips), the fleet
        sweeps about once every ``every`` seconds, and at most ``2 * every`` apart while one
        replica is up. SQLite (one host): :meth:`sweep`.
        """
        if self._sqlite:
            return self.sweep()
        now = self.clock()
        with self._write() as conn:
            if not conn.execute(
                sa.text(f"SELECT pg_try_advisory_xact_lock({SWEEP_LOCK})")
            ).scalar():
                return None  # another replica is sweeping
            last = conn.execute(
                sa.select(t.watchdog.c.swept_at).where(t.watchdog.c.id == 1)
            ).scalar()
            if last is not None and now - last < every:
                self._last_sweep = now
                return None  # another replica swept recently
            moved = self._sweep_in(conn, now)
        return self._swept(now, moved)

    def _sweep_in(self, conn: sa.Connection, now: float) -> dict[str, int]:
        """Both steps of the sweep in the caller's write transaction, and its record."""
        c = t.runs.c
        lost_cut, expire_cut = self._lost_cut(now), self._expire_cut(now)
        expired_at = c.alive_at + self.heartbeat_timeout + self.lost_grace
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
        if not self._sqlite:
            conn.execute(
                t.watchdog.update()
                .where(t.watchdog.c.id == 1)
                .values(swept_at=now, swept_by=self.replica)
            )
        return {"lost": lost, "failed_lost": expired}

    def _swept(self, now: float, moved: dict[str, int]) -> dict[str, int]:
        self._last_sweep = now
        if moved["lost"] or moved["failed_lost"]:
            log.info("watchdog: %d run(s) lost, %d expired", moved["lost"], moved["failed_lost"])
        return moved

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
            self.sweep_if_due(every)
            self.expire_uploads(every=self.expiry_check_interval)
        finally:
            self._sweep_lock.release()
