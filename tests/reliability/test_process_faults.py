"""Process faults: workers and the server SIGKILLed at random points.

What the SPEC allows after a worker dies, by what its journal says was sent and acknowledged:

==========================  ======================================================
last step of the worker     states the run may be in right after the kill
==========================  ======================================================
start sent, not acked       pending (never arrived) or running/lost (it arrived)
start acked                 running or lost: never terminal (nobody ended it)
succeed sent, not acked     running/lost (not arrived) or succeeded (arrived)
succeed acked               succeeded, forever
==========================  ======================================================

``failed_crash`` / ``failed_abandoned`` are never allowed (nobody sent them). Afterwards a
started run left alone goes ``lost`` then ``failed_lost`` (server ``--heartbeat-timeout 1
--lost-grace 2``), a pending one stays ``pending`` (it has no liveness to lose), and a resume
from a new process (``start(resume=True)``, then ``succeed``) recovers it. Assets: only what the
worker sent may be visible, only complete (SHA-256 of the file), and every acknowledged upload
must be.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from rel_helpers import (
    Api,
    assert_valid_path,
    has,
    read_journal,
    spawn_worker,
    wait_until,
)

HEARTBEAT_TIMEOUT = 1.0
LOST_GRACE = 2.0

KILL_POINTS = ("start", "heartbeat", "upload", "succeed")
OUTCOMES = ("expire", "resume")


@pytest.fixture(scope="module")
def watchdog_server(module_server_factory: Any) -> Any:
    return module_server_factory(heartbeat_timeout=HEARTBEAT_TIMEOUT, lost_grace=LOST_GRACE)


def _allowed(journal: list[dict[str, Any]]) -> set[str]:
    if has(journal, "succeed", "ack"):
        return {"succeeded"}
    if has(journal, "succeed", "sent"):
        return {"running", "lost", "succeeded", "failed_lost"}
    if has(journal, "start", "ack"):
        return {"running", "lost", "failed_lost"}
    return {"pending", "running", "lost", "failed_lost"}


def _trial(server: Any, tmp: Path, point: str, outcome: str, rng: Any, figures: Any) -> str:
    api = Api(server.url)
    try:
        key = api.run(api.experiment())
        tmp.mkdir(parents=True)
        payload = os.urandom((16 if point == "upload" else 1) * 2**20)
        source = tmp / "model.ckpt"
        source.write_bytes(payload)
        digest = hashlib.sha256(payload).hexdigest()
        journal_path = tmp / "journal.jsonl"
        config = {
            "mode": "lifecycle",
            "url": server.url,
            "home": str(tmp / "home1"),
            "run": list(key),
            "journal": str(journal_path),
            "interval": 0.2,
            "hold": 0.4,
            "files": [[str(source), "model.ckpt"]],
            "timeout": 20,
        }
        resumer = None
        if outcome == "resume":
            # Started now, so that it is imported and connected before the kill; it waits
            # for the go file, then takes the run over with a new lease and succeeds.
            resume_journal = tmp / "resume.jsonl"
            resumer = spawn_worker(
                {
                    **config,
                    "home": str(tmp / "home2"),
                    "resume": True,
                    "files": [],
                    "hold": 0.05,
                    "go": str(tmp / "go"),
                    "journal": str(resume_journal),
                },
                tmp / "resume.log",
            )
        worker = spawn_worker(config, tmp / "worker.log")
        trigger = {
            "start": ("start", "sent"),
            "heartbeat": ("start", "ack"),
            "upload": ("upload", "sent"),
            "succeed": ("succeed", "sent"),
        }[point]
        delay = {
            "start": (0.0, 0.03),
            "heartbeat": (0.05, 0.35),
            "upload": (0.0, 0.06),
            "succeed": (0.0, 0.02),
        }[point]
        wait_until(
            lambda: has(read_journal(journal_path), *trigger) or worker.poll() is not None,
            timeout=60,
            what=f"the worker to reach {trigger}",
        )
        time.sleep(rng.uniform(*delay))
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
        figures["fault:worker_sigkill"] += 1
        journal = read_journal(journal_path)
        allowed = _allowed(journal)
        state = api.state(key)
        assert state in allowed, (
            f"{point}: state {state!r} after the kill; allowed {allowed}; journal {journal}"
        )

        # Assets: only complete, only what was sent; acknowledged ones are there.
        assets = api.assets(key)
        if has(journal, "upload", "ack"):
            assert "model.ckpt" in assets, assets
        if "model.ckpt" in assets:
            assert has(journal, "upload", "sent")
            assert assets["model.ckpt"]["sha256"] == digest
            assert assets["model.ckpt"]["size"] == len(payload)
            assert api.download_sha(key, "model.ckpt") == digest
            figures["uploads verified"] += 1
        assert set(assets) <= {"model.ckpt"}, assets

        # A request the worker sent just before it died may still be in flight: it can land
        # after the read above (a start on a pending run, a succeed on a running one). So
        # later states are checked against the same table, not against the first read.
        if outcome == "expire":
            killed_at = time.monotonic()

            def settled() -> str | None:
                now = api.state(key)
                if now in ("failed_lost", "succeeded"):
                    return now
                quiet = HEARTBEAT_TIMEOUT + LOST_GRACE + 1.0
                if now == "pending" and time.monotonic() - killed_at > quiet:
                    return now  # the start never arrived: a pending run has nothing to lose
                return None

            final = wait_until(settled, timeout=60, what="the killed worker's run to settle")
            assert final in allowed, (final, allowed, journal)
            if final == "failed_lost":
                edges = api.edges(key)
                assert edges[-2:] == [("running", "lost"), ("lost", "failed_lost")], edges
                result = "expired"
            else:
                result = f"stayed {final}"
        else:
            assert resumer is not None
            if state in ("pending", "running"):
                # Let it go lost first (if it was started), so the resume recovers a lost run.
                time.sleep(0.2)
                state = api.state(key)
            if state == "running":
                state = wait_until(
                    lambda: (now := api.state(key)) != "running" and now,
                    timeout=30,
                    what="the run to go lost before the resume",
                )
            (tmp / "go").touch()
            code = resumer.wait(timeout=120)
            rj = read_journal(resume_journal)
            final = api.state(key)
            assert final in allowed | {"succeeded"}, (final, allowed)
            if has(rj, "succeed", "ack"):
                assert code == 0 and final == "succeeded", (code, final)
                figures["runs recovered by resume"] += 1
                result = f"recovered from {state}"
            else:
                # Refused: the first worker's succeed had landed, or the window had passed.
                assert code != 0 and not has(rj, "start", "ack"), rj
                assert final in ("succeeded", "failed_lost"), (final, rj)
                if final == "succeeded":
                    assert has(journal, "succeed", "sent"), journal
                result = f"resume refused ({final})"
        edges = api.edges(key)
        assert_valid_path(edges, f"{point}/{outcome}")
        assert not any(dst in ("failed_crash", "failed_abandoned") for _, dst in edges), edges
        return result
    finally:
        api.close()


def test_worker_sigkill_at_random_points(
    watchdog_server: Any, tmp_path: Path, rng: Any, figures: Any, soak: bool
) -> None:
    trials = [(p, o) for p in KILL_POINTS for o in OUTCOMES] * (4 if soak else 1)
    with concurrent.futures.ThreadPoolExecutor(min(len(trials), 8)) as pool:
        futures = {
            pool.submit(
                _trial,
                watchdog_server,
                tmp_path / f"t{i}-{p}-{o}",
                p,
                o,
                random.Random(rng.random()),
                figures,
            ): (p, o)
            for i, (p, o) in enumerate(trials)
        }
        results = {}
        errors = []
        for future, (point, outcome) in futures.items():
            try:
                results[(point, outcome)] = future.result()
            except Exception as exc:
                errors.append(f"{point}/{outcome}: {exc}")
    assert not errors, "\n".join(errors)
    print("worker kill trials:", results)


# ------------------------------------------------------------------------------ server kills
def test_server_sigkill_under_load(
    server_factory: Any, store_url: str, tmp_path: Path, rng: Any, figures: Any, soak: bool
) -> None:
    """Several client processes create, start, beat, upload and end runs while the server is
    SIGKILLed and restarted; everything acknowledged is there afterwards."""
    server = server_factory(store_url=store_url)
    api = Api(server.url)
    experiment = api.experiment()
    stop = tmp_path / "stop"
    workers = []
    for i in range(3):
        config = {
            "mode": "load",
            "url": server.url,
            "home": str(tmp_path / f"home{i}"),
            "journal": str(tmp_path / f"journal{i}.jsonl"),
            "experiment_id": experiment,
            "seed": rng.random(),
            "scratch": str(tmp_path / f"scratch{i}"),
            "stop": str(stop),
            "timeout": 120,
        }
        workers.append((spawn_worker(config, tmp_path / f"worker{i}.log"), Path(config["journal"])))
    kills = 8 if soak else 3
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 1.5))
            server.kill(signal.SIGKILL)
            figures["fault:server_sigkill"] += 1
            server.start(port=server.port)
        time.sleep(0.5)
    finally:
        stop.touch()
    crashed = []
    for i, (proc, _journal) in enumerate(workers):
        if proc.wait(timeout=300) != 0:
            crashed.append((tmp_path / f"worker{i}.log").read_text(errors="replace"))

    seen_runs: dict[int, int] = {}
    checked_transitions = checked_assets = 0
    for proc, journal_path in workers:
        journal = read_journal(journal_path)
        for entry in journal:
            if entry["phase"] != "ack" or "run" not in entry:
                continue
            key = (experiment, 0, entry["run"])
            if entry["op"] == "create_run":
                assert entry["run"] not in seen_runs, f"run number {entry['run']} given twice"
                seen_runs[entry["run"]] = proc.pid
            elif entry["op"] == "spooled":
                pytest.fail(f"a terminal transition was spooled: {entry}")
        runs_of = {e["run"] for e in journal if e["op"] == "create_run" and e["phase"] == "ack"}
        for run in runs_of:
            key = (experiment, 0, run)
            edges = api.edges(key)
            assert_valid_path(edges, str(key))
            info = api.get_run(key)
            if has(journal, "start", "ack", run=run):
                assert ("pending", "running") in edges, (key, edges)
                checked_transitions += 1
            if has(journal, "succeed", "ack", run=run):
                assert info["state"] == "succeeded", (key, info)
                checked_transitions += 1
            if has(journal, "fail", "ack", run=run):
                assert info["state"] == "failed_crash", (key, info)
                checked_transitions += 1
            assets = api.assets(key)
            for entry in journal:
                if entry["op"] == "asset" and entry["phase"] == "ack" and entry["run"] == run:
                    assert entry["name"] in assets, (key, entry, assets)
                    assert assets[entry["name"]]["sha256"] == entry["sha256"]
                    assert api.download_sha(key, entry["name"]) == entry["sha256"]
                    checked_assets += 1
    listed = {
        r["run"] for r in api.ok("GET", "/v1/runs", params={"experiment_id": experiment})["runs"]
    }
    assert set(seen_runs) <= listed
    assert checked_transitions > 0 and checked_assets > 0
    figures["acknowledged transitions verified after server kills"] += checked_transitions
    figures["uploads verified"] += checked_assets
    api.close()
    # Everything acknowledged was checked above; now, did every worker get through?
    assert not crashed, "\n\n".join(log[-3000:] for log in crashed)
