"""The job side of ``hydra/launcher=chronicle``: what runs inside each job process.

Inside the job (:class:`TrackedTask`): start the run (``resume=True`` when a requeued job finds
its run already running or lost), beat, export ``CHRONICLE_EXPERIMENT`` / ``_VARIATION`` /
``_RUN`` / ``_LEASE`` and ``CHRONICLE_URL`` or an absolute ``CHRONICLE_HOME`` so a Lightning or
HF callback in the task adopts the run (it beats and uploads; the terminal transition stays
here), call the task, upload the job's output directory, then:

=============================  =============================================================
task returns                   ``return_value.json`` asset (when JSON-serialisable), then
                               ``succeed`` (waits for the uploads)
exception                      outputs uploaded, ``fail("crash", <type, message,
                               traceback>)``, re-raised: Hydra reports the job as usual
``KeyboardInterrupt``          ``fail("abandoned")`` at once, re-raised
``SystemExit``                 pre-emption (submitit requeue, Lightning's SIGTERM): outputs
                               flushed, heartbeats stopped, no terminal state (resumable);
                               a ``SystemExit`` raised while handling a ``KeyboardInterrupt``
                               (Lightning's Ctrl+C path) counts as ``KeyboardInterrupt``
=============================  =============================================================

Tracking errors never kill a job: they are logged (once at WARNING) unless ``strict``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import TaskFunction
from omegaconf import DictConfig

from chronicle_integrations._config import (
    ENV_EXPERIMENT,
    ENV_HOME,
    ENV_LEASE,
    ENV_RUN,
    ENV_TRAINING_ENDED_FILE,
    ENV_URL,
    ENV_VARIATION,
    JOB_CRASH_FLUSH_SECONDS,
    JOB_PREEMPT_FLUSH_SECONDS,
)
from chronicle_integrations._errors import ChronicleError
from chronicle_integrations._frameworks import TrackedRun
from chronicle_integrations.client import Chronicle, Run
from chronicle_integrations.client._staging import NotRegularFile, file_kind, open_regular

log = logging.getLogger(__name__)

RETURN_VALUE_ASSET = "return_value.json"


# ------------------------------------------------------------------------------ clients
_clients: dict[tuple[str | None, str | None], Chronicle] = {}


def client_for(url: str | None, home: str | None) -> Chronicle:
    """One :class:`Chronicle` per process and target (the launching process and in-process
    jobs of the basic launcher share it)."""
    key = (url, None if url else home)
    client = _clients.get(key)
    if client is None or client._closed:
        client = _clients[key] = Chronicle(url=url, home=home)
    return client


def resolve_target(url: str | None, home: str | None) -> tuple[str | None, str | None]:
    """``(url, absolute home)`` from the config, else ``$CHRONICLE_URL`` / ``$CHRONICLE_HOME``,
    else the embedded store in ``./chronicle``. The home is made absolute here, in the
    launching process, because jobs may run in another directory (``hydra.job.chdir``)."""
    url = url or os.environ.get("CHRONICLE_URL") or None
    home = home or os.environ.get("CHRONICLE_HOME") or "chronicle"
    return url, os.path.abspath(home)


# ------------------------------------------------------------------------------ the job side
@dataclass
class TrackedTask:
    """The task function as the inner launcher sees it: runs one job as one Chronicle run.

    Picklable (joblib and submitit pickle it into the job processes): it holds the user's
    task function, plain settings and the job-number -> run table, never a client.
    """

    task_function: TaskFunction
    url: str | None
    home: str | None
    heartbeat_interval: float = 60.0
    upload_outputs: bool = True
    strict: bool = False
    #: ``hydra.job.num`` -> ``(experiment_id, variation, run)``; filled before each batch.
    runs: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    #: ``hydra.job.num`` -> the lease the job starts its run with (the launcher's: its
    #: watcher's teardown is bound to it, see ``_watch``).
    leases: dict[int, str] = field(default_factory=dict)
    #: How a job names itself for the launcher's watcher (``worker_started`` event):
    #: ``"slurm"`` (its SLURM job id), ``"local"`` (pid and start time), None (not managed:
    #: the basic launcher runs jobs in the launching process).
    worker_kind: str | None = None

    def __call__(self, cfg: DictConfig) -> Any:
        hydra_cfg = HydraConfig.get()
        num = int(hydra_cfg.job.num)
        key = self.runs.get(num)
        if key is None:  # not launched through us (should not happen): run untracked
            log.warning("chronicle: job #%d has no run; running it untracked", num)
            return self.task_function(cfg)
        output_dir = Path(str(hydra_cfg.runtime.output_dir))
        return _JobRun(self, key, output_dir, self.leases.get(num)).execute(cfg)


class _JobRun:
    """One job's run, inside the job process: the hooks of the job mapped onto the shared
    lifecycle (:class:`TrackedRun`; identity: the job's run from the launcher's table,
    taken over when a requeued job finds it running or lost; ``RunNotRunnable`` when it
    already ended). Outputs are uploaded before each outcome is recorded."""

    def __init__(
        self,
        task: TrackedTask,
        key: tuple[str, int, int],
        output_dir: Path,
        lease: str | None = None,
    ) -> None:
        self.task = task
        self.key = key
        self.output_dir = output_dir
        self.tracked = TrackedRun(
            chronicle=client_for(task.url, task.home),
            experiment_id=key[0],
            variation=key[1],
            run=key[2],
            heartbeat_interval=task.heartbeat_interval,
            stall_timeout=None,  # the job has no training loop of its own to watch
            strict=task.strict,
            carry_on="the job continues without it",
            crash_flush_seconds=JOB_CRASH_FLUSH_SECONDS,
            preempt_flush_seconds=JOB_PREEMPT_FLUSH_SECONDS,
            lease=lease,
        )
        self.guard = self.tracked.guard

    @property
    def run(self) -> Run | None:
        """The job's run (None when starting it failed, non-strict)."""
        return self.tracked.run

    def execute(self, cfg: DictConfig) -> Any:
        self.tracked.begin(take_over=True)
        self._name_worker()
        saved_env = self._export_env()
        try:
            result = self.task.task_function(cfg)
        except KeyboardInterrupt:
            self.tracked.abandon("KeyboardInterrupt")
            raise
        except SystemExit as exc:
            if isinstance(exc.__context__, KeyboardInterrupt):
                # Lightning turns Ctrl+C into sys.exit(1) inside its `except KeyboardInterrupt`
                self.tracked.abandon("KeyboardInterrupt")
            else:
                self._upload_outputs()
                self.tracked.preempted(f"job exited: SystemExit {exc.code!r}")
            raise
        except BaseException as exc:
            self._upload_outputs()
            self.tracked.crash(exc)  # flush (bounded), then record
            raise
        finally:
            _restore_env(saved_env)
        self._succeed(result)
        return result

    def _name_worker(self) -> None:
        """Tell the launcher's watcher which process or SLURM job serves the run (a
        ``worker_started`` event under the run's lease), so that it can tear it down."""
        run = self.run
        if run is None or self.task.worker_kind is None:
            return
        from ._watch import worker_handle

        detail = worker_handle(self.task.worker_kind, run.heartbeat_timeout)
        if detail is not None:
            with self.guard("naming the job's worker"):
                run.record_event("worker", "worker_started", detail)

    def _export_env(self) -> dict[str, str | None]:
        """Name the run for integrations inside the task; returns what to restore."""
        run = self.run
        if run is None:
            return {}
        values: dict[str, str | None] = {
            ENV_EXPERIMENT: run.experiment_id,
            ENV_VARIATION: str(run.variation),
            ENV_RUN: str(run.run),
            ENV_LEASE: run.lease,
            # An outer `chronicle exec`'s file is about its run, not this job's.
            ENV_TRAINING_ENDED_FILE: None,
        }
        if self.task.url:
            values[ENV_URL] = self.task.url
        else:
            values[ENV_URL] = None
            values[ENV_HOME] = self.task.home
        saved = {name: os.environ.get(name) for name in values}
        _restore_env(values)
        return saved

    def _succeed(self, result: Any) -> None:
        run = self.run
        if run is None:
            return
        self._upload_outputs()
        with self.guard("recording the return value"):
            _upload_return_value(run, result)
        self.tracked.succeed()

    def _upload_outputs(self) -> None:
        run = self.run
        if run is None or not self.task.upload_outputs or self.tracked.outcome is not None:
            return
        with self.guard(f"uploading the outputs of {self.output_dir}"):
            upload_directory(run, self.output_dir)


