"""Exit codes and error reporting of the ``chronicle`` command (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._config import ENV_API_KEY, ENV_HOME, ENV_URL
from .._errors import (
    APIError,
    ConfigurationError,
    InvalidRequest,
    InvalidTransition,
    LeaseConflict,
    NotFound,
    TransportError,
    Unauthorized,
    UploadError,
)
from ..lifecycle import RunState
from .format import printable

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

EXIT_CODES_HELP = f"""\
exit codes:
  0  success
  1  other errors (server unreachable, unexpected API errors, sync incomplete)
  2  usage or configuration error (bad arguments, invalid request)
  3  not found (experiment, variation, run or asset)
  4  invalid transition or lease conflict
  5  unauthorized (missing or wrong API key)

environment: {ENV_URL}, {ENV_API_KEY}, {ENV_HOME} (defaults of the global options)
"""


def wait_exit_code(state: RunState, awaited: RunState | None, timed_out: bool) -> int:
    """The exit code of ``chronicle wait`` (see :data:`WAIT_CODES_HELP`)."""
    if state is (awaited or RunState.SUCCEEDED):
        return EXIT_OK
    if timed_out or not state.is_terminal:
        return EXIT_WAIT_TIMEOUT
    return WAIT_EXIT_CODES[state]


def exit_code(exc: BaseException) -> int:
    """The exit code of a failed command (see the package docstring)."""
    if isinstance(exc, (ConfigurationError, InvalidRequest)):
        return EXIT_USAGE
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, (InvalidTransition, LeaseConflict)):
        return EXIT_CONFLICT
    if isinstance(exc, Unauthorized):
        return EXIT_UNAUTHORIZED
    return EXIT_ERROR


def error_code(exc: BaseException) -> str:
    """The ``code`` of an error under ``--json``: the API's, else one of :data:`ERROR_CODES`."""
    if isinstance(exc, APIError):
        return exc.code
    for cls, code in ERROR_CODES.items():
        if isinstance(exc, cls):
            return code
    return "error"


def report(
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
    print_json_error({"error": body})


def print_json_error(body: dict[str, Any]) -> None:
    sys.stderr.write(json.dumps(body, default=str) + "\n")
    sys.stderr.flush()
