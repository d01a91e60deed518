"""Background asset uploads: capture at call time, upload later, never lose or tear a file.

How the content is captured cheaply (SPEC "Uploads")
----------------------------------------------------
``upload_asset`` must return at once, yet the asset must be what the file held *at the call*,
even if training deletes or rewrites the file right after (Lightning evicts top-k checkpoints
and rewrites ``last.ckpt``; HF rotates ``checkpoint-N`` folders).

1. At call time each file is **hard-linked** into the staging directory: O(1), no bytes copied,
   whatever the size. The link keeps the inode alive when the source is deleted (top-k
   eviction, ``save_total_limit`` rotation) or atomically replaced (``os.replace``): the staged
   name still holds exactly the bytes of the call. When a link is impossible (another
   filesystem, a filesystem without links) the file is copied on the spot instead: slower but
   equally exact.
2. The one case a link cannot protect is an **in-place rewrite** of the same inode (``open(p,
   "wb")`` truncates and rewrites it). The worker records ``(size, mtime_ns)`` at call
   time and checks it again after reading the last byte and *before* asking the server to
   publish the asset. If it changed, the upload is dropped unpublished and a complete later
   version is captured instead: the worker waits until the file has been quiet for a moment,
   copies it privately, and checks the stat did not move during the copy. So an asset is
   either the call-time content or one complete later version - never a mix - and it only
   becomes visible after the server verified its SHA-256.

Staged files that could not be uploaded (server unreachable past the retry budget) are moved
to the spool with a manifest, and ``chronicle sync`` sends them later.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _validation as check
from ._errors import (
    APIError,
    ServerError,
    StorageFull,
    TransportError,
    UploadError,
)
from ._models import AssetInfo

log = logging.getLogger(__name__)

#: How long a rewritten file must stay unchanged before a later version is captured.
SETTLE_SECONDS = 0.5
#: How many times a rewritten file is re-captured before the upload gives up.
MAX_RECAPTURES = 20


@dataclass
class StagedFile:
    """A file captured for upload: a hard link (or private copy) in the staging directory."""

    path: Path
    name: str
    source: str
    size: int
    mtime_ns: int
    linked: bool

    def unchanged(self) -> bool:
        """True when the staged inode still holds the bytes captured at call time."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        # Not ctime: unlinking the source (top-k eviction) changes the inode's ctime.
        return (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)


class Stager:
    """Captures files into ``root`` (a directory on the client's home filesystem)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._warned_copy = False

    def stage(self, path: str | os.PathLike[str], name: str | None) -> list[StagedFile]:
        """Capture a file, or every regular file under a directory (keeping its layout)."""
        src = Path(path)
        base = check.asset_name(name if name is not None else src.name)
        if src.is_symlink() and src.is_dir():
            raise UploadError(
                f"refusing to upload {src}: it is a symbolic link to a directory", name=base
            )
        if src.is_dir():
            staged = []
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                for filename in sorted(filenames):
                    file = Path(dirpath, filename)
                    if file.is_symlink():
                        log.warning("not uploading %s: symbolic links are skipped", file)
                        continue
                    rel = file.relative_to(src).as_posix()
                    staged.append(self.stage_file(file, check.asset_name(f"{base}/{rel}")))
            return staged
        if not src.is_file():
            raise UploadError(f"cannot upload {src}: no such file or directory", name=base)
        return [self.stage_file(src, base)]

    def stage_file(self, src: Path, name: str) -> StagedFile:
        """Hard-link ``src`` into staging (O(1)); copy it when a link is impossible."""
        dst = self.root / uuid.uuid4().hex
        try:
            os.link(src, dst)
            st = os.stat(dst)
            return StagedFile(dst, name, str(src), st.st_size, st.st_mtime_ns, linked=True)
        except OSError:
            if not self._warned_copy:
                log.info(
                    "cannot hard-link %s into %s (another filesystem?); staging by copy",
                    src,
                    self.root,
                )
                self._warned_copy = True
        return copy_stable(src, dst, name)


def copy_stable(src: Path, dst: Path, name: str, settle: float = 0.0) -> StagedFile:
    """Copy ``src`` privately, retrying until its stat did not move during the copy."""
    for _ in range(MAX_RECAPTURES):
        if settle:
            _wait_quiet(src, settle)
        before = os.stat(src)
        shutil.copyfile(src, dst)
        after = os.stat(src)
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            st = os.stat(dst)
            return StagedFile(dst, name, str(src), st.st_size, st.st_mtime_ns, linked=False)
        settle = max(settle, SETTLE_SECONDS)
    raise UploadError(f"{src} kept changing while it was being captured", name=name)


def _wait_quiet(path: Path, quiet: float) -> None:
    last = None
    while True:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns)
        if key == last:
            return
        last = key
        time.sleep(quiet)


@dataclass(eq=False)  # identity semantics: tasks live in sets
class UploadTask:
    """One staged file bound to a run, waiting for a worker."""

    staged: StagedFile
    run_key: tuple[str, int, int]
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
        self._pending: dict[tuple[str, int, int], set[UploadTask]] = {}
        self._threads: list[threading.Thread] = []
        self._workers = max(1, workers)
        self._closed = False
        # (run, name) -> later tasks of that name, waiting for the one in flight to finish.
        self._waiting: dict[tuple[tuple[str, int, int], str], collections.deque[UploadTask]] = {}

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

    def pending(self, run_key: tuple[str, int, int] | None = None) -> list[UploadTask]:
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
