"""The core client: :class:`Chronicle` (one per process) and cheap :class:`Run` handles.

Example::

    from chronicle_integrations import Chronicle

    with Chronicle() as chronicle:            # $CHRONICLE_URL, else the embedded store
        exp = chronicle.create_experiment("lr-sweep", variations=[{"lr": 0.1}, {"lr": 0.01}])
        run = chronicle.create_run(exp, variation=1)
        cfg = run.get_variation_config()       # {"lr": 0.01}
        with run.start():                      # heartbeats on a daemon thread inside the block
            ...train...
            run.upload_asset("model.ckpt")     # returns at once; uploads in the background
        # the block ended: succeed() waited for the uploads; an exception -> fail("crash")
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _validation as check
from ._errors import (
    ChronicleError,
    ConfigurationError,
    InvalidRequest,
    ServerError,
    SourceChanged,
    StorageFull,
    TransportError,
    UploadError,
)
from ._heartbeat import KeepAlive, Progress
from ._models import AssetInfo, Event, ExperimentInfo, Page, RunInfo, walk_pages
from ._spool import Spool, SyncReport
from ._transport import EmbeddedTransport, Transport
from ._uploads import (
    StagedFile,
    Stager,
    UploadHandle,
    UploadPool,
    UploadTask,
    copy_stable,
    describe,
    reap_orphans,
)
from .lifecycle import Action, RunState

log = logging.getLogger(__name__)

__all__ = ["Chronicle", "Run"]

#: How often long waits (uploads at succeed/close) report progress.
PROGRESS_EVERY = 10.0


def _default_home() -> str:
    return os.path.abspath(os.environ.get("CHRONICLE_HOME") or "chronicle")


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
        self.url = url or os.environ.get("CHRONICLE_URL") or None
        api_key = api_key or os.environ.get("CHRONICLE_API_KEY") or None
        self.home = Path(home).resolve() if home is not None else Path(_default_home())
        self.close_timeout = close_timeout
        self._closed = False
        self._close_lock = threading.Lock()
        self._keepalives: weakref.WeakSet[KeepAlive] = weakref.WeakSet()
        self.transport: Transport
        if self.url:
            if not self.url.startswith(("http://", "https://")):
                raise ConfigurationError(
                    f"invalid Chronicle URL {self.url!r}: expected http://host:port"
                )
            from ._http import HttpTransport, RetryPolicy

            self.transport = HttpTransport(
                self.url,
                api_key,
                RetryPolicy(budget=timeout, first_contact=first_contact_timeout),
            )
        else:
            kwargs: dict[str, float] = {}
            for key, value, env in (
                ("heartbeat_timeout", heartbeat_timeout, "CHRONICLE_HEARTBEAT_TIMEOUT"),
                ("lost_grace", lost_grace, "CHRONICLE_LOST_GRACE"),
                ("stall_timeout", stall_timeout, "CHRONICLE_STALL_TIMEOUT"),
            ):
                raw = value if value is not None else os.environ.get(env)
                if raw is not None:
                    try:
                        kwargs[key] = float(raw)
                    except ValueError:
                        raise ConfigurationError(f"{env}={raw!r} is not a number") from None
            self.transport = EmbeddedTransport(self.home, **kwargs)
        self.spool = Spool(self.home / "spool")
        self._stager: Stager | None = None
        self._pool = UploadPool(upload_workers, self._upload_task, self._upload_failed)
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
        heartbeats, and release connections. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        timeout = self.close_timeout if timeout is None else timeout
        try:
            self._wait_uploads(None, timeout, "closing")
        finally:
            for task in self._pool.close():
                log.error(
                    "upload of %s (%s) never started before close; spooled for `chronicle sync`",
                    task.staged.source,
                    task.staged.name,
                )
                self._spool_task(task, "the client closed before it started")
            for task in self._pool.pending():
                log.error(
                    "abandoning upload of %s (%s) after %.0fs: it is still in progress; "
                    "its staged copy is spooled for `chronicle sync`",
                    task.staged.source,
                    task.staged.name,
                    timeout,
                )
                self._spool_task(task, "still in progress at close")
            for keepalive in list(self._keepalives):
                keepalive.stop(timeout=1.0)
            self.transport.close()
            _unregister_exit(self)

    # ------------------------------------------------------------------ experiments
    def create_experiment(
        self,
        name: str,
        variations: list[dict[str, Any]] | None = None,
        experiment_id: str | None = None,
    ) -> str:
        """Create an experiment with numbered variations (0, 1, ...); returns its id.

        The id is derived from the name with a random suffix unless given; it is chosen here
        so that a retried request cannot create a second experiment.
        """
        check.name(name)
        if experiment_id is None:
            experiment_id = check.derive_experiment_id(name)
        return self.transport.create_experiment(
            name, list(variations or []), experiment_id
        ).experiment_id

    def add_variation(self, experiment_id: str, config: dict[str, Any]) -> int:
        """Append a variation to an experiment; returns its number."""
        return self.transport.add_variation(experiment_id, check.config(config), _request_id())

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
            check.experiment_id(experiment_id), check.number(variation, "variation"), _request_id()
        )
        return Run(self, info.experiment_id, info.variation, info.run)

    def run(self, experiment_id: str, variation: int, run: int, lease: str | None = None) -> Run:
        """A handle on an existing run. No I/O: handles are cheap to create and discard.

        ``lease`` adopts a lease obtained elsewhere (e.g. ``$CHRONICLE_LEASE`` passed by a
        launcher to its job), so this handle may beat and end the run it started.
        """
        return Run(self, experiment_id, variation, run, lease=lease)

    def runs(
        self, experiment_id: str | None = None, state: str | RunState | None = None
    ) -> list[RunInfo]:
        """Runs, optionally of one experiment and/or in one state (the effective state), in
        ``experiment_id, variation, run`` order (fetched a page at a time)."""
        return list(self.iter_runs(experiment_id, state))

    def iter_runs(
        self,
        experiment_id: str | None = None,
        state: str | RunState | None = None,
        *,
        page_size: int | None = None,
    ) -> Iterator[RunInfo]:
        """Like :meth:`runs`, lazily: pages of ``page_size`` runs (default the server's) are
        fetched as the iteration reaches them. Every run that exists for the whole walk comes
        exactly once, in ``experiment_id, variation, run`` order.

        Example::

            for info in chronicle.iter_runs(state="lost"):
                chronicle.run(info.experiment_id, info.variation, info.run).fail("abandoned")
        """
        if state is not None:
            check.run_state(state)  # an error now, not at the first next()
        return walk_pages(
            lambda cursor: self.runs_page(experiment_id, state, limit=page_size, cursor=cursor)
        )

    def runs_page(
        self,
        experiment_id: str | None = None,
        state: str | RunState | None = None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[RunInfo]:
        """One page of :meth:`runs`: ``page.items`` (at most ``limit``) and
        ``page.next_cursor``, to pass as ``cursor`` for the next page (``None`` at the end).
        For callers that keep their place between calls (an agent, a paged UI)."""
        wanted = check.run_state(state).value if state is not None else None
        return self.transport.list_runs(experiment_id, wanted, limit=limit, cursor=cursor)

    def sync(self) -> SyncReport:
        """Send what the spool holds for this target (uploads first, then transitions), and
        remove the staged files of dead clients."""
        self._reap_staging()
        return self.spool.sync(self.transport)

    # ------------------------------------------------------------------ uploads (internal)
    def _reap_staging(self) -> None:
        """Remove what clients killed mid-upload left in staging (never a spooled file)."""
        try:
            reap_orphans(self.home / "staging", keep=self.spool.data_paths())
        except OSError as exc:
            log.warning("could not clean %s: %s", self.home / "staging", exc)

    def _stage(
        self, path: str | os.PathLike[str], name: str | None, follow_symlinks: bool = True
    ) -> Any:
        if self._stager is None:
            self._reap_staging()  # a client's start: clean up after dead predecessors once
            self._stager = Stager(self.home / "staging")
        return self._stager.stage(path, name, follow_symlinks)

    def _submit_upload(
        self,
        run: Run,
        path: str | os.PathLike[str],
        name: str | None,
        follow_symlinks: bool = True,
    ) -> UploadHandle:
        staged = self._stage(path, name, follow_symlinks)
        base = name if name is not None else Path(path).name
        futures = []
        for i, item in enumerate(staged):
            task = UploadTask(
                staged=item,
                run_key=run.key_tuple,
                lease=run.lease,
                future=_new_future(),
                upload_id=_request_id(),
            )
            try:
                self._pool.submit(task)
            except BaseException:
                # Refused (e.g. the client is closed): what was not queued leaves no copy.
                for left in staged[i:]:
                    left.path.unlink(missing_ok=True)
                raise
            futures.append(task.future)
        return UploadHandle(base, futures, directory=Path(path).is_dir())

    def _upload_task(self, task: UploadTask) -> AssetInfo:
        """Run in a worker: upload, verifying the capture is intact before publishing; if it
        was rewritten in place meanwhile, capture a complete later version and start over."""
        for _ in range(20):
            staged = task.staged
            try:
                if not staged.unchanged():
                    raise SourceChanged(staged.name)
                info = _upload_checked(self.transport, task)
            except Exception as exc:
                if not staged.path.exists():
                    raise  # close() spooled the staged file meanwhile: nothing to re-capture
                if not isinstance(exc, SourceChanged) and staged.unchanged():
                    raise  # a real failure, not a torn capture
                log.info(
                    "%s was rewritten in place while uploading; capturing its newest "
                    "complete version",
                    staged.source,
                )
                with contextlib.suppress(Exception):
                    self.transport.abort_upload(task.upload_id)
                fresh = copy_stable(
                    staged.path, staged.path.with_suffix(".recapture"), staged.name, settle=0.5
                )
                os.replace(fresh.path, staged.path)
                fresh.path, fresh.source = staged.path, staged.source
                task.staged = fresh
                task.upload_id = _request_id()
                continue
            staged.path.unlink(missing_ok=True)
            return info
        raise UploadError(
            f"{task.staged.source} kept being rewritten; gave up",
            name=task.staged.name,
            staged_path=str(task.staged.path),
        )

    def _upload_failed(self, task: UploadTask, exc: BaseException) -> None:
        """Never silent: ERROR naming the file; spool it when the failure may pass."""
        if not task.staged.path.exists():
            return  # already spooled by close(), which said so
        if isinstance(exc, (TransportError, ServerError, StorageFull)):
            log.error(
                "upload of %s as %r to run %s failed: %s; spooled for `chronicle sync`",
                task.staged.source,
                task.staged.name,
                "/".join(map(str, task.run_key)),
                exc,
            )
            self._spool_task(task, str(exc))
        elif _source_holds(task.staged):
            # Refused for good (a 4xx: no such run, another worker's lease, a bad name...):
            # the source still holds these very bytes, so the staged copy protects nothing.
            task.staged.path.unlink(missing_ok=True)
            message = (
                f"upload of {task.staged.source} as {task.staged.name!r} to run "
                f"{'/'.join(map(str, task.run_key))} was refused: {exc}; no copy kept (the "
                "file itself is unchanged)"
            )
            log.error("%s", message)
            if not task.future.done():
                task.future.set_exception(UploadError(message, name=task.staged.name))
        else:
            if self._stager is not None:
                self._stager.keep(task.staged)  # outlives this process, unlike staging
            log.error(
                "upload of %s as %r to run %s failed: %s; staged copy kept at %s",
                task.staged.source,
                task.staged.name,
                "/".join(map(str, task.run_key)),
                exc,
                task.staged.path,
            )

    def _spool_task(self, task: UploadTask, why: str) -> None:
        try:
            path = self.spool.add_upload(
                self.transport.target,
                task.run_key,
                task.staged.name,
                task.staged.path,
                lease=task.lease,
                upload_id=task.upload_id,
                linked=task.staged.linked,
            )
        except OSError as exc:
            log.error("could not spool %s (%s): %s", task.staged.name, why, exc)
            return
        if not task.future.done():
            task.future.set_exception(
                UploadError(
                    f"upload of {task.staged.source} as {task.staged.name!r} did not finish "
                    f"({why}); spooled at {path}: run `chronicle sync`",
                    name=task.staged.name,
                    staged_path=str(path),
                )
            )

    def _wait_uploads(
        self, run_key: tuple[str, int, int] | None, timeout: float | None, why: str
    ) -> bool:
        """Wait for pending uploads (one run's, or all), logging progress on long waits."""
        deadline = None if timeout is None else time.monotonic() + timeout
        started = time.monotonic()
        next_report = started + PROGRESS_EVERY
        while True:
            pending = self._pool.pending(run_key)
            if not pending:
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if now >= next_report:
                size = sum(t.staged.size for t in pending)
                log.info(
                    "%s: waiting for %d upload(s) (%s, %.1f MiB) for %.0fs",
                    why,
                    len(pending),
                    describe(pending),
                    size / 2**20,
                    now - started,
                )
                next_report = now + PROGRESS_EVERY
            wait = 0.5 if deadline is None else min(0.5, max(0.0, deadline - now))
            concurrent.futures.wait(
                [t.future for t in pending],
                timeout=wait,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )


class Run:
    """A handle on one run ``(experiment_id, variation, run)``.

    Creating a handle does no I/O. Mutators return ``self`` so calls chain::

        chronicle.run(exp, 0, 0).start().heartbeat()

    Used as a context manager after ``start()``, it keeps heartbeats alive inside the block
    and ends the run: ``succeed()`` on normal exit, ``fail("crash")`` on an exception,
    ``fail("abandoned")`` on ``KeyboardInterrupt``.
    """

    def __init__(
        self,
        chronicle: Chronicle,
        experiment_id: str,
        variation: int,
        run: int,
        lease: str | None = None,
    ) -> None:
        self.chronicle = chronicle
        self.experiment_id = check.experiment_id(experiment_id)
        self.variation = check.number(variation, "variation")
        self.run = check.number(run, "run")
        self.lease = lease
        #: Set when the server says the run was cancelled, expired or taken over.
        self.cancelled = threading.Event()
        self.cancel_reason: str | None = None
        #: True when the terminal transition could not be sent and was spooled.
        self.spooled = False
        #: Training progress, updated cheaply by the training loop, sent with heartbeats.
        self.progress = Progress()
        #: The store's watchdog timeout, as its answers to start and heartbeat said (None
        #: until then): keep_alive beats at most every third of it.
        self.heartbeat_timeout: float | None = None
        self._keepalive: KeepAlive | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Run {self.key}>"

    @property
    def key(self) -> str:
        """``experiment/variation/run``."""
        return f"{self.experiment_id}/{self.variation}/{self.run}"

    @property
    def key_tuple(self) -> tuple[str, int, int]:
        return (self.experiment_id, self.variation, self.run)

    @property
    def _t(self) -> Transport:
        return self.chronicle.transport

    # ------------------------------------------------------------------ reads
    def get_variation_config(self) -> dict[str, Any]:
        """The config of this run's variation."""
        return self._t.get_variation_config(self.experiment_id, self.variation)

    def info(self) -> RunInfo:
        """A fresh snapshot of the run (effective state, timestamps, reason, asset count)."""
        return self._t.get_run(*self.key_tuple)

    @property
    def state(self) -> RunState:
        """The run's current (effective) state, read from the store."""
        return self.info().state

    def events(self) -> list[Event]:
        """The run's timeline: every transition and every completed upload (fetched a page
        at a time)."""
        return list(walk_pages(lambda cursor: self._t.events(*self.key_tuple, cursor=cursor)))

    def assets(self) -> list[AssetInfo]:
        """The run's complete assets, by name (fetched a page at a time)."""
        return list(walk_pages(lambda cursor: self._t.list_assets(*self.key_tuple, cursor=cursor)))

    def download_asset(
        self,
        name: str,
        dest: str | os.PathLike[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download an asset to ``dest`` (a file path, or an existing directory to put it in),
        verifying its SHA-256. The file appears only when complete. Returns the path."""
        check.asset_name(name)
        target = Path(dest)
        if target.is_dir():
            target = target / Path(name).name
        known = {a.name: a for a in self.assets()}
        if name not in known:
            from ._errors import NotFound

            raise NotFound(f"run {self.key} has no asset {name!r}", name=name)
        expected = known[name]
        # A fresh name, created exclusively (mkstemp: O_EXCL, never follows a planted symbolic
        # link) in the destination's directory, so the final os.replace is atomic.
        # Visible (not a dot file), so a download killed midway leaves an obvious leftover.
        fd, tmp = tempfile.mkstemp(
            prefix=f"{target.name[:200]}.", suffix=".part", dir=target.parent
        )
        partial = Path(tmp)
        try:
            with os.fdopen(fd, "w+b") as fh:
                os.fchmod(fh.fileno(), 0o666 & ~_umask())  # what open() would have created
                self._t.download_asset(
                    *self.key_tuple,
                    name,
                    fh,
                    progress=(lambda n: progress(n, expected.size)) if progress else None,
                )
                fh.flush()
                fh.seek(0)
                hasher = hashlib.sha256()
                for block in iter(lambda: fh.read(1 << 20), b""):
                    hasher.update(block)
            if hasher.hexdigest() != expected.sha256:
                raise UploadError(
                    f"downloaded {name!r} does not match its SHA-256; removed", name=name
                )
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return target

    def download_directory(
        self,
        name: str,
        dest: str | os.PathLike[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Path]:
        """Download every asset under ``name/`` (a directory uploaded with ``upload_asset``,
        e.g. an HF ``checkpoint-500``), keeping its layout, each file SHA-256 verified.

        ``dest`` is the directory to fill, or an existing directory to create ``name``'s base
        name in (like ``cp -r``). ``progress(done, total)`` counts bytes over all the files.
        Returns ``{asset name: path}``; :class:`NotFound` when no asset is under ``name/``.
        """
        prefix = check.asset_name(name.rstrip("/")) + "/"
        members = [a for a in self.assets() if a.name.startswith(prefix)]
        if not members:
            from ._errors import NotFound

            raise NotFound(f"run {self.key} has no asset under {prefix!r}", name=name)
        root = Path(dest)
        if root.is_dir():
            root = root / Path(prefix).name
        total = sum(a.size for a in members)
        done = 0
        written: dict[str, Path] = {}

        def member_progress(n: int, _size: int) -> None:
            if progress is not None:
                progress(done + n, total)

        for asset in members:
            target = root.joinpath(*asset.name[len(prefix) :].split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            written[asset.name] = self.download_asset(
                asset.name, target, progress=member_progress if progress else None
            )
            done += asset.size
        return written

    # ------------------------------------------------------------------ transitions
    def start(self, resume: bool = False) -> Run:
        """``pending -> running``; ``resume=True`` also takes over a running or lost run.

        The lease is chosen here (or adopted from ``run(..., lease=)``) and kept in the
        handle; a start retried after a lost response, or repeated with the lease the run
        already holds, is a success with no effect.
        """
        lease = self.lease or secrets.token_urlsafe(24)
        holder = f"{socket.gethostname()}:{os.getpid()}"
        info = self._t.start(*self.key_tuple, resume=resume, lease=lease, holder=holder)
        self.lease = lease
        self.heartbeat_timeout = info.heartbeat_timeout or self.heartbeat_timeout
        self.cancelled.clear()
        return self

    def heartbeat(self, progress: dict[str, Any] | None = None) -> Run:
        """Tell the store the run is alive (``lost -> running`` if it had gone quiet).

        ``progress`` (e.g. ``{"step": 120}``) lets the store tell a run that advances from
        one that merely exists; without it, the latest ``run.progress`` is sent, if any.
        """
        self._send_heartbeat(quick=False, progress=progress)
        return self

    def _send_heartbeat(
        self, quick: bool = True, progress: dict[str, Any] | None = None
    ) -> RunInfo:
        if progress is None:
            progress = self.progress.snapshot()
        info = self._t.heartbeat(*self.key_tuple, self.lease, quick=quick, progress=progress)
        self.heartbeat_timeout = info.heartbeat_timeout or self.heartbeat_timeout
        return info

    def keep_alive(
        self,
        interval: float = 60.0,
        on_cancel: Callable[[Run, str], None] | None = None,
        stall_timeout: float | None = None,
    ) -> KeepAlive:
        """Send heartbeats every ``interval`` seconds on a daemon thread (one per run).

        The store's answers say its watchdog's ``heartbeat_timeout``: the loop beats at least
        three times within it (every ``min(interval, heartbeat_timeout / 3)`` seconds), and
        says so once at WARNING when ``interval`` was longer than that.

        Returns the running :class:`KeepAlive` (a context manager; ``.stop()`` ends it). When
        the server says the run was cancelled or taken over, ``run.cancelled`` is set and
        ``on_cancel(run, reason)`` is called.

        ``stall_timeout``: when set, heartbeats pause while ``run.progress`` has not advanced
        for that long (the training loop is hung: the watchdog should see it and move the run
        to ``lost``), and resume when it advances again. Off by default for the bare client;
        the framework integrations turn it on.
        """
        slot = (*self.key_tuple, self.lease)
        with self._lock, _LOOPS_LOCK:
            if self._keepalive is not None and self._keepalive.alive:
                self._keepalive.join(self, on_cancel, stall_timeout)
                return self._keepalive
            shared = _LOOPS.get(slot)
            if shared is not None and shared.alive:
                # Another handle on this run, under the same lease, already beats in this
                # process (a launcher, and a callback inside its job): share its loop, its
                # progress and its cancellation, so that one hung training loop stops the
                # only heartbeats the run has.
                self.progress = shared.run.progress
                self.cancelled = shared.run.cancelled
                shared.join(self, on_cancel, stall_timeout)
            else:
                shared = KeepAlive(self, interval, on_cancel, stall_timeout)
                shared.watchdog(self.heartbeat_timeout)
                shared.start()
                _LOOPS[slot] = shared
                self.chronicle._keepalives.add(shared)
            self._keepalive = shared
            return shared

    def stop_keep_alive(self) -> None:
        """Stop heartbeats (without ending the run: e.g. on pre-emption). A handle that joined
        another handle's loop only leaves it; the loop's owner keeps beating."""
        with self._lock:
            keepalive, self._keepalive = self._keepalive, None
        if keepalive is None:
            return
        if keepalive.run is self:
            keepalive.stop()
            with _LOOPS_LOCK:
                if _LOOPS.get((*self.key_tuple, self.lease)) is keepalive:
                    del _LOOPS[(*self.key_tuple, self.lease)]
        else:
            keepalive.leave(self)

    def _mark_cancelled(self, why: str) -> None:
        self.cancel_reason = why
        self.cancelled.set()

    def record_event(self, kind: str, cause: str, detail: dict[str, Any] | None = None) -> Event:
        """Add a supervisor's event to the run's timeline under this handle's lease, e.g.
        ``run.record_event("teardown", "teardown_requested", {"signal": "SIGTERM"})``. It
        never changes the run's state (used by ``chronicle exec``)."""
        return self._t.record_event(*self.key_tuple, self.lease, kind, cause, detail)

    def upload_asset(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        follow_symlinks: bool = True,
    ) -> UploadHandle:
        """Capture a file or directory now and upload it in the background.

        Returns at once with a future-like :class:`UploadHandle`. The content is the one at
        call time (hard-link staging, see ``_uploads``); a directory keeps its layout under
        ``name`` (default: the path's base name) and only its regular files are uploaded
        (symbolic links, FIFOs, sockets and devices are skipped with a warning). A file path
        must be a regular file, or a symbolic link to one unless ``follow_symlinks=False``
        (for callers uploading what they found in a directory others write to).
        """
        return self.chronicle._submit_upload(self, path, name, follow_symlinks)

    def wait_uploads(self, timeout: float | None = None) -> bool:
        """Wait for this run's pending uploads; True when none is left."""
        return self.chronicle._wait_uploads(self.key_tuple, timeout, f"run {self.key}")

    def succeed(self, timeout: float | None = None, progress: dict[str, Any] | None = None) -> Run:
        """Wait for this run's uploads (progress logged on long waits), then record success.

        ``progress`` is the final training progress, kept with the run so that a finished run
        shows where it ended; default: the latest ``run.progress``, if any (as heartbeats).
        If the server cannot be reached within the retry budget, the transition is spooled
        (``run.spooled`` becomes True, an ERROR says so) for ``chronicle sync``.
        """
        self.wait_uploads(timeout)
        self._end(Action.SUCCEED, None, None, progress)
        return self

    def fail(
        self,
        reason: str = "crash",
        message: str | None = None,
        progress: dict[str, Any] | None = None,
    ) -> Run:
        """Record a failure: ``"crash"`` (needs the lease once started) or ``"abandoned"``
        (a cancellation: anyone may). ``message`` is kept, bounded to 64 KiB. ``progress``:
        where training stopped, as for :meth:`succeed`."""
        check.fail_reason(reason)
        action = Action.FAIL_CRASH if reason == "crash" else Action.FAIL_ABANDONED
        self._end(action, reason, check.message(message), progress)
        return self

    def _final_progress(self, progress: dict[str, Any] | None) -> dict[str, Any] | None:
        """The progress sent with the terminal transition. Invalid progress is dropped (with
        a WARNING) rather than sent: it must never get the transition itself refused."""
        if progress is None:
            progress = self.progress.snapshot()
        if progress is None:
            return None
        try:
            return check.progress(progress)
        except InvalidRequest as exc:
            log.warning("run %s: not sending the final progress: %s", self.key, exc)
            return None

    def _end(
        self,
        action: Action,
        reason: str | None,
        message: str | None,
        progress: dict[str, Any] | None = None,
    ) -> None:
        # Stop beating first: a heartbeat in flight after the terminal transition would be
        # refused and mistaken for a cancellation of a run this worker ended itself.
        self.stop_keep_alive()
        progress = self._final_progress(progress)
        try:
            if action is Action.SUCCEED:
                self._t.succeed(*self.key_tuple, self.lease, progress)
            else:
                self._t.fail(*self.key_tuple, reason or "crash", message, self.lease, progress)
        except TransportError as exc:
            if self.lease is None:
                # Not this worker's run (e.g. an operator cancelling): nothing to defer.
                raise
            path = self.chronicle.spool.add_transition(
                self.chronicle.target,
                self.key_tuple,
                "succeed" if action is Action.SUCCEED else "fail",
                lease=self.lease,
                reason=reason,
                message=message,
                progress=progress,
            )
            self.spooled = True
            log.error(
                "could not record %s for run %s (%s); spooled at %s: run "
                "`chronicle sync` when the server is back",
                action,
                self.key,
                exc,
                path,
            )

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Run:
        if self.lease is None:
            raise ChronicleError(
                "call start() before entering the run's with-block: "
                "`with chronicle.run(e, v, r).start() as run:`"
            )
        self.keep_alive()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.succeed()
            return
        try:
            if isinstance(exc, KeyboardInterrupt):
                self.fail("abandoned", "KeyboardInterrupt")
            else:
                self.fail("crash", format_exception(exc))
        except ChronicleError as tracking_error:
            # Never let a tracking error (run cancelled or taken over meanwhile) replace the
            # exception that ended the block: that one is what the user needs to see.
            log.error("could not record the end of run %s: %s", self.key, tracking_error)


def format_exception(exc: BaseException, limit_bytes: int = 16 * 1024) -> str:
    """``Type: message`` followed by the end of the traceback, bounded."""
    head = f"{type(exc).__name__}: {exc}"
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(tail) > limit_bytes:
        tail = "...\n" + tail[-limit_bytes:]
    return f"{head}\n\n{tail}"


def _source_holds(staged: StagedFile) -> bool:
    """True when the source path is still the very inode staged, unchanged (a hard-linked
    capture whose file was neither deleted, replaced nor rewritten): dropping the staged
    link loses nothing."""
    try:
        src, own = os.stat(staged.source), os.stat(staged.path)
    except OSError:
        return False
    return (
        staged.linked
        and (src.st_dev, src.st_ino) == (own.st_dev, own.st_ino)
        and staged.unchanged()
    )


def _request_id() -> str:
    return uuid.uuid4().hex


def _umask() -> int:
    """The process's umask. Python has no getter: read it from ``/proc`` (Linux), else by
    setting and restoring it (a window of two syscalls)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_future() -> concurrent.futures.Future[AssetInfo]:
    return concurrent.futures.Future()


def _upload_checked(transport: Transport, task: UploadTask) -> AssetInfo:
    """Upload a staged file; refuse to publish if it was rewritten in place meanwhile."""
    e, v, r = task.run_key
    staged = task.staged

    def check_intact() -> None:
        if not staged.unchanged():
            raise SourceChanged(staged.name)

    return transport.upload_file(
        e,
        v,
        r,
        staged.name,
        str(staged.path),
        lease=task.lease,
        upload_id=task.upload_id,
        verify=check_intact,
        size=staged.size,
    )


#: Live heartbeat loops of this process by (experiment, variation, run, lease).
_LOOPS: dict[tuple[str, int, int, str | None], KeepAlive] = {}
_LOOPS_LOCK = threading.Lock()


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
