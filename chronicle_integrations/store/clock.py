"""The store's clock: the one rule for what "now" is.

Every time the store records (``started_at``, ``alive_at``, event times) and every liveness
judgement (``lost`` and ``failed_lost`` cut-offs) comes from :attr:`StoreBase.clock`, and that
callable is chosen here, once, by :func:`store_clock`:

* **SQLite** (one host by construction): the process clock, ``time.time()``.
* **PostgreSQL** (possibly several server replicas on several hosts behind a load balancer):
  the **database's** clock, so that every replica judges liveness against the same clock and
  two consecutive heartbeats of one run stamped by two replicas are comparable even when the
  hosts' clocks disagree. :class:`DatabaseClock` reads ``clock_timestamp()`` once every
  ``resync`` seconds and extrapolates with the host's *monotonic* clock in between, so a
  heartbeat costs no extra round trip and the host's wall clock (which NTP may step, or which
  may simply be wrong) is never consulted. The error against the database's clock is half the
  round trip of the last sample (sub-millisecond on a LAN) plus the monotonic clock's drift
  over ``resync`` seconds (parts per million); both are negligible against a heartbeat timeout.

Tests inject their own ``clock=`` (a callable returning seconds since the epoch).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa

__all__ = ["DEFAULT_RESYNC", "DatabaseClock", "process_clock", "store_clock"]

log = logging.getLogger(__name__)

#: Seconds between two samples of the database's clock.
DEFAULT_RESYNC = 5.0

_NOW_SQL = sa.text("SELECT extract(epoch FROM clock_timestamp())")


def process_clock() -> float:
    """This process's wall clock (the SQLite store's clock)."""
    return time.time()


class DatabaseClock:
    """The PostgreSQL server's clock, sampled every ``resync`` seconds (see the module).

    Never goes backwards in one process: a new sample that lands slightly behind the
    extrapolated value (round-trip noise) is held at the last value returned. When a sample
    fails (the database is briefly unreachable), the clock keeps extrapolating from the last
    good one and tries again at the next call after ``resync``; the first sample is taken at
    construction, so a store that opens has a clock.

    Example::

        clock = DatabaseClock(engine)
        now = clock()  # seconds since the epoch, on the database's clock
    """

    def __init__(self, engine: sa.Engine, resync: float = DEFAULT_RESYNC) -> None:
        self.engine = engine
        self.resync = float(resync)
        self._lock = threading.Lock()
        self._sampling = False
        self._last = 0.0
        self._base, self._mono, self.uncertainty = self._sample()
        self._next = self._mono + self.resync

    def _sample(self) -> tuple[float, float, float]:
        """``(database epoch, monotonic instant it corresponds to, half the round trip)``."""
        with self.engine.connect() as conn:
            before = time.monotonic()
            epoch = float(conn.execute(_NOW_SQL).scalar_one())
            after = time.monotonic()
            conn.rollback()
        return epoch, (before + after) / 2, (after - before) / 2

    def __call__(self) -> float:
        mono = time.monotonic()
        if mono >= self._next and self._claim():
            try:
                sample = self._sample()
            except Exception as exc:  # keep extrapolating; try again after another resync
                log.warning("could not read the database's clock (%s); extrapolating", exc)
                sample = None
            with self._lock:
                if sample is not None:
                    self._base, self._mono, self.uncertainty = sample
                self._next = time.monotonic() + self.resync
                self._sampling = False
            mono = time.monotonic()
        with self._lock:
            now = max(self._base + (mono - self._mono), self._last)
            self._last = now
        return now

    def _claim(self) -> bool:
        """One thread resamples; the others go on extrapolating from the last sample."""
        with self._lock:
            if self._sampling:
                return False
            self._sampling = True
            return True


def store_clock(engine: sa.Engine) -> Callable[[], float]:
    """The clock a store on ``engine`` uses unless one is injected: the database's clock on
    PostgreSQL (one clock for every replica), the process clock on SQLite."""
    if engine.dialect.name == "postgresql":
        return DatabaseClock(engine)
    return process_clock
