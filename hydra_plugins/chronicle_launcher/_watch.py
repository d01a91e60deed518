"""The launcher's watcher: tears down the jobs of its sweep whose runs went ``lost`` or were
cancelled (the launcher side of Chronicle-managed workers; ``chronicle exec`` is the other).

How it knows its jobs: the launcher starts each job's run under a lease it chose (the job adopts
it, :class:`~._job.TrackedTask` ``leases``), and each job names itself in a ``worker`` /
``worker_started`` event when it starts: ``{"kind": "slurm", "job_id": "45_0"}`` under
submitit_slurm, ``{"kind": "local", "host", "pid", "start_time", "group"}`` under
submitit_local and joblib (the basic launcher runs jobs in the launching process: nothing to
tear down). A thread in the launching process then reads the runs of the sweep every tenth of
the store's ``heartbeat_timeout``:

* ``lost`` (no heartbeat for ``heartbeat_timeout``: a hung or frozen job): the job is torn down
  at once; a SLURM job only while it is RUNNING and only if the attempt that runs named itself
  (its ``worker_started`` event carries SLURM's restart count): a requeued job that is pending,
  or that started again and has not resumed its run yet, is left alone, it is on its way back;
* ``failed_abandoned`` (``chronicle cancel``): torn down once ``teardown_grace`` passed and the
  job is still there.

The rules are :mod:`chronicle_integrations._teardown`'s, shared with ``chronicle exec``: no
teardown while the store is unreachable or before it answered without a break for
``heartbeat_timeout``; none once the run was taken over (the ``teardown_requested`` event is
recorded under the launcher's lease first, which the store refuses after a takeover); local
processes are named by pid *and* start time. SLURM jobs are ended with ``scancel`` (what
submitit's ``job.cancel()`` runs): SLURM sends SIGTERM, waits its ``KillWait``, then SIGKILL;
after ``teardown_grace`` a job still there gets ``scancel --signal=KILL --full``.
Teardown never changes a run's state; it is recorded as ``teardown`` events.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from typing import Any

from chronicle_integrations import _teardown
from chronicle_integrations._errors import ChronicleError
from chronicle_integrations._models import Event, RunInfo
from chronicle_integrations.client import Chronicle
from chronicle_integrations.lifecycle import RunState

log = logging.getLogger(__name__)

WORKER_EVENT = ("worker", "worker_started")
#: SLURM job states in which something of the job may still run.
SLURM_ACTIVE = frozenset(
    {
        "RUNNING",
        "COMPLETING",
        "CONFIGURING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "STAGE_OUT",
        "RESIZING",
        "PENDING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
    }
)
#: Of those, the ones where the job's processes run (a lost run's worker is hung there).
SLURM_RUNNING = frozenset({"RUNNING", "SUSPENDED", "STOPPED", "CONFIGURING"})


def slurm_job_id() -> str | None:
    """This SLURM job's id as ``squeue``/``scancel`` take it (``45_0`` for an array task)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def worker_handle(kind: str, heartbeat_timeout: float | None) -> dict[str, Any] | None:
    """What a job records about itself in its ``worker_started`` event (None: nothing to name,
    e.g. ``slurm`` outside a SLURM job)."""
    if kind == "slurm":
        job_id = slurm_job_id()
        if job_id is None:
            return None
        detail: dict[str, Any] = {
            "kind": "slurm",
            "job_id": job_id,
            "host": socket.gethostname(),
            # Which attempt of the job this is (SLURM counts requeues).
            "restarts": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        }
    elif kind == "local":
        detail = _teardown.LocalProcess.me().to_dict()
    else:
        return None
    if heartbeat_timeout:
        detail["heartbeat_timeout"] = float(heartbeat_timeout)
    return detail