def upload_directory(run: Run, directory: Path) -> int:
    """Upload every file under ``directory`` as an asset named by its relative path
    (``.hydra/config.yaml``, ``train.log``, ...). A file whose content (size and SHA-256) is
    already an asset of the run, e.g. a checkpoint a Lightning callback uploaded under its
    own name, is not uploaded twice. Returns how many uploads were queued."""
    if not directory.is_dir():
        return 0
    known = {(a.size, a.sha256) for a in run.assets()}
    sizes = {size for size, _ in known}
    queued = 0
    for path in sorted(directory.rglob("*")):
        try:
            st = path.lstat()  # never is_file(): it follows links; FIFOs would block open()
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFile(f"it is a {file_kind(st.st_mode)}")
            if st.st_size in sizes and (st.st_size, _sha256(path)) in known:
                continue
            name = path.relative_to(directory).as_posix()
            run.upload_asset(path, name, follow_symlinks=False)
            queued += 1
        except (OSError, ChronicleError) as exc:
            log.warning("chronicle: not uploading %s: %s", path, exc)
    return queued


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _upload_return_value(run: Run, result: Any) -> None:
    """The task's return value as ``return_value.json``, when it is JSON-serialisable."""
    if result is None:
        return
    try:
        text = json.dumps(result, allow_nan=False, indent=2, sort_keys=True)
    except (TypeError, ValueError):
        log.info(
            "chronicle: the return value of run %s is not JSON-serialisable; not recorded", run.key
        )
        return
    fd, tmp = tempfile.mkstemp(prefix="chronicle-return-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        run.upload_asset(tmp, RETURN_VALUE_ASSET)  # captured now: the file may go at once
    finally:
        os.unlink(tmp)


def _restore_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


__all__ = [
    "RETURN_VALUE_ASSET",
    "TrackedTask",
    "client_for",
    "resolve_target",
    "upload_directory",
]
