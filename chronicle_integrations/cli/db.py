"""``chronicle db upgrade|status --store URL``: the schema step of a deployment.

Several server replicas on one PostgreSQL are upgraded in this order (README "Scaling out"):
``chronicle db upgrade --store URL`` once (idempotent, also on an empty database; migrations
within a minor version are additive, so the replicas still running the old code keep
serving), then the replicas one by one, started with ``--no-migrate`` so that none of them
ever changes the schema behind the others' backs.
"""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from .._errors import ConfigurationError
from .errors import EXIT_OK

__all__ = ["cmd_db"]


def cmd_db(args: argparse.Namespace, out: TextIO) -> int:
    """Upgrade the schema of ``--store`` (``upgrade``) or print its version (``status``)."""
    try:
        from ..store import schema as t
        from ..store.base import upgrade_schema
        from ..store.engine import DatabaseOptions, _translate_db_errors, make_engine
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"this command needs the store's packages ({exc.name} is missing): "
            "pip install 'chronicle-integrations[server]'"
        ) from exc
    engine = make_engine(args.store, DatabaseOptions(pool_size=1, max_overflow=0))
    try:
        with _translate_db_errors(), engine.connect() as conn:
            before = t.schema_info(conn)
        if args.action == "upgrade":
            upgrade_schema(engine)
            with _translate_db_errors(), engine.connect() as conn:
                after = t.schema_info(conn)
        else:
            t.check_version(before, may_migrate=True)  # refuses a contracted newer schema
            after = before
    finally:
        engine.dispose()
    result = {
        "schema_version": after.version,
        "compatible_from": after.compatible_from,
        "was": before.version,
        "code_schema_version": t.SCHEMA_VERSION,
        "min_schema_version": t.MIN_SCHEMA_VERSION,
    }
    if args.json:
        out.write(json.dumps(result) + "\n")
    elif args.action == "upgrade":
        changed = (
            f"upgraded from version {before.version}"
            if before.version != after.version
            else "already current"
        )
        out.write(f"schema version {after.version} ({changed})\n")
    else:
        out.write(
            f"schema version {after.version} (compatible from {after.compatible_from}); "
            f"this chronicle: {t.SCHEMA_VERSION} (serves {t.MIN_SCHEMA_VERSION} and newer)\n"
        )
    return EXIT_OK
