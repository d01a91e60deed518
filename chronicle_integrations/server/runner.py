"""``serve()``: open the store, build the app and run it under uvicorn (``chronicle server``)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import ipaddress
import logging
import logging.config
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._config import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_HOME,
    DEFAULT_LOST_GRACE,
    ENV_API_KEY,
    ENV_HOME,
    ENV_S3_PUBLIC_ENDPOINT_URL,
)
from .._config import prepare_threshold as parse_prepare_threshold
from .._errors import ConfigurationError
from .._server_options import DEFAULT_HOST, DEFAULT_PORT, LOG_LEVELS, UPLOAD_MODES
from .._version import __version__
from ..store.core import DEFAULT_MAX_ASSET_BYTES, DEFAULT_UPLOAD_EXPIRY
from .app import (
    DEFAULT_MAX_CHUNK_BYTES,
    DEFAULT_MAX_JSON_BYTES,
    DEFAULT_UPLOAD_IDLE_TIMEOUT,
    DEFAULT_UPLOAD_MIN_RATE,
    create_app,
)

if TYPE_CHECKING:
    from types import FrameType

    import uvicorn

    from .connections import ConnectionLimits
    from .drain import Drain

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "is_loopback", "serve"]

#: Seconds a SIGTERM leaves requests in flight to finish (``--shutdown-timeout``).
DEFAULT_SHUTDOWN_TIMEOUT = 10.0

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True when ``host`` only ever means this machine (127.0.0.0/8, ::1, localhost).

    A host name counts only if every address it resolves to is a loopback address; ``""``,
    ``0.0.0.0`` and ``::`` (every interface) never do.
    """
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host.lower() == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%", 1)[0]).is_loopback for a in addresses
    )


def _blob_options(
    assets: str,
    root: Path,
    *,
    endpoint_url: str | None,
    region: str | None,
    path_style: bool,
    public_endpoint_url: str | None,
    max_parts: int | None,
    part_size: int | None,
    url_expiry: int | None,
    uploads: str | None,
) -> dict[str, Any]:
    """The keyword arguments of ``Store.open`` for the asset store ``assets``: for
    ``s3://``, the S3 settings and the work directory (``<home>/s3-work``) where proxied
    uploads keep the part being filled."""
    if uploads is not None and uploads not in UPLOAD_MODES:
        raise ConfigurationError(f"invalid uploads mode {uploads!r}: one of {UPLOAD_MODES}")
    if not assets.startswith("s3://"):
        if uploads == "direct":
            raise ConfigurationError("direct uploads need S3 asset storage (s3://bucket/prefix)")
        return {}
    from ..store.s3 import (
        DEFAULT_MAX_PARTS,
        DEFAULT_URL_EXPIRY,
        DIRECT_PART,
        MAX_PART,
        MIN_PART,
        S3Settings,
    )

    if max_parts is not None and not 1 <= max_parts <= DEFAULT_MAX_PARTS:
        raise ConfigurationError(f"s3_max_parts must be 1-{DEFAULT_MAX_PARTS}")
    if part_size is not None and not MIN_PART <= part_size <= MAX_PART:
        raise ConfigurationError(f"s3_part_size must be {MIN_PART}-{MAX_PART} bytes")
    if url_expiry is not None and not 1 <= url_expiry <= 7 * 86400:
        raise ConfigurationError("s3_url_expiry must be 1-604800 seconds (SigV4's limit)")
    settings = S3Settings(
        endpoint_url=endpoint_url,
        region=region,
        path_style=bool(path_style),
        public_endpoint_url=public_endpoint_url or os.environ.get(ENV_S3_PUBLIC_ENDPOINT_URL),
        max_parts=max_parts or DEFAULT_MAX_PARTS,
        direct_uploads=uploads != "proxied",
        part_size=part_size or DIRECT_PART,
        url_expiry=url_expiry or DEFAULT_URL_EXPIRY,
    )
    return {"s3": settings, "work_dir": root / "s3-work"}


def _uploads_shown(blob_options: dict[str, Any]) -> str:
    settings = blob_options.get("s3")
    if settings is None:
        return ""
    return ", direct uploads" if settings.direct_uploads else ", proxied uploads"


