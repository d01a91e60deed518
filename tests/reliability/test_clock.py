"""Clock: the watchdog and every timestamp use the server's clock only.

The client runs in a subprocess whose clock is skewed: under ``faketime`` (libfaketime, when
installed: ``apt-get install faketime``) and, always, with ``time.time`` patched in that process
only. The skew is checked to have taken effect (the worker journals its own ``time.time()``),
so these tests could fail. Then:

* a skewed worker that keeps beating every 0.2 s through pauses longer than the server's
  ``--heartbeat-timeout 1`` is never lost, and every timestamp the server records (started,
  heartbeats, ended, events) is on the server's clock;
* a skewed worker killed after ``start`` is lost and then ``failed_lost`` on the server's clock,
  its skew buys it nothing.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from rel_helpers import Api, assert_valid_path, has, read_journal, spawn_worker, wait_until

DAY = 86400.0
SKEWS: dict[str, tuple[str, float]] = {
    # name: (how, seconds)
    "faketime+30d": ("faketime", 30 * DAY),
    "faketime-400d": ("faketime", -400 * DAY),
    "patched+1y": ("patched", 365 * DAY),
    "patched-1y": ("patched", -365 * DAY),
}


@pytest.fixture(scope="module")
def clock_server(module_server_factory: Any) -> Any:
    return module_server_factory(heartbeat_timeout=1.0, lost_grace=2.0)


def _skewed(server: Any, tmp: Path, how: str, skew: float, kill: bool) -> dict[str, Any]:
    api = Api(server.url)
    try:
        key = api.run(api.experiment())
        tmp.mkdir(parents=True)
        source = tmp / "m.bin"
        source.write_bytes(b"checkpoint")
        journal = tmp / "journal.jsonl"
        config: dict[str, Any] = {
            "mode": "lifecycle",
            "url": server.url,
            "home": str(tmp / "home"),
            "run": list(key),
            "journal": str(journal),
            "interval": 0.2,
            "hold": 2.5,
            "files": [[str(source), "m.bin"]],
            "timeout": 30,
        }
        env: dict[str, str] = {}
        prefix: list[str] = []
        if how == "faketime":
            days = skew / DAY
            prefix = ["faketime", "-f", f"{days:+.0f}d"]
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
            config["sleep_via_event"] = True
        else:
            config["skew"] = skew
        t0 = time.time()
        worker = spawn_worker(config, tmp / "worker.log", env=env, prefix=prefix)
        if kill:
            wait_until(
                lambda: has(read_journal(journal), "start", "ack") or worker.poll() is not None,
                timeout=60,
                what="the skewed worker to start the run",
            )
            os.killpg(worker.pid, signal.SIGKILL)  # the group: faketime forks
        code = worker.wait(timeout=120)
        entries = read_journal(journal)
        clock = next(e["time"] for e in entries if e["op"] == "clock")
        # The skew really applied in the worker (else this test proves nothing).
        assert abs((clock - t0) - skew) < 600, (clock, t0, skew)
        if kill:
            wait_until(
                lambda: api.state(key) == "failed_lost",
                timeout=60,
                what="the skewed worker's run to expire on the server's clock",
            )
        else:
            assert code == 0, (tmp / "worker.log").read_text()[-2000:]
        t1 = time.time()
        info = api.get_run(key)
        events = api.events(key)
        edges = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "transition"]
        assert_valid_path(edges, how)
        if kill:
            assert edges[-2:] == [("running", "lost"), ("lost", "failed_lost")], edges
            lost = [e for e in events if e["to_state"] == "lost"][-1]
            alive = info["last_heartbeat_at"] or info["started_at"]
            assert abs(lost["at"] - (alive + 1.0)) < 1e-3, (lost, info)
        else:
            assert edges == [(None, "pending"), ("pending", "running"), ("running", "succeeded")], (
                edges
            )
        stamps = [
            info["created_at"],
            info["started_at"],
            info["last_heartbeat_at"],
            info["ended_at"],
            *(e["at"] for e in events),
        ]
        slack = 60.0  # the server's clock, give or take scheduling; the skew is >= 30 days
        for stamp in stamps:
            if stamp is not None:
                assert t0 - slack <= stamp <= t1 + slack + 3.0, (stamp, t0, t1, info, events)
        return {"state": info["state"]}
    finally:
        api.close()


def test_skewed_client_clocks_change_nothing(
    clock_server: Any, tmp_path: Path, figures: Any
) -> None:
    cases = []
    for name, (how, skew) in SKEWS.items():
        if how == "faketime" and shutil.which("faketime") is None:
            continue
        for kill in (False, True):
            cases.append((name, how, skew, kill))
    assert any(how == "patched" for _, how, _, _ in cases)
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        futures = {
            pool.submit(_skewed, clock_server, tmp_path / f"{name}-{kill}", how, skew, kill): (
                name,
                kill,
            )
            for name, how, skew, kill in cases
        }
        errors = []
        for future, (name, kill) in futures.items():
            try:
                future.result()
                figures["fault:skewed client clock"] += 1
            except Exception as exc:
                errors.append(f"{name} kill={kill}: {exc}")
    assert not errors, "\n".join(errors)
