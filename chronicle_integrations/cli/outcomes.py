"""``chronicle`` commands on outcomes: ``best``, ``objective``, and the ``--sort`` of ``runs``."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, TextIO

from .connect import open_client
from .errors import EXIT_OK
from .format import print_json, printable, public, table


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


def sort_runs(runs: list[Any], metric: str, mode: str) -> list[Any]:
    """Runs best first by ``metric`` in ``mode`` (each run's min or max of it); runs without
    a value of it come last, in listing order."""
    column = "min" if mode == "min" else "max"

    def value(info: Any) -> float | None:
        summary = (info.metrics or {}).get(metric)
        return None if summary is None else summary.get(column)

    scored = [(value(r), i, r) for i, r in enumerate(runs)]
    have = [(v, i, r) for v, i, r in scored if v is not None]
    have.sort(key=lambda s: (s[0] if mode == "min" else -s[0], s[1]))
    return [r for _, _, r in have] + [r for v, _, r in scored if v is None]


def sort_mode(chronicle: Any, experiment_id: str | None, metric: str, mode: str | None) -> str:
    """``--mode``, else the objective's mode when ``metric`` is the objective, else ``min``."""
    if mode:
        return mode
    if experiment_id:
        goal = chronicle.experiment(experiment_id).objective
        if goal and goal.get("metric") == metric:
            return str(goal["mode"])
    return "min"


def write_sorted_runs(
    runs: list[Any], metric: str, mode: str, headers: list[str], row: Any, out: TextIO
) -> None:
    """The runs table with the metric's column (the value the sort used)."""
    column = "min" if mode == "min" else "max"
    if not runs:
        print("no runs", file=sys.stderr)
        return
    rows = [
        [*row(r), format_value(((r.metrics or {}).get(metric) or {}).get(column))] for r in runs
    ]
    out.write(table([*headers, f"{metric} ({column})".upper()], rows) + "\n")
