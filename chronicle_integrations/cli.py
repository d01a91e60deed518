"""The ``chronicle`` command: run the reference server, inspect and steer runs.

Usage::

    chronicle [--url URL] [--api-key KEY] [--home DIR] [--timeout S] [-v] COMMAND ...

    chronicle server [--host 127.0.0.1] [--port 8765] [--store URL] [--assets URL] ...
    chronicle create NAME [--variation JSON]... [--variations-file F]   # prints its id
    chronicle add-variation E JSON                # prints the new variation's number
    chronicle variations E                        # every variation with its config
    chronicle experiments                         # every experiment
    chronicle runs [--experiment E] [--state S]   # runs, filtered [--limit N]
    chronicle runs --page [--cursor C] --json     # one page and its next_cursor
    chronicle show E/V/R                          # one run, every field
    chronicle events E/V/R                        # its timeline
    chronicle cancel E/V/R [--message M]          # fail(reason="abandoned")
    chronicle rerun E V                           # the next run of a variation
    chronicle assets E/V/R                        # its assets
    chronicle wait E/V/R [--timeout S] [--state S]   # until terminal (exit code: which)
    chronicle download E/V/R NAME [DEST]          # an asset or a directory, SHA-256 verified
    chronicle sync                                # replay what the spool holds

Every listing and ``show`` take ``--json`` (the models' ``to_dict()``, lists as JSON arrays;
the lease token is never printed) for agents; people get aligned tables. With ``--json``, an
error is one JSON object on stderr, ``{"error": {"code": ..., "message": ...}}`` (the API's
stable code, see :data:`ERROR_CODES` for the others), with the same exit code. A JSON argument
(a variation config) may be given as ``@FILE`` (``@-``: stdin).

The client is chosen like :class:`~chronicle_integrations.Chronicle` chooses it: ``--url`` /
``$CHRONICLE_URL`` selects a server, otherwise the embedded store in ``--home`` /
``$CHRONICLE_HOME`` / ``./chronicle``. With the embedded store, a home directory that does not
exist is an error (exit 2) rather than a new empty store in the wrong place; ``sync`` just has
nothing to send. The client options (``--url``, ``--api-key``, ``--home``, ``--timeout``,
``-v``) are also accepted after the command, except for ``server``, which has its own.

Exit codes:

    0  success
    1  other errors: server unreachable, unexpected API errors, ``sync`` incomplete
    2  usage or configuration error (bad arguments, ConfigurationError, InvalidRequest)
    3  not found (unknown experiment, variation, run or asset)
    4  invalid transition or lease conflict (e.g. cancelling a run that already succeeded)
    5  unauthorized (missing or wrong API key)

``chronicle wait`` has its own exit codes (:data:`WAIT_CODES_HELP`): 0 when the run reached
the awaited state (default ``succeeded``), 10-12 for ``failed_crash`` / ``failed_abandoned`` /
``failed_lost``, 13 when it succeeded but another state was awaited, 14 on timeout.

Errors print one line, ``chronicle: error: <message>``, on stderr; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import itertools
import json
import logging
import os
import re
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ._errors import (
    APIError,
    ChronicleError,
    ConfigurationError,
    InvalidRequest,
    InvalidTransition,
    LeaseConflict,
    NotFound,
    TransportError,
    Unauthorized,
    UploadError,
)
from ._validation import DEFAULT_PAGE_SIZE, EXPERIMENT_ID_RE, MAX_NUMBER, MAX_PAGE_SIZE
from .lifecycle import RunState

if TYPE_CHECKING:
    from .client import Chronicle

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNAUTHORIZED = 5

#: ``chronicle wait``: the run ended in a state other than the awaited one.
EXIT_FAILED_CRASH = 10
EXIT_FAILED_ABANDONED = 11
EXIT_FAILED_LOST = 12
EXIT_ENDED_OTHERWISE = 13
EXIT_WAIT_TIMEOUT = 14

WAIT_EXIT_CODES = {
    RunState.FAILED_CRASH: EXIT_FAILED_CRASH,
    RunState.FAILED_ABANDONED: EXIT_FAILED_ABANDONED,
    RunState.FAILED_LOST: EXIT_FAILED_LOST,
    RunState.SUCCEEDED: EXIT_ENDED_OTHERWISE,
}

WAIT_CODES_HELP = """\
wait exit codes:
  0   the run is in the awaited state (default: succeeded)
  10  it ended failed_crash
  11  it ended failed_abandoned (cancelled)
  12  it ended failed_lost
  13  it succeeded, but --state awaited another state
  14  timeout: --timeout S passed first (the run goes on)
  1-5 as for every command (e.g. 3: no such run)
