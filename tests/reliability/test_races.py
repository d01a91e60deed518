"""Concurrency: client processes racing on one run and on one variation, through the HTTP API.

Each phase starts its worker processes first (imports and connections take a while), then
releases them together with a go file, so their requests really overlap. Afterwards:

* the event log is a walk through the transition table (``lifecycle.is_valid_path``);
* exactly one lease is accepted, the one of the last start/resume in the log;
* at most one terminal transition happened, every acknowledged end agrees with it, and a
  leased end was sent by the holder of the lease at that moment;
* run numbers handed out to racing ``create_run`` calls are unique and dense.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rel_helpers import Api, assert_valid_path, read_journal, spawn_worker, wait_until

WORKERS = 6


def _race(server: Any, tmp: Path, name: str, configs: list[dict[str, Any]]) -> list[list[dict]]:
    go = tmp / f"{name}.go"
    procs = []
    for i, config in enumerate(configs):
        journal = tmp / f"{name}-{i}.jsonl"
        full = {
            "url": server.url,
            "home": str(tmp / f"home-{name}-{i}"),
            "journal": str(journal),
            "go": str(go),
            "timeout": 60,
            **config,
        }
        procs.append((spawn_worker(full, tmp / f"{name}-{i}.log"), journal))
    # Release them together once every one of them is up (its clock line is written first).
    wait_until(
        lambda: all(read_journal(j) for _, j in procs),
        timeout=120,
        what="the racing workers to start",
    )
    time.sleep(0.3)  # imports done, Chronicle built: waiting on the go file
    go.touch()
    journals = []
    for proc, journal in procs:
        code = proc.wait(timeout=300)
        assert code == 0, (name, code, (tmp / f"{journal.stem}.log").read_text()[-2000:])
        journals.append(read_journal(journal))
    return journals


def _starts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["kind"] == "transition"
        and e["to_state"] == "running"
        and e["cause"] in ("start", "resume")
    ]


def test_races(
    server_factory: Any, store_url: str, tmp_path: Path, rng: Any, figures: Any, soak: bool
) -> None:
    server = server_factory(store_url=store_url)
    api = Api(server.url)
    rounds = 3 if soak else 1
    for _ in range(rounds):
        experiment = api.experiment(variations=2)

        # -- 1. start / resume / heartbeat on one run: one lease holder at the end --------
        key = api.run(experiment)
        configs = [
            {
                "mode": "race",
                "run": list(key),
                "actions": [
                    rng.choice(["start", "resume", "resume", "heartbeat"]) for _ in range(5)
                ],
            }
            for _ in range(WORKERS)
        ]
        journals = _race(server, tmp_path, f"lease-{experiment}", configs)
        figures["racing transitions"] += sum(len(c["actions"]) for c in configs)
        edges = api.edges(key)
        assert_valid_path(edges, "lease race")
        info = api.get_run(key)
        finals = {}
        for journal in journals:
            acked = [e for e in journal if e["phase"] == "ack" and e["op"] in ("start", "resume")]
            if acked:
                finals[acked[-1]["holder"]] = acked[-1]["lease"]
        if not finals:
            assert info["state"] == "pending", info
        else:
            accepted = []
            for holder, lease in finals.items():
                resp = api.request(
                    "POST", f"/v1/runs/{key[0]}/{key[1]}/{key[2]}/heartbeat", json={"lease": lease}
                )
                if resp.status_code == 200:
                    accepted.append(holder)
                else:
                    assert resp.status_code == 409, resp.text
                    assert resp.json()["error"]["code"] == "lease_conflict", resp.text
            assert len(accepted) == 1, (accepted, finals, edges)
            assert info["lease_holder"] == accepted[0], (info, accepted)
            starts = _starts(api.events(key))
            assert starts[-1]["detail"]["holder"] == accepted[0], starts

        # -- 2. the same, ending with succeed / fail: exactly one end ---------------------
        key = api.run(experiment)
        configs = [
            {
                "mode": "race",
                "run": list(key),
                "actions": [
                    "resume",
                    "heartbeat",
                    rng.choice(["succeed", "fail_crash", "fail_abandoned"]),
                    "heartbeat",
                ],
            }
            for _ in range(WORKERS)
        ]
        journals = _race(server, tmp_path, f"end-{experiment}", configs)
        figures["racing transitions"] += sum(len(c["actions"]) for c in configs)
        events = api.events(key)
        edges = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "transition"]
        assert_valid_path(edges, "end race")
        final = api.state(key)
        terminal = [
            e
            for e in events
            if e["kind"] == "transition"
            and e["to_state"] in ("succeeded", "failed_crash", "failed_abandoned")
        ]
        assert len(terminal) == 1 and terminal[0]["to_state"] == final, (final, edges)
        target = {
            "succeed": "succeeded",
            "fail_crash": "failed_crash",
            "fail_abandoned": "failed_abandoned",
        }
        enders = []
        for journal in journals:
            for entry in journal:
                if entry["op"] in target and entry["phase"] == "ack":
                    assert target[entry["op"]] == final, (entry, final, edges)
                    enders.append(entry["holder"])
                if entry["op"] == "heartbeat" and entry["phase"] == "ack":
                    # A heartbeat after the end would mean the end was not final.
                    ended = [e for e in journal if e["op"] in target and e["phase"] == "ack"]
                    assert not ended or journal.index(ended[0]) > journal.index(entry), journal
        assert enders, journals
        if final in ("succeeded", "failed_crash"):
            before = [e for e in events if e["id"] < terminal[0]["id"]]
            holder = _starts(before)[-1]["detail"]["holder"]
            assert holder in enders, (holder, enders, edges)

        # -- 3. create_run on one variation: unique, dense run numbers --------------------
        per = 5
        configs = [
            {"mode": "create_runs", "experiment_id": experiment, "variation": 1, "count": per}
            for _ in range(WORKERS)
        ]
        journals = _race(server, tmp_path, f"create-{experiment}", configs)
        numbers = [e["run"] for j in journals for e in j if e["op"] == "create_run"]
        assert sorted(numbers) == list(range(WORKERS * per)), sorted(numbers)
        listed = sorted(
            r["run"]
            for r in api.ok("GET", "/v1/runs", params={"experiment_id": experiment})["runs"]
            if r["variation"] == 1
        )
        assert listed == list(range(WORKERS * per)), listed
        figures["racing create_run calls"] += len(numbers)
    api.close()
