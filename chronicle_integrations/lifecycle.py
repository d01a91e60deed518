"""The run lifecycle: the seven states and the one transition table.

This module is the single source of truth for what may happen to a run. The store enforces it
(server side and embedded), the client uses it to fail early with a clear message, and the test
suite uses :func:`is_valid_path` to check that every event log is a walk through it.

State diagram::

                 start / resume                    succeed
    pending ───────────────────────► running ─────────────────────► succeeded
       │                              │  ▲ │ fail(crash)
       │ fail(crash|abandoned)        │  │ └──────────────────────► failed_crash
       │                   watchdog   │  │ heartbeat / resume        (fail(abandoned)
       │                 (no beat for │  │                            from pending, running,
       ▼                  timeout)    ▼  │                            lost -> failed_abandoned)
    failed_*                          lost ──── watchdog (grace) ───► failed_lost

``lost`` is recoverable (a heartbeat or a resume brings the run back to ``running``; it may
still succeed or fail); ``failed_lost`` is terminal.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

__all__ = [
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Action",
    "RunState",
    "allowed_sources",
    "is_valid_path",
    "next_state",
]


class RunState(str, enum.Enum):
    """The state of a run. A ``str`` enum: ``RunState.RUNNING == "running"``."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED_CRASH = "failed_crash"
    FAILED_ABANDONED = "failed_abandoned"
    LOST = "lost"
    FAILED_LOST = "failed_lost"

    @property
    def is_terminal(self) -> bool:
        """True for states that never change again."""
        return self in TERMINAL_STATES

    def __str__(self) -> str:  # print(RunState.RUNNING) -> "running"
        return self.value


TERMINAL_STATES: frozenset[RunState] = frozenset(
    {RunState.SUCCEEDED, RunState.FAILED_CRASH, RunState.FAILED_ABANDONED, RunState.FAILED_LOST}
)


class Action(str, enum.Enum):
    """Everything that can move a run. Watchdog actions are never requested by clients."""

    START = "start"
    RESUME = "resume"  # start(resume=True)
    HEARTBEAT = "heartbeat"
    SUCCEED = "succeed"
    FAIL_CRASH = "fail_crash"
    FAIL_ABANDONED = "fail_abandoned"
    WATCHDOG_LOST = "watchdog_lost"
    WATCHDOG_EXPIRED = "watchdog_expired"

    def __str__(self) -> str:
        return self.value


_P, _R, _L = RunState.PENDING, RunState.RUNNING, RunState.LOST

#: The transition table of SPEC section 3: for each action, the states it may start from and
#: the state it leads to. Anything not listed is an invalid transition.
TRANSITIONS: Mapping[Action, Mapping[RunState, RunState]] = {
    Action.START: {_P: _R},
    Action.RESUME: {_P: _R, _R: _R, _L: _R},
    Action.HEARTBEAT: {_R: _R, _L: _R},
    Action.SUCCEED: {_R: RunState.SUCCEEDED, _L: RunState.SUCCEEDED},
    Action.FAIL_CRASH: {
        _P: RunState.FAILED_CRASH,
        _R: RunState.FAILED_CRASH,
        _L: RunState.FAILED_CRASH,
    },
    Action.FAIL_ABANDONED: {
        _P: RunState.FAILED_ABANDONED,
        _R: RunState.FAILED_ABANDONED,
        _L: RunState.FAILED_ABANDONED,
    },
    Action.WATCHDOG_LOST: {_R: _L},
    Action.WATCHDOG_EXPIRED: {_L: RunState.FAILED_LOST},
}

#: The terminal state each terminal action leads to (for idempotent repeats).
TERMINAL_TARGET: Mapping[Action, RunState] = {
    Action.SUCCEED: RunState.SUCCEEDED,
    Action.FAIL_CRASH: RunState.FAILED_CRASH,
    Action.FAIL_ABANDONED: RunState.FAILED_ABANDONED,
}

#: Actions that must carry the run's current lease once the run has been started.
#: ``fail(reason="abandoned")`` is a cancellation: any authorised client may send it.
LEASED_ACTIONS: frozenset[Action] = frozenset({Action.HEARTBEAT, Action.SUCCEED, Action.FAIL_CRASH})

# Every edge an event log may contain (a repeated running->running start is recorded too).
_EDGES: frozenset[tuple[RunState, RunState]] = frozenset(
    (src, dst) for table in TRANSITIONS.values() for src, dst in table.items()
)


def next_state(action: Action, state: RunState) -> RunState | None:
    """The state ``action`` leads to from ``state``, or None when it is not allowed.

    An idempotent repeat of a terminal action (``succeed`` on a succeeded run) is *not* a
    transition; the store treats it separately as a success with no effect.
    """
    return TRANSITIONS[action].get(state)


def allowed_sources(action: Action) -> frozenset[RunState]:
    """The states from which ``action`` is allowed."""
    return frozenset(TRANSITIONS[action])


def is_valid_path(edges: Iterable[tuple[RunState | None, RunState]]) -> bool:
    """True when ``edges`` (from, to) form a walk through the table starting at creation.

    The first edge must be ``(None, pending)`` (run creation); each later edge must start where
    the previous one ended and be an edge of the table; nothing may follow a terminal state.
    """
    current: RunState | None = None
    for index, (src, dst) in enumerate(edges):
        src = RunState(src) if src is not None else None
        dst = RunState(dst)
        if index == 0:
            if src is not None or dst is not RunState.PENDING:
                return False
        elif src is not current or (src, dst) not in _EDGES:
            return False
        current = dst
    return True
