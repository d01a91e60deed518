"""Direct uploads to S3 (SeaweedFS) through a real server: the raw protocol and its refusals,
then the client's side (resume, expired URLs, fallback, dedup), with the bucket checked.

What must hold: only bytes whose SHA-256 the worker announced are ever stored (a corrupted or
resized part is refused by the store itself), nothing is visible before the server completed
and checked the object, the object in the bucket hashes to the asset's SHA-256, and nothing
is left behind (no multipart upload, no temporary object).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import s3kit
from server_helpers import Api, assert_error

from chronicle_integrations import Chronicle
from chronicle_integrations.client import _direct
from chronicle_integrations.store.s3 import composite_sha256

pytestmark = pytest.mark.s3
MiB = 2**20
PART = 5 * MiB


@pytest.fixture
def bucket(s3_bucket: str) -> str:
    return s3_bucket


@pytest.fixture
def direct_server(server_factory: Any, seaweedfs: s3kit.SeaweedServer, bucket: str) -> Any:
    extra = ("--s3-part-size", str(PART), "--s3-url-expiry", "2")
    return server_factory(**s3kit.server_kwargs(seaweedfs, bucket, *extra))


@pytest.fixture
def api(direct_server: Any) -> Any:
    with Api(direct_server.url) as client:
        yield client


def _objects(seaweedfs: s3kit.SeaweedServer, bucket: str) -> list[str]:
    listing = seaweedfs.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _mpus(seaweedfs: s3kit.SeaweedServer, bucket: str) -> list[str]:
    listing = seaweedfs.client().list_multipart_uploads(Bucket=bucket)
    return [u["Key"] for u in listing.get("Uploads", [])]


def _begin(api: Api, data: bytes, name: str = "model.ckpt") -> tuple[str, str, list[str]]:
    """Begin an upload of ``data``; returns (run path, upload id, part digests)."""
    path, lease = api.started()
    uid = api.ok(
        "POST", f"{path}/uploads", 201, json={"name": name, "size": len(data), "lease": lease}
    )["upload_id"]
    plan = api.ok("GET", f"/v1/uploads/{uid}/direct")
    assert plan["part_size"] == PART
    parts = [data[i : i + PART] for i in range(0, len(data), PART)]
    assert plan["parts"] == len(parts)
    return path, uid, [hashlib.sha256(p).hexdigest() for p in parts]


def _fresh(api: Api, uid: str, body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Newly signed URLs of the parts still missing, by part number."""
    return {u["part"]: u for u in api.ok("POST", f"/v1/uploads/{uid}/direct", json=body)["urls"]}


def _put(entry: dict[str, Any], body: bytes, **headers: str) -> requests.Response:
    return requests.put(
        entry["url"], data=body, headers={**entry["headers"], **headers}, timeout=30
    )


