"""Run metrics: names, values, per-run summaries, and the client's pending buffer.

Chronicle keeps no time series. For each metric name of a run it keeps a *summary*: the
``last`` value (by step, then by store time) and the ``min`` / ``max`` with their steps.
That answers "which run / which checkpoint is best" (see ``chronicle best``) at the cost of
one small row per name, and it is what the trackers' users ask for (research: metrics.md).

One rule, used by three places:

* :class:`MetricBuffer` (client, training thread): ``log`` folds values into a small summary
  per name under a lock - O(1), no I/O; the heartbeat thread ``take``\\ s the summaries and
  sends them with the next beat (or with ``succeed()`` / ``fail()``);
* :func:`parse_metrics` (store): checks what a request carries;
* :func:`merge` (store): folds an incoming summary into the stored one.

Values are floats. NaN and infinities are kept as ``last`` but never become ``min`` / ``max``.
On the wire (JSON has no NaN) non-finite values travel as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"``.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Any

from ._errors import InvalidMetric

__all__ = [
    "MAX_CHECKPOINTS_PER_REQUEST",
    "MAX_METRICS",
    "MAX_METRIC_NAME",
    "MODES",
    "MetricBuffer",
    "Summary",
    "checkpoint_metric",
    "decode_float",
    "encode_float",
    "host_number",
    "merge",
    "metric_name",
    "metric_value",
    "mode",
    "objective",
    "parse_checkpoints",
    "parse_metrics",
    "ranking_mode",
]

#: Most metric names one run may have (the store refuses the 65th: ``invalid_request``).
MAX_METRICS = 64
#: Longest metric name, in characters.
MAX_METRIC_NAME = 256
#: Most checkpoint records (an asset and the metric it was saved for) in one request.
MAX_CHECKPOINTS_PER_REQUEST = 64
#: Directions of "best": the smallest value, or the largest.
MODES = ("min", "max")
#: Steps are stored as 64-bit integers.
MAX_STEP = 2**63 - 1

_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

#: ``[last, last_step, min, min_step, max, max_step]``: one name's summary. ``min``/``max``
#: are None until a finite value was seen; steps are None when none was given.
Summary = list[Any]


def metric_name(value: Any) -> str:
    """Check a metric name: 1-256 characters, ``/``-separated segments (``val/loss``) with no
    empty, ``.`` or ``..`` segment, no backslash, NUL or other control characters."""
    if type(value) is str and value in _VALID_NAMES:  # the same names come with every beat
        return value
    problem = None
    if not isinstance(value, str) or not value:
        problem = "must be a non-empty string"
    elif len(value) > MAX_METRIC_NAME:
        problem = f"longer than {MAX_METRIC_NAME} characters"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "control characters (including NUL) are not allowed"
    elif "\\" in value:
        problem = "backslashes are not allowed"
    elif any(segment in ("", ".", "..") for segment in value.split("/")):
        problem = "empty, '.' and '..' segments are not allowed (e.g. 'val/loss')"
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            problem = "not valid UTF-8"
    if problem:
        raise InvalidMetric(f"invalid metric name {str(value)[:80]!r}: {problem}", field="metrics")
    if len(_VALID_NAMES) < 10_000:
        _VALID_NAMES.add(value)
    return value


#: Names that passed :func:`metric_name` (bounded): checked once per process.
_VALID_NAMES: set[str] = set()


def metric_value(value: Any, name: str = "") -> float:
    """A metric value as a float: an int or float (or a numpy scalar), never a bool or a
    string. NaN and infinities are allowed."""
    if type(value) is float:
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise InvalidMetric(
        f"metric {name!r}: {type(value).__name__} {str(value)[:40]!r} is not a number "
        "(log plain floats; call .item() on a tensor where it already is on the host)",
        field="metrics",
    )


def host_number(value: Any, name: str = "") -> float:
    """A framework's value as a float: a number, or a one-element tensor / array read with
    one ``.item()`` (a device sync: call it where the value is needed on the host anyway).
    Raises :class:`InvalidMetric` for anything else (a string, a multi-element tensor)."""
    if type(value) is float:
        return value
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, numbers.Real):
        numel = getattr(value, "numel", None) or getattr(value, "size", None)
        count = numel() if callable(numel) else numel
        if count is not None and count != 1:
            raise InvalidMetric(
                f"metric {name!r}: a {type(value).__name__} of {count} elements is not a number",
                field="metrics",
            )
        value = item()
    return metric_value(value, name)


def encode_float(value: float | None) -> float | str | None:
    """A float for JSON: non-finite values become ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    if value is None or math.isfinite(value):
        return value
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def decode_float(value: Any) -> Any:
    """The inverse of :func:`encode_float` (anything else is returned unchanged)."""
    return _SPECIAL.get(value, value) if isinstance(value, str) else value


