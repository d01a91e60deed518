# ruff: noqa: F811  (the fixtures of scaleout_kit are imported, then taken as parameters)
"""Several real server replicas on one PostgreSQL behind a real HAProxy (and a real pgbouncer
in transaction mode), under a fleet of real clients, while replicas are SIGKILLed and
restarted: nothing acknowledged is lost, no asset is torn, every client carries on.

Replicas share one assets directory (same host) or, as on several hosts, one S3 bucket on the
real SeaweedFS (workers upload straight to it with presigned URLs). HAProxy and pgbouncer run
from the sample configurations in ``deploy/``.
"""

from __future__ import annotations

import hashlib
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
import s3kit
import sqlalchemy as sa
from fleet_helpers import Fleet, experiment, verify, wait_progress
from scaleout_kit import haproxy_factory, pg_url, pgbouncer_factory  # noqa: F401 (fixtures)

from chronicle_integrations.client._direct import DIRECT_MIN_BYTES

pytestmark = [pytest.mark.scaleout, pytest.mark.postgres]


def _replicas(server_factory: Any, store_url: str, assets: Path, n: int, *args: str) -> list[Any]:
    return [
        server_factory(store_url=store_url, assets=assets, extra_args=list(args)) for _ in range(n)
    ]


def _kill_and_restart(fleet: Fleet, replica: Any) -> None:
    """SIGKILL one replica under load, let the fleet go on through the others, restart it."""
    wait_progress(fleet.acks, 2)
    replica.kill(signal.SIGKILL)
    wait_progress(fleet.acks, 2)  # carried on through the survivors (retries, redispatch)
    replica.start(port=replica.port)
    wait_progress(fleet.acks, 2)


def test_replicas_killed_under_load_lose_nothing(
    server_factory: Any, haproxy_factory: Any, pg_url: str, tmp_path: Path
) -> None:
    assets = tmp_path / "assets"  # one directory for every replica (same host)
    replicas = _replicas(server_factory, pg_url, assets, 3, "--db-pool-size", "4")
    proxy = haproxy_factory([r.port for r in replicas])
    proxy.wait_ready()
    eid = experiment(proxy.url)
    with Fleet(proxy.url, tmp_path / "fleet", eid, clients=6) as fleet:
        _kill_and_restart(fleet, replicas[0])
        _kill_and_restart(fleet, replicas[1])
    checked = verify(proxy.url, fleet.acks, assets)
    assert checked["runs"] >= 12 and checked["assets"] >= 3, checked
    assert fleet.acks.heartbeats > 0
    assert '/heartbeat HTTP/1.1" 200' in replicas[2].output()  # the balancer spread the load
    print(f"fleet behind haproxy: {checked}, {fleet.acks.heartbeats} heartbeats")


@pytest.mark.s3
def test_replicas_on_one_bucket_killed_under_load_lose_nothing(
    server_factory: Any,
    haproxy_factory: Any,
    pg_url: str,
    tmp_path: Path,
    seaweedfs: s3kit.SeaweedServer,
    s3_bucket: str,
) -> None:
    """The topology of several hosts: replicas share no directory, only PostgreSQL and one
    bucket; a replica SIGKILLed mid-upload leaves nothing torn, and every acknowledged asset's
    object in the bucket hashes to its SHA-256."""
    s3 = s3kit.server_kwargs(seaweedfs, s3_bucket)
    replicas = [
        server_factory(
            store_url=pg_url,
            assets=s3["assets"],
            extra_args=[*s3["extra_args"], "--db-pool-size", "4"],
            env=s3["env"],
        )
        for _ in range(2)
    ]
    proxy = haproxy_factory([r.port for r in replicas])
    proxy.wait_ready()
    eid = experiment(proxy.url)
    small, large = (64 * 1024, 2 * 2**20), (DIRECT_MIN_BYTES, DIRECT_MIN_BYTES + 2 * 2**20)
    sizes = (small, large)  # proxied through a replica, then straight to the bucket
    with Fleet(proxy.url, tmp_path / "fleet", eid, clients=4, upload_sizes=sizes) as fleet:
        _kill_and_restart(fleet, replicas[0])
        _kill_and_restart(fleet, replicas[1])
    checked = verify(proxy.url, fleet.acks)
    assert checked["runs"] >= 8 and checked["assets"] >= 2, checked
    client = seaweedfs.client()
    for digest, _size in set(fleet.acks.assets.values()):
        key = f"assets/objects/{digest[:2]}/{digest}"
        body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, key
    logs = "".join(r.output() for r in replicas)
    assert "/direct" in logs, "no worker uploaded straight to the bucket"
    assert '"PUT /v1/uploads/' in logs, "no upload was proxied"
    print(f"fleet on one bucket: {checked}, {fleet.acks.heartbeats} heartbeats")


