"""What every framework integration shares, importing no framework: the identity resolver
(:mod:`.identity`) and the lifecycle object (:mod:`.tracked`). Lightning, Transformers and
the Hydra job map their hooks onto these and nothing else."""

from __future__ import annotations

from .identity import (
    DEFAULT_EXPERIMENT_NAME,
    UNKNOWN_RUN,
    Decision,
    EnvIdentity,
    ExperimentGroups,
    identity_from_env,
    jsonable,
    resolve,
    settle,
)
from .tracked import QUICK_CLOSE_SECONDS, Guard, RunNotRunnable, TrackedRun

__all__ = [
    "DEFAULT_EXPERIMENT_NAME",
    "QUICK_CLOSE_SECONDS",
    "UNKNOWN_RUN",
    "Decision",
    "EnvIdentity",
    "ExperimentGroups",
    "Guard",
    "RunNotRunnable",
    "TrackedRun",
    "identity_from_env",
    "jsonable",
    "resolve",
    "settle",
]
