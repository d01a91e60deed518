"""Former home of the shared integration code, now :mod:`chronicle_integrations._frameworks`;
kept as a re-export for anything that still imports from here."""

from __future__ import annotations

from ._config import DEFAULT_STALL_TIMEOUT, PREEMPT_FLUSH_SECONDS
from ._frameworks import UNKNOWN_RUN, Guard, TrackedRun, identity_from_env, jsonable

__all__ = [
    "DEFAULT_STALL_TIMEOUT",
    "PREEMPT_FLUSH_SECONDS",
    "UNKNOWN_RUN",
    "Guard",
    "TrackedRun",
    "identity_from_env",
    "jsonable",
]
