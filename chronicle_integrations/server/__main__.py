"""``python -m chronicle_integrations.server``: run the reference server.

Exits 2 with a one-line error for a bad configuration (e.g. a public address without an API
key), 1 if the store cannot be opened.
"""

from __future__ import annotations

import argparse
import sys

from .._errors import ChronicleError, ConfigurationError
from ..store.core import DEFAULT_MAX_ASSET_BYTES, DEFAULT_UPLOAD_EXPIRY
from .app import (
    DEFAULT_MAX_CHUNK_BYTES,
    DEFAULT_MAX_JSON_BYTES,
    DEFAULT_UPLOAD_IDLE_TIMEOUT,
    DEFAULT_UPLOAD_MIN_RATE,
)


def build_parser(prog: str = "python -m chronicle_integrations.server") -> argparse.ArgumentParser:
    """The server's command-line options (the keyword arguments of :func:`serve`)."""
    parser = argparse.ArgumentParser(prog=prog, description="Run the Chronicle server.")
    parser.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help="SQLAlchemy URL of the database (default: SQLite in the home)",
    )
    parser.add_argument(
        "--assets",
        metavar="DIR",
        default=None,
        help="where asset bytes live (default: <home>/assets)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; anything beyond loopback needs an API key)",
    )
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default $CHRONICLE_API_KEY)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="seconds without a heartbeat before a run is lost (default 900)",
    )
    parser.add_argument(
        "--lost-grace",
        type=float,
        default=172800.0,
        metavar="S",
        help="seconds a run may stay lost before it fails (default 172800)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds a running run may beat without new progress before it "
        "is flagged stalled (default 1800)",
    )
    parser.add_argument(
        "--home",
        default=None,
        help="Chronicle home for the defaults (default $CHRONICLE_HOME or ./chronicle)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    parser.add_argument(
        "--max-json-bytes",
        type=int,
        default=DEFAULT_MAX_JSON_BYTES,
        metavar="N",
        help="largest JSON body accepted (default 2 MiB)",
    )
    parser.add_argument(
        "--max-chunk-bytes",
        type=int,
        default=DEFAULT_MAX_CHUNK_BYTES,
        metavar="N",
        help="largest upload chunk accepted (default 256 MiB)",
    )
    parser.add_argument(
        "--upload-idle-timeout",
        type=float,
        default=DEFAULT_UPLOAD_IDLE_TIMEOUT,
        metavar="S",
        help="abandon an upload chunk whose body sends nothing for S seconds (408; the "
        "bytes received are kept for the resume) (default 30)",
    )
    parser.add_argument(
        "--upload-min-rate",
        type=float,
        default=DEFAULT_UPLOAD_MIN_RATE,
        metavar="B",
        help="abandon an upload chunk whose body sends fewer than B bytes per second over "
        "a window of the idle timeout (default 1024; 0 disables)",
    )
    parser.add_argument(
        "--upload-expiry",
        type=float,
        default=DEFAULT_UPLOAD_EXPIRY,
        metavar="S",
        help="drop an unfinished upload, and its bytes, after S seconds without a chunk "
        "(default 86400)",
    )
    parser.add_argument(
        "--max-asset-bytes",
        type=int,
        default=DEFAULT_MAX_ASSET_BYTES,
        metavar="N",
        help="largest asset accepted, declared or not (413 beyond; default 1 TiB)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the options and serve until interrupted."""
    args = build_parser().parse_args(argv)
    from .runner import serve

    try:
        serve(
            store_url=args.store,
            assets=args.assets,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            heartbeat_timeout=args.heartbeat_timeout,
            lost_grace=args.lost_grace,
            home=args.home,
            log_level=args.log_level,
            max_json_bytes=args.max_json_bytes,
            max_chunk_bytes=args.max_chunk_bytes,
            stall_timeout=args.stall_timeout,
            upload_idle_timeout=args.upload_idle_timeout,
            upload_min_rate=args.upload_min_rate,
            upload_expiry=args.upload_expiry,
            max_asset_bytes=args.max_asset_bytes,
        )
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
