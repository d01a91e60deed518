"""The *next* Chronicle, for the rolling-upgrade test: a Python started with this directory on
``PYTHONPATH`` runs today's code with one more, additive, schema migration (a nullable column),
as the next minor release would ship it. ``compatible_from`` stays where it is (additive), so
replicas still running today's code keep serving the migrated database."""

from __future__ import annotations

import sqlalchemy as sa

from chronicle_integrations.store import schema as _schema

NEXT_COLUMN = "note"


def _v_next(conn: sa.Connection) -> None:
    """Additive: a nullable column old code never names."""
    present = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    if NEXT_COLUMN not in present:
        conn.execute(sa.text(f"ALTER TABLE runs ADD COLUMN {NEXT_COLUMN} TEXT"))


_schema.MIGRATIONS.append(_v_next)
_schema.SCHEMA_VERSION = len(_schema.MIGRATIONS)
_schema.MIN_SCHEMA_VERSION = _schema.SCHEMA_VERSION