"""

#: ``--json`` error codes of errors that are not the API's (those carry their own ``code``).
ERROR_CODES: dict[type[BaseException], str] = {
    ConfigurationError: "configuration_error",
    TransportError: "unreachable",
    UploadError: "upload_failed",
    OSError: "os_error",
}

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  other errors (server unreachable, unexpected API errors, sync incomplete)
  2  usage or configuration error (bad arguments, invalid request)
  3  not found (experiment, variation, run or asset)
  4  invalid transition or lease conflict
  5  unauthorized (missing or wrong API key)

environment: CHRONICLE_URL, CHRONICLE_API_KEY, CHRONICLE_HOME (defaults of the global options)
"""

RUN_EXAMPLE = "lr-sweep-1a2b/0/3"

#: Downloads larger than this get a progress bar (when stderr is a terminal).
PROGRESS_MIN_BYTES = 8 * 2**20

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- argument types
def run_id(text: str) -> tuple[str, int, int]:
    """Parse ``EXPERIMENT/VARIATION/RUN`` strictly (argparse ``type=``)."""
    parts = text.split("/")
    if (
        len(parts) != 3
        or not EXPERIMENT_ID_RE.fullmatch(parts[0])
        or not all(re.fullmatch(r"[0-9]+", p) for p in parts[1:])
        or not all(int(p) <= MAX_NUMBER for p in parts[1:])
    ):
        raise argparse.ArgumentTypeError(
            f"invalid run {text!r}: expected EXPERIMENT/VARIATION/RUN, e.g. {RUN_EXAMPLE}"
        )
    return parts[0], int(parts[1]), int(parts[2])


def experiment_arg(text: str) -> str:
    if not EXPERIMENT_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid experiment id {text!r}: 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return text


def variation_arg(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) > MAX_NUMBER:
        raise argparse.ArgumentTypeError(
            f"invalid variation {text!r}: expected an integer from 0 to {MAX_NUMBER}"
        )
    return int(text)


def state_arg(text: str) -> RunState:
    try:
        return RunState(text.strip().lower())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid state {text!r}: choose from {', '.join(s.value for s in RunState)}"
        ) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,20}", text):
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes >= 0, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 0-65535")
    return int(text)


# ---------------------------------------------------------------------- formatting
def format_time(ts: float | None) -> str:
    """Local wall-clock time for tables: ``2026-11-27 14:05:25``."""
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def format_iso(ts: float | None, now: float | None = None) -> str:
    """Local ISO time with offset and the relative age: ``2026-...T14:05:25+01:00 (3m ago)``."""
    if ts is None:
        return "-"
    iso = _dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
    return f"{iso} ({format_ago(ts, now)})"