def test_raw_protocol_refusals_and_publication(
    api: Api, direct_server: Any, seaweedfs: s3kit.SeaweedServer, bucket: str
) -> None:
    data = os.urandom(2 * PART + 12345)
    sha = hashlib.sha256(data).hexdigest()
    path, uid, digests = _begin(api, data)
    body = {"sha256": sha, "parts": digests}
    answer = api.ok("POST", f"/v1/uploads/{uid}/direct", json=body)
    assert not answer["completed"] and answer["stored"] == 0 and answer["parts"] == 3
    urls = {u["part"]: u for u in answer["urls"]}
    assert set(urls) == {1, 2, 3}
    assert "uploadId=" in urls[1]["url"] and "x-amz-checksum-sha256" in urls[1]["url"].lower()
    part1 = data[:PART]

    # Refused by the store itself: other bytes, the right bytes cut short, no checksum header.
    corrupt = bytearray(part1)
    corrupt[1000] ^= 0xFF
    bad = _put(urls[1], bytes(corrupt))
    assert bad.status_code == 400 and "BadDigest" in bad.text
    assert _put(urls[1], part1[:-1]).status_code == 403  # the size is signed
    assert requests.put(urls[1]["url"], data=part1, timeout=30).status_code == 403
    # A URL replayed for another part (or another upload) does not match its signature.
    forged = {**urls[1], "url": urls[1]["url"].replace("partNumber=1", "partNumber=2")}
    assert _put(forged, part1).status_code == 403
    other_upload = {**urls[1], "url": urls[1]["url"].replace("uploadId=", "uploadId=x")}
    assert _put(other_upload, part1).status_code in (403, 404)
    # Announcing other digests for the same upload is refused.
    other = {"sha256": sha, "parts": [digests[1], digests[0], digests[2]]}
    assert_error(api.post(f"/v1/uploads/{uid}/direct", json=other), 400, "invalid_request")
    # Completing before the parts are stored: 400, nothing published.
    error = assert_error(
        api.post(f"/v1/uploads/{uid}/complete", json={"sha256": sha}), 400, "invalid_request"
    )
    assert error["missing"] == [1, 2, 3]
    assert api.ok("GET", f"{path}/assets") == {"assets": []}

    # The server signs for 2 s here (--s3-url-expiry 2): on a loaded machine the refusals
    # above may outlast that, so the part is sent with freshly signed URLs.
    urls = _fresh(api, uid, body)
    assert _put(urls[1], part1).status_code == 200
    assert api.ok("GET", f"/v1/uploads/{uid}")["offset"] == PART  # progress, for watchers
    again = api.ok("POST", f"/v1/uploads/{uid}/direct", json=body)  # a resume: what is missing
    assert again["stored"] == 1 and [u["part"] for u in again["urls"]] == [2, 3]
    time.sleep(2.5)  # the URLs expire (--s3-url-expiry 2)
    expired = _put(urls[2], data[PART : 2 * PART])
    assert expired.status_code == 403 and "expired" in expired.text.lower()
    assert _put(_fresh(api, uid, body)[2], data[PART : 2 * PART]).status_code == 200
    assert _put(_fresh(api, uid, body)[3], data[2 * PART :]).status_code == 200
    assert api.ok("GET", f"{path}/assets") == {"assets": []}  # still invisible

    wrong = hashlib.sha256(b"no").hexdigest()
    assert_error(api.post(f"/v1/uploads/{uid}/complete", json={"sha256": wrong}), 400)
    asset = api.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": sha})
    assert asset["sha256"] == sha and asset["size"] == len(data)
    key = f"assets/objects/{sha[:2]}/{sha}"
    assert _objects(seaweedfs, bucket) == [key] and _mpus(seaweedfs, bucket) == []
    head = seaweedfs.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data)
    stored = seaweedfs.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == sha
    assert composite_sha256(digests).endswith("-3")
    # Served through the server, whole and by range.
    assert api.get(f"{path}/assets/model.ckpt").content == data
    ranged = api.get(f"{path}/assets/model.ckpt", headers={"Range": "bytes=5242870-5242889"})
    assert ranged.status_code == 206 and ranged.content == data[5242870:5242890]
    # Same content again: published at once from the stored object (dedup), no new upload.
    _, uid2, digests2 = _begin(api, data, name="copy.ckpt")
    dedup = api.ok("POST", f"/v1/uploads/{uid2}/direct", json={"sha256": sha, "parts": digests2})
    assert dedup["completed"] and dedup["asset"]["sha256"] == sha
    assert _mpus(seaweedfs, bucket) == [] and _objects(seaweedfs, bucket) == [key]
    assert "Traceback" not in direct_server.output()


def test_resume_survives_a_server_restart_and_discard_aborts(
    api: Api, direct_server: Any, seaweedfs: s3kit.SeaweedServer, bucket: str
) -> None:
    """The digests live in SQL: a restarted server hands out URLs only for missing parts."""
    data = os.urandom(2 * PART + 7)
    sha = hashlib.sha256(data).hexdigest()
    path, uid, digests = _begin(api, data)
    body = {"sha256": sha, "parts": digests}
    urls = {u["part"]: u for u in api.ok("POST", f"/v1/uploads/{uid}/direct", json=body)["urls"]}
    assert _put(urls[2], data[PART : 2 * PART]).status_code == 200
    direct_server.kill()
    direct_server.restart()
    answer = api.ok("POST", f"/v1/uploads/{uid}/direct", json=body)
    assert answer["stored"] == 1 and [u["part"] for u in answer["urls"]] == [1, 3]
    assert _mpus(seaweedfs, bucket) == [f"assets/objects/{sha[:2]}/{sha}"]
    resp = api.request("DELETE", f"/v1/uploads/{uid}")
    assert resp.status_code == 204
    assert _mpus(seaweedfs, bucket) == [] and _objects(seaweedfs, bucket) == []
    assert api.ok("GET", f"{path}/assets") == {"assets": []}


