"""The client's entry point: :class:`Chronicle`, one per process (see the package's doc).

A ``Chronicle`` holds the transport (HTTP or embedded), the spool, and the background
:class:`~._uploads.Uploads`; it hands out cheap :class:`~._run.Run` handles, and closes
itself at interpreter exit so that pending uploads are never dropped silently.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from .. import _config, _metrics
from .. import _validation as check
from .._errors import InvalidRequest
from .._models import BestRun, ExperimentInfo, Page, RunInfo, walk_pages
from ..lifecycle import RunState
from ._heartbeat import KeepAlive
from ._run import Run
from ._spool import Spool, SyncReport
from ._transport import EmbeddedTransport, Transport, request_id
from ._uploads import UploadPool, Uploads

log = logging.getLogger(__name__)

__all__ = ["Chronicle"]

#: The least time ``close()`` gives the last heartbeat of a run holding unsent metrics, even
#: when the wait for uploads used up its timeout: one short attempt.
LAST_BEAT_FLOOR = 1.0


class Chronicle:
    """A connection to Chronicle: a server (``url`` / ``$CHRONICLE_URL``) or the embedded store.

    Args:
        url: the server's base URL. Default ``$CHRONICLE_URL``; with neither, the embedded
            store in ``home`` is used (needs the ``embedded`` extra).
        api_key: bearer key for the server. Default ``$CHRONICLE_API_KEY``.
        home: the client's home: embedded database and assets, upload staging, the spool.
            Default ``$CHRONICLE_HOME``, else ``./chronicle`` (made absolute at construction).
        upload_workers: size of the shared background upload pool.
        close_timeout: how long ``close()`` waits for pending uploads before spooling them.
        timeout: the retry budget, in seconds, of each request to the server, answers
            included (however slowly they trickle in).
        first_contact_timeout: the budget of each request until the server has answered
            this client once (default 10 s; None: ``timeout``): a server that is down or
            silent when training starts costs a few seconds, not ``timeout``.
        heartbeat_timeout, lost_grace, stall_timeout: embedded store only: the watchdog's
            settings (default ``$CHRONICLE_HEARTBEAT_TIMEOUT`` / ``$CHRONICLE_LOST_GRACE`` /
            ``$CHRONICLE_STALL_TIMEOUT``, else 900 s, 48 h and 30 min). A server has its own.

    One ``Chronicle`` per process; it is a context manager, and ``close()`` is idempotent and
    also runs at interpreter exit, so pending uploads are never dropped silently.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        home: str | os.PathLike[str] | None = None,
        *,
        upload_workers: int = 4,
        close_timeout: float = 3600.0,
        timeout: float = 60.0,
        first_contact_timeout: float | None = 10.0,
        heartbeat_timeout: float | None = None,
        lost_grace: float | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        target = _config.resolve_target(url, home)
        self.url = target.url
        api_key = _config.api_key(api_key)
        self.home = target.home
        self.close_timeout = close_timeout
        self._closed = False
        self._close_lock = threading.Lock()
        self._keepalives: weakref.WeakSet[KeepAlive[Run]] = weakref.WeakSet()
        #: Handles that logged metrics (or checkpoint records): ``close()`` sends what they
        #: still hold.
        self._unsent: weakref.WeakSet[Run] = weakref.WeakSet()
        self.transport: Transport
        if self.url:
            from ._deadline import RetryPolicy
            from ._http import HttpTransport

            self.transport = HttpTransport(
                self.url,
                api_key,
                RetryPolicy(budget=timeout, first_contact=first_contact_timeout),
            )
        else:
            kwargs: dict[str, float] = {}
            for key, value, env in (
                ("heartbeat_timeout", heartbeat_timeout, _config.ENV_HEARTBEAT_TIMEOUT),
                ("lost_grace", lost_grace, _config.ENV_LOST_GRACE),
                ("stall_timeout", stall_timeout, _config.ENV_STALL_TIMEOUT),
            ):
                seconds = float(value) if value is not None else _config.env_seconds(env)
                if seconds is not None:
                    kwargs[key] = seconds
            self.transport = EmbeddedTransport(self.home, **kwargs)
        self.spool = Spool(self.home / "spool")
        self._uploads = Uploads(self.home, self.transport, self.spool, upload_workers)
        _register_exit(self)

    # ------------------------------------------------------------------ context / closing
    def __enter__(self) -> Chronicle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Chronicle {self.transport.target}>"

    @property
    def target(self) -> str:
        """Where this client writes: the server URL or ``embedded:<home>``."""
        return self.transport.target

    def close(self, timeout: float | None = None) -> None:
        """Wait (bounded, with progress) for pending uploads, spool what did not finish, stop
        heartbeats, send the metrics logged since the last heartbeat of a run left live
        (one last heartbeat each, under its lease), and release connections. Idempotent.

        ``timeout`` (default ``close_timeout``) bounds the wait for uploads; each last
        heartbeat gets what is left of it, at most a quick try (10 s over a server) and at
        least :data:`LAST_BEAT_FLOOR`; a WARNING names the metrics that could not be sent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        timeout = self.close_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            self._uploads.close(timeout)
        finally:
            keepalives = list(self._keepalives)
            for keepalive in keepalives:
                keepalive.stop(timeout=1.0)
            self._send_unsent([k.run for k in keepalives], deadline)
            self.transport.close()
            _unregister_exit(self)

    def _send_unsent(self, owners: list[Run], deadline: float) -> None:
        """The last heartbeat of each run that still holds metrics: the owners of this
        client's heartbeat loops (their member handles share their buffer) and the handles
        that logged metrics, each buffer once, each within what is left until ``deadline``
        (at least :data:`LAST_BEAT_FLOOR` seconds; at most a quick try)."""
        seen: set[int] = set()
        with self._close_lock:  # the training thread may list a handle meanwhile
            listed = list(self._unsent)
        for run in [*owners, *listed]:
            if id(run.pending_metrics) not in seen:
                seen.add(id(run.pending_metrics))
                run._send_unsent(max(LAST_BEAT_FLOOR, deadline - time.monotonic()))

    # ------------------------------------------------------------------ experiments
    def create_experiment(
        self,
        name: str,
        variations: list[dict[str, Any]] | None = None,
        experiment_id: str | None = None,
        objective: dict[str, Any] | None = None,
    ) -> str:
        """Create an experiment with numbered variations (0, 1, ...); returns its id.

        The id is derived from the name with a random suffix unless given; it is chosen here
        so that a retried request cannot create a second experiment. ``objective``, e.g.
        ``{"metric": "val/loss", "mode": "min"}``, says what "best" means for its runs
        (:meth:`best`, ``chronicle best``); also settable later (:meth:`set_objective`).
        """
        check.name(name)
        goal = _metrics.objective(objective)
        if experiment_id is None:
            experiment_id = check.derive_experiment_id(name)
        extra: dict[str, Any] = {"objective": goal} if goal is not None else {}
        return self.transport.create_experiment(
            name, list(variations or []), experiment_id, **extra
        ).experiment_id

    def set_objective(
        self, experiment_id: str, metric: str | None, mode: str = "min"
    ) -> ExperimentInfo:
        """Set what "best" means for an experiment's runs (``metric=None`` clears it)."""
        goal = _metrics.objective({"metric": metric, "mode": mode}) if metric else None
        return self.transport.set_objective(check.experiment_id(experiment_id), goal)

    def best(
        self,
        experiment_id: str,
        metric: str | None = None,
        mode: str | None = None,
        *,
        include_running: bool = False,
    ) -> BestRun:
        """The experiment's best run by ``metric`` (default: its objective's) in ``mode``
        (default: the objective's, else ``min``), with its state, value and best checkpoint
        asset (``BestRun.checkpoint``: download it with ``run.download_asset`` or
        ``download_directory``). Only succeeded runs count unless ``include_running``.
        :class:`NotFound` when no run qualifies."""
        check.experiment_id(experiment_id)
        if metric is not None:
            _metrics.metric_name(metric)
        if mode is not None:
            _metrics.mode(mode)
        return self.transport.best(experiment_id, metric, mode, include_running)

    def add_variation(self, experiment_id: str, config: dict[str, Any]) -> int:
        """Append a variation to an experiment; returns its number."""
        return self.transport.add_variation(experiment_id, check.config(config), request_id())

    def experiments(self) -> list[ExperimentInfo]:
        """Every experiment, oldest first (fetched a page at a time)."""
        return list(self.iter_experiments())

    def iter_experiments(self, *, page_size: int | None = None) -> Iterator[ExperimentInfo]:
        """Every experiment, oldest first, lazily: one page (``page_size``, default the
        server's) is fetched when the previous one is used up, so memory stays bounded."""
        return walk_pages(
            lambda cursor: self.transport.list_experiments(limit=page_size, cursor=cursor)
        )

    def experiment(self, experiment_id: str) -> ExperimentInfo:
        """One experiment."""
        return self.transport.get_experiment(experiment_id)

    def variations(self, experiment_id: str) -> list[dict[str, Any]]:
        """The configs of an experiment's variations, in order: ``variations(e)[n]`` is the
        config of variation ``n``."""
        count = self.experiment(experiment_id).variations
        return [self.transport.get_variation_config(experiment_id, n) for n in range(count)]

    # ------------------------------------------------------------------ runs
    def create_run(self, experiment_id: str, variation: int) -> Run:
        """Create the next run of a variation (``pending``); returns its handle."""
        info = self.transport.create_run(
            check.experiment_id(experiment_id), check.number(variation, "variation"), request_id()
        )
        return Run(self, info.experiment_id, info.variation, info.run)

    def run(self, experiment_id: str, variation: int, run: int, lease: str | None = None) -> Run:
        """A handle on an existing run. No I/O: handles are cheap to create and discard.

        ``lease`` adopts a lease obtained elsewhere (e.g. ``$CHRONICLE_LEASE`` passed by a
        launcher to its job), so this handle may beat and end the run it started.
        """
        return Run(self, experiment_id, variation, run, lease=lease)

    def runs(
        self,
        experiment_id: str | None = None,
        state: str | RunState | None = None,
        *,
        sort: str | None = None,
        mode: str | None = None,
    ) -> list[RunInfo]:
        """Runs, optionally of one experiment and/or in one state (the effective state), in
        ``experiment_id, variation, run`` order, or best first by the metric ``sort``
        (see :meth:`runs_page`); fetched a page at a time."""
        return list(self.iter_runs(experiment_id, state, sort=sort, mode=mode))

    def iter_runs(
        self,
        experiment_id: str | None = None,
        state: str | RunState | None = None,
        *,
        page_size: int | None = None,
        sort: str | None = None,
        mode: str | None = None,
    ) -> Iterator[RunInfo]:
        """Like :meth:`runs`, lazily: pages of ``page_size`` runs (default the server's) are
        fetched as the iteration reaches them. Every run that exists for the whole walk comes
        exactly once, in ``experiment_id, variation, run`` order (sorted: in the order of
        :meth:`runs_page`, when its value does not change during the walk).

        Example::

            for info in chronicle.iter_runs(state="lost"):
                chronicle.run(info.experiment_id, info.variation, info.run).fail("abandoned")
        """
        if state is not None:
            check.run_state(state)  # an error now, not at the first next()
        _sort_arguments(sort, mode)
        return walk_pages(
            lambda cursor: self.runs_page(
                experiment_id, state, limit=page_size, cursor=cursor, sort=sort, mode=mode
            )
        )

    def runs_page(
        self,
        experiment_id: str | None = None,
        state: str | RunState | None = None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        sort: str | None = None,
        mode: str | None = None,
    ) -> Page[RunInfo]:
        """One page of :meth:`runs`: ``page.items`` (at most ``limit``) and
        ``page.next_cursor``, to pass as ``cursor`` for the next page (``None`` at the end).
        For callers that keep their place between calls (an agent, a paged UI).

        ``sort``: best first by that metric, sorted by the store: each run's ``min`` of it
        (its ``max`` with ``mode="max"``; ``mode`` defaults to the objective's when ``sort``
        is the experiment's objective, else ``min``); ties in ``experiment_id, variation,
        run`` order, and the runs without a value of it (or only NaN) last, in that order.
        A cursor belongs to its ``sort`` and ``mode``."""
        wanted = check.run_state(state).value if state is not None else None
        _sort_arguments(sort, mode)
        return self.transport.list_runs(
            experiment_id, wanted, limit=limit, cursor=cursor, sort=sort, mode=mode
        )

    def sync(self) -> SyncReport:
        """Send what the spool holds for this target (uploads first, then transitions), and
        remove the staged files of dead clients."""
        self._uploads.reap_staging()
        return self.spool.sync(self.transport)

    @property
    def _pool(self) -> UploadPool:
        """The background upload pool (tests watch and slow it)."""
        return self._uploads.pool


def _sort_arguments(sort: str | None, mode: str | None) -> None:
    """Check the ``sort`` and ``mode`` of a runs listing here, before any request."""
    if sort is not None:
        _metrics.metric_name(sort)
    if mode is not None:
        if sort is None:
            raise InvalidRequest("mode is the direction of sort: pass sort too", field="mode")
        _metrics.mode(mode)


# ---------------------------------------------------------------------- exit handling
_live: weakref.WeakSet[Chronicle] = weakref.WeakSet()


def _register_exit(chronicle: Chronicle) -> None:
    _live.add(chronicle)


def _unregister_exit(chronicle: Chronicle) -> None:
    _live.discard(chronicle)


@atexit.register
def _close_all_at_exit() -> None:
    for chronicle in list(_live):
        try:
            chronicle.close()
        except Exception:
            log.exception("error while closing %r at exit", chronicle)