def format_ago(ts: float | None, now: float | None = None) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago`` (``in 4s`` for a clock ahead of ours)."""
    if ts is None:
        return "-"
    delta = (time.time() if now is None else now) - ts
    ahead = delta < 0
    delta = abs(delta)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            amount = f"{int(delta // size)}{unit}"
            break
    else:
        amount = f"{int(delta)}s"
    return f"in {amount}" if ahead else f"{amount} ago"


def format_size(size: int | float) -> str:
    """Binary units: ``512 B``, ``1.5 KiB``, ``12.0 MiB``."""
    value = float(size)
    if value < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def printable(text: object) -> str:
    """``text`` safe to show on a terminal: every character Python does not call printable
    (C0 and C1 controls, ESC, DEL, bidi overrides, zero-width and other format characters,
    line separators, unusual spaces) is shown as its escape (``\\x1b``, ``\\u202e``), so a
    failure message cannot drive the operator's terminal and invisible characters cannot make
    two different asset names look alike. Every human output path goes through here;
    ``--json`` does not (JSON escapes them itself)."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in value)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _one_line(text: str | None, limit: int = 60) -> str:
    if not text:
        return ""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    widths: list[int] | None = None,
    header: bool = True,
) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded.

    A table printed in parts (a listing streamed page by page) passes the same ``widths``
    list to every part: columns are at least as wide as before and the list is widened in
    place; the parts after the first leave out the ``header``.
    """
    cells = [[printable(c) for c in headers]] + [[printable(c) for c in row] for row in rows]
    widths = widths if widths is not None else []
    widths[:] = [
        max([len(row[i]) for row in cells] + widths[i : i + 1]) for i in range(len(headers))
    ]
    lines = []
    for row in cells if header else cells[1:]:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _public(record: Any) -> dict[str, Any]:
    """A model as JSON-ready dict, minus the lease token (a secret of the worker)."""
    data: dict[str, Any] = record.to_dict()
    data.pop("lease", None)
    return data


def _print_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2) + "\n")


class ProgressBar:
    """A minimal progress bar on a terminal stream (no tqdm dependency).

    ``bar(done, total)`` redraws at most ~10 times a second; ``close()`` ends the line.
    """

    def __init__(self, label: str, stream: TextIO, width: int = 30) -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        fraction = min(1.0, done / total) if total > 0 else 1.0
        filled = int(fraction * self.width)
        rate = done / max(now - self.started, 1e-6)
        self.stream.write(
            f"\r{self.label}  [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{fraction * 100:5.1f}%  {format_size(done)} / {format_size(total)}  "
            f"{format_size(rate)}/s "
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------- the client
def _open(args: argparse.Namespace, create: bool = False) -> Chronicle:
    """The :class:`Chronicle` the global options select (``create``: a missing embedded
    store is made, for ``chronicle create``)."""
    from .client import Chronicle

    if not args.url:
        home = Path(args.home or "chronicle").resolve()
        if create and not home.exists():
            home.mkdir(parents=True)
            log.warning("created a new embedded Chronicle store in %s", home)
        if not home.is_dir():
            raise ConfigurationError(
                f"no Chronicle store at {home}: pass --home DIR or set CHRONICLE_HOME "
                "(or --url / CHRONICLE_URL for a server)"
            )
    return Chronicle(url=args.url, api_key=args.api_key, home=args.home, timeout=args.timeout)


# ---------------------------------------------------------------------- commands
def cmd_exec(args: argparse.Namespace, out: TextIO) -> int:
    """Supervise a command as the run's worker; exit with its code (128 + N for signal N)."""
    from .supervisor import Supervisor

    command = args.exec_command
    if not command:
        raise ConfigurationError(
            "usage: chronicle exec E/V/R -- CMD [ARG ...] (the `--` is needed)"
        )
    if (args.run is None) == (args.experiment is None):
        raise ConfigurationError("name the run as E/V/R, or give --experiment E [--variation V]")
    with _open(args) as chronicle:
        if args.run is not None:
            run = chronicle.run(*args.run)
        else:
            run = chronicle.create_run(args.experiment, args.variation)
        run.start(resume=args.resume)
        print(f"chronicle exec: {run.key}", file=sys.stderr)
        outcome = Supervisor(
            chronicle,
            run,
            command,
            grace=args.grace,
            heartbeat_interval=args.heartbeat_interval,
        ).execute()
        for note in outcome.notes:
            print(f"chronicle exec: {note}", file=sys.stderr)
        if outcome.recorded:
            print(f"chronicle exec: run {run.key} {outcome.recorded}", file=sys.stderr)
    return outcome.exit_code


def cmd_server(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from .server import serve
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the server needs extra packages ({exc.name} is missing): "
            "pip install 'chronicle-integrations[server]'"
        ) from exc
    kwargs: dict[str, Any] = {"host": args.host, "port": args.port}
    for key, value in (
        ("store_url", args.store),
        ("assets", args.assets),
        ("api_key", args.server_api_key or args.api_key),
        ("heartbeat_timeout", args.heartbeat_timeout),
        ("lost_grace", args.lost_grace),
        ("stall_timeout", args.stall_timeout),
        ("upload_idle_timeout", args.upload_idle_timeout),
        ("upload_min_rate", args.upload_min_rate),
        ("upload_expiry", args.upload_expiry),
        ("max_asset_bytes", args.max_asset_bytes),
        ("home", args.server_home or args.home),
        ("log_level", args.log_level or ("debug" if args.verbose else None)),
    ):
        if value is not None:
            kwargs[key] = value
    serve(**kwargs)
    return EXIT_OK