def test_the_client_uploads_directly_and_refreshes_expired_urls(
    direct_server: Any,
    seaweedfs: s3kit.SeaweedServer,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No byte through the server (its log has no chunk PUT); the first part waits until its
    URL expired: the client asks for fresh URLs and finishes."""
    src = tmp_path / "big.ckpt"
    data = os.urandom(4 * PART + 99)
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    slow = {"done": False}
    real = _direct._Slice.__init__

    def stalled(self: Any, path: str, offset: int, length: int) -> None:
        if not slow["done"]:
            slow["done"] = True
            time.sleep(2.5)  # longer than --s3-url-expiry 2
        real(self, path, offset, length)

    monkeypatch.setattr(_direct._Slice, "__init__", stalled)
    with Chronicle(url=direct_server.url, home=tmp_path / "home") as chronicle:
        exp = chronicle.create_experiment("direct", variations=[{}])
        run = chronicle.create_run(exp, 0).start()
        info = run.upload_asset(src).result(120)
        assert info.sha256 == sha and info.size == len(data)
        out = tmp_path / "back"
        run.download_asset("big.ckpt", out)
        assert out.read_bytes() == data
        run.succeed()
    assert slow["done"]
    log = direct_server.output()
    assert "PUT /v1/uploads/" not in log, "bytes went through the server"
    assert log.count("/direct HTTP") >= 3  # plan, first batch, refreshed batch
    assert _objects(seaweedfs, bucket) == [f"assets/objects/{sha[:2]}/{sha}"]
    assert _mpus(seaweedfs, bucket) == []


def test_a_worker_that_cannot_reach_the_store_falls_back_to_proxied(
    server_factory: Any,
    seaweedfs: s3kit.SeaweedServer,
    bucket: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as sock:  # a port nothing listens on: the "public" endpoint
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = server_factory(
        **s3kit.server_kwargs(seaweedfs, bucket, "--s3-public-endpoint-url", dead)
    )
    files = []
    for i in range(2):
        files.append(tmp_path / f"f{i}.bin")
        files[-1].write_bytes(os.urandom(9 * MiB + i))
    caplog.set_level(logging.WARNING, logger="chronicle_integrations.client._direct")
    with Chronicle(url=server.url, home=tmp_path / "home") as chronicle:
        run = chronicle.create_run(chronicle.create_experiment("fb", variations=[{}]), 0).start()
        for path in files:
            info = run.upload_asset(path).result(120)
            assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        run.succeed()
    warnings = [r for r in caplog.records if "cannot reach the object store" in r.message]
    assert len(warnings) == 1  # logged once
    assert "PUT /v1/uploads/" in server.output()  # the bytes went through the server
    assert len(_objects(seaweedfs, bucket)) == 2


def test_sweep_aborts_old_abandoned_multipart_uploads(
    seaweedfs: s3kit.SeaweedServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chronicle_integrations.store.s3 import S3BlobStore, S3Settings

    for name, value in seaweedfs.env.items():
        monkeypatch.setenv(name, value)
    store = S3BlobStore(
        f"s3://{bucket}/assets", work_dir=tmp_path / "w", settings=S3Settings(path_style=True)
    )
    old = store.create_direct("a" * 64)
    time.sleep(1.5)
    fresh = store.create_direct("b" * 64)
    assert store.sweep(older_than=1.0) == 1
    remaining = seaweedfs.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in remaining] == [fresh]
    assert old != fresh


def test_direct_needs_s3(server_factory: Any, tmp_path: Path) -> None:
    """A server on a directory says so; the client then uses the proxied path."""
    server = server_factory()
    with Api(server.url) as api:
        path, lease = api.started()
        uid = api.ok(
            "POST", f"{path}/uploads", 201, json={"name": "x", "size": 10, "lease": lease}
        )["upload_id"]
        error = assert_error(api.get(f"/v1/uploads/{uid}/direct"), 400, "invalid_request")
        assert error["reason"] == "direct_unavailable"


def _chronicle_server(*args: str, env: dict[str, str], timeout: float = 60) -> Any:
    """``chronicle server ARGS`` (the CLI entry point), to completion."""
    import sys

    import testkit

    code = "import sys; from chronicle_integrations.cli import main; sys.exit(main())"
    return testkit.run(
        [sys.executable, "-c", code, "server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def test_bad_s3_settings_exit_2_with_a_clear_message(
    seaweedfs: s3kit.SeaweedServer, tmp_path: Path
) -> None:
    home = ["--home", str(tmp_path), "--port", "0"]
    missing = _chronicle_server(
        "--assets", "s3://no-such-bucket-x/a", "--s3-path-style", *home, env=seaweedfs.env
    )
    assert missing.returncode == 2, missing.stderr
    assert "error: cannot use the bucket" in missing.stderr, missing.stderr
    wrong_key = {**seaweedfs.env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    bucket = seaweedfs.new_bucket()
    denied = _chronicle_server(
        "--assets", f"s3://{bucket}/a", "--s3-path-style", *home, env=wrong_key
    )
    assert denied.returncode == 2 and "credentials" in denied.stderr, denied.stderr
    local = _chronicle_server("--uploads", "direct", *home, env={})
    assert local.returncode == 2 and "need S3" in local.stderr, local.stderr
    parts = _chronicle_server(
        "--assets", f"s3://{bucket}/a", "--s3-part-size", "1000", *home, env=seaweedfs.env
    )
    assert parts.returncode == 2 and "s3_part_size" in parts.stderr, parts.stderr


def test_chronicle_server_on_s3_with_explicit_endpoint_options(
    seaweedfs: s3kit.SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """The endpoint and region from the options (no AWS_ENDPOINT_URL), credentials from the
    standard variables; proxied mode; an asset round trip through ``chronicle server``."""
    import signal
    import subprocess
    import sys

    import testkit

    port = s3kit._free_port(set())
    env = {k: v for k, v in seaweedfs.env.items() if k not in ("AWS_ENDPOINT_URL", "AWS_REGION")}
    code = "import sys; from chronicle_integrations.cli import main; sys.exit(main())"
    args = [sys.executable, "-c", code, "server", "--port", str(port), "--home", str(tmp_path)]
    args += ["--assets", f"s3://{bucket}/p", "--s3-endpoint-url", seaweedfs.endpoint]
    args += ["--s3-region", "us-east-1", "--s3-path-style", "--uploads", "proxied"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with (tmp_path / "log").open("wb") as log:
        proc = testkit.spawn(args, stdout=log, stderr=subprocess.STDOUT, env={**clean, **env})
    try:
        url = f"http://127.0.0.1:{port}"
        testkit.wait_until(
            lambda: _healthy(url) or proc.poll() is not None, timeout=60, what="the server"
        )
        assert proc.poll() is None, (tmp_path / "log").read_text()
        data = os.urandom(3 * MiB)
        with Chronicle(url=url, home=tmp_path / "home") as chronicle:
            run = chronicle.create_run(chronicle.create_experiment("cli", variations=[{}]), 0)
            run.start()
            src = tmp_path / "a.bin"
            src.write_bytes(data)
            info = run.upload_asset(src).result(60)
            run.succeed()
        sha = hashlib.sha256(data).hexdigest()
        assert info.sha256 == sha
        assert _objects(seaweedfs, bucket) == [f"p/objects/{sha[:2]}/{sha}"]
        assert "proxied uploads" in (tmp_path / "log").read_text()
    finally:
        testkit.reap(proc, signal.SIGTERM)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/v1/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_an_object_beyond_the_part_limits_is_refused(
    server_factory: Any, seaweedfs: s3kit.SeaweedServer, bucket: str
) -> None:
    """With ``--s3-max-parts 2`` a direct upload holds at most 2 x 5 GiB: larger is 413; the
    part size grows so that a 6 GiB upload still fits in 2 parts."""
    server = server_factory(**s3kit.server_kwargs(seaweedfs, bucket, "--s3-max-parts", "2"))
    with Api(server.url) as api:
        path, lease = api.started()
        for size, status in ((11 * 2**30, 413), (6 * 2**30, 200)):
            uid = api.ok(
                "POST", f"{path}/uploads", 201, json={"name": "x", "size": size, "lease": lease}
            )["upload_id"]
            resp = api.get(f"/v1/uploads/{uid}/direct")
            assert resp.status_code == status, resp.text
        assert resp.json() == {"part_size": 3 * 2**30, "parts": 2}
        assert_error(api.get(f"/v1/uploads/{uid}0/direct"), 404, "not_found")