class SlurmJob:
    """A SLURM job as a teardown :class:`~chronicle_integrations._teardown.Target`."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.description = f"SLURM job {job_id}"

    def state(self) -> tuple[str | None, int]:
        """``(state, restart count)`` from ``scontrol show job``; ``(None, 0)`` when SLURM
        knows no such job (ended and purged) or cannot be asked."""
        try:
            done = subprocess.run(
                ["scontrol", "show", "job", "-o", self.job_id],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("chronicle: scontrol failed: %s", exc)
            return None, 0
        if done.returncode != 0 or not done.stdout.strip():
            return None, 0
        fields = dict(
            item.split("=", 1) for item in done.stdout.split("\n")[0].split() if "=" in item
        )
        state = fields.get("JobState")
        try:
            restarts = int(fields.get("Restarts", "0"))
        except ValueError:
            restarts = 0
        return (state.upper() if state else None), restarts

    def _scancel(self, *extra: str) -> None:
        try:
            subprocess.run(
                ["scancel", *extra, self.job_id], capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("chronicle: scancel %s failed: %s", self.job_id, exc)

    def terminate(self) -> None:
        self._scancel()  # what submitit's job.cancel() runs: SIGTERM, KillWait, SIGKILL

    def kill(self) -> None:
        self._scancel("--signal=KILL", "--full")

    def alive(self) -> bool:
        return self.state()[0] in SLURM_ACTIVE

    def left(self) -> Any:
        return {"state": self.state()[0]}


class Watcher:
    """The watcher thread of one batch of jobs (see the module docstring).

    Args:
        client: the launcher's client.
        experiment_id: the sweep's experiment.
        grace: ``teardown_grace`` (cancelled jobs get it to stop by themselves; SIGTERM ->
            SIGKILL).
    """

    def __init__(self, client: Chronicle, experiment_id: str, grace: float) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.grace = float(grace)
        self._leases: dict[tuple[int, int], str] = {}
        self._cancelled_at: dict[tuple[int, int], float] = {}
        store = getattr(client.transport, "store", None)
        #: Learnt from the store (embedded) or from the jobs' ``worker_started`` events.
        self.heartbeat_timeout: float | None = (
            float(store.heartbeat_timeout) if store is not None else None
        )
        self._trust = _teardown.TrustWindow(self.heartbeat_timeout or 60.0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: Runs torn down (their keys), for logs and tests.
        self.torn_down: list[tuple[int, int]] = []

    def watch(self, variation: int, run: int, lease: str) -> None:
        """Watch the run ``(variation, run)``, started by its job under ``lease``."""
        with self._lock:
            self._leases[(variation, run)] = lease

    def start(self) -> Watcher:
        if shutil.which("squeue") is None:
            log.debug("chronicle: no squeue here; SLURM jobs cannot be torn down")
        self._thread = threading.Thread(target=self._loop, name="chronicle-teardown", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.wait(_teardown.poll_interval(self.heartbeat_timeout or 10.0)):
            try:
                self.tick()
            except Exception:  # the watcher must never take the sweep down
                log.exception("chronicle: the teardown watcher failed one round")

    # ------------------------------------------------------------------ one round
    def tick(self) -> None:
        """Read the sweep's runs once and tear down what must be."""
        with self._lock:
            watched = dict(self._leases)
        if not watched:
            return
        try:
            infos = {
                (i.variation, i.run): i for i in self.client.runs(experiment_id=self.experiment_id)
            }
        except ChronicleError as exc:
            self._trust.failed(exc)
            return
        self._trust.answered()
        now = time.monotonic()
        for key, lease in watched.items():
            info = infos.get(key)
            if info is None or info.state in (RunState.PENDING, RunState.RUNNING):
                continue
            if info.state is RunState.LOST:
                handle = self._handle(info)  # also learns the store's heartbeat_timeout
                if handle is not None and self._trust.trusted:
                    self._lost(info, lease, handle)
            elif info.state is RunState.FAILED_ABANDONED:
                since = self._cancelled_at.setdefault(key, now)
                if now - since >= self.grace:
                    self._tear_down(info, lease, "was cancelled and its job went on", None)
            else:
                self._forget(key)  # ended by its job (or expired): nothing to do

    def _forget(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._leases.pop(key, None)
        self._cancelled_at.pop(key, None)

    def _handle(self, info: RunInfo) -> dict[str, Any] | None:
        """The latest ``worker_started`` event's detail of the run, None when it has none."""
        try:
            events: list[Event] = self.client.run(
                info.experiment_id, info.variation, info.run
            ).events()
        except ChronicleError as exc:
            log.warning("chronicle: cannot read the events of run %s: %s", info.key, exc)
            return None
        for event in reversed(events):
            if (event.kind, event.cause) == WORKER_EVENT and event.detail:
                told = event.detail.get("heartbeat_timeout")
                if told and self.heartbeat_timeout is None:
                    self.heartbeat_timeout = float(told)
                    self._trust.heartbeat_timeout = float(told)
                return dict(event.detail)
        return None

    def _lost(self, info: RunInfo, lease: str, handle: dict[str, Any]) -> None:
        if self.heartbeat_timeout is None:
            return  # the trust window cannot be judged yet
        if handle.get("kind") == "slurm":
            state, restarts = SlurmJob(str(handle["job_id"])).state()
            if state not in SLURM_RUNNING:
                if state not in SLURM_ACTIVE:
                    self._forget((info.variation, info.run))  # the job is gone already
                return  # pending (requeued): on its way back, holding nothing
            if restarts != int(handle.get("restarts") or 0):
                return  # a new attempt that has not resumed its run yet
        self._tear_down(info, lease, "is lost (no heartbeat)", handle)

    def _tear_down(
        self, info: RunInfo, lease: str, why: str, handle: dict[str, Any] | None
    ) -> None:
        key = (info.variation, info.run)
        if handle is None:
            handle = self._handle(info)
            if handle is None:
                return  # no job has named itself for this run: nothing of ours runs it
        target: _teardown.Target
        signal_name = "SIGTERM"
        if handle.get("kind") == "slurm":
            target = SlurmJob(str(handle["job_id"]))
            signal_name = "scancel"
            if not target.alive():
                self._forget(key)
                return
        elif handle.get("kind") == "local":
            process = _teardown.LocalProcess.from_dict(handle)
            if not process.here:
                return  # another host's process: not reachable from here
            target = _teardown.LocalTree(process)
            if not target.alive():
                self._forget(key)  # gone (or its pid reused: not ours)
                return
        else:
            return
        run = self.client.run(info.experiment_id, info.variation, info.run, lease=lease)
        reason = f"run {info.key} {why}"
        detail = {
            "target": target.description,
            "why": reason,
            "signal": signal_name,
            "grace": self.grace,
        }
        answer = _teardown.request(run, detail)
        if answer == _teardown.UNCONFIRMED:
            return  # try again next round
        self._forget(key)
        if answer == _teardown.TAKEN_OVER:
            return
        _teardown.escalate(run, target, reason, self.grace, terminate_signal=signal_name)
        self.torn_down.append(key)


__all__ = ["SlurmJob", "Watcher", "slurm_job_id", "worker_handle"]
