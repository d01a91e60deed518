"""``chronicle`` commands around a run's worker: exec (supervise it), wait (for the run to
end), server (run the reference server), ui (the web view of an embedded home)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from .. import _config
from .._errors import ConfigurationError
from .._server_options import serve_kwargs
from ..lifecycle import RunState
from .connect import home_dir, open_client
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


def cmd_ui(args: argparse.Namespace, out: TextIO) -> int:
    """Serve the web view (and the API) of an embedded home on loopback, until interrupted.

    The home's own watchdog settings (``$CHRONICLE_HEARTBEAT_TIMEOUT`` ...) apply, as for the
    embedded clients writing to it, so the pages show the states those clients see. With a
    server URL there is nothing to serve: its view is at ``URL/ui``."""
    if args.url:
        out.write(f"{args.url.rstrip('/')}/ui\n")
        print(
            "chronicle ui: the server serves its own view at that address "
            "(log in with its API key); `chronicle ui` serves an embedded home",
            file=sys.stderr,
        )
        return EXIT_OK
    try:
        from ..server import serve
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the web view needs extra packages ({exc.name} is missing): "
            "pip install 'chronicle-integrations[server]'"
        ) from exc
    settings: dict[str, float] = {}
    for key, env in (
        ("heartbeat_timeout", _config.ENV_HEARTBEAT_TIMEOUT),
        ("lost_grace", _config.ENV_LOST_GRACE),
        ("stall_timeout", _config.ENV_STALL_TIMEOUT),
    ):
        seconds = _config.env_seconds(env)
        if seconds is not None:
            settings[key] = seconds
    home = home_dir(args)
    if not (home / "chronicle.db").is_file():
        raise ConfigurationError(
            f"no Chronicle store at {home}: pass --home DIR or set {_config.ENV_HOME}"
        )
    print(f"chronicle ui: http://127.0.0.1:{args.port}/ui (home {home})", file=sys.stderr)
    # Loopback only and no key (the API key of the environment is a server's, not the
    # home's): the guard's Host and Origin checks keep other sites' pages out.
    serve(
        home=home,
        host="127.0.0.1",
        port=args.port,
        api_key="",
        log_level="debug" if args.verbose else "warning",
        **settings,  # type: ignore[arg-type]
    )
    return EXIT_OK
