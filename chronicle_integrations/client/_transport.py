"""How the client reaches a store: the transport interface and the embedded implementation.

:class:`Transport` is the one interface :class:`~chronicle_integrations.Chronicle` talks to.
:class:`EmbeddedTransport` calls the SQL store in-process (``$CHRONICLE_HOME``);
:class:`~chronicle_integrations.client._http.HttpTransport` speaks the server's ``/v1`` API.
Both raise the same typed errors, so the client behaves identically over either.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from .._errors import ConfigurationError, SourceChanged
from .._models import AssetInfo, BestRun, Event, ExperimentInfo, Page, RunInfo

if TYPE_CHECKING:
    from ..store import Store

#: What a heartbeat or terminal transition carries besides progress: ``(metrics,
#: checkpoints)`` as :meth:`~chronicle_integrations._metrics.MetricBuffer.take` gives them.
Outcomes = tuple[dict[str, Any] | None, dict[str, Any] | None]

#: Called with the number of bytes transferred so far.
TransferProgress = Callable[[int], None]

#: Size of each read while streaming a file.
READ_BLOCK = 1024 * 1024


class Transport(Protocol):
    """What the client needs from a store. Every method may raise the typed API errors."""

    target: str  # a human-readable description: the URL, or "embedded:<home>"

    def create_experiment(
        self,
        name: str,
        variations: list[dict[str, Any]],
        experiment_id: str | None,
        objective: dict[str, Any] | None = None,
    ) -> ExperimentInfo: ...
    def set_objective(
        self, experiment_id: str, objective: dict[str, Any] | None
    ) -> ExperimentInfo: ...
    def best(
        self, experiment_id: str, metric: str | None, mode: str | None, include_running: bool
    ) -> BestRun: ...
    def list_experiments(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[ExperimentInfo]:
        """One page of experiments after ``cursor`` (``None``: the first page)."""

    def get_experiment(self, experiment_id: str) -> ExperimentInfo: ...
    def add_variation(self, experiment_id: str, config: dict[str, Any], request_id: str) -> int: ...
    def get_variation_config(self, experiment_id: str, variation: int) -> dict[str, Any]: ...
    def create_run(self, experiment_id: str, variation: int, request_id: str) -> RunInfo: ...
    def get_run(self, e: str, v: int, r: int) -> RunInfo: ...
    def list_runs(
        self,
        experiment_id: str | None,
        state: str | None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        sort: str | None = None,
        mode: str | None = None,
    ) -> Page[RunInfo]:
        """One page of runs after ``cursor`` (``None``: the first page); with ``sort``,
        best first by that metric in ``mode``."""

    def start(
        self, e: str, v: int, r: int, *, resume: bool, lease: str, holder: str | None
    ) -> RunInfo: ...
    def heartbeat(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        *,
        quick: bool = False,
        progress: dict[str, Any] | None = None,
        outcomes: Outcomes = (None, None),
        budget: float | None = None,
    ) -> RunInfo:
        """One heartbeat. ``quick``: one short try (the caller beats again soon);
        ``budget``: at most this many seconds, retries included (a last beat at close)."""

    def succeed(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        progress: dict[str, Any] | None = None,
        outcomes: Outcomes = (None, None),
    ) -> RunInfo: ...
    def fail(
        self,
        e: str,
        v: int,
        r: int,
        reason: str,
        message: str | None,
        lease: str | None,
        progress: dict[str, Any] | None = None,
        outcomes: Outcomes = (None, None),
    ) -> RunInfo: ...
    def events(
        self, e: str, v: int, r: int, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[Event]:
        """One page of the run's timeline after ``cursor``."""

    def list_assets(
        self, e: str, v: int, r: int, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[AssetInfo]:
        """One page of the run's assets after ``cursor``."""

    def upload_file(
        self,
        e: str,
        v: int,
        r: int,
        name: str,
        path: str,
        *,
        lease: str | None,
        upload_id: str,
        progress: TransferProgress | None = None,
        verify: Callable[[], None] | None = None,
        size: int | None = None,
    ) -> AssetInfo:
        """Upload exactly ``size`` bytes of a file (default: its size now), resumably;
        ``verify()`` runs after the last byte is read and before the asset is published (it
        raises to stop the publication). A file shorter or longer than ``size`` raises
        :class:`SourceChanged` and nothing is published."""

    def abort_upload(self, upload_id: str) -> None:
        """Drop an unfinished upload's bytes (best effort)."""

    def download_asset(
        self,
        e: str,
        v: int,
        r: int,
        name: str,
        dest: BinaryIO,
        *,
        offset: int = 0,
        progress: TransferProgress | None = None,
    ) -> AssetInfo: ...
    def record_event(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        kind: str,
        cause: str,
        detail: dict[str, Any] | None,
    ) -> Event: ...
    def close(self) -> None: ...


def request_id() -> str:
    """A fresh id for a mutating call (a variation, a run, an upload): chosen by the client,
    so that a call retried after a lost answer has no second effect."""
    return uuid.uuid4().hex


def hashing_reader(
    fh: Any, hasher: Any, progress: TransferProgress | None, start: int = 0
) -> Iterator[bytes]:
    """Yield ``fh``'s blocks from its current position, hashing them and reporting progress."""
    done = start
    for block in iter(lambda: fh.read(READ_BLOCK), b""):
        hasher.update(block)
        done += len(block)
        if progress is not None:
            progress(done)
        yield block


class EmbeddedTransport:
    """The store in-process: SQLite + local assets under a Chronicle home directory.

    Several processes may use the same home at once (SQLite WAL with ``BEGIN IMMEDIATE``
    writes, ``flock``-guarded partial uploads).
    """

    def __init__(self, home: str | os.PathLike[str], **store_kwargs: Any) -> None:
        try:
            from ..store import Store
        except ModuleNotFoundError as exc:  # SQLAlchemy is an extra
            raise ConfigurationError(
                "the embedded store needs SQLAlchemy: pip install "
                "'chronicle-integrations[embedded]', or point CHRONICLE_URL at a server"
            ) from exc
        self.home = os.path.abspath(home)
        self.store: Store = Store.open_home(self.home, **store_kwargs)
        self.target = f"embedded:{self.home}"

    def create_experiment(
        self,
        name: str,
        variations: list[dict[str, Any]],
        experiment_id: str | None,
        objective: dict[str, Any] | None = None,
    ) -> ExperimentInfo:
        return self.store.create_experiment(name, variations, experiment_id, objective)

    def set_objective(self, experiment_id: str, objective: dict[str, Any] | None) -> ExperimentInfo:
        return self.store.set_objective(experiment_id, objective)

    def best(
        self, experiment_id: str, metric: str | None, mode: str | None, include_running: bool
    ) -> BestRun:
        self.store.maybe_sweep()
        return self.store.best(experiment_id, metric, mode, include_running=include_running)

    def list_experiments(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[ExperimentInfo]:
        return self.store.page_experiments(limit=limit, cursor=cursor)

    def get_experiment(self, experiment_id: str) -> ExperimentInfo:
        return self.store.get_experiment(experiment_id)

    def add_variation(self, experiment_id: str, config: dict[str, Any], request_id: str) -> int:
        return self.store.add_variation(experiment_id, config, request_id)

    def get_variation_config(self, experiment_id: str, variation: int) -> dict[str, Any]:
        return self.store.get_variation_config(experiment_id, variation)

    def create_run(self, experiment_id: str, variation: int, request_id: str) -> RunInfo:
        return self.store.create_run(experiment_id, variation, request_id)

    def get_run(self, e: str, v: int, r: int) -> RunInfo:
        return self.store.get_run(e, v, r)

    def list_runs(
        self,
        experiment_id: str | None,
        state: str | None,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        sort: str | None = None,
        mode: str | None = None,
    ) -> Page[RunInfo]:
        # Nobody else runs the watchdog's sweep for an embedded store: do it on listings.
        self.store.maybe_sweep()
        return self.store.page_runs(
            experiment_id, state, limit=limit, cursor=cursor, sort=sort, mode=mode
        )

    def start(
        self, e: str, v: int, r: int, *, resume: bool, lease: str, holder: str | None
    ) -> RunInfo:
        return self.store.start(e, v, r, resume=resume, lease=lease, holder=holder)

    def heartbeat(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        *,
        quick: bool = False,
        progress: dict[str, Any] | None = None,
        outcomes: Outcomes = (None, None),
        budget: float | None = None,
    ) -> RunInfo:
        return self.store.heartbeat(e, v, r, lease, progress, *outcomes)

    def succeed(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        progress: dict[str, Any] | None = None,
        outcomes: Outcomes = (None, None),
    ) -> RunInfo:
        return self.store.succeed(
            e, v, r, lease, progress, metrics=outcomes[0], checkpoints=outcomes[1]
        )

    def fail(
        self,
        e: str,
        v: int,
        r: int,
        reason: str,
        message: str | None,
        lease: str | None,
        progress: dict[str, Any] | None = None,
        outcomes: Outcomes = (None, None),
    ) -> RunInfo:
        return self.store.fail(
            e, v, r, reason, message, lease, progress, metrics=outcomes[0], checkpoints=outcomes[1]
        )

    def events(
        self, e: str, v: int, r: int, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[Event]:
        return self.store.page_events(e, v, r, limit=limit, cursor=cursor)

    def list_assets(
        self, e: str, v: int, r: int, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[AssetInfo]:
        return self.store.page_assets(e, v, r, limit=limit, cursor=cursor)

    def upload_file(
        self,
        e: str,
        v: int,
        r: int,
        name: str,
        path: str,
        *,
        lease: str | None,
        upload_id: str,
        progress: TransferProgress | None = None,
        verify: Callable[[], None] | None = None,
        size: int | None = None,
    ) -> AssetInfo:
        size = os.path.getsize(path) if size is None else size
        status = self.store.begin_upload(e, v, r, name, size=size, upload_id=upload_id, lease=lease)
        if not status.completed and status.offset == 0:
            # A fresh upload: the store hashes the bytes as it writes them, in this process,
            # and those are exactly the bytes read here, so its digest is the source's. One
            # SHA-256 pass instead of two (the commit still checks it against what it holds).
            # The local blob store copies the file in the kernel and hashes what it wrote.
            with open(path, "rb") as fh:
                written = self.store.write_file(upload_id, 0, fh.fileno(), size, progress)
                if written.offset < size or os.pread(fh.fileno(), 1, size):
                    raise SourceChanged(name)
            if verify is not None:
                verify()
            digest = self.store.upload_digest(upload_id)
            if digest is not None:
                return self.store.complete_upload(upload_id, digest)
            status = self.store.upload_status(upload_id)  # no running digest: hash below
        hasher = hashlib.sha256()
        with open(path, "rb") as fh:
            # Exactly ``size`` bytes: a file that grew or shrank since is a changed source.
            body = _Limited(fh, size)
            # A previous attempt stored a prefix (all of it, if complete): hash it without
            # sending it again.
            stored = size if status.completed else status.offset
            for _ in hashing_reader(_Limited(body, stored), hasher, None):
                pass
            if not status.completed:
                self.store.write_chunk(
                    upload_id, status.offset, hashing_reader(body, hasher, progress, status.offset)
                )
            if body.left or fh.read(1):
                raise SourceChanged(name)
        if verify is not None:
            verify()
        return self.store.complete_upload(upload_id, hasher.hexdigest())

    def abort_upload(self, upload_id: str) -> None:
        self.store.discard_upload(upload_id)

    def download_asset(
        self,
        e: str,
        v: int,
        r: int,
        name: str,
        dest: BinaryIO,
        *,
        offset: int = 0,
        progress: TransferProgress | None = None,
    ) -> AssetInfo:
        info, src = self.store.open_asset(e, v, r, name)
        with src:
            src.seek(offset)
            done = offset
            for block in iter(lambda: src.read(READ_BLOCK), b""):
                dest.write(block)
                done += len(block)
                if progress is not None:
                    progress(done)
        return info

    def record_event(
        self,
        e: str,
        v: int,
        r: int,
        lease: str | None,
        kind: str,
        cause: str,
        detail: dict[str, Any] | None,
    ) -> Event:
        return self.store.record_event(e, v, r, lease, kind, cause, detail)

    def close(self) -> None:
        self.store.close()


class _Limited:
    """A read-only view of the next ``limit`` bytes of a file; ``left`` is what it lacked."""

    def __init__(self, fh: Any, limit: int) -> None:
        self._fh, self.left = fh, limit

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data: bytes = self._fh.read(n)
        self.left -= len(data)
        return data
