# ruff: noqa: F811  (the fixtures of scaleout_kit are imported, then taken as parameters)
"""Operating a fleet of replicas: ``chronicle db upgrade``, ``--no-migrate``, a rolling
upgrade with two schema versions side by side, and a SIGTERM that drains what is in flight.

The "next" Chronicle is today's code with one more additive migration
(``next_schema/sitecustomize.py``, put on ``PYTHONPATH``): the old replicas keep serving the
database it migrated, through HAProxy, under a fleet of clients.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import testkit
from fleet_helpers import Fleet, experiment, verify, wait_progress
from scaleout_kit import environ, haproxy_factory, pg_url, with_path  # noqa: F401 (fixtures)

from chronicle_integrations.store import schema as t

pytestmark = [pytest.mark.scaleout, pytest.mark.postgres]

NEXT = Path(__file__).resolve().parent / "next_schema"


def _next_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": with_path(NEXT)}


def _db(store_url: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return testkit.run(
        [sys.executable, "-m", "chronicle_integrations.cli", "db", *args, "--store", store_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _schema(store_url: str) -> t.SchemaInfo:
    engine = sa.create_engine(sa.engine.make_url(store_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            return t.schema_info(conn)
    finally:
        engine.dispose()


def test_db_upgrade_is_idempotent_and_no_migrate_needs_it(server_factory: Any, pg_url: str) -> None:
    refused = None
    with pytest.raises(RuntimeError) as refused:
        server_factory(store_url=pg_url, extra_args=["--no-migrate"])
    assert "chronicle db upgrade --store URL" in str(refused.value)
    assert _schema(pg_url).version == 0  # a refusing server changed nothing
    first = _db(pg_url, "upgrade")
    assert first.returncode == 0, first.stderr
    assert "upgraded from version 0" in first.stdout
    again = _db(pg_url, "upgrade", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["schema_version"] == t.SCHEMA_VERSION
    status = _db(pg_url, "status", "--json")
    assert json.loads(status.stdout)["was"] == t.SCHEMA_VERSION
    server = server_factory(store_url=pg_url, extra_args=["--no-migrate"])
    body = requests.get(f"{server.url}/v1/ready", timeout=10).json()
    assert body["schema_version"] == t.SCHEMA_VERSION


def test_rolling_upgrade_old_and_new_replicas_side_by_side(
    server_factory: Any, haproxy_factory: Any, pg_url: str, tmp_path: Path
) -> None:
    """Two replicas of today's code behind HAProxy under a fleet; the next version's
    ``db upgrade`` migrates (additively) while they serve; one replica is replaced by the next
    version: the fleet never notices. Then a contract migration: today's code refuses to start
    on it, and a replica of it still running drops out of the balancer (``/v1/ready`` 503)."""
    assert _db(pg_url, "upgrade").returncode == 0
    assets = tmp_path / "assets"
    old = [
        server_factory(store_url=pg_url, assets=assets, extra_args=["--no-migrate"])
        for _ in range(2)
    ]
    proxy = haproxy_factory([r.port for r in old])
    proxy.wait_ready()
    eid = experiment(proxy.url)
    with Fleet(proxy.url, tmp_path / "fleet", eid, clients=4) as fleet:
        wait_progress(fleet.acks, 3)
        upgraded = _db(pg_url, "upgrade", env=_next_env())
        assert upgraded.returncode == 0, upgraded.stderr
        assert _schema(pg_url) == (t.SCHEMA_VERSION + 1, t.COMPATIBLE_FROM)
        wait_progress(fleet.acks, 3)  # the old replicas serve the next schema
        # Replace replica 1 by the next version (same port: the balancer's config is fixed).
        replica = old[1]
        replica.stop()
        with environ(PYTHONPATH=with_path(NEXT)):
            replica.start(port=replica.port)
        wait_progress(fleet.acks, 4)  # old and new replicas side by side
    verify(proxy.url, fleet.acks, assets)
    # A fresh replica of today's code still starts on the additively migrated schema.
    late = server_factory(store_url=pg_url, assets=assets, extra_args=["--no-migrate"])
    assert "a rolling upgrade in progress" in late.output()
    ready = requests.get(f"{late.url}/v1/ready", timeout=10).json()
    assert ready["schema_version"] == t.SCHEMA_VERSION + 1
    assert _schema(pg_url) == (t.SCHEMA_VERSION + 1, t.COMPATIBLE_FROM)  # never downgraded
    # A contract migration (compatible_from raised) shuts today's code out, with the fix.
    engine = sa.create_engine(sa.engine.make_url(pg_url).set(drivername="postgresql+psycopg"))
    with engine.begin() as conn:
        conn.execute(t.schema_version.update().values(compatible_from=t.SCHEMA_VERSION + 1))
    engine.dispose()
    response = requests.get(f"{late.url}/v1/ready", timeout=10)
    assert response.status_code == 503 and "upgrade chronicle-integrations" in response.text
    with pytest.raises(RuntimeError, match="upgrade chronicle-integrations"):
        server_factory(store_url=pg_url, assets=assets)


def test_sigterm_drains_what_was_acknowledged(server_factory: Any, pg_url: str) -> None:
    """Heartbeats from many threads while the replica gets SIGTERM: its shutdown completes
    after answering the requests in flight (some are answered after "Shutting down"), and
    every heartbeat it acknowledged is in the database once it is back."""
    server = server_factory(store_url=pg_url, extra_args=["--shutdown-timeout", "5"])
    eid = experiment(server.url, "drain")
    runs = []
    for i in range(16):
        created = requests.post(
            f"{server.url}/v1/experiments/{eid}/variations/{i % 2}/runs", timeout=10
        ).json()
        path = f"/v1/runs/{eid}/{i % 2}/{created['run']}"
        lease = f"lease-{i}-{os.urandom(4).hex()}"
        started = requests.post(f"{server.url}{path}/start", json={"lease": lease}, timeout=10)
        assert started.status_code == 200, started.text
        runs.append((path, lease))
    acked: dict[str, float] = {}
    answered = threading.Event()
    lock = threading.Lock()

    def beat(path: str, lease: str) -> None:
        with requests.Session() as session:
            for _ in range(10_000):
                try:
                    r = session.post(f"{server.url}{path}/heartbeat", json={"lease": lease})
                except requests.RequestException:
                    return  # the replica stopped listening
                if r.status_code != 200:
                    return
                answered.set()
                with lock:
                    acked[path] = max(acked.get(path, 0.0), r.json()["last_heartbeat_at"])

    threads = [threading.Thread(target=beat, args=run) for run in runs]
    for thread in threads:
        thread.start()
    assert answered.wait(30)
    testkit.wait_until(lambda: len(acked) == len(runs), 30, what="every run beating")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(120)
    for thread in threads:
        thread.join(60)
    # uvicorn re-raises the SIGTERM once its shutdown is complete: exit by that signal.
    assert code in (0, -signal.SIGTERM), server.output()[-3000:]
    assert "Application shutdown complete" in server.output()
    assert "still busy" not in server.output()
    server.start(port=server.port)
    for path, _lease in runs:
        stored = requests.get(f"{server.url}{path}", timeout=10).json()["last_heartbeat_at"]
        assert stored >= acked[path], (path, stored, acked[path])
