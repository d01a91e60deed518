"""Every setting's name and default, and how a client finds its target: one place.

Environment variables (all optional):

============================== =========================================================
``CHRONICLE_URL``              the server; unset: the embedded store in the home
``CHRONICLE_API_KEY``          bearer key for the server (and the key ``chronicle server``
                               requires; prefer it to ``--api-key``, which ``ps`` shows)
``CHRONICLE_HOME``             the client's home (embedded store, staging, spool);
                               default ``./chronicle``
``CHRONICLE_EXPERIMENT``,      the run a worker serves, set by Chronicle-managed workers
``CHRONICLE_VARIATION``,       (``chronicle exec``, the Hydra launcher) for the
``CHRONICLE_RUN``,             integrations inside; with ``CHRONICLE_LEASE`` the run is
``CHRONICLE_LEASE``            already started and its owner ends it
``CHRONICLE_TRAINING_ENDED_FILE`` set by ``chronicle exec``: the integration inside creates
                               it when its training ended (the supervisor beats again)
``CHRONICLE_HEARTBEAT_TIMEOUT``, embedded store only: the watchdog's settings (a server
``CHRONICLE_LOST_GRACE``,      has its own command-line options)
``CHRONICLE_STALL_TIMEOUT``
``CHRONICLE_S3_PUBLIC_ENDPOINT_URL`` a server on ``s3://`` assets: the S3 host that the
                               URLs it presigns for workers name (``--s3-public-endpoint-url``)
``AWS_ENDPOINT_URL``,          boto3's own (``_S3`` variant, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``, ...     ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/config``):
                               how a server on ``s3://`` assets reaches the bucket when the
                               ``--s3-*`` options do not say
``CHRONICLE_UI_REFRESH``       the web view: seconds between a live page's refreshes
                               (default 5)
``CHRONICLE_DB_POOL_SIZE``,    ``chronicle server`` on PostgreSQL: the database pool of
``CHRONICLE_DB_MAX_OVERFLOW``, one replica, and when psycopg prepares statements
``CHRONICLE_DB_PREPARE_THRESHOLD`` (``none`` behind pgbouncer); the ``--db-*`` options win
============================== =========================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ._errors import ConfigurationError

ENV_URL = "CHRONICLE_URL"
ENV_API_KEY = "CHRONICLE_API_KEY"
ENV_HOME = "CHRONICLE_HOME"
ENV_EXPERIMENT = "CHRONICLE_EXPERIMENT"
ENV_VARIATION = "CHRONICLE_VARIATION"
ENV_RUN = "CHRONICLE_RUN"
ENV_LEASE = "CHRONICLE_LEASE"
ENV_HEARTBEAT_TIMEOUT = "CHRONICLE_HEARTBEAT_TIMEOUT"
ENV_LOST_GRACE = "CHRONICLE_LOST_GRACE"
ENV_STALL_TIMEOUT = "CHRONICLE_STALL_TIMEOUT"
ENV_DB_POOL_SIZE = "CHRONICLE_DB_POOL_SIZE"
ENV_DB_MAX_OVERFLOW = "CHRONICLE_DB_MAX_OVERFLOW"
ENV_DB_PREPARE_THRESHOLD = "CHRONICLE_DB_PREPARE_THRESHOLD"
#: Set by ``chronicle exec`` for the integration inside: a file to create when the training
#: ended while the process goes on, so the supervisor beats for the process again.
ENV_TRAINING_ENDED_FILE = "CHRONICLE_TRAINING_ENDED_FILE"
#: S3 asset storage: the host presigned URLs name, when workers reach it by another name.
ENV_S3_PUBLIC_ENDPOINT_URL = "CHRONICLE_S3_PUBLIC_ENDPOINT_URL"
#: boto3's own variables, read by boto3 itself (named here for the help texts and docs).
ENV_AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
ENV_AWS_REGION = "AWS_REGION"
#: The web view: seconds between the refreshes of a page that shows live runs.
ENV_UI_REFRESH = "CHRONICLE_UI_REFRESH"

#: The home when neither an argument nor ``$CHRONICLE_HOME`` names one (relative to the
#: working directory, made absolute when resolved).
DEFAULT_HOME = "chronicle"

#: The watchdog: no heartbeat for this long -> ``lost`` (store clock, seconds).
DEFAULT_HEARTBEAT_TIMEOUT = 900.0
#: ``lost`` for this long -> ``failed_lost`` (48 h).
DEFAULT_LOST_GRACE = 172800.0
#: Training progress unchanged for this long: the store flags the run ``stalled`` and the
#: integrations pause their heartbeats (a hung collective or data loader), so the watchdog
#: sees the run go ``lost``. Generous on purpose: a step, validation or save longer than this
#: is rare.
DEFAULT_STALL_TIMEOUT = 1800.0
#: The longest interval between a client's heartbeats (always within a third of the store's
#: ``heartbeat_timeout``, which the server tells its clients).
DEFAULT_HEARTBEAT_INTERVAL = 60.0
#: The web view's refresh interval of live pages (seconds), and the port of ``chronicle ui``.
DEFAULT_UI_REFRESH = 5.0
DEFAULT_UI_PORT = 8766

#: How long an in-process integration waits for its uploads when training crashed, before it
#: records the crash (heartbeats go on meanwhile); what is left goes on in the background.
CRASH_FLUSH_SECONDS = 60.0
#: The same for a Hydra job (its whole output directory is uploaded first).
JOB_CRASH_FLUSH_SECONDS = 300.0
#: How long an in-process integration flushes uploads on pre-emption (SIGTERM) before the rest
#: is spooled for ``chronicle sync``: schedulers send SIGKILL about 30 s after SIGTERM.
PREEMPT_FLUSH_SECONDS = 20.0
#: The same for a Hydra job: submitit signals its jobs ``signal_delay_s`` (90-120 s) before
#: the end, so a job has longer.
JOB_PREEMPT_FLUSH_SECONDS = 60.0


@dataclass(frozen=True)
class Target:
    """Where a client talks to: a server (``url``) or the embedded store in ``home``. The
    home also holds the staging area and the spool in both cases."""

    url: str | None
    home: Path


def default_home() -> Path:
    """``$CHRONICLE_HOME``, else ``./chronicle``, absolute."""
    return Path(os.path.abspath(os.environ.get(ENV_HOME) or DEFAULT_HOME))


def resolve_target(url: str | None = None, home: str | os.PathLike[str] | None = None) -> Target:
    """The one rule: ``url`` or ``$CHRONICLE_URL`` selects a server; the home is ``home`` or
    ``$CHRONICLE_HOME`` or ``./chronicle``, made absolute."""
    chosen = url or os.environ.get(ENV_URL) or None
    if chosen is not None and not chosen.startswith(("http://", "https://")):
        raise ConfigurationError(f"invalid Chronicle URL {chosen!r}: expected http://host:port")
    return Target(chosen, Path(home).resolve() if home is not None else default_home())


def api_key(given: str | None = None) -> str | None:
    """``given``, else ``$CHRONICLE_API_KEY``, else None."""
    return given or os.environ.get(ENV_API_KEY) or None


def env_seconds(name: str) -> float | None:
    """A number of seconds from the environment variable ``name`` (None when unset)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ConfigurationError(f"{name}={raw!r} must be > 0")
    return value


