"""Background uploads: the worker pool, and :class:`Uploads`, which a ``Chronicle`` owns.

What is captured, and how, is ``_staging``'s business. Here:

* :class:`UploadPool`: daemon workers shared by every run of one ``Chronicle``; uploads of
  the same name to the same run go one at a time, in submission order;
* :class:`Uploads`: stages a file or directory, queues one task per file, uploads each
  (re-capturing a file rewritten in place meanwhile), and never fails silently: a failure
  that may pass is spooled for ``chronicle sync``, a refusal for good keeps a copy only when
  the source no longer holds the bytes; ``close()`` waits (bounded, with progress) and
  spools what did not finish.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import (
    APIError,
    ServerError,
    SourceChanged,
    StorageFull,
    TransportError,
    UploadError,
)
from .._models import AssetInfo, RunKey
from ._spool import Spool
from ._staging import MAX_RECAPTURES, SETTLE_SECONDS, StagedFile, Stager, copy_stable, reap_orphans
from ._transport import Transport, request_id

log = logging.getLogger(__name__)

#: How often long waits (uploads at succeed/close) report progress.
PROGRESS_EVERY = 10.0


@dataclass(eq=False)  # identity semantics: tasks live in sets
class UploadTask:
    """One staged file bound to a run, waiting for a worker."""

    staged: StagedFile
    run_key: RunKey
    lease: str | None
    future: concurrent.futures.Future[AssetInfo]
    upload_id: str


class UploadHandle:
    """What ``upload_asset`` returns: a future for one file or a whole directory.

    ``result(timeout)`` returns the :class:`AssetInfo` (a list of them for a directory) or
    raises :class:`UploadError` if the upload finally failed.
    """

    def __init__(
        self, name: str, futures: list[concurrent.futures.Future[AssetInfo]], directory: bool
    ) -> None:
        self.name = name
        self.futures = futures
        self.directory = directory

    def done(self) -> bool:
        """True when every file finished (uploaded or failed)."""
        return all(f.done() for f in self.futures)

    def result(self, timeout: float | None = None) -> AssetInfo | list[AssetInfo]:
        """Wait for the upload; raise :class:`UploadError` if it finally failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for f in self.futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            results.append(f.result(left))
        return results if self.directory else results[0]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The first failure, or None."""
        for f in self.futures:
            exc = f.exception(timeout)
            if exc is not None:
                return exc
        return None

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<UploadHandle {self.name!r} files={len(self.futures)} {state}>"


class UploadPool:
    """A bounded pool of daemon worker threads shared by all runs of one ``Chronicle``.

    Daemon threads (not ``ThreadPoolExecutor``, whose exit hook would silently block the
    interpreter until every queued upload finished): ``Chronicle.close()``, also called at
    interpreter exit, drains with a bound and progress, then spools what is left.

    Uploads of the same name to the same run go one at a time, in the order they were
    submitted: a rewritten ``last.ckpt`` uploaded twice must end as the newer version, and
    parallel uploads would publish whichever finished last.
    """

    def __init__(
        self,
        workers: int,
        upload: Callable[[UploadTask], AssetInfo],
        on_failure: Callable[[UploadTask, BaseException], None],
    ) -> None:
        self._queue: queue.Queue[UploadTask | None] = queue.Queue()
        self._upload = upload
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._pending: dict[RunKey, set[UploadTask]] = {}
        self._threads: list[threading.Thread] = []
        self._workers = max(1, workers)
        self._closed = False
        # (run, name) -> later tasks of that name, waiting for the one in flight to finish.
        self._waiting: dict[tuple[RunKey, str], collections.deque[UploadTask]] = {}

    def submit(self, task: UploadTask) -> None:
        """Queue a task (workers start lazily, on first use)."""
        with self._lock:
            if self._closed:
                raise UploadError(
                    "this Chronicle is closed; no more uploads are accepted", name=task.staged.name
                )
            self._pending.setdefault(task.run_key, set()).add(task)
            slot = (task.run_key, task.staged.name)
            if slot in self._waiting:
                self._waiting[slot].append(task)  # released when the earlier one finishes
                return
            self._waiting[slot] = collections.deque()
            if len(self._threads) < self._workers:
                thread = threading.Thread(
                    target=self._work, daemon=True, name=f"chronicle-upload-{len(self._threads)}"
                )
                self._threads.append(thread)
                thread.start()
        self._queue.put(task)

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            try:
                info = self._upload(task)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    self._on_failure(task, exc)
                if not task.future.done():
                    task.future.set_exception(_as_upload_error(task, exc))
            else:
                task.future.set_result(info)
            finally:
                with self._lock:
                    tasks = self._pending.get(task.run_key)
                    if tasks is not None:
                        tasks.discard(task)
                        if not tasks:
                            del self._pending[task.run_key]
                    slot = (task.run_key, task.staged.name)
                    later = self._waiting.get(slot)
                    if later:
                        self._queue.put(later.popleft())
                    else:
                        self._waiting.pop(slot, None)

    def pending(self, run_key: RunKey | None = None) -> list[UploadTask]:
        """Unfinished tasks, of one run or of all."""
        with self._lock:
            if run_key is not None:
                return list(self._pending.get(run_key, ()))
            return [t for tasks in self._pending.values() for t in tasks]

    def close(self) -> list[UploadTask]:
        """Stop accepting work; tell idle workers to exit. Returns tasks never started."""
        with self._lock:
            self._closed = True
        leftovers: list[UploadTask] = []
        with self._lock:
            for waiting in self._waiting.values():
                leftovers.extend(waiting)
                waiting.clear()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftovers.append(item)
        with self._lock:
            for task in leftovers:
                tasks = self._pending.get(task.run_key)
                if tasks is not None:
                    tasks.discard(task)
                    if not tasks:
                        del self._pending[task.run_key]
        for _ in self._threads:
            self._queue.put(None)
        return leftovers


def _as_upload_error(task: UploadTask, exc: BaseException) -> UploadError:
    if isinstance(exc, UploadError):
        return exc
    return UploadError(
        f"upload of {task.staged.source} as {task.staged.name!r} failed: "
        f"{type(exc).__name__}: {exc}",
        name=task.staged.name,
        staged_path=str(task.staged.path),
    )


def is_transient(exc: BaseException) -> bool:
    """Failures worth spooling for ``chronicle sync`` (the server may come back)."""
    return isinstance(exc, (TransportError, ServerError, StorageFull, OSError)) and not (
        isinstance(exc, APIError) and exc.status < 500
    )


def describe(tasks: list[Any]) -> str:
    """A short human list of staged names."""
    names = [t.staged.name for t in tasks]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class Uploads:
    """A ``Chronicle``'s background uploads: staging, the pool, failures, the final wait.

    Owned by one ``Chronicle`` (``home``'s staging directory, its transport and spool);
    ``Run.upload_asset`` and ``Run.wait_uploads`` go through :meth:`submit` and :meth:`wait`.
    """

    def __init__(self, home: Path, transport: Transport, spool: Spool, workers: int) -> None:
        self.home = home
        self.transport = transport
        self.spool = spool
        self._stager: Stager | None = None
        self.pool = UploadPool(workers, self._upload_task, self._upload_failed)

    def reap_staging(self) -> None:
        """Remove what clients killed mid-upload left in staging (never a spooled file)."""
        try:
            reap_orphans(self.home / "staging", keep=self.spool.data_paths())
        except OSError as exc:
            log.warning("could not clean %s: %s", self.home / "staging", exc)

    def _stage(
        self, path: str | os.PathLike[str], name: str | None, follow_symlinks: bool = True
    ) -> Any:
        if self._stager is None:
            self.reap_staging()  # a client's start: clean up after dead predecessors once
            self._stager = Stager(self.home / "staging")
        return self._stager.stage(path, name, follow_symlinks)

    def submit(
        self,
        run_key: RunKey,
        lease: str | None,
        path: str | os.PathLike[str],
        name: str | None,
        follow_symlinks: bool = True,
    ) -> UploadHandle:
        """Capture ``path`` now and queue its upload to ``run_key`` under ``lease``."""
        staged = self._stage(path, name, follow_symlinks)
        base = name if name is not None else Path(path).name
        futures = []
        for i, item in enumerate(staged):
            task = UploadTask(
                staged=item,
                run_key=run_key,
                lease=lease,
                future=_new_future(),
                upload_id=request_id(),
            )
            try:
                self.pool.submit(task)
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
        for _ in range(MAX_RECAPTURES):
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
                    staged.path,
                    staged.path.with_suffix(".recapture"),
                    staged.name,
                    settle=SETTLE_SECONDS,
                )
                os.replace(fresh.path, staged.path)
                fresh.path, fresh.source = staged.path, staged.source
                task.staged = fresh
                task.upload_id = request_id()
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

    def wait(self, run_key: RunKey | None, timeout: float | None, why: str) -> bool:
        """Wait for pending uploads (one run's, or all), logging progress on long waits."""
        deadline = None if timeout is None else time.monotonic() + timeout
        started = time.monotonic()
        next_report = started + PROGRESS_EVERY
        while True:
            pending = self.pool.pending(run_key)
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

    def close(self, timeout: float) -> None:
        """Wait (bounded, with progress) for every pending upload, then stop the pool and
        spool what never started or is still in progress, each named at ERROR."""
        try:
            self.wait(None, timeout, "closing")
        finally:
            for task in self.pool.close():
                log.error(
                    "upload of %s (%s) never started before close; spooled for `chronicle sync`",
                    task.staged.source,
                    task.staged.name,
                )
                self._spool_task(task, "the client closed before it started")
            for task in self.pool.pending():
                log.error(
                    "abandoning upload of %s (%s) after %.0fs: it is still in progress; "
                    "its staged copy is spooled for `chronicle sync`",
                    task.staged.source,
                    task.staged.name,
                    timeout,
                )
                self._spool_task(task, "still in progress at close")


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