def cmd_experiments(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as chronicle:
        experiments = chronicle.experiments()
    if args.json:
        _print_json([_public(e) for e in experiments], out)
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
    detail = _one_line(info.message, 50)
    return f"{info.reason} ({detail})" if detail else str(info.reason)


RUN_HEADERS = ["RUN", "STATE", "STARTED", "LAST HEARTBEAT", "PROGRESS", "ENDED", "ASSETS", "REASON"]


def _run_row(r: Any, now: float) -> list[Any]:
    return [
        r.key,
        r.state.value + (" (stalled)" if r.stalled else ""),
        format_time(r.started_at),
        format_ago(r.last_heartbeat_at, now),
        _progress(r.progress),
        format_time(r.ended_at),
        r.asset_count,
        _reason(r),
    ]


def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    """List runs. The whole listing (at most ``--limit`` runs) is fetched and printed a page
    at a time, so memory stays bounded and the first rows appear at once; ``--json`` is
    still one JSON array. ``--page`` / ``--cursor`` print a single page with its
    ``next_cursor``, for agents that keep their place between calls."""
    with _open(args) as chronicle:
        if args.experiment:  # an unknown experiment is "not found", not an empty listing
            chronicle.experiment(args.experiment)
        if args.page or args.cursor is not None:
            page = chronicle.runs_page(
                args.experiment, args.state, limit=args.limit, cursor=args.cursor
            )
            if args.json:
                body = {"runs": [_public(r) for r in page.items], "next_cursor": page.next_cursor}
                _print_json(body, out)
                return EXIT_OK
            _write_runs(iter([page.items]), out)
            if page.next_cursor is not None:
                print(f"more: pass --cursor {page.next_cursor}", file=sys.stderr)
            return EXIT_OK
        size = min(args.limit, MAX_PAGE_SIZE) if args.limit else None
        runs = itertools.islice(
            chronicle.iter_runs(args.experiment, args.state, page_size=size), args.limit
        )
        chunks = iter(lambda: list(itertools.islice(runs, size or DEFAULT_PAGE_SIZE)), [])
        if args.json:
            _stream_json_list(([_public(r) for r in chunk] for chunk in chunks), out)
        else:
            _write_runs(chunks, out)
    return EXIT_OK


def _write_runs(chunks: Iterator[list[Any]], out: TextIO) -> None:
    """The runs table, one part per chunk as it arrives (columns widen as needed)."""
    widths: list[int] = []
    for chunk in chunks:
        if chunk:
            rows = [_run_row(r, time.time()) for r in chunk]
            out.write(table(RUN_HEADERS, rows, widths=widths, header=not widths) + "\n")
            out.flush()
    if not widths:
        print("no runs", file=sys.stderr)


def _stream_json_list(chunks: Iterator[list[Any]], out: TextIO) -> None:
    """One JSON array (as :func:`_print_json` writes it), written a chunk at a time."""
    first = True
    for chunk in chunks:
        for item in chunk:
            text = textwrap.indent(json.dumps(item, indent=2), "  ")
            out.write(("[\n" if first else ",\n") + text)
            first = False
        out.flush()
    out.write("[]\n" if first else "\n]\n")


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as chronicle:
        run = chronicle.run(*args.run)
        info = run.info()
        config = run.get_variation_config()
    if args.json:
        _print_json({**_public(info), "config": config}, out)
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
        ("progress", _progress(info.progress)),
        ("progress advanced", format_iso(info.progress_at, now)),
        ("ended", format_iso(info.ended_at, now)),
        ("reason", info.reason or "-"),
        ("lease holder", info.lease_holder or "-"),
        ("assets", str(info.asset_count)),
    ]
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


def _progress(progress: dict[str, Any] | None) -> str:
    """``step=120 epoch=3`` (or ``-``)."""
    if not progress:
        return "-"
    return " ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in progress.items()
    )


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
    src = event.from_state or ""
    return f"{src} -> {event.to_state}".strip()


def _event_cause(event: Any) -> str:
    if event.kind == "asset" or not event.detail:
        return str(event.cause)
    extra = ", ".join(f"{k}={v}" for k, v in sorted(event.detail.items()))
    return f"{event.cause} ({extra})"


