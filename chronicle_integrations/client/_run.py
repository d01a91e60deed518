"""A cheap handle on one run: :class:`Run` (reads, transitions, heartbeats, uploads).

Handles do no I/O when created; a ``Chronicle`` makes them (``create_run``, ``run``). The
heartbeat loop of ``keep_alive`` lives in ``_heartbeat`` and uses only the
:class:`~._heartbeat.Beating` interface a run provides (``beat``, ``mark_cancelled``, the key,
lease, progress and cancellation); uploads go through the ``Chronicle``'s ``Uploads``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import secrets
import socket
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .. import _validation as check
from .._errors import (
    ChronicleError,
    InvalidMetric,
    InvalidRequest,
    NotFound,
    TransportError,
    UploadError,
)
from .._metrics import MetricBuffer
from .._models import AssetInfo, Event, RunInfo, RunKey, walk_pages
from ..lifecycle import Action, RunState
from ._heartbeat import KeepAlive, Progress, attach, detach
from ._transport import Outcomes, Transport
from ._uploads import UploadHandle

if TYPE_CHECKING:
    from ._chronicle import Chronicle

log = logging.getLogger(__name__)

__all__ = ["Run", "format_exception"]


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
        #: Metrics logged since the last send (``log_metrics``), sent with heartbeats and
        #: the terminal transition.
        self.pending_metrics = MetricBuffer()
        self._told_metrics = False
        #: Whether the client knows this handle has metrics to send (``Chronicle.close``
        #: sends what is still pending then).
        self._listed = False
        self._keepalive: KeepAlive[Run] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Run {self.key}>"

    @property
    def key(self) -> str:
        """``experiment/variation/run``."""
        return f"{self.experiment_id}/{self.variation}/{self.run}"

    @property
    def key_tuple(self) -> RunKey:
        """``(experiment_id, variation, run)`` as a :class:`RunKey` (a tuple)."""
        return RunKey(self.experiment_id, self.variation, self.run)

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
        self.beat(quick=False, progress=progress)
        return self

    def beat(
        self,
        quick: bool = True,
        progress: dict[str, Any] | None = None,
        *,
        budget: float | None = None,
    ) -> RunInfo:
        """Send one heartbeat and return the store's answer (the run as it is now).

        ``quick`` (the default): one short try, for callers that beat again soon anyway (the
        heartbeat loop, ``chronicle exec``'s supervisor); False: the full retry budget, as
        :meth:`heartbeat`. ``budget``: at most this many seconds over a server (the last
        beat at close). ``progress``: as for :meth:`heartbeat`. The metrics logged since
        the last send travel with it (put back if it fails; dropped, with one ERROR, if the
        store refuses them: the heartbeat then goes without). Part of the interface the
        heartbeat loop uses (``_heartbeat.Beating``).
        """
        if progress is None:
            progress = self.progress.snapshot()
        outcomes = self.pending_metrics.take()
        extra: dict[str, Any] = {"outcomes": outcomes} if outcomes != (None, None) else {}
        send = functools.partial(
            self._t.heartbeat,
            *self.key_tuple,
            self.lease,
            quick=quick,
            progress=progress,
            budget=budget,
        )
        try:
            info = send(**extra)
        except InvalidMetric as exc:
            self._metrics_refused(exc, outcomes)
            info = send()
        except BaseException:
            self.pending_metrics.restore(*outcomes)
            raise
        self.heartbeat_timeout = info.heartbeat_timeout or self.heartbeat_timeout
        return info

    def log_metrics(self, values: Any, step: int | None = None) -> Run:
        """Record metric values, e.g. ``run.log_metrics({"val/loss": 0.31}, step=1200)``.

        O(1) per name on the calling thread and no I/O: the values are folded into a small
        summary per name (last, min, max with their steps) that travels with the next
        heartbeat of ``keep_alive`` and with ``succeed()`` / ``fail()``. The store keeps, per
        name, the last value (by step: a resumed run replaying earlier steps does not
        overwrite a later value) and the min and max; NaN and infinities are kept as the
        last value but never become min or max. Read them back in ``info().metrics``.

        Raises :class:`InvalidMetric` at once, recording nothing of the call, for a value
        that is not a number, an invalid name (``/``-separated segments, no ``..``, NUL or
        control characters, at most 256 characters) or a 65th name for the run.

        What is still unsent when the client closes (``Chronicle.close()``, also at
        interpreter exit) or when ``stop_keep_alive()`` stops this run's heartbeats goes
        with one last heartbeat then, while the run is live.
        """
        if not self._listed:
            self._list_unsent()
        self.pending_metrics.log(values, step)
        return self

    def _list_unsent(self) -> None:
        """Tell the client this handle holds metrics to send (once per handle): its
        ``close()`` sends what is still pending then (:meth:`_send_unsent`)."""
        self._listed = True
        with self.chronicle._close_lock:
            self.chronicle._unsent.add(self)

    def _send_unsent(self, budget: float | None = None) -> bool:
        """Send the metrics and checkpoint records still pending (logged since the last
        heartbeat) with one heartbeat under the lease: one quick try, within ``budget``
        seconds when given (a server that does not answer costs at most that); never
        raises. True when nothing is left unsent; else a WARNING names what was not sent
        and why (no lease, the run is no longer ours, the store unreachable or refusing).

        ``Chronicle.close()`` and :meth:`stop_keep_alive` call it, for a run that neither
        beats again nor ends (a script closing its client with the run left running, a
        process exiting normally, a pre-emption)."""
        if self.pending_metrics.unsent() == ([], []):
            return True
        if self.lease is None:
            why = "this handle holds no lease (start() the run, or adopt its lease)"
        elif self.cancelled.is_set():
            why = f"the run is {self.cancel_reason or 'no longer this worker'}"
        else:
            try:
                self.beat(budget=budget)
                return True
            except Exception as exc:  # a teardown path: never raise a tracking error
                why = str(exc)
        names, assets = self.pending_metrics.unsent()  # a failed beat put them back
        log.warning(
            "run %s: could not send its last metrics (%s): %s",
            self.key,
            why,
            ", ".join([*names, *(f"checkpoint {a}" for a in assets)])[:500],
        )
        return False

    def _metrics_refused(self, exc: InvalidMetric, outcomes: Outcomes) -> None:
        """The store refused metrics this client let through (e.g. the run already has 64
        names, logged by an earlier worker): say so once, keep the names the store knows,
        drop the rest. Training goes on."""
        if not self._told_metrics:
            self._told_metrics = True
            log.error("run %s: the store refused metrics (%s); they are dropped", self.key, exc)
        try:
            known = set(self._t.get_run(*self.key_tuple).metrics or {})
        except ChronicleError:
            self.pending_metrics.forget()
            return
        self.pending_metrics.limit_to(known)
        metrics = {k: v for k, v in (outcomes[0] or {}).items() if k in known}
        self.pending_metrics.restore(metrics or None, None)

    def keep_alive(
        self,
        interval: float = 60.0,
        on_cancel: Callable[[Run, str], None] | None = None,
        stall_timeout: float | None = None,
    ) -> KeepAlive[Run]:
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
        with self._lock:
            # Another handle on this run under the same lease that already beats in this
            # process (a launcher, and a callback inside its job) shares its loop.
            loop, started = attach(self, self._keepalive, interval, on_cancel, stall_timeout)
            if started:
                self.chronicle._keepalives.add(loop)
            self._keepalive = loop
            return loop

    def stop_keep_alive(self) -> None:
        """Stop heartbeats (without ending the run: e.g. on pre-emption). A handle that joined
        another handle's loop only leaves it; the loop's owner keeps beating. When this stops
        the loop, the metrics logged since its last beat go with one last heartbeat
        (:meth:`_send_unsent`)."""
        if self._stop_beating():
            self._send_unsent()

    def _stop_beating(self) -> bool:
        """Stop (or leave) this handle's heartbeat loop; True when that stopped the loop."""
        with self._lock:
            keepalive, self._keepalive = self._keepalive, None
        if keepalive is None:
            return False
        detach(self, keepalive)
        return keepalive.run is self

    def mark_cancelled(self, why: str) -> None:
        """Record that the run is no longer this worker's: ``cancel_reason = why``, then
        ``cancelled`` is set. The heartbeat loop calls it when the server says the run was
        cancelled, expired, ended elsewhere or taken over (``_heartbeat.Beating``)."""
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
        metric: dict[str, Any] | None = None,
    ) -> UploadHandle:
        """Capture a file or directory now and upload it in the background.

        Returns at once with a future-like :class:`UploadHandle`. The content is the one at
        call time (hard-link staging, see ``_staging``); a directory keeps its layout under
        ``name`` (default: the path's base name) and only its regular files are uploaded
        (symbolic links, FIFOs, sockets and devices are skipped with a warning). A file path
        must be a regular file, or a symbolic link to one unless ``follow_symlinks=False``
        (for callers uploading what they found in a directory others write to).

        ``metric``: what a checkpoint was saved for, ``{"metric": "val_loss", "value": 0.31,
        "step": 1200, "epoch": 2}``; recorded with the asset (sent like metrics), so that
        ``chronicle best`` can name the run's best checkpoint.
        """
        asset = name if name is not None else Path(path).name
        if metric is not None:
            self.pending_metrics.check_checkpoint(asset, metric)
        handle = self.chronicle._uploads.submit(
            self.key_tuple, self.lease, path, name, follow_symlinks
        )
        if metric is not None:
            if not self._listed:
                self._list_unsent()
            self.pending_metrics.checkpoint(asset, metric)
        return handle

    def wait_uploads(self, timeout: float | None = None) -> bool:
        """Wait for this run's pending uploads; True when none is left."""
        return self.chronicle._uploads.wait(self.key_tuple, timeout, f"run {self.key}")

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
        # refused and mistaken for a cancellation of a run this worker ended itself. The
        # pending metrics go with the transition, not with a last beat.
        self._stop_beating()
        progress = self._final_progress(progress)
        outcomes = self.pending_metrics.take()
        try:
            try:
                self._send_end(action, reason, message, progress, outcomes)
            except InvalidMetric as exc:
                if not self._told_metrics:
                    log.error(
                        "run %s: the store refused the final metrics (%s); ending without",
                        self.key,
                        exc,
                    )
                    self._told_metrics = True
                outcomes = (None, None)
                self._send_end(action, reason, message, progress, outcomes)
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
                outcomes=outcomes,
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

    def _send_end(
        self,
        action: Action,
        reason: str | None,
        message: str | None,
        progress: dict[str, Any] | None,
        outcomes: Outcomes,
    ) -> None:
        extra: dict[str, Any] = {"outcomes": outcomes} if outcomes != (None, None) else {}
        if action is Action.SUCCEED:
            self._t.succeed(*self.key_tuple, self.lease, progress, **extra)
        else:
            self._t.fail(*self.key_tuple, reason or "crash", message, self.lease, progress, **extra)

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


def _umask() -> int:
    """The process's umask. Python has no getter: read it from ``/proc`` (Linux), else by
    setting and restoring it (a window of two syscalls)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
