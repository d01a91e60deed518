"""The SQL schema and its versioned migrations.

Why not Alembic: the embedded store migrates itself on open, from whichever process gets there
first, with no command to run and no migration scripts to ship or locate. What that needs is a
version number in the database, an ordered list of migration steps in code, and a lock so that
two processes opening a fresh database do not both migrate it. That is the whole of this module
(~50 lines); Alembic would add a dependency and an environment to configure for no gain here.
A database written by a newer Chronicle is refused with a clear message instead of misread.

Rolling upgrades (several server replicas on one PostgreSQL)
------------------------------------------------------------
The database records two numbers in ``chronicle_schema``: ``version`` (the last migration
applied) and ``compatible_from`` (the oldest code schema version that may still serve it).
The rule that lets an old replica keep serving while a new one has migrated:

* **Within a minor version, migrations are additive** (expand only): new tables, new nullable
  (or defaulted) columns, new indexes. Old code never names them, so it reads and writes as
  before. Such a migration leaves ``compatible_from`` where it was.
* A migration that removes, renames or retypes anything old code uses (contract) raises
  ``compatible_from`` to its own version, and ships in a new minor version only, after every
  replica runs code that no longer needs what it removes.

Code whose :data:`SCHEMA_VERSION` is below the database's ``version`` serves it when
``compatible_from`` is not above :data:`SCHEMA_VERSION`, and refuses otherwise; code refuses a
database older than :data:`MIN_SCHEMA_VERSION` unless it may migrate (``chronicle server``
migrates by default, ``--no-migrate`` refuses instead; ``chronicle db upgrade`` migrates and
exits). :func:`check_version` is that gate, in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import sqlalchemy as sa

from .._errors import ConfigurationError

log = logging.getLogger(__name__)

metadata = sa.MetaData()

# Integer primary keys that autoincrement on both SQLite and PostgreSQL.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("experiment_id", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("next_variation", sa.Integer, nullable=False, server_default="0"),
    # v5: what "best" means for the experiment's runs (`chronicle best`), optional.
    sa.Column("objective_metric", sa.String(256)),
    sa.Column("objective_mode", sa.String(3)),
    # v3: the order of the experiments listing, so that each page is an index range scan.
    sa.Index("ix_experiments_created", "created_at", "experiment_id"),
)

variations = sa.Table(
    "variations",
    metadata,
    sa.Column(
        "experiment_id",
        sa.String(128),
        sa.ForeignKey("experiments.experiment_id"),
        primary_key=True,
    ),
    sa.Column("variation", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # Run numbers are handed out by an atomic increment of this counter: unique under races.
    sa.Column("next_run", sa.Integer, nullable=False, server_default="0"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("experiment_id", sa.String(128), primary_key=True),
    sa.Column("variation", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("run", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("last_heartbeat_at", sa.Float),
    # COALESCE(last_heartbeat_at, started_at), kept as a column so the watchdog's sweep is an
    # index range scan instead of a full scan over every run ever recorded.
    sa.Column("alive_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("reason", sa.String(20)),
    sa.Column("message", sa.Text),
    sa.Column("lease", sa.String(128)),
    sa.Column("lease_holder", sa.String(256)),
    # v2: the latest training progress a heartbeat carried ({"step": .., "epoch": ..}) and
    # when it last changed (store clock): a run that beats without advancing is "stalled".
    sa.Column("progress", sa.Text),
    sa.Column("progress_at", sa.Float),
    sa.ForeignKeyConstraint(
        ["experiment_id", "variation"], ["variations.experiment_id", "variations.variation"]
    ),
    sa.Index("ix_runs_state_alive", "state", "alive_at"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("experiment_id", sa.String(128), nullable=False),
    sa.Column("variation", sa.Integer, nullable=False),
    sa.Column("run", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("from_state", sa.String(20)),
    sa.Column("to_state", sa.String(20)),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("cause", sa.String(64), nullable=False),
    sa.Column("detail", sa.Text),
    sa.Index("ix_events_run", "experiment_id", "variation", "run", "id"),
)

assets = sa.Table(
    "assets",
    metadata,
    sa.Column("experiment_id", sa.String(128), primary_key=True),
    sa.Column("variation", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("run", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(1024), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("upload_id", sa.String(128), primary_key=True),
    sa.Column("experiment_id", sa.String(128), nullable=False),
    sa.Column("variation", sa.Integer, nullable=False),
    sa.Column("run", sa.Integer, nullable=False),
    sa.Column("name", sa.String(1024), nullable=False),
    sa.Column("size", sa.BigInteger),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("completed_at", sa.Float),
    sa.Column("sha256", sa.String(64)),
)

# Results of non-idempotent creations (add_variation, create_run) keyed by a client request id,
# so that a retry after a lost response returns the first answer instead of a ghost duplicate.
requests_done = sa.Table(
    "requests_done",
    metadata,
    sa.Column("request_id", sa.String(160), primary_key=True),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# v5: per-run metric summaries (no time series): per name the last value (by step, then store
# time; NULL with last_at set = NaN, infinities stored as such), the finite min and max with
# their steps. The (experiment, name, min|max) indexes make `best` an index walk, not a scan.
run_metrics = sa.Table(
    "run_metrics",
    metadata,
    sa.Column("experiment_id", sa.String(128), primary_key=True),
    sa.Column("variation", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("run", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(256), primary_key=True),
    sa.Column("last", sa.Float),
    sa.Column("last_step", sa.BigInteger),
    sa.Column("min", sa.Float),
    sa.Column("min_step", sa.BigInteger),
    sa.Column("max", sa.Float),
    sa.Column("max_step", sa.BigInteger),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_run_metrics_min", "experiment_id", "name", "min"),
    sa.Index("ix_run_metrics_max", "experiment_id", "name", "max"),
)

# v5: the metric a checkpoint asset was saved for, by asset name (a file, or a directory
# uploaded under that name). Joined with `assets` when read, so a record whose upload has
# not completed is invisible; it survives top-k eviction and save_total_limit rotation.
asset_metrics = sa.Table(
    "asset_metrics",
    metadata,
    sa.Column("experiment_id", sa.String(128), primary_key=True),
    sa.Column("variation", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("run", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(1024), primary_key=True),
    sa.Column("metric", sa.String(256), nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("step", sa.BigInteger),
    sa.Column("epoch", sa.Float),
    sa.Column("recorded_at", sa.Float, nullable=False),
)

schema_version = sa.Table(
    "chronicle_schema",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
    # v4: the oldest code schema version that may serve this database (see the module).
    sa.Column("compatible_from", sa.Integer),
)

# v4: the watchdog's last sweep, fleet-wide: server replicas on one PostgreSQL take turns
# (``pg_try_advisory_xact_lock``) and skip a sweep another replica made recently.
watchdog = sa.Table(
    "chronicle_watchdog",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("swept_at", sa.Float),
    sa.Column("swept_by", sa.String(256)),
)


# v6: one row per direct (presigned) upload to S3: its multipart upload and the per-part
# SHA-256 digests the worker announced, so that any replica can resume or complete it.
direct_uploads = sa.Table(
    "direct_uploads",
    metadata,
    sa.Column("upload_id", sa.String(128), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("part_size", sa.BigInteger, nullable=False),
    sa.Column("mpu_id", sa.String(1024), nullable=False),
    sa.Column("parts", sa.Text, nullable=False),  # JSON list of hex SHA-256, part 1 first
    sa.Column("created_at", sa.Float, nullable=False),
)


def _v1(conn: sa.Connection) -> None:
    # Creates the tables as this version defines them; later steps therefore check what
    # exists before altering, so they are no-ops on a database created by this version.
    for table in (experiments, variations, runs, events, assets, uploads, requests_done):
        table.create(conn, checkfirst=True)


def _add_missing_columns(conn: sa.Connection, table: sa.Table, names: list[str]) -> None:
    present = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    for name in names:
        if name not in present:
            column = table.c[name]
            ddl = column.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {name} {ddl}"))


def _v2(conn: sa.Connection) -> None:
    """Progress carried by heartbeats (honest liveness)."""
    _add_missing_columns(conn, runs, ["progress", "progress_at"])


def _v3(conn: sa.Connection) -> None:
    """The index behind the keyset pages of the experiments listing."""
    for index in experiments.indexes:
        index.create(conn, checkfirst=True)


def _v4(conn: sa.Connection) -> None:
    """Rolling upgrades (``compatible_from``) and the fleet-wide watchdog sweep."""
    _add_missing_columns(conn, schema_version, ["compatible_from"])
    watchdog.create(conn, checkfirst=True)
    if conn.execute(sa.select(watchdog.c.id)).first() is None:
        conn.execute(watchdog.insert().values(id=1))


def _v5(conn: sa.Connection) -> None:
    """Outcomes: run metric summaries, checkpoint metrics, experiment objectives (additive:
    code of v4 serves a v5 database, ignoring them)."""
    _add_missing_columns(conn, experiments, ["objective_metric", "objective_mode"])
    for table in (run_metrics, asset_metrics):
        table.create(conn, checkfirst=True)


def _v6(conn: sa.Connection) -> None:
    """Direct uploads to S3 (additive: older code never reads the table)."""
    direct_uploads.create(conn, checkfirst=True)


#: Ordered migrations; the schema version is the index of the last one applied, plus one.
#: Within a minor version, only additive ones (see the module docstring).
MIGRATIONS: list[Callable[[sa.Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6]
SCHEMA_VERSION = len(MIGRATIONS)
#: The oldest database schema this code can serve without migrating it (it uses the
#: ``chronicle_watchdog`` table of v4, the metric tables of v5, ``direct_uploads`` of v6).
MIN_SCHEMA_VERSION = 6
#: What a database migrated by this code records as ``compatible_from``: the oldest code
#: that may serve it. Only a contract migration raises it (versions before 4 predate it).
COMPATIBLE_FROM = 4


class SchemaInfo(NamedTuple):
    """What the database says of its schema (``version`` 0: no schema yet)."""

    version: int
    compatible_from: int


def current_version(conn: sa.Connection) -> int:
    """The database's schema version, read without writing (0: no schema yet)."""
    return schema_info(conn).version


