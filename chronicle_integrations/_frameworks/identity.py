"""Which run a training is, for every framework integration: one resolver, one rule.

Inputs: the explicit arguments (``experiment_id``, ``variation``, ``run``,
``experiment_name``), the environment (``$CHRONICLE_EXPERIMENT`` / ``_VARIATION`` / ``_RUN``
/ ``_LEASE``), the identity a checkpoint carries (or None) and whether training resumes from
a checkpoint. Output: a :class:`Decision`. The rules, in order (first match wins):

1. **Explicit arguments.** ``experiment_id`` + ``variation`` + ``run`` is that run;
   ``experiment_id`` (+ ``variation``, default 0) alone is a new run of that variation, or,
   when training resumes from a checkpoint whose run belongs to that experiment (and
   variation, when given), that run. A lease in the environment for the very same run is
   adopted (rule 2).
2. **A run named by the environment with a lease** (``chronicle exec``, the Hydra launcher):
   the launcher already started it and owns its end. The integration beats and uploads but
   never takes the terminal transition (``owns_end`` is False) and never resumes it (the
   lease is shared, not taken over).
3. **A run named by the environment without a lease** is the run, owned by the integration;
   it is resumed iff training resumes from a checkpoint, whatever identity the checkpoint
   carries.
4. **Resuming from a checkpoint that carries an identity**: that run, resumed.
5. **Otherwise a new run**: with ``experiment_name``, one experiment per name per process
   (per store); without, the experiment of the callback instance (its first training
   creates it, named ``"training"``). In both, each distinct config is a variation and each
   training a run of it (:class:`ExperimentGroups`).

Then, for a run to resume (rules 1, 3, 4), one check against the store
(:func:`settle`): a run that already ended cannot be resumed, so the training becomes **a
new run of the same variation**, with one clear warning; a checkpoint's run this store does
not know (another Chronicle's checkpoint) becomes a new run by rule 5.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .._config import ENV_EXPERIMENT, ENV_LEASE, ENV_RUN, ENV_VARIATION
from .._models import RunKey

log = logging.getLogger(__name__)

#: Why a run cannot be resumed when the store does not have it.
UNKNOWN_RUN = "is unknown to this Chronicle"
#: The experiment name of unnamed trainings.
DEFAULT_EXPERIMENT_NAME = "training"


@dataclass(frozen=True)
class EnvIdentity:
    """The run named by the environment, and the lease of the launcher that started it."""

    key: RunKey
    lease: str | None


def identity_from_env() -> EnvIdentity | None:
    """The run ``$CHRONICLE_EXPERIMENT`` / ``_VARIATION`` / ``_RUN`` (+ ``_LEASE``) name, or
    None (unset, or malformed: logged)."""
    exp = os.environ.get(ENV_EXPERIMENT)
    var = os.environ.get(ENV_VARIATION)
    run = os.environ.get(ENV_RUN)
    if not exp or var is None or run is None:
        return None
    try:
        key = RunKey(exp, int(var), int(run))
    except ValueError:
        log.warning("ignoring malformed %s/%s=%r/%r", ENV_VARIATION, ENV_RUN, var, run)
        return None
    return EnvIdentity(key, os.environ.get(ENV_LEASE) or None)


def check_arguments(experiment_id: str | None, variation: int | None, run: int | None) -> None:
    """Reject incomplete explicit identities (at construction, before any training)."""
    if run is not None and (experiment_id is None or variation is None):
        raise ValueError("run= needs experiment_id= and variation= too")
    if variation is not None and experiment_id is None:
        raise ValueError("variation= needs experiment_id= too")


@dataclass(frozen=True)
class Decision:
    """What the integration does when training starts.

    Exactly one of: ``key`` (start, resume or adopt that run), ``create`` (a new run of that
    ``(experiment_id, variation)``), or neither (a new run by ``experiment_name`` grouping,
    or the instance's own group when the name is None).
    """

    key: RunKey | None = None
    create: tuple[str, int] | None = None
    experiment_name: str | None = None
    #: The launcher's lease to adopt (rule 2).
    lease: str | None = None
    resume: bool = False
    #: False for an adopted run: its launcher records the end.
    owns_end: bool = True
    #: Which rule decided: "explicit", "environment", "checkpoint" or "new".
    source: str = "new"
    #: Set by :func:`settle`: the run this decision replaces and why (for the one warning).
    replaces: tuple[RunKey, str] | None = None

    @property
    def adopted(self) -> bool:
        """A launcher started the run (a lease in the environment)."""
        return self.lease is not None


def resolve(
    *,
    experiment_id: str | None = None,
    variation: int | None = None,
    run: int | None = None,
    experiment_name: str | None = None,
    env: EnvIdentity | None = None,
    saved: RunKey | tuple[str, int, int] | None = None,
    resuming: bool = False,
) -> Decision:
    """The one identity rule (see the module docstring). ``saved`` is the identity the
    checkpoint carries; ``resuming`` says training resumes from a checkpoint (with or without
    an identity in it). Pure: asks no store (see :func:`settle`)."""
    check_arguments(experiment_id, variation, run)
    saved_key = RunKey(*saved) if saved is not None else None
    if experiment_id is not None:
        if run is not None:
            key = RunKey(experiment_id, int(variation or 0), run)
            if env is not None and env.lease is not None and env.key == key:
                return Decision(key=key, lease=env.lease, owns_end=False, source="explicit")
            return Decision(key=key, resume=resuming, source="explicit")
        if (
            resuming
            and saved_key is not None
            and saved_key.experiment_id == experiment_id
            and (variation is None or saved_key.variation == variation)
        ):
            return Decision(key=saved_key, resume=True, source="explicit")
        return Decision(create=(experiment_id, int(variation or 0)), source="explicit")
    if env is not None:
        if env.lease is not None:
            return Decision(key=env.key, lease=env.lease, owns_end=False, source="environment")
        return Decision(key=env.key, resume=resuming, source="environment")
    if resuming and saved_key is not None:
        # The name is kept: a checkpoint run this store does not know becomes a new run by it.
        return Decision(
            key=saved_key, resume=True, experiment_name=experiment_name, source="checkpoint"
        )
    return Decision(experiment_name=experiment_name, source="new")


def settle(decision: Decision, why_not: Callable[[RunKey], str | None]) -> Decision:
    """Apply "a run that cannot be resumed is replaced" (rule (c), one place for all).

    ``why_not(key)`` says why a run cannot be resumed (``"already <state>"``, or
    :data:`UNKNOWN_RUN`), or None. An ended run becomes a new run of its variation; an
    unknown checkpoint run becomes a new run by name/instance grouping. Each replacement is
    logged once at WARNING. Other decisions are returned unchanged."""
    if not decision.resume or decision.key is None or decision.adopted:
        return decision
    key = decision.key
    reason = why_not(key)
    if reason is None:
        return decision
    if reason == UNKNOWN_RUN:
        if decision.source != "checkpoint":
            return decision  # a named run the store lacks: starting it reports the error
        replaced = Decision(experiment_name=decision.experiment_name, source="new")
    else:
        replaced = replace(
            decision, key=None, create=(key.experiment_id, key.variation), resume=False
        )
    return replace(replaced, replaces=(key, reason))


@dataclass
class _Group:
    experiment_id: str
    variations: dict[str, int] = field(default_factory=dict)


class ExperimentGroups:
    """Where a new run goes when no identity is given (rule 5).

    Named: one experiment per ``(store target, experiment_name)`` in this process, shared by
    every callback. Unnamed: the experiment of one callback instance (its ``instance``
    groups, plain picklable data kept by the callback). In both, one variation per distinct
    config (canonical JSON) and one run per training."""

    _named: dict[tuple[str, str], _Group] = {}
    _lock = threading.Lock()

    @classmethod
    def new_run(
        cls,
        client: Any,
        name: str | None,
        config: dict[str, Any],
        instance: dict[str, _Group],
    ) -> RunKey:
        """Create the run (and the experiment / variation when needed); returns its key."""
        canonical = json.dumps(config, sort_keys=True)
        groups: dict[Any, _Group] = cls._named if name is not None else instance
        slot: Any = (client.target, name) if name is not None else client.target
        with cls._lock:
            group = groups.get(slot)
            if group is None:
                exp = client.create_experiment(name or DEFAULT_EXPERIMENT_NAME, variations=[config])
                group = groups[slot] = _Group(exp, {canonical: 0})
            variation = group.variations.get(canonical)
            if variation is None:
                variation = group.variations[canonical] = client.add_variation(
                    group.experiment_id, config
                )
        return RunKey(*client.create_run(group.experiment_id, variation).key_tuple)


def jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe rendering of hyperparameters (unknown objects become their repr)."""
    if depth > 8:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): jsonable(v, depth + 1) for k, v in dict(value.items()).items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    return repr(value)


__all__ = [
    "DEFAULT_EXPERIMENT_NAME",
    "UNKNOWN_RUN",
    "Decision",
    "EnvIdentity",
    "ExperimentGroups",
    "check_arguments",
    "identity_from_env",
    "jsonable",
    "resolve",
    "settle",
]