def cmd_events(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as chronicle:
        events = chronicle.run(*args.run).events()
    if args.json:
        _print_json([_public(e) for e in events], out)
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
    with _open(args) as chronicle:
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
        _print_json(_public(info), out)
    else:
        out.write(f"{info.key}: {info.state.value}\n")
    return EXIT_OK


def _answer(args: argparse.Namespace, record: Callable[[], Any], line: str, out: TextIO) -> None:
    """What a command made: with ``--json`` the JSON of ``record()`` (read only then), else
    ``line`` (an id or number, for shell scripts)."""
    if args.json:
        _print_json(record(), out)
    else:
        out.write(f"{line}\n")


def cmd_rerun(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as chronicle:
        run = chronicle.create_run(args.experiment, args.variation)
        _answer(args, lambda: _public(run.info()), run.key, out)
    return EXIT_OK


def cmd_assets(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as chronicle:
        assets = chronicle.run(*args.run).assets()
    if args.json:
        _print_json([_public(a) for a in assets], out)
    elif not assets:
        print("no assets", file=sys.stderr)
    else:
        out.write(
            table(
                ["NAME", "SIZE", "SHA256", "CREATED"],
                [
                    [a.name, format_size(a.size), a.sha256[:12], format_time(a.created_at)]
                    for a in assets
                ],
            )
            + "\n"
        )
    return EXIT_OK


def cmd_download(args: argparse.Namespace, out: TextIO) -> int:
    """One asset, or every asset under ``NAME/`` (a directory) when NAME is not an asset."""
    dest = Path(args.dest)
    if args.dest.endswith(("/", os.sep)) and not dest.exists():
        dest.mkdir(parents=True)
    bar: ProgressBar | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            if total <= PROGRESS_MIN_BYTES or not sys.stderr.isatty():
                return
            bar = ProgressBar(printable(args.name), sys.stderr)
        bar(done, total)

    with _open(args) as chronicle:
        run = chronicle.run(*args.run)
        assets = {a.name: a for a in run.assets()}
        try:
            if args.name in assets:
                written = {args.name: run.download_asset(args.name, dest, progress=progress)}
            else:
                written = run.download_directory(args.name, dest, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    _print_written(written, assets, args.json, out)
    return EXIT_OK


def _print_written(
    written: dict[str, Path], assets: dict[str, Any], as_json: bool, out: TextIO
) -> None:
    """What a download wrote: one path a line, or (``--json``) ``[{"name", "path", "size",
    "sha256"}, ...]`` (the SHA-256 each file was verified against)."""
    files = [
        {
            "name": name,
            "path": str(Path(path).resolve()),
            "size": assets[name].size,
            "sha256": assets[name].sha256,
        }
        for name, path in written.items()
    ]
    if as_json:
        _print_json(files, out)
    else:
        out.write("".join(f"{printable(f['path'])}\n" for f in files))


def _json_config(text: str) -> Any:
    """A JSON argument, or ``@FILE`` (``@-``: stdin) holding it (argparse ``type=``)."""
    source = "argument"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {source}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON in {source}: {exc}") from None


def _config_arg(text: str) -> dict[str, Any]:
    """A variation config: a JSON object (``_json_config``)."""
    value = _json_config(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"a variation config must be a JSON object, got {type(value).__name__}"
        )
    return value


def _configs_file(text: str) -> list[dict[str, Any]]:
    """A file (``-``: stdin) holding a JSON array of variation configs."""
    value = _json_config("@" + text)
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise argparse.ArgumentTypeError(
            f"{text} must hold a JSON array of objects (one config per variation)"
        )
    return value


class _ExtendInOrder(argparse.Action):
    """``--variation`` and ``--variations-file`` fill one list in command-line order (the
    order numbers the variations)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.extend(values if isinstance(values, list) else [values])
        setattr(namespace, self.dest, items)


def cmd_create(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args, create=True) as chronicle:
        experiment_id = chronicle.create_experiment(
            args.name, args.variations or [], experiment_id=args.experiment_id
        )
        _answer(args, lambda: _public(chronicle.experiment(experiment_id)), experiment_id, out)
    return EXIT_OK


def cmd_add_variation(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as chronicle:
        number = chronicle.add_variation(args.experiment, args.config)
    record = {"experiment_id": args.experiment, "variation": number, "config": args.config}
    _answer(args, lambda: record, str(number), out)
    return EXIT_OK


def cmd_variations(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args) as chronicle:
        configs = chronicle.variations(args.experiment)
    if args.json:
        _print_json([{"variation": n, "config": c} for n, c in enumerate(configs)], out)
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


def wait_exit_code(state: RunState, awaited: RunState | None, timed_out: bool) -> int:
    """The exit code of ``chronicle wait`` (see :data:`WAIT_CODES_HELP`)."""
    if state is (awaited or RunState.SUCCEEDED):
        return EXIT_OK
    if timed_out or not state.is_terminal:
        return EXIT_WAIT_TIMEOUT
    return WAIT_EXIT_CODES[state]


def cmd_wait(args: argparse.Namespace, out: TextIO) -> int:
    """Poll the run until it is terminal or in ``--state``; state changes go to stderr."""
    deadline = None if args.wait_timeout is None else time.monotonic() + args.wait_timeout
    last: tuple[RunState, str] | None = None
    timed_out = False
    with _open(args) as chronicle:
        run = chronicle.run(*args.run)
        while True:
            info = run.info()
            shown = (info.state, _progress(info.progress))
            if shown != last and not args.json:
                detail = f" ({shown[1]})" if info.progress else ""
                print(
                    f"{format_time(time.time())}  {info.key}: {info.state.value}{detail}",
                    file=sys.stderr,
                    flush=True,
                )
            last = shown
            if info.state is args.state or info.state.is_terminal:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out = True
                break
            time.sleep(args.interval if deadline is None else min(args.interval, deadline - now))
    _answer(args, lambda: _public(info), f"{info.key}: {info.state.value}", out)
    return wait_exit_code(info.state, args.state, timed_out)


def cmd_sync(args: argparse.Namespace, out: TextIO) -> int:
    if not args.url and not Path(args.home or "chronicle").resolve().is_dir():
        from ._spool import SyncReport

        report = SyncReport()  # no home, hence no spool: nothing to send
    else:
        with _open(args) as chronicle:
            report = chronicle.sync()
    if args.json:
        _print_json(report.to_dict(), out)
    else:
        out.write(
            f"sent {len(report.sent)}, waiting {len(report.waiting)}, "
            f"refused {len(report.refused)}\n"
        )
        for word, items in (
            ("sent", report.sent),
            ("waiting", report.waiting),
            ("refused", report.refused),
        ):
            for item in items:
                out.write(f"  {word}: {printable(item)}\n")
    return EXIT_ERROR if report.waiting or report.refused else EXIT_OK


# ---------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    """The ``chronicle`` argument parser."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="chronicle",
        description="Chronicle: track ML training runs through a strict lifecycle.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--url",
        default=os.environ.get("CHRONICLE_URL") or None,
        help="server URL (default $CHRONICLE_URL; else the embedded store)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CHRONICLE_API_KEY") or None,
        help="API key (default $CHRONICLE_API_KEY)",
    )
    parser.add_argument(
        "--home",
        default=os.environ.get("CHRONICLE_HOME") or None,
        help="client home: embedded store, spool (default $CHRONICLE_HOME, else ./chronicle)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="retry budget of each request to a server, in seconds (default 60)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log INFO (-vv: DEBUG) to stderr; show tracebacks",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # The client options are also accepted after the command (`chronicle runs --url U`), as
    # agents tend to write them; SUPPRESS keeps the values given before it otherwise.
    client_flags: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--url",), {"help": "server URL"}),
        (("--api-key",), {"help": "API key"}),
        (("--home",), {"help": "client home"}),
        (
            ("--timeout",),
            {
                "type": _positive_float,
                "metavar": "S",
                "help": "retry budget of each request, in seconds",
            },
        ),
        (("-v", "--verbose"), {"action": "count", "help": "more logging; tracebacks"}),
    ]

    def client_options(without: str = "") -> argparse.ArgumentParser:
        options = argparse.ArgumentParser(add_help=False)
        group = options.add_argument_group("client options (also accepted before COMMAND)")
        for flags, kwargs in client_flags:
            if without not in flags:
                group.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)
        return options

    def add(
        name: str,
        func: Callable[[argparse.Namespace, TextIO], int],
        help: str,
        json_flag: bool = True,
        epilog: str = "",
    ) -> argparse.ArgumentParser:
        # `wait --timeout S` is how long to wait: there the retry budget goes before COMMAND.
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=epilog + EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[]
            if name == "server"
            else [client_options("--timeout" if name == "wait" else "")],
        )
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable JSON output")
        return p

    run_help = f"the run, as EXPERIMENT/VARIATION/RUN (e.g. {RUN_EXAMPLE})"

    p = add("server", cmd_server, "run the reference Chronicle server", json_flag=False)
    p.add_argument(
        "--store", metavar="URL", help="SQLAlchemy store URL (default SQLite in the home)"
    )
    p.add_argument(
        "--assets",
        metavar="URL",
        help="asset storage: a directory or s3://bucket/prefix (default a directory in the home)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="listen address (default 127.0.0.1; anything beyond loopback needs an API key)",
    )
    p.add_argument("--port", type=_port, default=8765, help="listen port (default 8765)")
    p.add_argument(
        "--api-key",
        dest="server_api_key",
        metavar="KEY",
        help="API key clients must send (default $CHRONICLE_API_KEY)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=_positive_float,
        metavar="S",
        help="seconds without a heartbeat before a run is lost (default 900)",
    )
    p.add_argument(
        "--lost-grace",
        type=_positive_float,
        metavar="S",
        help="seconds a run may stay lost before it fails (default 172800)",
    )
    p.add_argument(
        "--stall-timeout",
        type=_positive_float,
        metavar="S",
        help="flag a running run stalled when its heartbeats' progress has not "
        "advanced for S seconds (default 1800)",
    )
    p.add_argument(
        "--upload-idle-timeout",
        type=_positive_float,
        metavar="S",
        help="abandon an upload chunk whose body sends nothing for S seconds (408; the "
        "bytes received are kept for the resume) (default 30)",
    )
    p.add_argument(
        "--upload-min-rate",
        type=_non_negative_float,
        metavar="B",
        help="abandon an upload chunk whose body sends fewer than B bytes per second over "
        "a window of the idle timeout (default 1024; 0 disables)",
    )
    p.add_argument(
        "--upload-expiry",
        type=_positive_float,
        metavar="S",
        help="drop an unfinished upload, and its bytes, after S seconds without a chunk "
        "(default 86400)",
    )
    p.add_argument(
        "--max-asset-bytes",
        type=_non_negative_int,
        metavar="N",
        help="largest asset accepted, declared or not (413 beyond; default 1 TiB)",
    )
    p.add_argument(
        "--home",
        dest="server_home",
        metavar="DIR",
        help="server home for the default store and assets (default $CHRONICLE_HOME)",
    )
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="server log level (default info)",
    )

    p = add(
        "exec",
        cmd_exec,
        "run a command as a Chronicle-managed worker: chronicle exec E/V/R -- CMD ...",
        json_flag=False,
    )
    p.add_argument(
        "run", type=run_id, metavar="E/V/R", nargs="?", help=run_help + " (or --experiment)"
    )
    p.add_argument(
        "--experiment", "-e", type=experiment_arg, metavar="E", help="create a run of E ..."
    )
    p.add_argument(
        "--variation", type=variation_arg, metavar="V", default=0, help="... variation V"
    )
    p.add_argument(
        "--resume", action="store_true", help="take over a running or lost run (a restart)"
    )
    p.add_argument(
        "--grace",
        type=_positive_float,
        metavar="S",
        default=30.0,
        help="seconds between SIGTERM and SIGKILL when the worker is torn down (default 30)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        metavar="S",
        default=60.0,
        help="longest interval between the supervisor's own heartbeats (default 60; "
        "always within a third of the store's heartbeat timeout)",
    )

    p = add("create", cmd_create, "create an experiment with variations; prints its id")
    p.add_argument("name", metavar="NAME", help="the experiment's name")
    p.add_argument(
        "--experiment-id",
        type=experiment_arg,
        metavar="E",
        help="its id (default: derived from NAME with a random suffix); repeating the same "
        "create with the same id is a no-op",
    )
    p.add_argument(
        "--variation",
        dest="variations",
        action=_ExtendInOrder,
        type=_config_arg,
        metavar="JSON",
        help="a variation's config, a JSON object or @FILE (repeatable; numbered 0, 1, ... in "
        "command-line order)",
    )
    p.add_argument(
        "--variations-file",
        dest="variations",
        action=_ExtendInOrder,
        type=_configs_file,
        metavar="FILE",
        help="a JSON array of variation configs (- for stdin)",
    )

    p = add("add-variation", cmd_add_variation, "add a variation; prints its number")
    p.add_argument("experiment", type=experiment_arg, metavar="E", help="experiment id")
    p.add_argument(
        "config", type=_config_arg, metavar="JSON", help="its config: a JSON object or @FILE"
    )

    p = add("variations", cmd_variations, "list an experiment's variations with their configs")
    p.add_argument("experiment", type=experiment_arg, metavar="E", help="experiment id")

    add("experiments", cmd_experiments, "list experiments")

    p = add(
        "runs",
        cmd_runs,
        "list runs (fetched and printed a page at a time; --page/--cursor for one page)",
    )
    p.add_argument(
        "--limit",
        "-n",
        type=_positive_int,
        metavar="N",
        help="at most N runs; with --page/--cursor, the page size "
        f"(default {DEFAULT_PAGE_SIZE}, at most {MAX_PAGE_SIZE})",
    )
    p.add_argument(
        "--page",
        action="store_true",
        help='print one page; with --json an object {"runs": [...], "next_cursor": C} '
        "(null on the last page)",
    )
    p.add_argument(
        "--cursor",
        metavar="C",
        help="print the page after C, the next_cursor of the previous page (implies --page)",
    )
    p.add_argument(
        "--experiment", "-e", type=experiment_arg, metavar="E", help="only this experiment's runs"
    )
    p.add_argument(
        "--state",
        "-s",
        type=state_arg,
        metavar="S",
        help=f"only runs in this state ({', '.join(s.value for s in RunState)})",
    )

    p = add("show", cmd_show, "show every field of a run")
    p.add_argument("run", type=run_id, metavar="E/V/R", help=run_help)

    p = add("events", cmd_events, "show a run's timeline (transitions and uploads)")
    p.add_argument("run", type=run_id, metavar="E/V/R", help=run_help)

    p = add("cancel", cmd_cancel, "cancel a run: fail(reason='abandoned')")
    p.add_argument("run", type=run_id, metavar="E/V/R", help=run_help)
    p.add_argument("--message", "-m", help="why (recorded with the run)")

    p = add("rerun", cmd_rerun, "create the next run of a variation; prints E/V/R")
    p.add_argument("experiment", type=experiment_arg, metavar="E", help="experiment id")
    p.add_argument("variation", type=variation_arg, metavar="V", help="variation number")

    p = add(
        "wait",
        cmd_wait,
        "wait until a run is terminal (or in --state S); the exit code says how it ended",
        epilog=WAIT_CODES_HELP,
    )
    p.add_argument("run", type=run_id, metavar="E/V/R", help=run_help)
    p.add_argument(
        "--timeout",
        dest="wait_timeout",
        type=_positive_float,
        metavar="S",
        help="give up after S seconds (exit 14; default: wait for ever); the client's retry "
        "budget goes before the command: chronicle --timeout S wait ...",
    )
    p.add_argument(
        "--state",
        "-s",
        type=state_arg,
        metavar="S",
        help="wait for this state instead (e.g. running); a terminal state ends the wait too",
    )
    p.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds between polls (default 1)",
    )

    p = add("assets", cmd_assets, "list a run's assets")
    p.add_argument("run", type=run_id, metavar="E/V/R", help=run_help)

    p = add(
        "download",
        cmd_download,
        "download an asset, or a directory of assets (SHA-256 verified); prints the paths",
    )
    p.add_argument("run", type=run_id, metavar="E/V/R", help=run_help)
    p.add_argument(
        "name",
        metavar="NAME",
        help="the asset's name (see `chronicle assets`), or a directory: every asset under "
        "NAME/ (e.g. checkpoint-500), layout kept",
    )
    p.add_argument(
        "dest",
        metavar="DEST",
        nargs="?",
        default=".",
        help="a file path (a directory's path) or an existing directory to put it in (default .)",
    )

    add("sync", cmd_sync, "send what the spool holds (exit 1 if anything is left)")
    return parser