def _step(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        raise InvalidMetric(
            f"metric {name!r}: step {value!r} must be an integer >= 0", field="metrics"
        )
    return value


def _finite_or_none(value: Any, name: str, what: str) -> float | None:
    if value is None:
        return None
    number = metric_value(decode_float(value), name)
    if not math.isfinite(number):
        raise InvalidMetric(f"metric {name!r}: {what} must be finite", field="metrics")
    return number


def parse_metrics(value: Any) -> dict[str, Summary]:
    """Check the ``metrics`` of a heartbeat, ``succeed`` or ``fail``: an object of at most
    :data:`MAX_METRICS` names, each a number (``{"val/loss": 0.31}``) or a summary
    ``{"last": 0.31, "step": 1200, "min": .., "min_step": .., "max": .., "max_step": ..}``
    (what the client sends). Raises :class:`InvalidMetric` (``invalid_request``)."""
    if not isinstance(value, dict):
        raise InvalidMetric("metrics must be a JSON object of names to numbers", field="metrics")
    if len(value) > MAX_METRICS:
        raise InvalidMetric(
            f"{len(value)} metric names in one request: a run may have at most {MAX_METRICS}",
            field="metrics",
        )
    out: dict[str, Summary] = {}
    for name, item in value.items():
        metric_name(name)
        if not isinstance(item, dict):
            last = metric_value(decode_float(item), name)
            finite = last if math.isfinite(last) else None
            out[name] = [last, None, finite, None, finite, None]
            continue
        if "last" not in item:
            raise InvalidMetric(f"metric {name!r}: a summary needs 'last'", field="metrics")
        last = metric_value(decode_float(item["last"]), name)
        step = _step(item.get("step"), name)
        low = _finite_or_none(item.get("min"), name, "min")
        high = _finite_or_none(item.get("max"), name, "max")
        if low is None and high is None and math.isfinite(last):
            low = high = last
        if (low is None) != (high is None) or (low is not None and high is not None and low > high):
            raise InvalidMetric(f"metric {name!r}: inconsistent min/max", field="metrics")
        out[name] = [
            last,
            step,
            low,
            _step(item.get("min_step", step), name),
            high,
            _step(item.get("max_step", step), name),
        ]
    return out


def merge(old: Summary | None, new: Summary) -> Summary:
    """Fold ``new`` into ``old`` (both :data:`Summary`). ``last`` moves unless ``new`` is for
    an earlier step than ``old`` (a resumed run replaying steps does not overwrite a later
    value; without steps, the later arrival wins); ``min`` / ``max`` keep the extreme finite
    values, the earlier one on a tie."""
    if old is None:
        return list(new)
    out = list(old)
    if new[1] is None or old[1] is None or new[1] >= old[1]:
        out[0], out[1] = new[0], new[1]
    if new[2] is not None and (old[2] is None or new[2] < old[2]):
        out[2], out[3] = new[2], new[3]
    if new[4] is not None and (old[4] is None or new[4] > old[4]):
        out[4], out[5] = new[4], new[5]
    return out


def to_wire(summary: Summary) -> dict[str, Any]:
    """A summary as a request carries it (see :func:`parse_metrics`)."""
    return {
        "last": encode_float(summary[0]),
        "step": summary[1],
        "min": summary[2],
        "min_step": summary[3],
        "max": summary[4],
        "max_step": summary[5],
    }


def mode(value: Any) -> str:
    """Check a direction: ``"min"`` or ``"max"``."""
    if value not in MODES:
        raise InvalidMetric(f"invalid mode {value!r}: use 'min' or 'max'", field="mode")
    return str(value)


def ranking_mode(metric: str, wanted: str | None, goal: dict[str, Any] | None) -> str:
    """The direction of a ranking by ``metric`` (``best``, ``runs --sort``): ``wanted``,
    else the objective ``goal``'s mode when ``metric`` is its metric, else ``min``."""
    if wanted is None and goal and goal.get("metric") == metric:
        wanted = goal.get("mode")
    return mode(wanted or "min")


def objective(value: Any) -> dict[str, str] | None:
    """Check an experiment's objective: ``{"metric": "val/loss", "mode": "min"}`` (or None)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"metric", "mode"} or "metric" not in value:
        raise InvalidMetric(
            'an objective is {"metric": NAME, "mode": "min" | "max"}', field="objective"
        )
    return {"metric": metric_name(value["metric"]), "mode": mode(value.get("mode", "min"))}


def checkpoint_metric(value: Any) -> dict[str, Any]:
    """Check what a checkpoint asset was saved for: ``{"metric": NAME, "value": x,
    "step": s, "epoch": e}`` (``value`` may be non-finite; step and epoch optional)."""
    if not isinstance(value, dict) or "metric" not in value or "value" not in value:
        raise InvalidMetric(
            'a checkpoint record is {"metric": NAME, "value": X, "step": S, "epoch": E}',
            field="checkpoints",
        )
    name = metric_name(value["metric"])
    epoch = value.get("epoch")
    if epoch is not None:  # HF's epochs are fractional
        epoch = _finite_or_none(epoch, name, "epoch")
    return {
        "metric": name,
        "value": metric_value(decode_float(value["value"]), name),
        "step": _step(value.get("step"), name),
        "epoch": epoch,
    }


def parse_checkpoints(value: Any) -> dict[str, dict[str, Any]]:
    """Check the ``checkpoints`` of a request: ``{asset name: checkpoint record}``."""
    from ._validation import asset_name

    if not isinstance(value, dict) or len(value) > MAX_CHECKPOINTS_PER_REQUEST:
        raise InvalidMetric(
            "checkpoints must be an object of at most "
            f"{MAX_CHECKPOINTS_PER_REQUEST} asset names to checkpoint records",
            field="checkpoints",
        )
    out = {}
    for name, record in value.items():
        try:
            asset_name(name)
        except Exception as exc:
            raise InvalidMetric(str(exc), field="checkpoints") from None
        out[name] = checkpoint_metric(record)
    return out


class MetricBuffer:
    """What the training thread logged since the last send, per name a :data:`Summary`.

    :meth:`log` costs a dict lookup and a few comparisons per name under a lock (no I/O); the
    heartbeat thread :meth:`take`\\ s everything at once and, if the send failed,
    :meth:`restore`\\ s it, so nothing logged is lost to a transient failure. At most
    :data:`MAX_METRICS` names are accepted per buffer (the store's per-run bound).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Summary] = {}
        self._checkpoints: dict[str, dict[str, Any]] = {}
        #: Every name this buffer accepted (validated once each).
        self._names: set[str] = set()

    def log(self, values: Any, step: int | None = None) -> None:
        """Fold ``values`` (a mapping of names to numbers) in. Raises :class:`InvalidMetric`
        before recording anything when a name or value is invalid.

        The common case (float values of names seen before) is one pass of type and set
        checks, then one pass under the lock: about a microsecond for a few names."""
        if step is not None and (type(step) is not int or step < 0):
            _step(step, "step")
        try:
            items = values.items()
        except AttributeError:
            raise InvalidMetric(
                "log_metrics takes a mapping of names to numbers", field="metrics"
            ) from None
        names = self._names
        for name, value in items:
            if type(value) is not float or name not in names:
                items = self._checked(items)  # the slow path: converts, validates, caps
                break
        with self._lock:
            pending = self._pending
            for name, value in items:
                entry = pending.get(name)
                finite = value - value == 0.0
                if entry is None:
                    pending[name] = (
                        [value, step, value, step, value, step]
                        if finite
                        else [value, step, None, None, None, None]
                    )
                    continue
                if step is None or entry[1] is None or step >= entry[1]:
                    entry[0] = value
                    entry[1] = step
                if finite:
                    if entry[2] is None or value < entry[2]:
                        entry[2] = value
                        entry[3] = step
                    if entry[4] is None or value > entry[4]:
                        entry[4] = value
                        entry[5] = step

    def _checked(self, items: Any) -> list[tuple[str, float]]:
        """Validate names (once each) and convert values; admit new names under the cap."""
        names = self._names
        checked = []
        for name, value in items:
            if name not in names:
                metric_name(name)
            checked.append((name, metric_value(value, name)))
        with self._lock:
            new = {n for n, _ in checked if n not in names}
            if new and len(names) + len(new) > MAX_METRICS:
                raise InvalidMetric(
                    f"a run may have at most {MAX_METRICS} metric names; "
                    f"{len(names)} are in use, refused: {', '.join(sorted(new))[:200]}",
                    field="metrics",
                )
            names |= new
        return checked

    @staticmethod
    def check_checkpoint(asset: str, record: dict[str, Any]) -> dict[str, Any]:
        """Check a checkpoint record (:func:`checkpoint_metric`) and its asset's name."""
        from ._validation import asset_name

        try:
            asset_name(asset)
        except InvalidMetric:
            raise
        except Exception as exc:
            raise InvalidMetric(str(exc), field="checkpoints") from None
        return checkpoint_metric(record)

    def checkpoint(self, asset: str, record: dict[str, Any]) -> None:
        """Remember the metric a checkpoint asset was saved for (sent like metrics)."""
        checked = self.check_checkpoint(asset, record)
        with self._lock:
            self._checkpoints[asset] = checked

    def limit_to(self, names: set[str]) -> None:
        """Accept from now on only ``names`` plus what fits under the cap (the store knows
        these names for the run)."""
        with self._lock:
            self._names = set(names)
            self._pending = {k: v for k, v in self._pending.items() if k in names}

    def unsent(self) -> tuple[list[str], list[str]]:
        """What is pending: the metric names and the checkpoint assets (for a WARNING about
        what could not be sent); two empty lists when nothing is."""
        with self._lock:
            return sorted(self._pending), sorted(self._checkpoints)

    def take(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Everything pending, as a request carries it (``metrics``, ``checkpoints``), and
        empty the buffer; ``(None, None)`` when nothing is pending."""
        with self._lock:
            pending, self._pending = self._pending, {}
            checkpoints, self._checkpoints = self._checkpoints, {}
        metrics = {name: to_wire(s) for name, s in pending.items()} if pending else None
        cps = (
            {name: {**r, "value": encode_float(r["value"])} for name, r in checkpoints.items()}
            if checkpoints
            else None
        )
        return metrics, cps

    def restore(self, metrics: dict[str, Any] | None, checkpoints: dict[str, Any] | None) -> None:
        """Put back what :meth:`take` gave (a send failed): values logged meanwhile stay the
        later ones."""
        with self._lock:
            for name, summary in parse_metrics(metrics or {}).items():
                later = self._pending.get(name)
                self._pending[name] = merge(summary, later) if later else summary
            for name, record in (checkpoints or {}).items():
                self._checkpoints.setdefault(name, checkpoint_metric(record))

    def forget(self, names: set[str] | None = None) -> None:
        """Drop names the store refused (all when None) so they are not sent again."""
        with self._lock:
            if names is None:
                self._pending.clear()
                self._checkpoints.clear()
            else:
                self._names -= names
