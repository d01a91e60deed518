"""``python -m chronicle_integrations.server``: run the reference server.

Exits 2 with a one-line error for a bad configuration (e.g. a public address without an API
key), 1 if the store cannot be opened.
"""

from __future__ import annotations

import argparse
import sys

from .._errors import ChronicleError, ConfigurationError
from .._server_options import add_server_options, serve_kwargs


def build_parser(prog: str = "python -m chronicle_integrations.server") -> argparse.ArgumentParser:
    """The server's command-line options (the keyword arguments of :func:`serve`), the same
    as ``chronicle server``'s."""
    parser = argparse.ArgumentParser(prog=prog, description="Run the Chronicle server.")
    add_server_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the options and serve until interrupted."""
    args = build_parser().parse_args(argv)
    from .runner import serve

    try:
        serve(**serve_kwargs(args))
    except ConfigurationError as exc:
        print(f"chronicle server: error: {exc}", file=sys.stderr)
        return 2
    except ChronicleError as exc:
        print(f"chronicle server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
