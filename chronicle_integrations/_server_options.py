"""The server's command-line options, one definition for both entry points.

``chronicle server`` and ``python -m chronicle_integrations.server`` take the same options:
:func:`add_server_options` adds them to a parser, :func:`serve_kwargs` turns the parsed
arguments into the keyword arguments of :func:`~chronicle_integrations.server.serve`.

This module lives outside the ``server`` package on purpose: the ``chronicle`` parser is built
for every command, and importing ``chronicle_integrations.server`` imports FastAPI, which the
client-only commands neither need nor may require. Defaults come from :mod:`._config`; an
option left out is not passed on, so :func:`serve` (and the store) apply their own default,
which the help text quotes.

The values are checked when they are parsed (a usage error, exit 2, before anything is
opened); :func:`serve` checks them again for callers from Python.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from ._config import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_HOME,
    DEFAULT_LOST_GRACE,
    DEFAULT_STALL_TIMEOUT,
    ENV_API_KEY,
    ENV_AWS_ENDPOINT_URL,
    ENV_AWS_REGION,
    ENV_DB_MAX_OVERFLOW,
    ENV_DB_POOL_SIZE,
    ENV_DB_PREPARE_THRESHOLD,
    ENV_HOME,
    ENV_S3_PUBLIC_ENDPOINT_URL,
)
from ._config import prepare_threshold as _prepare_threshold
from ._errors import ConfigurationError

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "LOG_LEVELS",
    "UPLOAD_MODES",
    "add_s3_options",
    "add_server_options",
    "port",
    "serve_kwargs",
]

#: The listen address: loopback only (anything else needs an API key).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")

#: ``dest`` of each option -> the keyword of ``serve()`` it is passed as. ``--api-key`` and
#: ``--home`` get their own ``dest`` because ``chronicle`` has client options of those names.
_SERVE_KEYWORDS = {
    "store": "store_url",
    "assets": "assets",
    "host": "host",
    "port": "port",
    "server_api_key": "api_key",
    "server_home": "home",
    "heartbeat_timeout": "heartbeat_timeout",
    "lost_grace": "lost_grace",
    "stall_timeout": "stall_timeout",
    "log_level": "log_level",
    "max_json_bytes": "max_json_bytes",
    "max_chunk_bytes": "max_chunk_bytes",
    "upload_idle_timeout": "upload_idle_timeout",
    "upload_min_rate": "upload_min_rate",
    "upload_expiry": "upload_expiry",
    "max_asset_bytes": "max_asset_bytes",
    "s3_endpoint_url": "s3_endpoint_url",
    "s3_region": "s3_region",
    "s3_path_style": "s3_path_style",
    "s3_public_endpoint_url": "s3_public_endpoint_url",
    "s3_max_parts": "s3_max_parts",
    "s3_part_size": "s3_part_size",
    "s3_url_expiry": "s3_url_expiry",
    "uploads": "uploads",
    "db_pool_size": "db_pool_size",
    "db_max_overflow": "db_max_overflow",
    "db_prepare_threshold": "db_prepare_threshold",
    "migrate": "migrate",
    "shutdown_timeout": "shutdown_timeout",
}

#: How uploads reach an ``s3://`` asset store (``--uploads``).
UPLOAD_MODES = ("direct", "proxied")


def port(text: str) -> int:
    """A TCP port, 0-65535 (0: any free port) (argparse ``type=``)."""
    if not re.fullmatch(r"[0-9]+", text) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 0-65535")
    return int(text)


def _setting(name: str, kind: type[float] | type[int], *, zero_ok: bool = False) -> Any:
    """An argparse ``type=`` for the ``serve()`` setting ``name``: a finite number of ``kind``
    that is > 0 (``zero_ok``: >= 0). The error names the setting as ``serve()`` does."""
    expected = ("a whole number" if kind is int else "a number") + (" >= 0" if zero_ok else " > 0")

    def parse(text: str) -> float | int:
        try:
            value = kind(text) if len(text) <= 40 else None
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"invalid {name} {text!r}: expected {expected}")
        return value

    parse.__name__ = name
    return parse


def _threshold(text: str) -> str:
    """argparse ``type=`` of ``--db-prepare-threshold``: ``none``, ``auto`` or a count (kept
    as text, checked here; ``serve()`` reads it)."""
    try:
        _prepare_threshold(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip().lower()


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Add the server's options to ``parser`` (see :func:`serve_kwargs`)."""
    seconds = "S"
    parser.add_argument(
        "--store",
        metavar="URL",
        help="SQLAlchemy URL of the database (default: SQLite in the home)",
    )
    parser.add_argument(
        "--assets",
        metavar="URL",
        help="where the asset bytes live: a directory (default: <home>/assets) or "
        "s3://bucket/prefix (needs the 's3' extra; see the --s3-* options)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}; anything beyond loopback needs "
        "an API key)",
    )
    parser.add_argument(
        "--port", type=port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--api-key",
        dest="server_api_key",
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' (default ${ENV_API_KEY}; prefer the "
        "variable: the command line is visible in ps)",
    )
    parser.add_argument(
        "--home",
        dest="server_home",
        metavar="DIR",
        help=f"server home for the default store and assets (default ${ENV_HOME} or "
        f"./{DEFAULT_HOME})",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=_setting("heartbeat_timeout", float),
        default=DEFAULT_HEARTBEAT_TIMEOUT,
        metavar=seconds,
        help="seconds without a heartbeat before a run is lost "
        f"(default {DEFAULT_HEARTBEAT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--lost-grace",
        type=_setting("lost_grace", float),
        default=DEFAULT_LOST_GRACE,
        metavar=seconds,
        help=f"seconds a run may stay lost before it fails (default {DEFAULT_LOST_GRACE:g})",
    )
    parser.add_argument(
        "--stall-timeout",
        type=_setting("stall_timeout", float),
        default=DEFAULT_STALL_TIMEOUT,
        metavar=seconds,
        help="flag a running run stalled when its heartbeats' progress has not advanced "
        f"for S seconds (default {DEFAULT_STALL_TIMEOUT:g})",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        help="server log level (default info)",
    )
    parser.add_argument(
        "--max-json-bytes",
        type=_setting("max_json_bytes", int),
        metavar="N",
        help="largest JSON body accepted (default 2 MiB)",
    )
    parser.add_argument(
        "--max-chunk-bytes",
        type=_setting("max_chunk_bytes", int),
        metavar="N",
        help="largest upload chunk accepted (default 256 MiB)",
    )
    parser.add_argument(
        "--upload-idle-timeout",
        type=_setting("upload_idle_timeout", float),
        metavar=seconds,
        help="abandon an upload chunk whose body sends nothing for S seconds (408; the "
        "bytes received are kept for the resume) (default 30)",
    )
    parser.add_argument(
        "--upload-min-rate",
        type=_setting("upload_min_rate", float, zero_ok=True),
        metavar="B",
        help="abandon an upload chunk whose body sends fewer than B bytes per second over "
        "a window of the idle timeout (default 1024; 0 disables)",
    )
    parser.add_argument(
        "--upload-expiry",
        type=_setting("upload_expiry", float),
        metavar=seconds,
        help="drop an unfinished upload, and its bytes, after S seconds without a chunk "
        "(default 86400)",
    )
    parser.add_argument(
        "--max-asset-bytes",
        type=_setting("max_asset_bytes", int, zero_ok=True),
        metavar="N",
        help="largest asset accepted, declared or not (413 beyond; default 1 TiB)",
    )
    # -- several replicas on one PostgreSQL (README: "Scaling out")
    parser.add_argument(
        "--db-pool-size",
        type=_setting("db_pool_size", int),
        metavar="N",
        help=f"PostgreSQL connections kept open by this replica (default ${ENV_DB_POOL_SIZE} "
        "or 10); a replica opens at most pool size + overflow",
    )
    parser.add_argument(
        "--db-max-overflow",
        type=_setting("db_max_overflow", int, zero_ok=True),
        metavar="N",
        help=f"PostgreSQL connections opened beyond the pool under load (default "
        f"${ENV_DB_MAX_OVERFLOW} or 20)",
    )
    parser.add_argument(
        "--db-prepare-threshold",
        type=_threshold,
        metavar="N|none|auto",
        help="executions before psycopg prepares a statement server-side; 'none' behind "
        "pgbouncer in transaction mode; 'auto': none when the store URL has ?pgbouncer=true "
        f"(default ${ENV_DB_PREPARE_THRESHOLD} or auto)",
    )
    parser.add_argument(
        "--no-migrate",
        dest="migrate",
        action="store_false",
        default=None,
        help="never create or migrate the schema: refuse to start on a database that "
        "`chronicle db upgrade` has not brought to this version (rolling upgrades)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_setting("shutdown_timeout", float),
        metavar=seconds,
        help="the bound of a shutdown (SIGTERM), in seconds: requests in flight, then the "
        "heartbeat lane's pending commit and the upload writes, all within it; the process "
        "exits within about S + 1 s (default 10)",
    )

    add_s3_options(parser)


