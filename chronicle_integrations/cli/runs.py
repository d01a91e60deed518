"""``chronicle`` commands on experiments, variations and runs: create, add-variation,
variations, experiments, runs, show, events, cancel, rerun."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from .._errors import InvalidTransition
from .._validation import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from .connect import open_client
from .errors import EXIT_OK
from .format import (
    answer,
    format_ago,
    format_iso,
    format_size,
    format_time,
    one_line,
    print_json,
    printable,
    progress_text,
    public,
    stream_json_list,
    table,
)
from .outcomes import format_value, metric_column, sort_mode


def cmd_create(args: argparse.Namespace, out: TextIO) -> int:
    with open_client(args, create=True) as chronicle:
        objective = (
            {"metric": args.objective, "mode": args.objective_mode}
            if getattr(args, "objective", None)
            else None
        )
        experiment_id = chronicle.create_experiment(
            args.name, args.variations or [], experiment_id=args.experiment_id, objective=objective
        )
        answer(args, lambda: public(chronicle.experiment(experiment_id)), experiment_id, out)
    return EXIT_OK


def cmd_add_variation(args: argparse.Namespace, out: TextIO) -> int:
    with open_client(args) as chronicle:
        number = chronicle.add_variation(args.experiment, args.config)
    record = {"experiment_id": args.experiment, "variation": number, "config": args.config}
    answer(args, lambda: record, str(number), out)
    return EXIT_OK


def cmd_variations(args: argparse.Namespace, out: TextIO) -> int:
    with open_client(args) as chronicle:
        configs = chronicle.variations(args.experiment)
    if args.json:
        print_json([{"variation": n, "config": c} for n, c in enumerate(configs)], out)
    elif not configs:
        print("no variations", file=sys.stderr)
    else:
        out.write(
            table(
                ["VARIATION", "CONFIG"],
                [[n, json.dumps(c, sort_keys=True)] for n, c in enumerate(configs)],
            )
            + "\n"
        )
    return EXIT_OK


def cmd_experiments(args: argparse.Namespace, out: TextIO) -> int:
    with open_client(args) as chronicle:
        experiments = chronicle.experiments()
    if args.json:
        print_json([public(e) for e in experiments], out)
    elif not experiments:
        print("no experiments", file=sys.stderr)
    else:
        out.write(
            table(
                ["EXPERIMENT", "NAME", "VARIATIONS", "CREATED"],
                [
                    [e.experiment_id, e.name, e.variations, format_time(e.created_at)]
                    for e in experiments
                ],
            )
            + "\n"
        )
    return EXIT_OK


def _reason(info: Any) -> str:
    if not info.reason:
        return ""
    detail = one_line(info.message, 50)
    return f"{info.reason} ({detail})" if detail else str(info.reason)


RUN_HEADERS = ["RUN", "STATE", "STARTED", "LAST HEARTBEAT", "PROGRESS", "ENDED", "ASSETS", "REASON"]


def _run_row(r: Any, now: float) -> list[Any]:
    return [
        r.key,
        r.state.value + (" (stalled)" if r.stalled else ""),
        format_time(r.started_at),
        format_ago(r.last_heartbeat_at, now),
        progress_text(r.progress),
        format_time(r.ended_at),
        r.asset_count,
        _reason(r),
    ]


def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    """List runs. The whole listing (at most ``--limit`` runs) is fetched and printed a page
    at a time, so memory stays bounded and the first rows appear at once; ``--json`` is
    still one JSON array. ``--page`` / ``--cursor`` print a single page with its
    ``next_cursor``, for agents that keep their place between calls. ``--sort M``: best
    first by ``M``, sorted by the store (the same pages), with ``M``'s column."""
    with open_client(args) as chronicle:
        if args.experiment:  # an unknown experiment is "not found", not an empty listing
            chronicle.experiment(args.experiment)
        sort = getattr(args, "sort", None)
        order: dict[str, Any] = {}
        if sort:
            order = {"sort": sort, "mode": sort_mode(chronicle, args.experiment, sort, args.mode)}
        if args.page or args.cursor is not None:
            page = chronicle.runs_page(
                args.experiment, args.state, limit=args.limit, cursor=args.cursor, **order
            )
            if args.json:
                body = {"runs": [public(r) for r in page.items], "next_cursor": page.next_cursor}
                print_json(body, out)
                return EXIT_OK
            _write_runs(iter([page.items]), out, **order)
            if page.next_cursor is not None:
                print(f"more: pass --cursor {page.next_cursor}", file=sys.stderr)
            return EXIT_OK
        size = min(args.limit, MAX_PAGE_SIZE) if args.limit else None
        runs = itertools.islice(
            chronicle.iter_runs(args.experiment, args.state, page_size=size, **order), args.limit
        )
        chunks = iter(lambda: list(itertools.islice(runs, size or DEFAULT_PAGE_SIZE)), [])
        if args.json:
            stream_json_list(([public(r) for r in chunk] for chunk in chunks), out)
        else:
            _write_runs(chunks, out, **order)
    return EXIT_OK


