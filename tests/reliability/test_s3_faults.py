"""Faults around the S3 asset store (issue 17), on a real SeaweedFS and real server processes.

* **Worker <-> S3, direct mode**: the fault proxy sits in front of SeaweedFS and the server
  presigns for the proxy (``--s3-public-endpoint-url``), so every part the worker sends
  crosses connections that are cut, reset and delayed at random byte offsets.
* **Server <-> S3, proxied mode**: the server's own endpoint (``--s3-endpoint-url``) is the
  proxy: every part, completion, copy and delete the server sends may be cut.
* **S3 unreachable for a while** (both modes): the proxy refuses every connection (and resets
  the live ones) in the middle of the uploads, then comes back. While it is down the server
  answers 503 ``unavailable`` (never a 500), and the client waits it out.
* **The Chronicle server SIGKILLed** between parts of a proxied upload (S3 made unreachable
  first, so nothing more can be stored: the kill lands between parts for certain), and in the
  window between "all parts stored, object complete in S3" and "asset recorded" (the test
  holds SQLite's write lock, so the server blocks right there; see test_crash_windows.py), in
  both modes. The client's own retries resume or re-complete the upload on the restarted
  server.

Every upload must end byte-identical (the bucket's object hashed independently with boto3),
no object may be visible half-written, nothing acknowledged may be lost, and no multipart
upload, temporary object or local tail may be left behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import s3kit
from rel_helpers import Api, FaultyProxy, run_path, wait_until

from chronicle_integrations import Chronicle
from chronicle_integrations.client._deadline import RetryPolicy
from chronicle_integrations.client._direct import PART_ATTEMPTS
from chronicle_integrations.client._http import HttpTransport

pytestmark = pytest.mark.s3
MiB = 2**20
#: The part size of direct uploads here (S3's smallest: several parts per upload).
PART = 5 * MiB
#: The least time S3 stays unreachable in the outage tests.
OUTAGE_SECONDS = 8.0
#: In direct mode: longer than the backoffs between a worker's PART_ATTEMPTS attempts of a
#: part can last, so that a worker that gives a part up after so many attempts fails here.
DIRECT_OUTAGE_SECONDS = 2.0 + sum(
    min(RetryPolicy().cap, RetryPolicy().base * 2**k) for k in range(PART_ATTEMPTS - 1)
)


# ------------------------------------------------------------------------------ helpers
def _s3_port(seaweedfs: s3kit.SeaweedServer) -> int:
    return int(urlsplit(seaweedfs.endpoint).port or 0)


def _files(tmp_path: Path, rng: Any, sizes: list[int]) -> list[tuple[Path, str]]:
    files = []
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        path = tmp_path / f"ckpt-{i}.bin"
        path.write_bytes(data)
        files.append((path, hashlib.sha256(data).hexdigest()))
    return files


def _parts_stored(seaweedfs: s3kit.SeaweedServer, bucket: str) -> int:
    """Parts stored so far in the bucket's unfinished multipart uploads."""
    client = seaweedfs.client()
    total = 0
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        try:
            listing = client.list_parts(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        except Exception:  # completed or aborted meanwhile
            continue
        total += len(listing.get("Parts", []))
    return total


def _exists(seaweedfs: s3kit.SeaweedServer, bucket: str, key: str) -> bool:
    try:
        seaweedfs.client().head_object(Bucket=bucket, Key=key)
    except Exception:
        return False
    return True


def _object_key(sha: str) -> str:
    return f"assets/objects/{sha[:2]}/{sha}"


def _assert_bucket_holds_exactly(
    seaweedfs: s3kit.SeaweedServer, bucket: str, shas: set[str], figures: Any
) -> None:
    """The bucket holds one complete object per digest in ``shas`` (its bytes hashed here)
    and nothing else: no other object, no temporary one, no multipart upload."""
    client = seaweedfs.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted(keys) == sorted(_object_key(sha) for sha in shas), keys
    for sha in shas:
        body = client.get_object(Bucket=bucket, Key=_object_key(sha))["Body"]
        hasher = hashlib.sha256()
        for block in body.iter_chunks(MiB):
            hasher.update(block)
        assert hasher.hexdigest() == sha, f"object {sha} holds other bytes"
        figures["uploads verified"] += 1
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def _server_logs(server: Any) -> str:
    """Everything the server printed, over all its starts."""
    logs = sorted(Path(server._log_dir).glob("server-*.log"))
    return "\n".join(p.read_text(errors="replace") for p in logs)


def _assert_no_internal_errors(server: Any) -> str:
    """No 500 (a bug) and no unexpected exception in any of the server's logs; returns them."""
    logs = _server_logs(server)
    assert not re.search(r'HTTP/1\.1" 500', logs), "the server answered 500 internal"
    assert "unexpected error in" not in logs, "an exception escaped a route"
    return logs


def _no_tails(server: Any) -> list[str]:
    work = Path(server._log_dir) / "home" / "s3-work"
    return sorted(p.name for p in work.iterdir()) if work.exists() else []


# ------------------------------------------------------------------------------ network faults
def test_direct_parts_through_a_faulty_network_end_byte_identical(
    server_factory: Any,
    seaweedfs: s3kit.SeaweedServer,
    s3_bucket: str,
    tmp_path: Path,
    rng: Any,
    figures: Any,
) -> None:
    with FaultyProxy(_s3_port(seaweedfs), rng, mean_up=8 * MiB, mean_down=64 * 1024) as proxy:
        extra = ("--s3-public-endpoint-url", proxy.url, "--s3-part-size", str(PART))
        server = server_factory(**s3kit.server_kwargs(seaweedfs, s3_bucket, *extra))
        files = _files(tmp_path, rng, [rng.randint(12 * MiB, 24 * MiB) for _ in range(4)])
        with Chronicle(url=server.url, home=tmp_path / "home", timeout=120) as chronicle:
            run = chronicle.create_run(chronicle.create_experiment("s3f", variations=[{}]), 0)
            run.start()
            handles = [run.upload_asset(path) for path, _ in files]
            infos = [h.result(600) for h in handles]
            run.succeed()
        faults = proxy.faults()
    assert faults > 0, "the proxy injected no fault: the test proved nothing"
    figures["faults injected (S3 direct parts)"] += faults
    for info, (_, sha) in zip(infos, files, strict=True):
        assert info.sha256 == sha
    _assert_bucket_holds_exactly(seaweedfs, s3_bucket, {sha for _, sha in files}, figures)
    assert "PUT /v1/uploads/" not in server.output(), "a part went through the server"


def test_proxied_parts_through_a_faulty_network_between_server_and_s3(
    server_factory: Any,
    seaweedfs: s3kit.SeaweedServer,
    s3_bucket: str,
    tmp_path: Path,
    rng: Any,
    figures: Any,
) -> None:
    """The server's parts (16 MiB: 2-3 per upload), completions, copies and deletes cross a
    network that cuts, resets and delays them; boto3's retries and the client's resumes carry
    every upload through, verified by the server's own SHA-256 and here."""
    with FaultyProxy(_s3_port(seaweedfs), rng, mean_up=8 * MiB, mean_down=64 * 1024) as proxy:
        proxy.enabled = False  # the server's start-up check of the bucket goes through cleanly
        extra = ("--uploads", "proxied", "--s3-endpoint-url", proxy.url)
        server = server_factory(**s3kit.server_kwargs(seaweedfs, s3_bucket, *extra))
        proxy.enabled = True
        files = _files(tmp_path, rng, [rng.randint(20 * MiB, 40 * MiB) for _ in range(4)])
        with Chronicle(url=server.url, home=tmp_path / "home", timeout=120) as chronicle:
            run = chronicle.create_run(chronicle.create_experiment("s3f", variations=[{}]), 0)
            run.start()
            handles = [run.upload_asset(path) for path, _ in files]
            infos = [h.result(600) for h in handles]
            run.succeed()
            listed = {a.name: a.sha256 for a in run.assets()}
        faults = proxy.faults()
    assert faults > 0, "the proxy injected no fault: the test proved nothing"
    figures["faults injected (server <-> S3)"] += faults
    for info, (path, sha) in zip(infos, files, strict=True):
        assert info.sha256 == sha and listed[path.name] == sha
    _assert_bucket_holds_exactly(seaweedfs, s3_bucket, {sha for _, sha in files}, figures)
    _assert_no_internal_errors(server)
    assert _no_tails(server) == []


# ------------------------------------------------------------------------------ outage
@pytest.mark.parametrize("mode", ["proxied", "direct"])
def test_s3_unreachable_for_a_while(
    mode: str,
    server_factory: Any,
    seaweedfs: s3kit.SeaweedServer,
    s3_bucket: str,
    tmp_path: Path,
    rng: Any,
    figures: Any,
) -> None:
    """S3 goes away (connections refused, live ones reset) in the middle of a part, 20 MiB
    into the uploads. It stays away until the server has answered 503 ``unavailable`` to a
    probe and (proxied) to an upload chunk, and for at least :data:`OUTAGE_SECONDS`
    (direct: :data:`DIRECT_OUTAGE_SECONDS`, longer than a worker's part attempts last).
    Every upload ends byte-identical once S3 is back."""
    with FaultyProxy(_s3_port(seaweedfs), rng) as proxy:
        proxy.enabled = False  # no random faults: only the outage
        extra = ["--uploads", mode, "--s3-endpoint-url", proxy.url, "--s3-part-size", str(PART)]
        if mode == "direct":
            extra += ["--s3-public-endpoint-url", proxy.url]
        server = server_factory(**s3kit.server_kwargs(seaweedfs, s3_bucket, *extra))
        # (proxied parts are 16 MiB: 20 MiB in is the middle of the first file's part 2)
        first = 40 * MiB if mode == "proxied" else rng.randint(12 * MiB, 24 * MiB)
        sizes = [first] + [rng.randint(12 * MiB, 24 * MiB) for _ in range(3)]
        files = _files(tmp_path, rng, sizes)
        outage = OUTAGE_SECONDS if mode == "proxied" else DIRECT_OUTAGE_SECONDS

        # A probe: an upload begun before the outage, whose status needs S3 (nothing cached).
        api = Api(server.url)
        key = api.run(api.experiment())
        lease = api.ok("POST", run_path(key) + "/start")["lease"]
        probe = api.ok(
            "POST", run_path(key) + "/uploads", 201, json={"name": "probe", "lease": lease}
        )["upload_id"]

        with Chronicle(
            url=server.url, home=tmp_path / "home", timeout=120, upload_workers=1
        ) as chronicle:
            run = chronicle.create_run(chronicle.create_experiment("s3f", variations=[{}]), 0)
            run.start()
            proxy.refuse_at = proxy.stats["bytes_up"] + 20 * MiB
            handles = [run.upload_asset(path) for path, _ in files]
            wait_until(lambda: proxy.refusing, timeout=120, what="the outage")
            began = time.monotonic()
            done_at_outage = sum(h.done() for h in handles)
            answer = api.request("GET", f"/v1/uploads/{probe}", timeout=120)
            if mode == "proxied":
                wait_until(
                    lambda: re.search(r'"PUT /v1/uploads/\S+ HTTP/1\.1" 503', server.output()),
                    timeout=120,
                    what="a chunk answered 503 while S3 is away",
                )
            time.sleep(max(0.0, outage - (time.monotonic() - began)))
            proxy.refuse(False)
            figures["fault:s3_outage"] += 1
            figures["S3 outage seconds survived"] += int(time.monotonic() - began)
            infos = [h.result(600) for h in handles]
            run.succeed()
        api.close()
    assert done_at_outage < len(files), "every upload was done before the outage"
    assert answer.status_code == 503, (answer.status_code, answer.text)
    assert answer.json()["error"]["code"] == "unavailable", answer.text
    for info, (_, sha) in zip(infos, files, strict=True):
        assert info.sha256 == sha
    _assert_bucket_holds_exactly(seaweedfs, s3_bucket, {sha for _, sha in files}, figures)
    logs = _assert_no_internal_errors(server)
    assert re.search(r'HTTP/1\.1" 503', logs)
    if mode == "direct":  # the outage was waited out, not taken for an unreachable endpoint
        assert "PUT /v1/uploads/" not in logs, "the worker fell back to the proxied path"
    assert _no_tails(server) == []


# ------------------------------------------------------------------------------ server kills
def test_server_sigkill_between_parts_of_a_proxied_upload_resumes(
    server_factory: Any,
    seaweedfs: s3kit.SeaweedServer,
    s3_bucket: str,
    tmp_path: Path,
    rng: Any,
    figures: Any,
) -> None:
    """One 40 MiB upload (parts of 16 + 16 + 8 MiB). Once part 1 is in the bucket, S3 is made
    unreachable (so no further part can be stored) and the server is SIGKILLed: it dies
    between parts, with the tail of the next part on its disk. Restarted on the same port,
    database and bucket, it resumes from ListParts + the tail; the client carries on."""
    with FaultyProxy(_s3_port(seaweedfs), rng) as proxy:
        proxy.enabled = False
        extra = ("--uploads", "proxied", "--s3-endpoint-url", proxy.url)
        server = server_factory(**s3kit.server_kwargs(seaweedfs, s3_bucket, *extra))
        [(path, sha)] = _files(tmp_path, rng, [40 * MiB])
        with Chronicle(url=server.url, home=tmp_path / "home", timeout=120) as chronicle:
            run = chronicle.create_run(chronicle.create_experiment("s3f", variations=[{}]), 0)
            run.start()
            handle = run.upload_asset(path)
            wait_until(
                lambda: _parts_stored(seaweedfs, s3_bucket) > 0,
                timeout=120,
                what="part 1 in the bucket",
            )
            proxy.refuse(True)
            server.kill(signal.SIGKILL)
            figures["fault:server_sigkill"] += 1
            stored = _parts_stored(seaweedfs, s3_bucket)
            published = _exists(seaweedfs, s3_bucket, _object_key(sha))
            proxy.refuse(False)
            server.start(port=server.port)
            info = handle.result(600)
            run.succeed()
            listed = {a.name: a.sha256 for a in run.assets()}
    assert 1 <= stored < 3 and not published, (stored, published)
    assert info.sha256 == sha and listed[path.name] == sha
    _assert_bucket_holds_exactly(seaweedfs, s3_bucket, {sha}, figures)
    _assert_no_internal_errors(server)
    restarted = server.output()
    assert re.search(r"PUT /v1/uploads/\S+\?offset=[1-9]", restarted), (
        "the restarted server got no resumed chunk"
    )
    assert "offset=0 " not in restarted, "the upload started over from byte 0"
    assert _no_tails(server) == []


@pytest.mark.parametrize("mode", ["proxied", "direct"])
def test_server_sigkill_between_object_complete_and_asset_recorded(
    mode: str,
    server_factory: Any,
    seaweedfs: s3kit.SeaweedServer,
    s3_bucket: str,
    tmp_path: Path,
    rng: Any,
    figures: Any,
) -> None:
    """The client (the real ``HttpTransport``) has sent every byte; the test takes SQLite's
    write lock just before the client completes (its ``verify`` hook), so the server
    completes the object in S3 (direct: the multipart upload at the content address;
    proxied: completed, verified, copied to the content address, temporary object deleted)
    and then blocks before recording the asset. SIGKILL there, restart: the client's own
    retry of ``complete`` must publish the asset, byte-identical, with nothing left over."""
    extra = ("--uploads", mode, "--s3-part-size", str(PART))
    server = server_factory(**s3kit.server_kwargs(seaweedfs, s3_bucket, *extra))
    api = Api(server.url)
    key = api.run(api.experiment())
    lease = api.ok("POST", run_path(key) + "/start")["lease"]
    [(path, sha)] = _files(tmp_path, rng, [rng.randint(12 * MiB, 24 * MiB)])
    upload_id = secrets.token_urlsafe(12)

    database = server.store_url.removeprefix("sqlite:///")
    lock = sqlite3.connect(database, timeout=30, isolation_level=None, check_same_thread=False)
    locked = threading.Event()

    def hold_the_database() -> None:  # the client's last check before it completes
        if not locked.is_set():
            lock.execute("BEGIN IMMEDIATE")  # the server's next write transaction now waits
            locked.set()

    transport = HttpTransport(server.url)
    results: list[Any] = []

    def upload() -> None:
        try:
            results.append(
                transport.upload_file(
                    *key,
                    "model.ckpt",
                    str(path),
                    lease=lease,
                    upload_id=upload_id,
                    verify=hold_the_database,
                )
            )
        except Exception as exc:
            results.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        assert locked.wait(120), "the client never got to complete"
        temporary = f"assets/uploads/{upload_id}"

        def in_the_window() -> bool:
            if not _exists(seaweedfs, s3_bucket, _object_key(sha)):
                return False
            return mode == "direct" or not _exists(seaweedfs, s3_bucket, temporary)

        wait_until(in_the_window, timeout=60, what="the object complete at its address")
        assert api.assets(key) == {}, "the asset was recorded while the database was locked"
        server.kill(signal.SIGKILL)  # inside the window: object complete, asset not recorded
        figures["fault:server_sigkill"] += 1
    finally:
        if locked.is_set():
            lock.execute("ROLLBACK")
        lock.close()
    server.start(port=server.port)
    thread.join(timeout=180)
    transport.close()
    assert results and not isinstance(results[0], Exception), results
    assert results[0].sha256 == sha
    assert api.assets(key)["model.ckpt"]["sha256"] == sha
    assert api.download_sha(key, "model.ckpt") == sha
    api.close()
    _assert_bucket_holds_exactly(seaweedfs, s3_bucket, {sha}, figures)
    logs = _assert_no_internal_errors(server)
    with sqlite3.connect(database) as db:  # (direct: the record of the parts is dropped)
        assert db.execute("SELECT count(*) FROM direct_uploads").fetchone() == (0,)
    if mode == "direct":
        assert "PUT /v1/uploads/" not in logs, "the bytes went through the server"
    assert _no_tails(server) == []