def serve(
    *,
    store_url: str | None = None,
    assets: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    lost_grace: float = DEFAULT_LOST_GRACE,
    home: str | os.PathLike[str] | None = None,
    log_level: str = "info",
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    stall_timeout: float | None = None,
    upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT,
    upload_min_rate: float = DEFAULT_UPLOAD_MIN_RATE,
    upload_expiry: float = DEFAULT_UPLOAD_EXPIRY,
    max_asset_bytes: int = DEFAULT_MAX_ASSET_BYTES,
    limits: ConnectionLimits | None = None,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    s3_path_style: bool = False,
    s3_public_endpoint_url: str | None = None,
    s3_max_parts: int | None = None,
    s3_part_size: int | None = None,
    s3_url_expiry: int | None = None,
    uploads: str | None = None,
    db_pool_size: int | None = None,
    db_max_overflow: int | None = None,
    db_prepare_threshold: int | str | None = "",
    migrate: bool = True,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Run the Chronicle server until interrupted (SIGINT/SIGTERM shut it down gracefully).

    Connections are bounded by ``limits`` (see :mod:`.connections`: a deadline and a size for
    each request head, a connection cap within the open-file limit, which is raised to its
    hard limit first); repeated log lines (a failed ``accept()`` per connection under a
    flood) are collapsed to one per 10 s.

    Defaults: ``home`` = ``$CHRONICLE_HOME`` or ``./chronicle``; ``store_url`` = SQLite at
    ``<home>/chronicle.db``; ``assets`` = ``<home>/assets``; ``api_key`` =
    ``$CHRONICLE_API_KEY``; ``stall_timeout`` = the store's (a running run beating without new
    progress for that long is flagged ``stalled``). ``upload_idle_timeout`` /
    ``upload_min_rate``: when an upload chunk body counts as stalled (see :func:`create_app`);
    ``upload_expiry``: seconds an unfinished upload may go without a chunk before it is
    dropped; ``max_asset_bytes``: the largest asset (bounds uploads that declare no size).
    ``assets`` may be ``s3://bucket/prefix``: the ``s3_*`` settings say how to reach it
    (unset: boto3's chain, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...); ``uploads``:
    how upload bytes reach it (``direct``, the default with S3: from the worker to the bucket
    through presigned URLs; ``proxied``: through this server).
    Listening beyond loopback without an API key is refused with
    :class:`ConfigurationError`, as are invalid settings.

    Several replicas on one PostgreSQL (README "Scaling out"): ``db_pool_size`` /
    ``db_max_overflow`` bound this replica's connections (``$CHRONICLE_DB_POOL_SIZE`` /
    ``_MAX_OVERFLOW``, else 10 + 20); ``db_prepare_threshold``: ``"none"`` behind pgbouncer in
    transaction mode (``"auto"``, the default: none when the URL has ``?pgbouncer=true``);
    ``migrate=False`` refuses a schema that needs migrating instead of migrating it
    (``chronicle db upgrade`` does that); ``shutdown_timeout``: the bound of a shutdown
    (SIGTERM): the readiness check answers 503 from the signal on, the requests in flight
    finish (upload chunks still arriving near the end are stopped, resumable), then the
    heartbeat lane's pending group commit and the upload writers are drained in what is left
    of it; the process exits within about that many seconds (:mod:`.drain`).
    """
    if api_key is None:
        api_key = os.environ.get(ENV_API_KEY)
    api_key = api_key.strip() if api_key else None
    if not is_loopback(host) and not api_key:
        raise ConfigurationError(
            f"refusing to listen on {host!r} without an API key: anyone who can reach it could "
            "read and change every run. Pass --api-key (or set CHRONICLE_API_KEY), or listen "
            "on 127.0.0.1"
        )
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError(f"invalid port {port!r}: use 0-65535")
    level = log_level.lower()
    if level not in LOG_LEVELS:
        raise ConfigurationError(f"invalid log level {log_level!r}: one of {', '.join(LOG_LEVELS)}")
    if max_json_bytes <= 0 or max_chunk_bytes <= 0:
        raise ConfigurationError("max_json_bytes and max_chunk_bytes must be > 0")
    if not upload_idle_timeout > 0 or not upload_min_rate >= 0:
        raise ConfigurationError("upload_idle_timeout must be > 0 and upload_min_rate >= 0")

    root = Path(home or os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser().resolve()
    if store_url is None:
        root.mkdir(parents=True, exist_ok=True)
        store_url = f"sqlite:///{root / 'chronicle.db'}"
    assets_dir: str | os.PathLike[str] = assets if assets is not None else root / "assets"

    import uvicorn  # the server's own dependency, imported only when serving

    from ..store import DatabaseOptions, Store
    from .connections import (
        ConnectionLimits,
        Throttle,
        connection_cap,
        guarded_protocol,
        raise_fd_limit,
    )

    # Configure logging first (uvicorn applies its config when Config is built), so that the
    # store's own messages (migrations) are shown.
    wanted = limits or ConnectionLimits()
    limits = dataclasses.replace(
        wanted, max_connections=connection_cap(raise_fd_limit(), wanted.max_connections)
    )
    config_kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": level,
        "log_config": _log_config(level),
        "http": guarded_protocol(limits),
        "timeout_graceful_shutdown": shutdown_timeout,
        "server_header": False,
    }
    timeouts: dict[str, float] = {
        "heartbeat_timeout": heartbeat_timeout,
        "lost_grace": lost_grace,
        "upload_expiry": upload_expiry,
        "max_asset_bytes": max_asset_bytes,
    }
    if stall_timeout is not None:
        if stall_timeout <= 0:
            raise ConfigurationError("stall_timeout must be > 0")
        timeouts["stall_timeout"] = stall_timeout
    blob_options = _blob_options(
        os.fspath(assets_dir),
        root,
        endpoint_url=s3_endpoint_url,
        region=s3_region,
        path_style=s3_path_style,
        public_endpoint_url=s3_public_endpoint_url,
        max_parts=s3_max_parts,
        part_size=s3_part_size,
        url_expiry=s3_url_expiry,
        uploads=uploads,
    )
    if not shutdown_timeout > 0:
        raise ConfigurationError("shutdown_timeout must be > 0")
    threshold = (
        parse_prepare_threshold(db_prepare_threshold)
        if isinstance(db_prepare_threshold, str) and db_prepare_threshold
        else db_prepare_threshold
    )
    database = DatabaseOptions.resolve(db_pool_size, db_max_overflow, threshold)
    # The log config before the store opens (uvicorn applies it again when Config is built):
    # the store's own messages at open (migrations, a newer compatible schema) are shown.
    logging.config.dictConfig(config_kwargs["log_config"])
    options: dict[str, Any] = {**blob_options, **timeouts}
    store = Store.open(store_url, assets_dir, database=database, migrate=migrate, **options)
    try:
        app = create_app(
            store,
            api_key=api_key,
            max_json_bytes=max_json_bytes,
            max_chunk_bytes=max_chunk_bytes,
            upload_idle_timeout=upload_idle_timeout,
            upload_min_rate=upload_min_rate,
            hosts=[host],
            drain_timeout=shutdown_timeout,
        )
        server = _draining_server(uvicorn.Config(app, **config_kwargs), app.state.drain)
        throttle = Throttle()
        for name in ("asyncio", "uvicorn.error", "chronicle_integrations.server.connections"):
            logging.getLogger(name).addFilter(throttle)
        # Everything built so far (modules, routes, the store) lives as long as the process:
        # move it out of the collector's reach, so that full collections under load walk
        # only request garbage (they otherwise pause every thread for tens of ms: tail
        # latency).
        gc.collect()
        gc.freeze()
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "Chronicle server %s on http://%s:%d, web view at /ui (store %s, assets %s%s, "
            "API key %s)",
            __version__,
            shown,
            port,
            _hide_password(store_url),
            os.fspath(assets_dir),
            _uploads_shown(blob_options),
            "required" if api_key else "not required",
        )
        log.debug("connection limits: %s", limits)
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            raise ConfigurationError(
                f"could not serve on {host}:{port} (see the log above)"
            ) from exc
        if not server.started:
            raise ConfigurationError(f"could not serve on {host}:{port} (see the log above)")
    finally:
        store.close()


def _draining_server(config: uvicorn.Config, drain: Drain) -> uvicorn.Server:
    """uvicorn's server (built from ``config``, which configures logging), telling ``drain``
    when a shutdown is asked for (in the signal handler: the readiness check fails at once,
    not from uvicorn's next tick) and when it starts draining (the bound starts)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            drain.begin()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            drain.start()
            await super().shutdown(sockets)

    return DrainingServer(config)


def _hide_password(url: str) -> str:
    try:
        import sqlalchemy as sa

        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<store URL>"


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config, plus a handler for this package's loggers (the library itself
    installs none; ``serve`` is an application entry point)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["chronicle_integrations"] = {
        "handlers": ["default"],
        "propagate": False,
        "level": "DEBUG" if level == "trace" else level.upper(),
    }
    return config