def _write_runs(
    chunks: Iterator[list[Any]], out: TextIO, sort: str | None = None, mode: str = "min"
) -> None:
    """The runs table, one part per chunk as it arrives (columns widen as needed); with
    ``sort``, a last column of the value the sort used."""
    widths: list[int] = []
    headers = list(RUN_HEADERS)
    cell = None
    if sort:
        header, cell = metric_column(sort, mode)
        headers.append(header)
    for chunk in chunks:
        if chunk:
            now = time.time()
            rows = [[*_run_row(r, now), *([cell(r)] if cell else [])] for r in chunk]
            out.write(table(headers, rows, widths=widths, header=not widths) + "\n")
            out.flush()
    if not widths:
        print("no runs", file=sys.stderr)


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    with open_client(args) as chronicle:
        run = chronicle.run(*args.run)
        info = run.info()
        config = run.get_variation_config()
    if args.json:
        print_json({**public(info), "config": config}, out)
        return EXIT_OK
    now = time.time()
    state = info.state.value + (" (terminal)" if info.state.is_terminal else "")
    if info.stalled:
        state += " - STALLED: heartbeats arrive but progress has not advanced"
    fields = [
        ("run", info.key),
        ("experiment", info.experiment_id),
        ("variation", str(info.variation)),
        ("config", json.dumps(config, sort_keys=True)),
        ("state", state),
        ("created", format_iso(info.created_at, now)),
        ("started", format_iso(info.started_at, now)),
        ("last heartbeat", format_iso(info.last_heartbeat_at, now)),
        ("progress", progress_text(info.progress)),
        ("progress advanced", format_iso(info.progress_at, now)),
        ("ended", format_iso(info.ended_at, now)),
        ("reason", info.reason or "-"),
        ("lease holder", info.lease_holder or "-"),
        ("assets", str(info.asset_count)),
    ]
    for name, summary in sorted((info.metrics or {}).items()):
        fields.append(
            (
                f"metric {name}",
                f"last {format_value(summary.get('last'))} (step {summary.get('last_step')}), "
                f"min {format_value(summary.get('min'))}, max {format_value(summary.get('max'))}",
            )
        )
    width = max(len(k) for k, _ in fields) + 2
    for key, value in fields:
        out.write(f"{key + ':':<{width}}{printable(value)}\n")
    if info.message:
        out.write("message:\n")
        for line in info.message.splitlines():
            out.write(f"  {printable(line)}\n")
    else:
        out.write(f"{'message:':<{width}}-\n")
    return EXIT_OK


def _event_text(event: Any) -> str:
    if event.kind == "asset":
        detail = event.detail or {}
        sha = str(detail.get("sha256") or "")[:12]
        size = detail.get("size")
        extra = ", ".join(x for x in (format_size(size) if size is not None else "", sha) if x)
        return f"asset {detail.get('name', '?')}" + (f" ({extra})" if extra else "")
    if event.kind == "teardown":  # the worker's supervisor acted; the state did not change
        detail = event.detail or {}
        return f"teardown {detail.get('signal', '')} {detail.get('target', '')}".strip()
    if event.kind == "worker":  # a managed worker named itself for its executor
        detail = event.detail or {}
        name = detail.get("job_id") or detail.get("pid") or ""
        return f"worker {detail.get('kind', '')} {name}".strip()
    src = event.from_state or ""
    return f"{src} -> {event.to_state}".strip()


def _event_cause(event: Any) -> str:
    if event.kind == "asset" or not event.detail:
        return str(event.cause)
    extra = ", ".join(f"{k}={v}" for k, v in sorted(event.detail.items()))
    return f"{event.cause} ({extra})"


def cmd_events(args: argparse.Namespace, out: TextIO) -> int:
    with open_client(args) as chronicle:
        events = chronicle.run(*args.run).events()
    if args.json:
        print_json([public(e) for e in events], out)
    else:
        out.write(
            table(
                ["AT", "EVENT", "CAUSE"],
                [[format_time(e.at), _event_text(e), _event_cause(e)] for e in events],
            )
            + "\n"
        )
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, out: TextIO) -> int:
    with open_client(args) as chronicle:
        run = chronicle.run(*args.run)
        try:
            run.fail(reason="abandoned", message=args.message)
        except InvalidTransition as exc:
            state = exc.state or "terminal"
            raise InvalidTransition(
                f"cannot cancel run {run.key}: it is already {state}; terminal states never change",
                **exc.details,
            ) from exc
        info = run.info()
    if args.json:
        print_json(public(info), out)
    else:
        out.write(f"{info.key}: {info.state.value}\n")
    return EXIT_OK


def cmd_rerun(args: argparse.Namespace, out: TextIO) -> int:
    with open_client(args) as chronicle:
        run = chronicle.create_run(args.experiment, args.variation)
        answer(args, lambda: public(run.info()), run.key, out)
    return EXIT_OK
