"""The ``hydra/launcher=chronicle`` config and its thin :class:`ChronicleLauncher`.

The launcher wraps another launcher (the *executor*: ``basic`` by default, ``joblib``,
``submitit_local``, ``submitit_slurm``) and runs every job of a sweep as a Chronicle run::

    python train.py -m hydra/launcher=chronicle lr=0.1,0.01
    python train.py -m hydra/launcher=chronicle \\
        'hydra/launcher@hydra.launcher.executor=submitit_local' lr=0.1,0.01

Only Hydra and the standard library are imported here (Hydra imports every plugin module at
every start); the client and the lifecycle code are in :mod:`._core`, loaded by ``launch()``.
"""

# No `from __future__ import annotations`: Hydra executes this module without registering it
# in sys.modules, and dataclasses then cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence  # noqa: UP035 - OmegaConf needs typing names

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class ChronicleLauncherConf:
    """``hydra.launcher`` when ``hydra/launcher=chronicle``.

    ``_self_`` comes FIRST in the defaults list so that the executor's config, merged after
    it, fills ``executor`` (the other order would reset it to the ``None`` below), and
    ``_recursive_: false`` hands ``executor`` to the launcher as a config to instantiate
    later, with ``setup()``, instead of instantiating it too early.
    """

    defaults: List[Any] = field(  # noqa: UP006
        default_factory=lambda: ["_self_", {"/hydra/launcher@executor": "basic"}]
    )
    _target_: str = "hydra_plugins.chronicle_launcher.chronicle_launcher.ChronicleLauncher"
    _recursive_: bool = False
    #: The wrapped launcher's config (chosen with ``hydra/launcher@hydra.launcher.executor=``).
    executor: Any = None
    #: Default: ``<task name>-<hash of the absolute sweep dir>``: the same sweep dir reuses the
    #: experiment (jobs with recorded overrides get new runs of their variation).
    experiment_id: Optional[str] = None  # noqa: UP045
    #: Default: the task (job) name.
    experiment_name: Optional[str] = None  # noqa: UP045
    #: Default ``$CHRONICLE_URL``; with neither, the embedded store in ``home``.
    url: Optional[str] = None  # noqa: UP045
    #: Default ``$CHRONICLE_HOME``, else ``./chronicle`` (made absolute: jobs may chdir).
    home: Optional[str] = None  # noqa: UP045
    heartbeat_interval: float = 60.0
    #: Upload each job's output directory (``.hydra/``, logs, what the job wrote) as assets.
    upload_outputs: bool = True
    #: Rerun the failed variations of this experiment (see README): new runs, same variations.
    rerun_failed_of: Optional[str] = None  # noqa: UP045
    #: On Ctrl+C, mark the runs of unfinished jobs ``failed_abandoned``. Default (null): yes,
    #: except under submitit_slurm, whose jobs keep running after the launcher is interrupted.
    abandon_on_interrupt: Optional[bool] = None  # noqa: UP045
    #: Raise tracking errors inside jobs instead of logging them and running on.
    strict: bool = False
    #: Tear down jobs whose runs went lost or were cancelled (submitit, joblib; see README).
    teardown: bool = True
    #: Seconds a cancelled job may take to stop by itself, and between SIGTERM and SIGKILL.
    teardown_grace: float = 30.0


ConfigStore.instance().store(
    group="hydra/launcher",
    name="chronicle",
    node=ChronicleLauncherConf,
    provider="chronicle-integrations",
)


class ChronicleLauncher(Launcher):
    """Runs a sweep's jobs as runs of one Chronicle experiment, on any inner launcher.

    One instance lives for the whole sweep: sweepers that launch in batches (Optuna, Ax, ...)
    call :meth:`launch` repeatedly and every batch goes to the same experiment, with fresh
    variation numbers (``hydra.job.num`` keeps growing across batches).
    """

    def __init__(
        self,
        executor: Any = None,
        experiment_id: str | None = None,
        experiment_name: str | None = None,
        url: str | None = None,
        home: str | None = None,
        heartbeat_interval: float = 60.0,
        upload_outputs: bool = True,
        rerun_failed_of: str | None = None,
        abandon_on_interrupt: bool | None = None,
        strict: bool = False,
        teardown: bool = True,
        teardown_grace: float = 30.0,
    ) -> None:
        self.executor = executor
        self.experiment_id = experiment_id
        self.experiment_name = experiment_name
        self.url = url
        self.home = home
        self.heartbeat_interval = float(heartbeat_interval)
        self.upload_outputs = bool(upload_outputs)
        self.rerun_failed_of = rerun_failed_of
        self.abandon_on_interrupt = abandon_on_interrupt
        self.strict = bool(strict)
        self.teardown = bool(teardown)
        self.teardown_grace = float(teardown_grace)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        #: Filled by ``_core`` on the first launch (the sweep's state across batches).
        self.state: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from . import _core

        return _core.launch(self, job_overrides, initial_job_idx)


__all__ = ["ChronicleLauncher", "ChronicleLauncherConf"]