def schema_info(conn: sa.Connection) -> SchemaInfo:
    """The database's schema version and ``compatible_from``, read without writing."""
    inspector = sa.inspect(conn)
    if not inspector.has_table(schema_version.name):
        return SchemaInfo(0, 0)
    names = {c["name"] for c in inspector.get_columns(schema_version.name)}
    columns = [schema_version.c.version]
    if "compatible_from" in names:
        columns.append(schema_version.c.compatible_from)
    row = conn.execute(sa.select(*columns)).first()
    if row is None:
        return SchemaInfo(0, 0)
    version = int(row[0] or 0)
    compatible = row[1] if len(row) > 1 and row[1] is not None else version
    return SchemaInfo(version, int(compatible))


def check_version(info: SchemaInfo, *, may_migrate: bool, url: str = "the database") -> bool:
    """The version gate: True when the database needs migrating (and ``may_migrate``), False
    when this code can serve it as it is; :class:`ConfigurationError` with the fix otherwise."""
    if info.version > SCHEMA_VERSION:
        if info.compatible_from > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{url} has chronicle schema version {info.version}, which needs chronicle "
                f"code of schema version {info.compatible_from} or newer; this chronicle-"
                f"integrations knows version {SCHEMA_VERSION}: upgrade chronicle-integrations "
                "on this replica"
            )
        log.info(
            "%s has schema version %d, newer than this chronicle's %d but compatible with it "
            "(an additive migration: a rolling upgrade in progress)",
            url,
            info.version,
            SCHEMA_VERSION,
        )
        return False
    if info.version == SCHEMA_VERSION:
        return False
    if may_migrate:
        return True
    if info.version == 0:
        raise ConfigurationError(
            f"{url} has no chronicle schema yet and this server may not create it "
            "(--no-migrate): run `chronicle db upgrade --store URL` first"
        )
    if info.version < MIN_SCHEMA_VERSION:
        raise ConfigurationError(
            f"{url} has chronicle schema version {info.version}, older than the minimum this "
            f"chronicle serves ({MIN_SCHEMA_VERSION}): run `chronicle db upgrade --store URL` "
            "(or start a server without --no-migrate)"
        )
    return False


def migrate(conn: sa.Connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION` inside the caller's write transaction.

    The caller holds the database's write lock (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL
    advisory lock), so concurrent openers serialise here and only one migrates.
    """
    # A fresh (empty) database is created, not upgraded: that is routine for every new home
    # or Hydra job, so it is logged at DEBUG; upgrading an existing store is news (INFO).
    fresh = not sa.inspect(conn).has_table(runs.name)
    level = logging.DEBUG if fresh else logging.INFO
    schema_version.create(conn, checkfirst=True)
    current = conn.execute(sa.select(schema_version.c.version)).scalar()
    if current is None:
        current = 0
        conn.execute(schema_version.insert().values(id=1, version=0))
    if current >= SCHEMA_VERSION:
        # Newer (and compatible, or the gate refuses it) or already current: never downgrade.
        check_version(schema_info(conn), may_migrate=True)
        return int(current)
    for version in range(current, SCHEMA_VERSION):
        log.log(level, "migrating the chronicle schema to version %d", version + 1)
        MIGRATIONS[version](conn)
    conn.execute(
        schema_version.update().values(version=SCHEMA_VERSION, compatible_from=COMPATIBLE_FROM)
    )
    return SCHEMA_VERSION
