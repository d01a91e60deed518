"""The work behind ``hydra/launcher=chronicle`` (imported by ``launch()`` only).

In the launching process, for each batch of jobs (:func:`launch`):

1. the experiment is registered once per sweep (``experiment_id`` from the config, else
   derived from the task name and the absolute sweep dir) and kept in the launcher, so
   sweepers that launch in batches (Optuna, ...) fill one experiment;
2. each job becomes a variation (config: the job's overrides and its resolved task config,
   JSON-safe) and a new ``pending`` run of it. A job whose overrides equal those of a
   variation recorded by an earlier invocation (same experiment) gets a new run of *that*
   variation: that is how reruns keep their variation. In a fresh experiment variation
   numbers equal ``hydra.job.num``;
3. the inner launcher (the *executor*) runs the jobs with the task function wrapped in a
   :class:`TrackedTask`, which is pickled into the job processes by joblib / submitit;
4. afterwards, runs of jobs that never started are failed: ``crash`` when Hydra reports the
   job failed before the task ran (e.g. a bad override), ``abandoned`` on Ctrl+C.

The job side (:class:`TrackedTask`, what runs inside each job process) is in
:mod:`._job`; its names are re-exported here.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from chronicle_integrations._errors import (
    ChronicleError,
    NotFound,
    ServerError,
    TransportError,
)
from chronicle_integrations._frameworks import jsonable
from chronicle_integrations._models import RunInfo
from chronicle_integrations.client import Chronicle, Run, format_exception
from chronicle_integrations.lifecycle import RunState

from ._job import RETURN_VALUE_ASSET, TrackedTask, client_for, resolve_target, upload_directory
from ._watch import Watcher

if TYPE_CHECKING:
    from .chronicle_launcher import ChronicleLauncher

log = logging.getLogger(__name__)

#: States whose variations ``rerun_failed_of`` runs again.
FAILED_STATES = (RunState.FAILED_CRASH, RunState.FAILED_ABANDONED, RunState.FAILED_LOST)
#: Errors that mean "the store cannot be used right now" (not a mistake in the request).
UNREACHABLE = (TransportError, ServerError)
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


# ------------------------------------------------------------------------------ the launcher side
@dataclass
class _Variation:
    number: int
    overrides: list[str]
    used: bool = False


@dataclass
class SweepState:
    """What a launcher keeps across batches."""

    client: Chronicle
    inner: Launcher
    task: TrackedTask
    abandon_on_interrupt: bool
    #: submitit: job processes are independent of the launching process (and SLURM's keep
    #: running after it is gone), so the launcher never ends runs they may still start.
    jobs_outlive_launcher: bool
    #: None until registered (the store may be unreachable: the jobs then run untracked).
    experiment_id: str | None = None
    #: Variations recorded before this sweep started, which a job with the same overrides
    #: reuses (new run of the same variation).
    recorded: list[_Variation] = field(default_factory=list)
    #: ``rerun_failed_of``: variation -> the pending run someone already requested for it
    #: (``chronicle rerun E V``): the job executes that run instead of creating another.
    requested: dict[int, int] = field(default_factory=dict)


def launch(
    launcher: ChronicleLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    """Register the batch as variations and runs, then run it on the inner launcher."""
    assert launcher.config is not None and launcher.hydra_context is not None
    assert launcher.task_function is not None
    state: SweepState = launcher.state or _begin_sweep(launcher)
    launcher.state = state
    if state.experiment_id is None:
        _register_experiment(launcher, state)

    jobs = [list(o) for o in job_overrides]
    if launcher.rerun_failed_of is not None:
        jobs = _select_failed(state, jobs)
        if not jobs:
            log.info("chronicle: no failed variation of %s to rerun", state.experiment_id)
            return []

    runs: list[Run] = []
    watcher = None
    if state.task.worker_kind is not None and launcher.teardown and state.experiment_id:
        watcher = Watcher(state.client, state.experiment_id, launcher.teardown_grace)
    for offset, overrides in enumerate(jobs):
        num = initial_job_idx + offset
        if state.experiment_id is None:
            break  # the store is unreachable: the batch runs untracked (logged)
        try:
            variation = _variation_for(launcher, state, overrides, num)
            if variation in state.requested:
                run = state.client.run(
                    state.experiment_id, variation, state.requested.pop(variation)
                )
            else:
                run = state.client.create_run(state.experiment_id, variation)
        except UNREACHABLE as exc:
            if launcher.strict:
                raise
            log.error("chronicle: could not register job #%d (%s); it runs untracked", num, exc)
            continue
        state.task.runs[num] = run.key_tuple
        state.task.leases[num] = lease = secrets.token_urlsafe(24)
        if watcher is not None:
            watcher.watch(run.variation, run.run, lease)
        runs.append(run)
        log.info("chronicle: job #%d -> run %s", num, run.key)

    if watcher is not None:
        watcher.start()
    try:
        results = state.inner.launch(jobs, initial_job_idx=initial_job_idx)
    except KeyboardInterrupt:
        if state.abandon_on_interrupt:
            _end_unfinished(state, runs, None, interrupted=True)
        else:
            log.warning(
                "chronicle: interrupted; the runs of jobs already submitted are left "
                "to those jobs (they keep running on the cluster)"
            )
        raise
    except BaseException as exc:
        if state.jobs_outlive_launcher:
            # E.g. submitit could not get a job's result (its process was killed): the other
            # jobs may still be running (or about to start) and end their runs themselves;
            # a killed one goes lost by the heartbeat timeout.
            log.error(
                "chronicle: the %s launcher failed (%s: %s); the runs of its jobs are "
                "left to those jobs and the heartbeat timeout",
                _executor_name(launcher),
                type(exc).__name__,
                exc,
            )
        else:
            # basic / joblib: nothing of this batch runs any more. Jobs that never started
            # get failed_crash; a job whose worker died is left to go lost.
            _end_unfinished(state, runs, None, interrupted=False, error=exc)
        raise
    finally:
        if watcher is not None:
            watcher.stop()
    _end_unfinished(state, runs, list(results), interrupted=False)
    return results


def _begin_sweep(launcher: ChronicleLauncher) -> SweepState:
    config = launcher.config
    assert config is not None and launcher.hydra_context is not None
    assert launcher.task_function is not None
    url, home = resolve_target(launcher.url, launcher.home)
    client = client_for(url, home)
    task = TrackedTask(
        task_function=launcher.task_function,
        url=url,
        home=None if url else home,
        heartbeat_interval=launcher.heartbeat_interval,
        upload_outputs=launcher.upload_outputs,
        strict=launcher.strict,
        worker_kind=_worker_kind(_executor_module(launcher)),
    )
    executor = launcher.executor
    if executor is None:
        executor = OmegaConf.create({"_target_": BASIC_LAUNCHER})
    # How Hydra instantiates launchers itself: the class must be a discovered plugin, and the
    # target policy of hydra-core 1.3.8 (which refuses `hydra._internal.*` targets in plain
    # `instantiate`, e.g. the basic launcher) trusts it. Private, but stable across 1.3.
    inner = Plugins.instance()._instantiate(executor)
    assert isinstance(inner, Launcher)
    inner.setup(hydra_context=launcher.hydra_context, task_function=task, config=config)
    executor_name = _executor_name(launcher)
    abandon = launcher.abandon_on_interrupt
    if abandon is None:
        abandon = "slurm" not in executor_name.lower()
    state = SweepState(
        client=client,
        inner=inner,
        task=task,
        abandon_on_interrupt=abandon,
        jobs_outlive_launcher="submitit" in _executor_module(launcher),
    )
    _register_experiment(launcher, state)
    return state


def _register_experiment(launcher: ChronicleLauncher, state: SweepState) -> None:
    """Create (or find) the sweep's experiment and the variations recorded before.

    An unreachable store does not stop the sweep (non-strict): the jobs run untracked, with an
    ERROR, and the next batch tries again. ``rerun_failed_of`` needs the store: it raises."""
    config = launcher.config
    assert config is not None
    client = state.client
    task_name = str(config.hydra.job.name)
    try:
        if launcher.rerun_failed_of is not None:
            experiment_id = launcher.rerun_failed_of
            client.experiment(experiment_id)  # NotFound early, with the id in the message
        else:
            experiment_id = launcher.experiment_id or derive_experiment_id(
                task_name, str(config.hydra.sweep.dir)
            )
            try:  # an existing experiment is reused whatever its name (reruns, batches)
                client.experiment(experiment_id)
            except NotFound:
                name = launcher.experiment_name or task_name
                client.create_experiment(name, [], experiment_id=experiment_id)
        state.recorded = _recorded_variations(client, experiment_id)
    except UNREACHABLE as exc:
        if launcher.strict or launcher.rerun_failed_of is not None:
            raise
        log.error(
            "chronicle: cannot register the sweep on %s (%s); its jobs run untracked",
            client.target,
            exc,
        )
        return
    state.experiment_id = experiment_id
    log.info(
        "chronicle: sweep -> experiment %s (%s)%s",
        experiment_id,
        client.target,
        f", {len(state.recorded)} variation(s) recorded before" if state.recorded else "",
    )


def derive_experiment_id(task_name: str, sweep_dir: str) -> str:
    """``<task name>-<8 hex of the absolute sweep dir>``: stable for one sweep dir."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", task_name).strip("-._")[:100] or "hydra"
    digest = hashlib.sha256(os.path.abspath(sweep_dir).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def _executor_name(launcher: ChronicleLauncher) -> str:
    executor = launcher.executor
    target = executor.get("_target_") if isinstance(executor, DictConfig) else None
    return str(target or BASIC_LAUNCHER).rsplit(".", 1)[-1]


def _executor_module(launcher: ChronicleLauncher) -> str:
    executor = launcher.executor
    target = executor.get("_target_") if isinstance(executor, DictConfig) else None
    return str(target or BASIC_LAUNCHER)


def _worker_kind(executor: str) -> str | None:
    """How the jobs of an executor name themselves for the watcher: ``slurm`` (submitit's
    SLURM launcher), ``local`` (job processes of this host: submitit_local, joblib), None (the
    basic launcher: jobs run in the launching process, which cannot tear itself down)."""
    if "submitit" in executor:
        return "slurm" if "slurm" in executor.lower() else "local"
    if "joblib" in executor.lower():
        return "local"
    return None


def _recorded_variations(client: Chronicle, experiment_id: str) -> list[_Variation]:
    out = []
    for number, config in enumerate(client.variations(experiment_id)):
        overrides = config.get("overrides") if isinstance(config, dict) else None
        if isinstance(overrides, list):
            out.append(_Variation(number, [str(o) for o in overrides]))
    return out


def _variation_for(
    launcher: ChronicleLauncher, state: SweepState, overrides: list[str], num: int
) -> int:
    """The variation of a job: a recorded one with the same overrides (a rerun), else new."""
    assert state.experiment_id is not None
    for recorded in state.recorded:
        if not recorded.used and sorted(recorded.overrides) == sorted(overrides):
            recorded.used = True
            return recorded.number
    return state.client.add_variation(
        state.experiment_id,
        {
            "overrides": overrides,
            "config": _task_config(launcher, overrides, num),
        },
    )


def _task_config(launcher: ChronicleLauncher, overrides: list[str], num: int) -> Any:
    """The job's task config, resolved when possible (else with its interpolations), JSON-safe.

    Composed here, in the launching process, exactly as the inner launcher will compose it
    for the job (``load_sweep_config`` with ``hydra.job.num`` set)."""
    assert launcher.hydra_context is not None and launcher.config is not None
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    try:
        sweep = launcher.hydra_context.config_loader.load_sweep_config(
            launcher.config, list(overrides)
        )
        with open_dict(sweep):
            sweep.hydra.job.num = num
        hydra_config.set_config(sweep)
        task_cfg = copy.deepcopy(sweep)  # what run_job hands the task: no `hydra` node
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        try:
            container = OmegaConf.to_container(task_cfg, resolve=True)
        except Exception:
            container = OmegaConf.to_container(task_cfg, resolve=False)
        return jsonable(container)
    except Exception as exc:  # the job itself will report the problem (e.g. a bad override)
        log.debug("chronicle: could not compose the config of job #%d: %s", num, exc)
        return None
    finally:
        hydra_config.cfg = saved


def _select_failed(state: SweepState, jobs: list[list[str]]) -> list[list[str]]:
    """``rerun_failed_of``: the jobs whose variation failed and is not done since.

    A variation qualifies when its latest started run failed and nothing succeeded or runs
    after it: either that failed run is its latest run (the job gets a new run), or a rerun
    was requested meanwhile (``chronicle rerun E V``: its latest run is ``pending``), which
    is the run the job executes (recorded in ``state.requested``) instead of leaving it
    pending forever next to a new one.

    Jobs of the sweep are matched to recorded variations by their overrides; a sweep of one
    job without overrides (``-m`` alone) means every failed variation, with its recorded
    overrides."""
    assert state.experiment_id is not None
    by_variation: dict[int, list[RunInfo]] = {}
    for info in state.client.runs(experiment_id=state.experiment_id):
        by_variation.setdefault(info.variation, []).append(info)
    failed: list[_Variation] = []
    for recorded in state.recorded:
        runs = sorted(by_variation.get(recorded.number, []), key=lambda i: i.run)
        requested = runs.pop() if runs and runs[-1].state is RunState.PENDING else None
        ended = [i for i in runs if i.state is not RunState.PENDING]
        if not ended or ended[-1].state not in FAILED_STATES:
            continue
        if requested is not None:
            state.requested[recorded.number] = requested.run
        failed.append(recorded)
    if jobs == [[]]:
        selected = [list(v.overrides) for v in failed]
    else:
        wanted = {tuple(sorted(v.overrides)) for v in failed}
        selected = [job for job in jobs if tuple(sorted(job)) in wanted]
        skipped = len(jobs) - len(selected)
        if skipped:
            log.info(
                "chronicle: rerun_failed_of=%s: skipping %d job(s) whose variation did "
                "not fail (or is not in the experiment)",
                state.experiment_id,
                skipped,
            )
    log.info(
        "chronicle: rerunning %d failed variation(s) of %s%s",
        len(selected),
        state.experiment_id,
        f" ({len(state.requested)} as the pending run already requested)"
        if state.requested
        else "",
    )
    return selected


def _end_unfinished(
    state: SweepState,
    runs: list[Run],
    results: list[JobReturn] | None,
    *,
    interrupted: bool,
    error: BaseException | None = None,
) -> None:
    """After a batch: fail the runs its jobs never ended.

    Interrupted (Ctrl+C): every run not yet terminal -> ``failed_abandoned`` (the job that was
    running has usually done so itself). Otherwise only runs still ``pending``: their job
    failed before the task ran -> ``failed_crash`` with Hydra's error, or the sweep process is
    exiting (``SystemExit``) -> ``failed_abandoned``. Started runs are left to their jobs (a
    pre-empted job's run stays resumable; a dead worker's goes lost)."""
    if not runs or state.experiment_id is None:
        return
    try:
        current = {
            (i.variation, i.run): i.state
            for i in state.client.runs(experiment_id=state.experiment_id)
        }
    except (ChronicleError, OSError) as exc:
        log.warning(
            "chronicle: could not read the runs of %s to close them: %s", state.experiment_id, exc
        )
        return
    for index, run in enumerate(runs):
        run_state = current.get((run.variation, run.run))
        if run_state is None or run_state.is_terminal:
            continue
        if interrupted:
            reason, message = "abandoned", "KeyboardInterrupt: the sweep was interrupted"
        elif run_state is RunState.PENDING and isinstance(error, SystemExit):
            # The sweep process is leaving (pre-emption, sys.exit in a job): a new sweep, not
            # this one, will run these jobs again.
            reason = "abandoned"
            message = f"the sweep exited (SystemExit {error.code!r}) before this job started"
        elif run_state is RunState.PENDING:
            reason, message = "crash", _never_started(results, index, error)
        else:
            continue  # running / lost: its job (or the heartbeat timeout) decides
        try:
            run.fail(reason, message)
            log.info("chronicle: run %s -> failed_%s", run.key, reason)
        except ChronicleError as exc:
            log.warning("chronicle: could not fail run %s: %s", run.key, exc)


def _never_started(results: list[JobReturn] | None, index: int, error: BaseException | None) -> str:
    if error is not None:
        return "the launcher failed before this job started its run: " + format_exception(error)
    result = results[index] if results is not None and index < len(results) else None
    if result is not None and result.status == JobStatus.FAILED:
        error = result._return_value
        if isinstance(error, BaseException):
            return "the job failed before its task ran: " + format_exception(error)
    return "the job never started its run"


__all__ = [
    "RETURN_VALUE_ASSET",
    "TrackedTask",
    "client_for",
    "derive_experiment_id",
    "launch",
    "resolve_target",
    "upload_directory",
]
