# ruff: noqa: F811  (the fixtures of scaleout_kit are imported, then taken as parameters)
"""One clock for every replica: a replica whose host clock is an hour ahead
(``skewed_clock/sitecustomize.py``) and a correct one serve the same runs on PostgreSQL,
alternately, with a watchdog timeout of 2 s. On the database's clock nothing is lost and every
timestamp agrees; on each process's own clock the skewed replica would see every run the other
one stamped as silent for an hour, and fail it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from fleet_helpers import experiment
from scaleout_kit import environ, pg_url, with_path  # noqa: F401 (fixtures)

from chronicle_integrations.lifecycle import is_valid_path

pytestmark = [pytest.mark.scaleout, pytest.mark.postgres]

SKEWED = Path(__file__).resolve().parent / "skewed_clock"
SKEW = 3600.0


def test_a_skewed_replica_changes_nothing(server_factory: Any, pg_url: str) -> None:
    args = {"store_url": pg_url, "heartbeat_timeout": 2.0, "lost_grace": 2.0}
    right = server_factory(**args)
    with environ(PYTHONPATH=with_path(SKEWED), CHRONICLE_TEST_CLOCK_SKEW=str(SKEW)):
        skewed = server_factory(**args)
    replicas = [right, skewed]
    eid = experiment(right.url, "clock")
    keys = []
    for i in range(4):
        run = requests.post(f"{right.url}/v1/experiments/{eid}/variations/0/runs", timeout=10)
        path = f"/v1/runs/{eid}/0/{run.json()['run']}"
        lease = f"clock-lease-{i:04d}"
        # started on either replica, then beaten through both, alternately
        started = requests.post(
            f"{replicas[i % 2].url}{path}/start", json={"lease": lease}, timeout=10
        )
        assert started.status_code == 200, started.text
        keys.append((path, lease))
    engine = sa.create_engine(sa.engine.make_url(pg_url).set(drivername="postgresql+psycopg"))
    deadline = time.monotonic() + 8.0  # four heartbeat timeouts
    n = 0
    while time.monotonic() < deadline:
        for path, lease in keys:
            replica = replicas[n % 2]
            n += 1
            answer = requests.post(f"{replica.url}{path}/heartbeat", json={"lease": lease})
            assert answer.status_code == 200, (replica.url, answer.text)
            body = answer.json()
            assert body["state"] == "running", body
            with engine.connect() as conn:
                db_now = conn.execute(sa.text("SELECT extract(epoch FROM now())")).scalar()
            assert abs(body["last_heartbeat_at"] - float(db_now)) < 5.0, (replica.url, body)
        time.sleep(0.3)
    engine.dispose()
    # The skewed replica's watchdog swept meanwhile (every 0.5 s): it moved nothing.
    for path, _lease in keys:
        for replica in replicas:
            run = requests.get(f"{replica.url}{path}", timeout=10).json()
            assert run["state"] == "running", (replica.url, run)
        events = requests.get(f"{right.url}{path}/events", timeout=10).json()["events"]
        edges = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "transition"]
        assert is_valid_path(edges) and edges[-1] == ("pending", "running"), edges
        assert all(abs(e["at"] - events[0]["at"]) < 60 for e in events), events
