"""Resumable uploads through a real server: a connection cut mid-body, a server killed
mid-upload, racing chunks, and the checks that keep half-written assets invisible."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from server_helpers import Api, assert_error

MiB = 1024 * 1024
#: The tests on the module server also run on one whose assets live in S3 (see conftest.py).
ON_S3 = True


def wait_until(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def resume(api: Api, upload_id: str, data: bytes, attempts: int = 20) -> int:
    """What a client does after a failure: read the offset back, send the rest from there
    (an answer of 409 offset_mismatch says where to continue). Returns the resumed offset."""
    offset = api.ok("GET", f"/v1/uploads/{upload_id}")["offset"]
    first = offset
    for _ in range(attempts):
        resp = api.put(f"/v1/uploads/{upload_id}", params={"offset": offset}, data=data[offset:])
        if resp.status_code == 200:
            assert resp.json()["offset"] == len(data)
            return first
        offset = assert_error(resp, 409, "offset_mismatch")["offset"]
        time.sleep(0.05)  # a write of the dropped connection is still landing
    raise AssertionError("the upload did not resume")


@pytest.mark.parametrize("cut", ["close", "reset"])
def test_connection_cut_mid_body_then_resume(api: Api, server: Any, cut: str) -> None:
    path, lease = api.started()
    data = os.urandom(8 * MiB)
    uid = api.ok(
        "POST",
        f"{path}/uploads",
        201,
        json={"name": "model.ckpt", "size": len(data), "lease": lease},
    )["upload_id"]
    sent = 3 * MiB + 123
    address = urlsplit(server.url)
    sock = socket.create_connection((address.hostname, address.port))
    try:
        sock.sendall(
            (
                f"PUT /v1/uploads/{uid}?offset=0 HTTP/1.1\r\n"
                f"Host: {address.netloc}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(data)}\r\n\r\n"
            ).encode()
        )
        sock.sendall(data[:sent])
        # The server writes while the body is still arriving...
        before_cut = wait_until(lambda: api.ok("GET", f"/v1/uploads/{uid}")["offset"])
        assert before_cut > 0
    finally:
        if cut == "reset":  # an abrupt reset (RST) instead of an orderly close (FIN)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        sock.close()
    # ... and keeps what it wrote: the offset never goes back, and never past what was sent.
    after_cut = api.ok("GET", f"/v1/uploads/{uid}")["offset"]
    assert before_cut <= after_cut <= sent
    assert api.ok("GET", f"{path}/assets") == {"assets": []}  # not visible until complete

    resumed_at = resume(api, uid, data)
    assert before_cut <= resumed_at <= sent
    digest = hashlib.sha256(data).hexdigest()
    asset = api.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": digest})
    assert asset["sha256"] == digest and asset["size"] == len(data)
    assert api.get(f"{path}/assets/model.ckpt").content == data
    assert api.ok("GET", "/v1/health")["status"] == "ok"
    assert "Traceback" not in server.output()


def test_server_killed_mid_upload_then_resume(server_factory: Any, store_url: str) -> None:
    server = server_factory(store_url=store_url)
    api = Api(server.url)
    path, lease = api.started()
    data = os.urandom(3 * MiB + 7)
    uid = api.ok(
        "POST",
        f"{path}/uploads",
        201,
        json={"name": "a/b/c.bin", "size": len(data), "lease": lease},
    )["upload_id"]
    api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=data[: MiB + 5])
    server.kill(signal.SIGKILL)
    api.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v1/health", timeout=5)
    server.restart()  # same port, same store: the in-memory digest is gone
    api = Api(server.url)
    assert api.state(path) == "running"
    assert api.ok("GET", f"/v1/uploads/{uid}")["offset"] == MiB + 5
    assert resume(api, uid, data) == MiB + 5
    digest = hashlib.sha256(data).hexdigest()
    assert api.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": digest})["size"] == len(
        data
    )
    assert api.get(f"{path}/assets/a/b/c.bin").content == data
    api.ok("POST", f"{path}/succeed", json={"lease": lease})
    api.close()


def test_racing_chunks_at_one_offset(api: Api, server: Any) -> None:
    path, lease = api.started()
    data = os.urandom(4 * MiB)
    uid = api.ok("POST", f"{path}/uploads", 201, json={"name": "race.bin", "lease": lease})[
        "upload_id"
    ]

    def put(_: int) -> requests.Response:
        return requests.put(
            f"{server.url}/v1/uploads/{uid}", params={"offset": 0}, data=data, timeout=60
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(put, range(2)))
    assert sorted(r.status_code for r in responses) == [200, 409], [r.text for r in responses]
    loser = next(r for r in responses if r.status_code == 409)
    assert_error(loser, 409, "offset_mismatch")
    assert api.ok("GET", f"/v1/uploads/{uid}")["offset"] == len(data)
    digest = hashlib.sha256(data).hexdigest()
    assert api.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": digest})["size"] == len(
        data
    )


def test_declared_size_is_enforced(api: Api) -> None:
    path, lease = api.started()
    uid = api.ok(
        "POST", f"{path}/uploads", 201, json={"name": "sized.bin", "size": 10, "lease": lease}
    )["upload_id"]
    error = assert_error(
        api.put(f"/v1/uploads/{uid}", params={"offset": 0}, data=b"x" * 20), 400, "invalid_request"
    )
    assert error["field"] == "size"
    assert api.ok("GET", f"/v1/uploads/{uid}")["offset"] == 0
    api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=b"12345")
    # Completing before all declared bytes arrived is refused; the answer says how far it got.
    error = assert_error(
        api.post(
            f"/v1/uploads/{uid}/complete", json={"sha256": hashlib.sha256(b"12345").hexdigest()}
        ),
        400,
        "invalid_request",
    )
    assert error["offset"] == 5
    assert api.ok("GET", f"{path}/assets") == {"assets": []}
    api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 5}, data=b"67890")
    api.ok(
        "POST",
        f"/v1/uploads/{uid}/complete",
        json={"sha256": hashlib.sha256(b"1234567890").hexdigest()},
    )
    # A complete upload takes no more chunks.
    assert_error(
        api.put(f"/v1/uploads/{uid}", params={"offset": 10}, data=b"more"), 400, "invalid_request"
    )

    # A big chunk that overflows the declared size: refused mid-stream, the server stops
    # reading, and no byte past the declared size is stored.
    uid = api.ok(
        "POST", f"{path}/uploads", 201, json={"name": "sized2.bin", "size": MiB, "lease": lease}
    )["upload_id"]
    error = assert_error(
        api.put(f"/v1/uploads/{uid}", params={"offset": 0}, data=os.urandom(3 * MiB)),
        400,
        "invalid_request",
    )
    assert error["field"] == "size"
    assert api.ok("GET", f"/v1/uploads/{uid}")["offset"] <= MiB
    assert api.ok("GET", "/v1/health")["status"] == "ok"


def test_digest_mismatch_stores_nothing(api: Api) -> None:
    path, lease = api.started()
    data = b"the real content" * 1000
    uid = api.ok("POST", f"{path}/uploads", 201, json={"name": "weights.bin", "lease": lease})[
        "upload_id"
    ]
    api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=data)
    wrong = hashlib.sha256(b"something else").hexdigest()
    error = assert_error(
        api.post(f"/v1/uploads/{uid}/complete", json={"sha256": wrong}), 422, "digest_mismatch"
    )
    assert error["received_sha256"] == hashlib.sha256(data).hexdigest()
    assert api.ok("GET", f"{path}/assets") == {"assets": []}
    assert api.ok("GET", path)["asset_count"] == 0
    assert_error(api.get(f"{path}/assets/weights.bin"), 404, "not_found")
    assert not [e for e in api.ok("GET", f"{path}/events")["events"] if e["kind"] == "asset"]
    # The upload starts over from zero and can then succeed.
    assert api.ok("GET", f"/v1/uploads/{uid}")["offset"] == 0
    api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=data)
    api.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": hashlib.sha256(data).hexdigest()})
    assert api.get(f"{path}/assets/weights.bin").content == data
