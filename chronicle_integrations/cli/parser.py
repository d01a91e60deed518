"""The ``chronicle`` argument parser and its argument types."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .._config import DEFAULT_HOME, DEFAULT_UI_PORT, ENV_API_KEY, ENV_HOME, ENV_URL
from .._server_options import add_server_options, port
from .._validation import DEFAULT_PAGE_SIZE, EXPERIMENT_ID_RE, MAX_NUMBER, MAX_PAGE_SIZE
from ..lifecycle import RunState
from .db import cmd_db
from .errors import EXIT_CODES_HELP, WAIT_CODES_HELP
from .runs import (
    cmd_add_variation,
    cmd_cancel,
    cmd_create,
    cmd_events,
    cmd_experiments,
    cmd_rerun,
    cmd_runs,
    cmd_show,
    cmd_variations,
)
from .transfers import cmd_assets, cmd_download, cmd_sync
from .workers import cmd_exec, cmd_server, cmd_ui, cmd_wait

RUN_EXAMPLE = "lr-sweep-1a2b/0/3"


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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


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


def config_arg(text: str) -> dict[str, Any]:
    """A variation config: a JSON object (``_json_config``)."""
    value = _json_config(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"a variation config must be a JSON object, got {type(value).__name__}"
        )
    return value


def configs_file(text: str) -> list[dict[str, Any]]:
    """A file (``-``: stdin) holding a JSON array of variation configs."""
    value = _json_config("@" + text)
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise argparse.ArgumentTypeError(
            f"{text} must hold a JSON array of objects (one config per variation)"
        )
    return value


class ExtendInOrder(argparse.Action):
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


def build_parser() -> argparse.ArgumentParser:
    """The ``chronicle`` argument parser."""
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="chronicle",
        description="Chronicle: track ML training runs through a strict lifecycle.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--url",
        default=os.environ.get(ENV_URL) or None,
        help=f"server URL (default ${ENV_URL}; else the embedded store)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(ENV_API_KEY) or None,
        help=f"API key (default ${ENV_API_KEY})",
    )
    parser.add_argument(
        "--home",
        default=os.environ.get(ENV_HOME) or None,
        help=f"client home: embedded store, spool (default ${ENV_HOME}, else ./{DEFAULT_HOME})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
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
                "type": positive_float,
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
    add_server_options(p)

    p = add(
        "ui",
        cmd_ui,
        "serve the read-only web view of an embedded home (--home) on 127.0.0.1",
        json_flag=False,
    )
    p.add_argument(
        "--port",
        type=port,
        default=DEFAULT_UI_PORT,
        metavar="P",
        help=f"port on 127.0.0.1 (default {DEFAULT_UI_PORT}; 0: any free port)",
    )

    p = add(
        "db",
        cmd_db,
        "the store's schema: upgrade it (idempotent, also on an empty database) or show it",
    )
    p.add_argument("action", choices=["upgrade", "status"], help="upgrade, or show the version")
    p.add_argument("--store", required=True, metavar="URL", help="SQLAlchemy URL of the database")

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
        type=positive_float,
        metavar="S",
        default=30.0,
        help="seconds between SIGTERM and SIGKILL when the worker is torn down (default 30)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=positive_float,
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
        action=ExtendInOrder,
        type=config_arg,
        metavar="JSON",
        help="a variation's config, a JSON object or @FILE (repeatable; numbered 0, 1, ... in "
        "command-line order)",
    )
    p.add_argument(
        "--variations-file",
        dest="variations",
        action=ExtendInOrder,
        type=configs_file,
        metavar="FILE",
        help="a JSON array of variation configs (- for stdin)",
    )

    p = add("add-variation", cmd_add_variation, "add a variation; prints its number")
    p.add_argument("experiment", type=experiment_arg, metavar="E", help="experiment id")
    p.add_argument(
        "config", type=config_arg, metavar="JSON", help="its config: a JSON object or @FILE"
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
        type=positive_int,
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
        type=positive_float,
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
        type=positive_float,
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