# ---------------------------------------------------------------------- entry point
def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, (ConfigurationError, InvalidRequest)):
        return EXIT_USAGE
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, (InvalidTransition, LeaseConflict)):
        return EXIT_CONFLICT
    if isinstance(exc, Unauthorized):
        return EXIT_UNAUTHORIZED
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "exec" in argv and "--" in argv[argv.index("exec") :]:
        # `chronicle exec E/V/R -- CMD ...`: everything after `--` is the command, verbatim.
        cut = argv.index("--", argv.index("exec"))
        argv, command = argv[:cut], argv[cut + 1 :]
    try:
        args = _parse(parser, argv)
        args.exec_command = command
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # The library never configures logging; the command line does, for its own process.
    level = (
        logging.WARNING
        if not args.verbose
        else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    )
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code: int = args.func(args, sys.stdout)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        _report(args, "interrupted", "interrupted")
        return 130
    except BrokenPipeError:
        # `chronicle runs | head`: the reader left; stop quietly (and let Python's final
        # flush of stdout go to /dev/null instead of raising again).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except (ChronicleError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        message = " ".join((str(exc) or type(exc).__name__).split("\n"))  # one line
        _report(args, message, _error_code(exc), exc)
        return _exit_code(exc)
    except Exception as exc:  # a bug: still one line unless -v
        if args.verbose:
            traceback.print_exc()
        _report(
            args,
            f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)",
            "unexpected",
        )
        return EXIT_ERROR


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``; with ``--json`` among the arguments, a usage error is reported
    as a JSON error (code ``usage``) instead of argparse's usage text."""
    if "--json" not in argv:
        return parser.parse_args(argv)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parser.parse_args(argv)
    except SystemExit as exc:
        text = captured.getvalue()
        if exc.code in (0, None):
            sys.stderr.write(text)
        else:
            last = text.strip().splitlines()[-1] if text.strip() else "invalid arguments"
            message = last.split(": error: ", 1)[-1]
            _print_json_error({"error": {"code": "usage", "message": message}})
        raise


def _error_code(exc: BaseException) -> str:
    """The ``code`` of an error under ``--json``: the API's, else one of :data:`ERROR_CODES`."""
    if isinstance(exc, APIError):
        return exc.code
    for cls, code in ERROR_CODES.items():
        if isinstance(exc, cls):
            return code
    return "error"


def _report(
    args: argparse.Namespace, message: str, code: str, exc: BaseException | None = None
) -> None:
    """An error on stderr: ``chronicle: error: MESSAGE``, or with ``--json`` one JSON object
    ``{"error": {"code", "message", ...details}}`` (the body the server sends)."""
    if not getattr(args, "json", False):
        print(f"chronicle: error: {printable(message)}", file=sys.stderr)
        return
    body = {"code": code, "message": message}
    if isinstance(exc, APIError):
        body.update(exc.details)
    _print_json_error({"error": body})


def _print_json_error(body: dict[str, Any]) -> None:
    sys.stderr.write(json.dumps(body, default=str) + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
