"""The ``chronicle`` command: run the reference server, inspect and steer runs.

Usage::

    chronicle [--url URL] [--api-key KEY] [--home DIR] [--timeout S] [-v] COMMAND ...

    chronicle server [--host 127.0.0.1] [--port 8765] [--store URL] [--assets DIR] ...
    chronicle ui [--home DIR] [--port 8766]      # the web view of an embedded home
    chronicle db upgrade --store URL              # migrate the schema (idempotent)
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
stable code, see :data:`.errors.ERROR_CODES` for the others), with the same exit code. A
JSON argument (a variation config) may be given as ``@FILE`` (``@-``: stdin).

The client is chosen like :class:`~chronicle_integrations.Chronicle` chooses it: ``--url`` /
``$CHRONICLE_URL`` selects a server, otherwise the embedded store in ``--home`` /
``$CHRONICLE_HOME`` / ``./chronicle``. With the embedded store, a home directory that does not
exist is an error (exit 2) rather than a new empty store in the wrong place; ``sync`` just has
nothing to send. The client options (``--url``, ``--api-key``, ``--home``, ``--timeout``,
``-v``) are also accepted after the command, except for ``server``, which takes the server's
options (the same as ``python -m chronicle_integrations.server``'s; ``--api-key`` and
``--home`` given before ``server`` are the fallbacks of its own).

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

Modules: :mod:`.parser` (``build_parser``, argument types), :mod:`.format` (tables, escaping,
times, sizes, progress bar, JSON), :mod:`.errors` (exit codes, error reporting),
:mod:`.connect` (the client the options select), and the commands by area: :mod:`.runs`
(experiments, variations, runs), :mod:`.transfers` (assets, download, sync), :mod:`.workers`
(exec, wait, server, ui). The server's options are :mod:`chronicle_integrations._server_options`,
shared with ``python -m chronicle_integrations.server``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from .._errors import ChronicleError

# ``EXIT_*``, ``wait_exit_code`` and the formatting helpers are imported from here by callers
# (tests, scripts): re-exported.
from .errors import EXIT_CONFLICT as EXIT_CONFLICT
from .errors import EXIT_ENDED_OTHERWISE as EXIT_ENDED_OTHERWISE
from .errors import EXIT_ERROR, error_code, exit_code, print_json_error, report
from .errors import EXIT_FAILED_ABANDONED as EXIT_FAILED_ABANDONED
from .errors import EXIT_FAILED_CRASH as EXIT_FAILED_CRASH
from .errors import EXIT_FAILED_LOST as EXIT_FAILED_LOST
from .errors import EXIT_NOT_FOUND as EXIT_NOT_FOUND
from .errors import EXIT_OK as EXIT_OK
from .errors import EXIT_UNAUTHORIZED as EXIT_UNAUTHORIZED
from .errors import EXIT_USAGE as EXIT_USAGE
from .errors import EXIT_WAIT_TIMEOUT as EXIT_WAIT_TIMEOUT
from .errors import WAIT_CODES_HELP as WAIT_CODES_HELP
from .errors import wait_exit_code as wait_exit_code
from .format import ProgressBar as ProgressBar
from .format import format_ago as format_ago
from .format import format_iso as format_iso
from .format import format_size as format_size
from .format import format_time as format_time
from .format import printable as printable
from .format import table as table
from .parser import build_parser as build_parser
from .parser import run_id as run_id

__all__ = ["main"]


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
        report(args, "interrupted", "interrupted")
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
        report(args, message, error_code(exc), exc)
        return exit_code(exc)
    except Exception as exc:  # a bug: still one line unless -v
        if args.verbose:
            traceback.print_exc()
        report(
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
            print_json_error({"error": {"code": "usage", "message": message}})
        raise