def add_s3_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``--assets s3://...`` (ignored for a directory)."""
    group = parser.add_argument_group("S3 asset storage (--assets s3://bucket/prefix)")
    group.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        help=f"the S3 endpoint, for an S3-compatible store (default ${ENV_AWS_ENDPOINT_URL} "
        "or AWS)",
    )
    group.add_argument(
        "--s3-region", metavar="REGION", help=f"the bucket's region (default ${ENV_AWS_REGION})"
    )
    group.add_argument(
        "--s3-path-style",
        action="store_true",
        default=None,
        help="path-style addressing (endpoint/bucket/key), as MinIO and SeaweedFS want",
    )
    group.add_argument(
        "--s3-public-endpoint-url",
        metavar="URL",
        help="the endpoint workers reach the store by, for the URLs the server presigns "
        f"(default ${ENV_S3_PUBLIC_ENDPOINT_URL}, else the endpoint)",
    )
    group.add_argument(
        "--s3-max-parts",
        type=_setting("s3_max_parts", int),
        metavar="N",
        help="the store's limit on parts per multipart upload (default 10000, as AWS; "
        "larger uploads get larger parts)",
    )
    group.add_argument(
        "--s3-part-size",
        type=_setting("s3_part_size", int),
        metavar="N",
        help="bytes per part of a direct upload (default 64 MiB; at least 5 MiB)",
    )
    group.add_argument(
        "--s3-url-expiry",
        type=_setting("s3_url_expiry", int),
        metavar="S",
        help="seconds a presigned part URL stays valid; workers ask for fresh ones as they "
        "go (default 900)",
    )
    group.add_argument(
        "--uploads",
        choices=UPLOAD_MODES,
        help="how upload bytes reach S3: direct (the default: workers send them to the "
        "bucket through URLs this server presigns, signing each part's SHA-256) or proxied "
        "(through this server, which hashes them)",
    )


def serve_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``serve()`` that the options added by
    :func:`add_server_options` give; an option without a value is left out (``serve()``
    then applies its default: e.g. the API key from ``$CHRONICLE_API_KEY``)."""
    return {
        keyword: getattr(args, dest)
        for dest, keyword in _SERVE_KEYWORDS.items()
        if getattr(args, dest, None) is not None
    }
