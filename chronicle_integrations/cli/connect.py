"""The client a ``chronicle`` command talks through, chosen by the global options."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .._config import DEFAULT_HOME, ENV_HOME, ENV_URL
from .._errors import ConfigurationError

if TYPE_CHECKING:
    from ..client import Chronicle

log = logging.getLogger(__name__)


def home_dir(args: argparse.Namespace) -> Path:
    """The client home the options name (``--home``, whose default is ``$CHRONICLE_HOME``),
    else ``./chronicle``, absolute."""
    return Path(args.home or DEFAULT_HOME).resolve()


def open_client(args: argparse.Namespace, create: bool = False) -> Chronicle:
    """The :class:`Chronicle` the global options select (``create``: a missing embedded
    store is made, for ``chronicle create``)."""
    from ..client import Chronicle

    if not args.url:
        home = home_dir(args)
        if create and not home.exists():
            home.mkdir(parents=True)
            log.warning("created a new embedded Chronicle store in %s", home)
        if not home.is_dir():
            raise ConfigurationError(
                f"no Chronicle store at {home}: pass --home DIR or set {ENV_HOME} "
                f"(or --url / {ENV_URL} for a server)"
            )
    return Chronicle(url=args.url, api_key=args.api_key, home=args.home, timeout=args.timeout)
