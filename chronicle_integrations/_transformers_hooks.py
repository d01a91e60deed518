"""The process-level parts of :mod:`chronicle_integrations.transformers`.

What ``ChronicleTrainerCallback`` needs beyond the Trainer's events: the SIGTERM handler it
chains while ``train()`` runs, the process-wide net (chained ``sys.excepthook`` /
``threading.excepthook`` and an ``atexit`` handler) that records how an unwrapped ``train()``
call ended, the ``torch.distributed`` collectives of ``on_save`` / ``on_step_end``, the
variation config recorded for a new experiment (secrets scrubbed) and the run identity read
back from a checkpoint. Imported only by that module: it imports neither transformers nor
torch at import time (torch is imported inside the collectives, which only run when
``torch.distributed`` is initialised).
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ._frameworks import jsonable

if TYPE_CHECKING:
    from transformers.trainer_callback import TrainerState
    from transformers.training_args import TrainingArguments

    from .transformers import ChronicleTrainerCallback

#: Key fragments of TrainingArguments / model configs that must never reach the store.
_SECRET_MARKERS = ("secret", "password", "passwd", "api_key", "apikey", "credential", "access_key")


def _is_secret(key: object) -> bool:
    """``hub_token``-like keys (what transformers itself masks: ``*_token``) and obvious
    credentials; ``pad_token_id`` & co. are hyperparameters and stay."""
    k = str(key).lower()
    return k == "token" or k.endswith("_token") or any(m in k for m in _SECRET_MARKERS)


def _scrub(value: Any) -> Any:
    """Drop secret-looking keys at any depth (hub tokens, API keys)."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not _is_secret(k)}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def _variation_config(args: TrainingArguments, model: Any, state: TrainerState) -> dict[str, Any]:
    """The variation config of a new experiment: TrainingArguments + model config."""
    config: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        config["training_args"] = jsonable(_scrub(args.to_dict()))
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_dict"):
        with contextlib.suppress(Exception):
            config["model_config"] = jsonable(_scrub(model_config.to_dict()))
    if getattr(state, "trial_params", None):
        config["trial_params"] = jsonable(state.trial_params)
    return config


def _saved_identity(state: TrainerState, name: str) -> tuple[str, int, int] | None:
    """The run identity the callback named ``name`` stored in the checkpoint's
    ``trainer_state.json`` (see ``ChronicleTrainerCallback.state``), if any."""
    stored: Any = state.stateful_callbacks
    saved: Any = stored.get(name) if isinstance(stored, dict) else None
    if isinstance(saved, list):
        saved = saved[-1] if saved else None
    try:
        ident = saved["attributes"]["_saved_run"]
        return (str(ident["experiment_id"]), int(ident["variation"]), int(ident["run"]))
    except (KeyError, TypeError, ValueError):
        return None


def _chain_sigterm(on_signal: Callable[[], None]) -> Callable[[], None]:
    """Install a SIGTERM handler that calls ``on_signal`` (it must not log or block), then
    chains to the handler installed before it (raising ``SystemExit(143)`` when that was the
    default one, "terminate"). Main thread only. Returns what puts the previous one back."""
    if threading.current_thread() is not threading.main_thread():
        return _noop
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        return _noop
    if previous is None:  # installed outside Python: restore the default afterwards
        previous = signal.SIG_DFL

    def on_sigterm(signum: int, frame: Any) -> None:
        # No logging here: a signal handler may interrupt a logging call holding its lock.
        on_signal()
        if callable(previous):
            previous(signum, frame)  # e.g. transformers' JIT checkpoint handler
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)  # the default action was "terminate"

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except (ValueError, OSError):
        return _noop

    def restore() -> None:
        # JITCheckpointCallback restores its own predecessor in on_train_end: only put
        # ours back if nobody replaced it meanwhile.
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(signal.SIGTERM) is on_sigterm:
                signal.signal(signal.SIGTERM, previous)

    return restore


def _noop() -> None:
    return None


def _pruned_by(exc: BaseException | None) -> str | None:
    """``"optuna"`` when ``exc`` is optuna's ``TrialPruned`` (the search cancelling the
    trial: not a crash), else None. Recognised by class name and module, without importing
    optuna. (Ray Tune stops a trial by stopping its actor: no exception reaches train().)"""
    for cls in type(exc).__mro__ if exc is not None else ():
        if cls.__name__ == "TrialPruned" and cls.__module__.split(".")[0] == "optuna":
            return "optuna"
    return None


def _frames(frame: FrameType | None, limit: int) -> Iterator[FrameType]:
    """``frame`` and its callers, innermost first, at most ``limit`` of them."""
    for _ in range(limit):
        if frame is None:
            return
        yield frame
        frame = frame.f_back


def _in_frame(function: str) -> bool:
    """True when a function named ``function`` is calling us (a few frames up)."""
    return any(frame.f_code.co_name == function for frame in _frames(sys._getframe(1), 16))


class _UnwrappedNet:
    """How an unwrapped ``train()`` call ended, when no Trainer event says it (there is no
    exception event): chained ``sys.excepthook`` and ``threading.excepthook`` record an
    uncaught exception (its type, message and traceback, like the wrapper), and an
    ``atexit`` handler records a run still active at exit (an exception the program caught;
    a caught one is also recorded by the next ``train()`` call). Installed once, on first
    use; the previous hooks are always called after ours. One per process: ``_NET``."""

    def __init__(self) -> None:
        self._armed: dict[ChronicleTrainerCallback, int] = {}  # -> ident of training thread
        self._lock = threading.Lock()
        self._installed = False
        self._sys_hook: Callable[..., Any] = sys.excepthook
        self._thread_hook: Callable[..., Any] = threading.excepthook

    def arm(self, callback: ChronicleTrainerCallback) -> None:
        with self._lock:
            self._armed[callback] = threading.get_ident()
            if not self._installed:
                self._installed = True
                self._sys_hook, sys.excepthook = sys.excepthook, self._excepthook
                self._thread_hook, threading.excepthook = threading.excepthook, self._thread
                atexit.register(self._at_exit)  # after client.py's: runs before it closes

    def disarm(self, callback: ChronicleTrainerCallback) -> None:
        with self._lock:
            self._armed.pop(callback, None)

    def armed(self, callback: ChronicleTrainerCallback) -> bool:
        return callback in self._armed

    def _uncaught(self, exc: BaseException | None, thread: int | None) -> None:
        with contextlib.suppress(Exception):
            with self._lock:
                hit = [cb for cb, ident in self._armed.items() if ident == thread]
            for callback in hit:
                if exc is not None:
                    callback._end_by(exc)

    def _excepthook(self, *args: Any) -> None:
        self._uncaught(args[1] if len(args) > 1 else None, threading.get_ident())
        self._sys_hook(*args)

    def _thread(self, args: Any) -> None:
        self._uncaught(args.exc_value, getattr(args.thread, "ident", None))
        self._thread_hook(args)

    def _at_exit(self) -> None:
        with self._lock:
            left = list(self._armed)
        for callback in left:
            callback._end_left_over(when="before the process exited")


_NET = _UnwrappedNet()


def _newest_mtime_ns(folder: Path) -> int:
    newest = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            newest = max(newest, path.stat().st_mtime_ns)
    return newest


def _distributed(args: TrainingArguments) -> bool:
    if args.world_size <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _any_rank(flag: bool, args: TrainingArguments) -> bool:
    """True on every rank when ``flag`` is true on any rank (a MAX all-reduce)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())