def test_fleet_through_pgbouncer_transaction_mode(
    server_factory: Any,
    haproxy_factory: Any,
    pgbouncer_factory: Any,
    pg_url: str,
    tmp_path: Path,
) -> None:
    """The same fleet with the replicas behind pgbouncer (transaction pooling, Debian's 1.18:
    no prepared-statement support): ``?pgbouncer=true`` keeps psycopg from preparing, so no
    request fails, and the advisory-locked migration and sweep work through it."""
    bouncer = pgbouncer_factory(pg_url, pool_size=6)
    assets = tmp_path / "assets"
    replicas = _replicas(server_factory, bouncer.url, assets, 2, "--db-pool-size", "4")
    proxy = haproxy_factory([r.port for r in replicas])
    proxy.wait_ready()
    eid = experiment(proxy.url)
    with Fleet(proxy.url, tmp_path / "fleet", eid, clients=6) as fleet:
        wait_progress(fleet.acks, 12)
        _kill_and_restart(fleet, replicas[1])
    verify(proxy.url, fleet.acks, assets)
    database = sa.engine.make_url(pg_url).database
    assert f"registered new auto-database: db={database}" in bouncer.output()  # went through it
    for replica in replicas:
        assert "prepared statement" not in replica.output().lower(), replica.output()[-3000:]


def test_prepared_statements_break_behind_pgbouncer_without_the_option(
    pgbouncer_factory: Any, pg_url: str, tmp_path: Path
) -> None:
    """The failure the option prevents, reproduced: with psycopg's default auto-prepare, the
    store's heartbeats from a few threads through transaction-mode pgbouncer fail
    ("prepared statement ... does not exist" / "already exists"); with ``?pgbouncer=true``
    the same load runs clean."""
    from chronicle_integrations.store import DatabaseOptions, Store

    bouncer = pgbouncer_factory(pg_url, pool_size=2)

    def hammer(url: str) -> list[str]:
        store = Store.open(url, tmp_path / "assets", database=DatabaseOptions(pool_size=4))
        eid = store.create_experiment("prepare", [{}]).experiment_id
        runs = []
        for _ in range(4):
            run = store.create_run(eid, 0).run
            runs.append((run, store.start(eid, 0, run).lease))
        errors: list[str] = []

        def beat(run: int, lease: str | None) -> None:
            for _ in range(40):
                try:
                    store.heartbeat(eid, 0, run, lease)
                except Exception as exc:
                    errors.append(str(exc).splitlines()[0])

        threads = [threading.Thread(target=beat, args=r) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        store.close()
        return errors

    broken = hammer(bouncer.raw_url)
    assert any("prepared statement" in e for e in broken), broken[:5]
    assert hammer(bouncer.url) == []


def test_ready_follows_the_database(server_factory: Any, pg_url: str) -> None:
    """``/v1/ready`` answers 503 while the replica's database refuses it (``/v1/health``
    still 200: the process lives), 200 again once it answers."""
    server = server_factory(store_url=pg_url)
    assert requests.get(f"{server.url}/v1/ready", timeout=10).json()["status"] == "ready"
    name = sa.engine.make_url(pg_url).database
    admin = sa.create_engine(
        sa.engine.make_url(pg_url).set(drivername="postgresql+psycopg", database="postgres"),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.NullPool,
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"
                ),
                {"d": name},
            )
        response = requests.get(f"{server.url}/v1/ready", timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert requests.get(f"{server.url}/v1/health", timeout=10).status_code == 200
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    assert requests.get(f"{server.url}/v1/ready", timeout=30).status_code == 200
