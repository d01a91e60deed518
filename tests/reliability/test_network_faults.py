"""Network faults: the real client talks to a real server through a proxy that delays, cuts
(FIN) and resets (RST) connections at random byte offsets, in both directions.

* Large uploads all end byte-identical (the server's stored object is hashed independently) and
  are *resumed*, not restarted: the proxy counts the bytes it forwarded upstream, and what was
  sent beyond the payload is far less than what restarts would have re-sent (the bytes already
  forwarded on the connections that were cut), and chunks resuming at an offset > 0 are seen.
* Transitions and heartbeats take effect exactly once although responses get lost and requests
  are retried: each run's event log is exactly ``created -> running -> succeeded``, each asset
  was published once, and ``create_run`` retries never create a ghost run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from rel_helpers import Api, FaultyProxy, Plan, assert_valid_path, sha256_file

from chronicle_integrations import Chronicle

MiB = 2**20


def test_large_uploads_through_faulty_network(
    server_factory: Any, tmp_path: Path, rng: Any, figures: Any, soak: bool
) -> None:
    server = server_factory()
    count = 100 if soak else 30
    base = os.urandom(40 * MiB)
    files = []
    payload = 0
    for i in range(count):
        size = rng.randint(20 * MiB, 40 * MiB)
        start = rng.randint(0, len(base) - size)
        header = os.urandom(64)  # every file distinct (objects are content-addressed)
        data = header + base[start : start + size - len(header)]
        path = tmp_path / "src" / f"ckpt-{i}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        files.append((path, f"ckpts/ckpt-{i}.bin", hashlib.sha256(data).hexdigest(), size))
        payload += size
    del base

    api = Api(server.url)
    # Responses are reset or delayed, not cut with a FIN: a FIN inside the header block is the
    # bug test_response_cut_inside_headers_is_retried pins down.
    with FaultyProxy(server.port, rng) as proxy:
        chronicle = Chronicle(url=proxy.url, home=tmp_path / "home", upload_workers=4, timeout=120)
        try:
            experiment = chronicle.create_experiment("network-faults", variations=[{}])
            runs = [chronicle.create_run(experiment, 0) for _ in range(3)]
            extra = [chronicle.create_run(experiment, 0) for _ in range(7)]
            for run in runs:
                run.start()
                run.keep_alive(0.2)
            handles = []
            for i, (path, name, digest, size) in enumerate(files):
                run = runs[i % len(runs)]
                handles.append((run, name, digest, size, run.upload_asset(path, name)))
            for run in runs:
                run.succeed()
            for _run, name, digest, _size, handle in handles:
                info = handle.result(timeout=600)
                assert info.sha256 == digest, name
        finally:
            chronicle.close()
        stats = dict(proxy.stats)

    # Byte-identical: the server's listing, and the stored object hashed here.
    for run, name, digest, size, _ in handles:
        key = run.key_tuple
        asset = api.assets(key)[name]
        assert (asset["sha256"], asset["size"]) == (digest, size), name
        stored = server.assets / "objects" / digest[:2] / digest
        assert sha256_file(stored) == digest, name
    figures["uploads verified"] += len(handles)
    figures["bytes uploaded through the faulty proxy"] += payload

    # Exactly once in effect.
    numbers = sorted(
        r["run"] for r in api.ok("GET", "/v1/runs", params={"experiment_id": experiment})["runs"]
    )
    assert numbers == list(range(len(runs) + len(extra))), numbers
    for run in runs:
        events = api.events(run.key_tuple)
        edges = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "transition"]
        assert_valid_path(edges, run.key)
        assert edges == [(None, "pending"), ("pending", "running"), ("running", "succeeded")], edges
        published = [e["detail"]["name"] for e in events if e["kind"] == "asset"]
        assert sorted(published) == sorted(n for r, n, *_ in handles if r is run), published

    # Resumed, not restarted.
    faults = {k: v for k, v in stats.items() if k.startswith("fault:")}
    for kind, n in faults.items():
        figures[f"{kind} (proxy)"] += n
    print(f"proxy: payload {payload} bytes; {stats}")
    sent = stats.get("bytes_up", 0)
    assert sent < 2 * payload, stats
    excess = sent - payload
    cut = stats.get("cut_up_bytes", 0)
    if cut > 64 * MiB:
        # A restart re-sends every byte forwarded on a cut connection; a resume re-sends only
        # what the server had not yet stored when the connection died.
        assert excess < 0.5 * cut, f"excess {excess} vs {cut} bytes forwarded before cuts"
        assert stats.get("resumed_puts", 0) > 0, stats
    assert sum(faults.values()) > 0, stats


@pytest.mark.parametrize("offset", [0, 16, 40])
def test_response_cut_inside_headers_is_retried(
    server_factory: Any, tmp_path: Path, rng: Any, figures: Any, offset: int
) -> None:
    """The server processed the request; its answer dies after ``offset`` bytes of the status
    line/headers. The client must retry (the call is idempotent), not fail, and not create a
    second run."""
    server = server_factory()
    api = Api(server.url)
    experiment = api.experiment()
    with FaultyProxy(server.port, rng, script=[Plan("down", "cut", offset)]) as proxy:
        chronicle = Chronicle(url=proxy.url, home=tmp_path / "home", timeout=20)
        try:
            run = chronicle.create_run(experiment, 0)
        finally:
            chronicle.close()
            figures["fault:cut_down (proxy)"] += proxy.faults()
    assert run.run == 0
    runs = api.ok("GET", "/v1/runs", params={"experiment_id": experiment})["runs"]
    assert [r["run"] for r in runs] == [0]


def test_uploads_resume_across_replicas(
    server_factory: Any, tmp_path: Path, rng: Any, figures: Any
) -> None:
    """Two server processes on one store (database and asset directory), connections
    alternating between them through the faulty proxy: a chunk cut on one replica resumes on
    the other, and every asset still ends byte-identical."""
    first = server_factory()
    second = server_factory(store_url=first.store_url, assets=first.assets)
    files = []
    for i in range(10):
        data = os.urandom(rng.randint(4 * MiB, 12 * MiB))
        path = tmp_path / f"r{i}.bin"
        path.write_bytes(data)
        files.append((path, hashlib.sha256(data).hexdigest(), len(data)))
    with FaultyProxy([first.port, second.port], rng, mean_up=6 * MiB) as proxy:
        chronicle = Chronicle(url=proxy.url, home=tmp_path / "home", upload_workers=3, timeout=120)
        try:
            experiment = chronicle.create_experiment("replicas", variations=[{}])
            run = chronicle.create_run(experiment, 0).start()
            handles = [run.upload_asset(p) for p, _, _ in files]
            run.succeed()
            infos = [h.result(timeout=300) for h in handles]
        finally:
            chronicle.close()
        stats = dict(proxy.stats)
    api = Api(first.url)
    assets = api.assets(run.key_tuple)
    for (path, digest, size), info in zip(files, infos, strict=True):
        assert info.sha256 == digest
        assert (assets[path.name]["sha256"], assets[path.name]["size"]) == (digest, size)
        assert sha256_file(first.assets / "objects" / digest[:2] / digest) == digest
    assert_valid_path(api.edges(run.key_tuple), run.key)
    assert api.state(run.key_tuple) == "succeeded"
    for kind, n in stats.items():
        if kind.startswith("fault:"):
            figures[f"{kind} (proxy)"] += n
    figures["uploads verified"] += len(files)
    print(f"replicas proxy: {stats}")
    assert stats.get("resumed_puts", 0) > 0, stats