def prepare_threshold(text: str) -> int | str | None:
    """A prepare threshold as written by an operator: ``none`` (never prepare: pgbouncer in
    transaction mode), ``auto`` (none when the URL says ``?pgbouncer=true``), or a count."""
    word = text.strip().lower()
    if word in ("none", "off"):
        return None
    if word == "auto":
        return "auto"
    if word.isdigit() and len(word) <= 9:
        return int(word)
    raise ConfigurationError(f"invalid prepare threshold {text!r}: none, auto or a count >= 0")


def env_count(name: str, *, zero_ok: bool = False) -> int | None:
    """A whole number from the environment variable ``name`` (None when unset)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    word = raw.strip()
    if not word.isdigit() or len(word) > 9 or (int(word) == 0 and not zero_ok):
        raise ConfigurationError(f"{name}={raw!r} must be a whole number > {-1 if zero_ok else 0}")
    return int(word)


__all__ = [
    "CRASH_FLUSH_SECONDS",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_HOME",
    "DEFAULT_LOST_GRACE",
    "DEFAULT_STALL_TIMEOUT",
    "DEFAULT_UI_PORT",
    "DEFAULT_UI_REFRESH",
    "ENV_API_KEY",
    "ENV_AWS_ENDPOINT_URL",
    "ENV_AWS_REGION",
    "ENV_DB_MAX_OVERFLOW",
    "ENV_DB_POOL_SIZE",
    "ENV_DB_PREPARE_THRESHOLD",
    "ENV_EXPERIMENT",
    "ENV_HEARTBEAT_TIMEOUT",
    "ENV_HOME",
    "ENV_LEASE",
    "ENV_LOST_GRACE",
    "ENV_RUN",
    "ENV_S3_PUBLIC_ENDPOINT_URL",
    "ENV_STALL_TIMEOUT",
    "ENV_TRAINING_ENDED_FILE",
    "ENV_UI_REFRESH",
    "ENV_URL",
    "ENV_VARIATION",
    "JOB_CRASH_FLUSH_SECONDS",
    "JOB_PREEMPT_FLUSH_SECONDS",
    "PREEMPT_FLUSH_SECONDS",
    "Target",
    "api_key",
    "default_home",
    "env_count",
    "env_seconds",
    "prepare_threshold",
    "resolve_target",
]
