"""``chronicle`` commands around a run's worker: exec (supervise it), wait (for the run to
end), server (run the reference server)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from .._errors import ConfigurationError
from .._server_options import serve_kwargs
from ..lifecycle import RunState
from .connect import open_client
from .errors import EXIT_OK, wait_exit_code
from .format import answer, format_time, progress_text, public


def cmd_exec(args: argparse.Namespace, out: TextIO) -> int:
    """Supervise a command as the run's worker; exit with its code (128 + N for signal N)."""
    from ..supervisor import Supervisor

    command = args.exec_command
    if not command:
        raise ConfigurationError(
            "usage: chronicle exec E/V/R -- CMD [ARG ...] (the `--` is needed)"
        )
    if (args.run is None) == (args.experiment is None):
        raise ConfigurationError("name the run as E/V/R, or give --experiment E [--variation V]")
    with open_client(args) as chronicle:
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


def cmd_wait(args: argparse.Namespace, out: TextIO) -> int:
    """Poll the run until it is terminal or in ``--state``; state changes go to stderr."""
    deadline = None if args.wait_timeout is None else time.monotonic() + args.wait_timeout
    last: tuple[RunState, str] | None = None
    timed_out = False
    with open_client(args) as chronicle:
        run = chronicle.run(*args.run)
        while True:
            info = run.info()
            shown = (info.state, progress_text(info.progress))
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
    answer(args, lambda: public(info), f"{info.key}: {info.state.value}", out)
    return wait_exit_code(info.state, args.state, timed_out)


def cmd_server(args: argparse.Namespace, out: TextIO) -> int:
    """Run the reference server with the options of :mod:`.._server_options`."""
    try:
        from ..server import serve
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the server needs extra packages ({exc.name} is missing): "
            "pip install 'chronicle-integrations[server]'"
        ) from exc
    kwargs = serve_kwargs(args)
    # The client options before the command are the fallbacks (`chronicle --home H server`;
    # `--api-key`'s default is $CHRONICLE_API_KEY, as for serve() itself).
    for key, value in (
        ("api_key", args.api_key),
        ("home", args.home),
        ("log_level", "debug" if args.verbose else None),
    ):
        if value is not None:
            kwargs.setdefault(key, value)
    serve(**kwargs)
    return EXIT_OK
