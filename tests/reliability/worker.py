"""A worker process for the reliability tests: the real client, driven by a JSON config.

Run as ``python worker.py '<json config>'``. Every call is journaled to ``config["journal"]``
as one JSON line *before* it is sent (``phase: "sent"``) and *after* its answer came back
(``"ack"``, or ``"refused"`` with the error code), so a test that SIGKILLs this process at a
random point knows exactly which transitions were acknowledged. Lines are written with one
``write`` each (no buffering), so they survive a SIGKILL of this process.

Modes (``config["mode"]``):

* ``lifecycle``: start (or resume) one run, ``keep_alive``, upload files, succeed;
* ``load``: create runs in a loop and take each through start, heartbeats, uploads, an end;
* ``race``: wait for a go file, then fire a list of transitions at one run;
* ``create_runs``: wait for a go file, then create runs of one variation.

``config["skew"]`` (seconds) shifts ``time.time`` in this process only (a skewed client clock).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, op: str, phase: str, **fields: Any) -> None:
        line = json.dumps({"op": op, "phase": phase, "pid": os.getpid(), **fields}) + "\n"
        os.write(self._fd, line.encode())


def _skew(seconds: float) -> None:
    real_time, real_time_ns = time.time, time.time_ns
    time.time = lambda: real_time() + seconds  # type: ignore[assignment]
    time.time_ns = lambda: real_time_ns() + int(seconds * 1e9)  # type: ignore[assignment]


def _sleep_via_event() -> None:
    """Under libfaketime with FAKETIME_DONT_FAKE_MONOTONIC=1, Python's ``time.sleep``
    (``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)``) fails with EINVAL, and with a faked
    monotonic clock ``Event.wait`` never returns; so sleep on an Event (real monotonic)."""
    import threading

    def sleep(seconds: float) -> None:
        threading.Event().wait(max(0.0, seconds))

    time.sleep = sleep  # type: ignore[assignment]


def _wait_go(config: dict[str, Any]) -> None:
    go = config.get("go")
    if go:
        while not os.path.exists(go):
            time.sleep(0.002)


def lifecycle(chronicle: Any, config: dict[str, Any], j: Journal) -> None:
    run = chronicle.run(*config["run"])
    hold = float(config.get("hold", 0.3))
    _wait_go(config)
    j("start", "sent", resume=bool(config.get("resume")))
    run.start(resume=bool(config.get("resume")))
    j("start", "ack", lease=run.lease)
    run.keep_alive(float(config.get("interval", 0.2)))
    time.sleep(hold)
    for path, name in config.get("files", []):
        j("upload", "sent", name=name)
        info = run.upload_asset(path, name).result()
        j("upload", "ack", name=name, sha256=info.sha256, size=info.size)
    time.sleep(hold)
    run.wait_uploads()
    j("succeed", "sent")
    run.succeed()
    j("succeed", "ack")


def load(chronicle: Any, config: dict[str, Any], j: Journal) -> None:
    rng = random.Random(config["seed"])
    scratch = Path(config["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    stop = config["stop"]
    count = 0
    while not os.path.exists(stop) and count < int(config.get("max_runs", 1000)):
        count += 1
        run = chronicle.create_run(config["experiment_id"], 0)
        j("create_run", "ack", run=run.run)
        run.start()
        j("start", "ack", run=run.run, lease=run.lease)
        for _ in range(rng.randint(1, 3)):
            run.heartbeat()
            j("heartbeat", "ack", run=run.run)
        handles = []
        for k in range(rng.randint(1, 2)):
            data = rng.randbytes(rng.randint(64 * 1024, 3 * 1024 * 1024))
            path = scratch / f"{os.getpid()}-{run.run}-{k}.bin"
            path.write_bytes(data)
            handles.append(
                (f"a{k}.bin", hashlib.sha256(data).hexdigest(), run.upload_asset(path, f"a{k}.bin"))
            )
        for name, sha, handle in handles:
            info = handle.result()
            assert info.sha256 == sha, (info, sha)
            j("asset", "ack", run=run.run, name=name, sha256=info.sha256)
        if rng.random() < 0.7:
            j("succeed", "sent", run=run.run)
            run.succeed()
            j("succeed", "ack", run=run.run)
        else:
            j("fail", "sent", run=run.run)
            run.fail("crash", "simulated crash")
            j("fail", "ack", run=run.run)
        if run.spooled:
            j("spooled", "ack", run=run.run)


def race(chronicle: Any, config: dict[str, Any], j: Journal) -> None:
    from chronicle_integrations._errors import APIError

    run = chronicle.run(*config["run"])
    holder = f"{socket.gethostname()}:{os.getpid()}"
    _wait_go(config)
    for action in config["actions"]:
        try:
            if action in ("start", "resume"):
                run.start(resume=action == "resume")
            elif action == "heartbeat":
                run.heartbeat()
            elif action == "succeed":
                run.succeed()
            elif action == "fail_crash":
                run.fail("crash")
            elif action == "fail_abandoned":
                run.fail("abandoned")
            else:
                raise ValueError(action)
        except APIError as exc:
            j(action, "refused", code=exc.code, lease=run.lease, holder=holder)
        else:
            j(action, "ack", lease=run.lease, holder=holder)


def create_runs(chronicle: Any, config: dict[str, Any], j: Journal) -> None:
    _wait_go(config)
    for _ in range(int(config["count"])):
        run = chronicle.create_run(config["experiment_id"], int(config["variation"]))
        j("create_run", "ack", run=run.run)


def main() -> int:
    config = json.loads(sys.argv[1])
    if config.get("skew"):
        _skew(float(config["skew"]))
    if config.get("sleep_via_event"):
        _sleep_via_event()
    j = Journal(config["journal"])
    j("clock", "ack", time=time.time())
    from chronicle_integrations import Chronicle

    chronicle = Chronicle(
        url=config["url"],
        api_key=config.get("api_key"),
        home=config["home"],
        timeout=float(config.get("timeout", 60)),
    )
    try:
        {"lifecycle": lifecycle, "load": load, "race": race, "create_runs": create_runs}[
            config["mode"]
        ](chronicle, config, j)
    finally:
        chronicle.close()
    j("exit", "ack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
