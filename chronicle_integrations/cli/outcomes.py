"""``chronicle`` commands on outcomes: ``best``, ``objective``, and the ``--sort`` of ``runs``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, TextIO

from .._metrics import ranking_mode
from .connect import open_client
from .errors import EXIT_OK
from .format import print_json, printable, public


def cmd_best(args: argparse.Namespace, out: TextIO) -> int:
    """The best run of an experiment, with its state, value and best checkpoint."""
    with open_client(args) as chronicle:
        best = chronicle.best(
            args.experiment, args.metric, args.mode, include_running=args.include_running
        )
    if args.json:
        print_json(best.to_dict(), out)
        return EXIT_OK
    checkpoint = best.checkpoint or {}
    fields = [
        ("run", best.key),
        ("state", best.state.value),
        ("metric", f"{best.metric} ({best.mode})"),
        (
            "value",
            format_value(best.value) + (f" at step {best.step}" if best.step is not None else ""),
        ),
        ("checkpoint", checkpoint.get("name") or "-"),
    ]
    if checkpoint:
        fields.append(
            (
                "download",
                f"chronicle download {best.key} {checkpoint['name']}",
            )
        )
    width = max(len(k) for k, _ in fields) + 2
    for key, value in fields:
        out.write(f"{key + ':':<{width}}{printable(value)}\n")
    return EXIT_OK


def cmd_objective(args: argparse.Namespace, out: TextIO) -> int:
    """Set (or clear) what "best" means for an experiment's runs."""
    with open_client(args) as chronicle:
        if args.clear:
            info = chronicle.set_objective(args.experiment, None)
        elif args.metric is None:
            info = chronicle.experiment(args.experiment)
        else:
            info = chronicle.set_objective(args.experiment, args.metric, args.mode or "min")
    if args.json:
        print_json(public(info), out)
    else:
        goal = info.objective
        out.write(
            f"{info.experiment_id}: {goal['metric']} ({goal['mode']})\n"
            if goal
            else f"{info.experiment_id}: no objective\n"
        )
    return EXIT_OK


def format_value(value: Any) -> str:
    """A metric value for people: ``0.3125``, ``nan``, ``inf``, ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"


def sort_mode(chronicle: Any, experiment_id: str | None, metric: str, mode: str | None) -> str:
    """The direction of ``runs --sort``: ``--mode``, else the objective's mode when
    ``metric`` is the objective, else ``min`` (the store's rule, ``ranking_mode``; asked
    here to name the column)."""
    goal = chronicle.experiment(experiment_id).objective if experiment_id and not mode else None
    return ranking_mode(metric, mode, goal)


def metric_column(metric: str, mode: str) -> tuple[str, Callable[[Any], str]]:
    """The runs table's column for ``runs --sort``: its header and each run's cell, the value
    the sort used (its min, or its max in mode ``max``)."""
    column = "min" if mode == "min" else "max"

    def cell(info: Any) -> str:
        return format_value(((info.metrics or {}).get(metric) or {}).get(column))

    return f"{metric} ({column})".upper(), cell
