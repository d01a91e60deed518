"""A fleet of real Chronicle clients (threads, one client each) that start runs, beat, upload
and finish through a load balancer, recording every answer the server acknowledged, and the
checks made afterwards against the database's story of every run."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from testkit import HttpApi

from chronicle_integrations import Chronicle
from chronicle_integrations.lifecycle import is_valid_path


@dataclass
class Acks:
    """What the servers acknowledged to the fleet (all under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    started: set[tuple[str, int, int]] = field(default_factory=set)
    succeeded: set[tuple[str, int, int]] = field(default_factory=set)
    #: run -> the highest ``last_heartbeat_at`` a heartbeat answer carried
    beats: dict[tuple[str, int, int], float] = field(default_factory=dict)
    #: (run, asset name) -> (sha256, size)
    assets: dict[tuple[tuple[str, int, int], str], tuple[str, int]] = field(default_factory=dict)
    heartbeats: int = 0
    errors: list[str] = field(default_factory=list)
    spooled: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        with self.lock:
            return len(self.succeeded)


class Fleet:
    """``clients`` threads, each its own :class:`Chronicle` against ``url`` (a balancer)."""

    def __init__(
        self,
        url: str,
        home: Path,
        experiment_id: str,
        *,
        clients: int = 6,
        beats_per_run: int = 6,
        upload_every: int = 2,
        upload_sizes: tuple[tuple[int, int], ...] = ((64 * 1024, 3 * 1024 * 1024),),
        seed: int = 18,
    ) -> None:
        """``upload_sizes``: byte ranges the uploads take in turn (a client's k-th upload is
        drawn from range k modulo their number)."""
        self.upload_sizes = upload_sizes
        self.url = url
        self.home = home
        self.experiment_id = experiment_id
        self.acks = Acks()
        self.stop = threading.Event()
        self.beats_per_run = beats_per_run
        self.upload_every = upload_every
        self._threads = [
            threading.Thread(target=self._client, args=(i, seed + i), daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> Fleet:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(300)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"fleet clients still running: {alive}"

    def _client(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        files = self.home / f"files{index}"
        files.mkdir(parents=True, exist_ok=True)
        # A retry budget that outlasts a replica restart (the balancer sends the retries to
        # the replica still up anyway).
        chronicle = Chronicle(url=self.url, home=self.home / f"client{index}", timeout=120)
        acks = self.acks
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                run = chronicle.create_run(self.experiment_id, index % 2).start()
                key = run.key_tuple
                with acks.lock:
                    acks.started.add(key)
                handles = []
                for step in range(self.beats_per_run):
                    info = run.beat(quick=False, progress={"step": step})
                    with acks.lock:
                        acks.heartbeats += 1
                        at = info.last_heartbeat_at or 0.0
                        acks.beats[key] = max(acks.beats.get(key, 0.0), at)
                    if step == 1 and n % self.upload_every == 0:
                        low, high = self.upload_sizes[
                            (n // self.upload_every) % len(self.upload_sizes)
                        ]
                        data = rng.randbytes(rng.randint(low, high))
                        path = files / f"r{n}.bin"
                        path.write_bytes(data)
                        digest = hashlib.sha256(data).hexdigest()
                        with acks.lock:
                            acks.assets[(key, path.name)] = (digest, len(data))
                        handles.append(run.upload_asset(path))
                for handle in handles:
                    handle.result(timeout=300)
                run.succeed(timeout=300)
                if run.spooled:
                    with acks.lock:
                        acks.spooled.append(run.key)
                    continue
                with acks.lock:
                    acks.succeeded.add(key)
        except Exception as exc:  # every client must carry on through its retries
            with acks.lock:
                acks.errors.append(f"client {index}: {type(exc).__name__}: {exc}")
        finally:
            chronicle.close(timeout=60)


def verify(url: str, acks: Acks, assets_dir: Path | None = None) -> dict[str, int]:
    """Check the database's story of every run the fleet touched against what was
    acknowledged: no lost transition or heartbeat, no torn asset, every event log a walk."""
    assert not acks.errors, acks.errors
    assert not acks.spooled, f"transitions spooled (never acknowledged): {acks.spooled}"
    checked = {"runs": 0, "assets": 0}
    with HttpApi(url) as api:
        for key in sorted(acks.started):
            path = f"/v1/runs/{key[0]}/{key[1]}/{key[2]}"
            run = api.ok("GET", path)
            if key in acks.succeeded:
                assert run["state"] == "succeeded", (key, run)
            else:
                assert run["state"] != "pending", (key, run)  # its start was acknowledged
            beat = acks.beats.get(key)
            if beat is not None:
                assert (run["last_heartbeat_at"] or 0.0) >= beat, (key, run, beat)
            events = api.ok("GET", path + "/events")["events"]
            edges = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "transition"]
            assert is_valid_path(edges), (key, edges)
            checked["runs"] += 1
        for (key, name), (digest, size) in sorted(acks.assets.items()):
            if key not in acks.succeeded:
                continue  # its upload was never acknowledged (the fleet stopped mid-run)
            path = f"/v1/runs/{key[0]}/{key[1]}/{key[2]}"
            listed = {a["name"]: a for a in api.ok("GET", path + "/assets")["assets"]}
            assert (listed[name]["sha256"], listed[name]["size"]) == (digest, size), key
            hasher = hashlib.sha256()
            with api.request("GET", f"{path}/assets/{name}", stream=True) as resp:
                assert resp.status_code == 200, resp.text
                for block in resp.iter_content(1 << 20):
                    hasher.update(block)
            assert hasher.hexdigest() == digest, (key, name)
            if assets_dir is not None:
                blob = assets_dir / "objects" / digest[:2] / digest
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
            checked["assets"] += 1
    return checked


def wait_progress(acks: Acks, more: int, timeout: float = 180.0) -> None:
    """Until ``more`` runs beyond the current count succeeded (the fleet carries on)."""
    target = acks.done + more
    deadline = time.monotonic() + timeout
    while acks.done < target:
        with acks.lock:
            errors = list(acks.errors)
        assert not errors, errors
        assert time.monotonic() < deadline, f"the fleet stalled at {acks.done} runs"
        time.sleep(0.1)


def experiment(url: str, name: str = "fleet") -> str:
    """A new experiment with two variations, through ``url``."""
    eid = f"{name}-{os.urandom(5).hex()}"
    body = {"name": name, "variations": [{"v": 0}, {"v": 1}], "experiment_id": eid}
    response = requests.post(f"{url}/v1/experiments", json=body, timeout=30)
    assert response.status_code == 201, response.text
    return eid
