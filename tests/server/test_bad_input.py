"""Bad input, through a real server: every case gets a 4xx with the standard error body and a
stable code, persists nothing (the store looks the same through GET before and after), and
leaves the server serving.

The server runs with small body limits (64 KiB JSON, 1 MiB chunks) so the limits are cheap to
exceed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from server_helpers import Api, assert_error

JSON_LIMIT = 64 * 1024
CHUNK_LIMIT = 1024 * 1024


@dataclass
class World:
    """A fixed set of records the bad requests aim at."""

    api: Api
    url: str
    eid: str
    run: str  # /v1/runs/e/0/0, running
    lease: str
    pending: str  # /v1/runs/e/0/1
    upload_id: str  # an open upload of `run` holding 3 bytes
    done_upload: str  # a completed upload of `run` (asset "done.bin")

    def snapshot(self) -> Any:
        api = self.api
        # Experiments (with variation counts), every run (state, timestamps, lease holder,
        # asset count), the two runs' timelines (transitions and uploads), the open upload.
        return (
            api.ok("GET", "/v1/experiments"),
            api.ok("GET", "/v1/runs"),
            api.ok("GET", f"{self.run}/events"),
            api.ok("GET", f"{self.pending}/events"),
            api.ok("GET", f"/v1/uploads/{self.upload_id}"),
        )


@pytest.fixture(scope="module")
def limited_server(module_server_factory: Any, module_store_url: str) -> Iterator[Any]:
    process = module_server_factory(
        store_url=module_store_url,
        extra_args=["--max-json-bytes", str(JSON_LIMIT), "--max-chunk-bytes", str(CHUNK_LIMIT)],
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def world(limited_server: Any) -> Iterator[World]:
    api = Api(limited_server.url)
    eid = api.experiment([{"lr": 0.1}])
    run, lease = api.started(eid)
    pending = api.run(eid)
    upload_id = api.ok(
        "POST", f"{run}/uploads", 201, json={"name": "open.bin", "size": 100, "lease": lease}
    )["upload_id"]
    api.ok("PUT", f"/v1/uploads/{upload_id}", params={"offset": 0}, data=b"abc")
    done = api.ok("POST", f"{run}/uploads", 201, json={"name": "done.bin", "lease": lease})[
        "upload_id"
    ]
    api.ok("PUT", f"/v1/uploads/{done}", params={"offset": 0}, data=b"done")
    api.ok(
        "POST", f"/v1/uploads/{done}/complete", json={"sha256": hashlib.sha256(b"done").hexdigest()}
    )
    yield World(api, limited_server.url, eid, run, lease, pending, upload_id, done)
    api.close()


def raw(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    chunks: list[bytes] | None = None,
) -> Any:
    """A request sent exactly as given (requests would normalise ``..`` and encodings)."""
    address = urlsplit(url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        if chunks is not None:
            conn.request(
                method, path, body=iter(chunks), headers=headers or {}, encode_chunked=True
            )
        else:
            conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), data
    finally:
        conn.close()


def check_raw(answer: Any, status: int, code: str) -> dict[str, Any]:
    got, headers, data = answer
    assert got == status, (got, data[:300])
    assert headers.get("content-type", "").startswith("application/json")
    error = json.loads(data)["error"]
    assert error["code"] == code and error["message"], error
    return dict(error)


# Each case: (method, path template, JSON body or None, status, code). In paths and bodies,
# {E} = the experiment, {RUN} = the running run's path, {PENDING} = the pending run's path,
# {U} = the open upload, {LEASE} = the running run's lease.
CASES: list[tuple[str, str, Any, int, str]] = [
    # unknown things
    ("GET", "/v1/experiments/no-such-exp", None, 404, "not_found"),
    ("GET", "/v1/experiments/{E}/variations/7", None, 404, "not_found"),
    ("POST", "/v1/experiments/no-such-exp/variations", {"config": {}}, 404, "not_found"),
    ("POST", "/v1/experiments/{E}/variations/7/runs", None, 404, "not_found"),
    ("POST", "/v1/experiments/no-such-exp/variations/0/runs", None, 404, "not_found"),
    ("GET", "/v1/runs/{E}/0/99", None, 404, "not_found"),
    ("GET", "/v1/runs/{E}/5/0", None, 404, "not_found"),
    ("GET", "/v1/runs/no-such-exp/0/0", None, 404, "not_found"),
    ("POST", "/v1/runs/{E}/0/99/start", None, 404, "not_found"),
    ("POST", "/v1/runs/{E}/0/99/heartbeat", {"lease": "whatever-lease"}, 404, "not_found"),
    ("POST", "/v1/runs/{E}/0/99/succeed", None, 404, "not_found"),
    ("POST", "/v1/runs/{E}/0/99/fail", {"reason": "abandoned"}, 404, "not_found"),
    ("GET", "/v1/runs/{E}/0/99/events", None, 404, "not_found"),
    ("GET", "/v1/runs/{E}/0/99/assets", None, 404, "not_found"),
    ("GET", "{RUN}/assets/no-such-asset.bin", None, 404, "not_found"),
    ("GET", "{RUN}/assets/open.bin", None, 404, "not_found"),  # not complete: invisible
    ("POST", "/v1/runs/{E}/0/99/uploads", {"name": "x.bin"}, 404, "not_found"),
    ("GET", "/v1/uploads/no-such-upload-id", None, 404, "not_found"),
    ("PUT", "/v1/uploads/no-such-upload-id?offset=0", None, 404, "not_found"),
    ("POST", "/v1/uploads/no-such-upload-id/complete", {"sha256": "0" * 64}, 404, "not_found"),
    ("GET", "/v1/nowhere", None, 404, "not_found"),
    ("GET", "/v1/runs/{E}/0/0/nowhere", None, 404, "not_found"),
    ("GET", "/v1/experiments/", None, 404, "not_found"),
    ("GET", "/v2/health", None, 404, "not_found"),
    # wrong methods
    ("DELETE", "/v1/experiments", None, 405, "invalid_request"),
    ("POST", "/v1/health", None, 405, "invalid_request"),
    ("GET", "{RUN}/start", None, 405, "invalid_request"),
    ("PATCH", "/v1/uploads/{U}", None, 405, "invalid_request"),
    # invalid ids and numbers
    ("GET", "/v1/experiments/-bad", None, 400, "invalid_request"),
    ("GET", "/v1/experiments/" + "a" * 129, None, 400, "invalid_request"),
    ("GET", "/v1/experiments/bad%20id", None, 400, "invalid_request"),
    ("GET", "/v1/experiments/{E}/variations/-1", None, 400, "invalid_request"),
    ("GET", "/v1/experiments/{E}/variations/abc", None, 400, "invalid_request"),
    ("GET", "/v1/experiments/{E}/variations/1.0", None, 400, "invalid_request"),
    ("GET", "/v1/experiments/{E}/variations/+1", None, 400, "invalid_request"),
    ("GET", "/v1/experiments/{E}/variations/1_0", None, 400, "invalid_request"),
    ("GET", "/v1/experiments/{E}/variations/%201", None, 400, "invalid_request"),
    ("GET", "/v1/experiments/{E}/variations/2147483648", None, 400, "invalid_request"),
    ("GET", "/v1/experiments/{E}/variations/" + "9" * 40, None, 400, "invalid_request"),
    ("GET", "/v1/runs/{E}/0/-1", None, 400, "invalid_request"),
    ("GET", "/v1/runs/{E}/0/1e3", None, 400, "invalid_request"),
    ("POST", "/v1/runs/{E}/x/0/start", None, 400, "invalid_request"),
    ("POST", "/v1/runs/bad!id/0/0/start", None, 400, "invalid_request"),
    ("GET", "/v1/runs?state=exploded", None, 400, "invalid_request"),
    ("GET", "/v1/runs?state=", None, 400, "invalid_request"),
    ("GET", "/v1/runs?experiment_id=bad!id", None, 400, "invalid_request"),
    ("GET", "/v1/uploads/x", None, 400, "invalid_request"),
    # bodies: missing, wrong types, invalid values
    ("POST", "/v1/experiments", None, 400, "invalid_request"),
    ("POST", "/v1/experiments", {}, 400, "invalid_request"),
    ("POST", "/v1/experiments", {"name": 5}, 400, "invalid_request"),
    ("POST", "/v1/experiments", {"name": ""}, 400, "invalid_request"),
    ("POST", "/v1/experiments", {"name": "a\nb"}, 400, "invalid_request"),
    ("POST", "/v1/experiments", {"name": "x" * 300}, 400, "invalid_request"),
    ("POST", "/v1/experiments", {"name": "ok", "variations": {"lr": 1}}, 400, "invalid_request"),
    ("POST", "/v1/experiments", {"name": "ok", "variations": [1, 2]}, 400, "invalid_request"),
    (
        "POST",
        "/v1/experiments",
        {"name": "ok", "variations": [{"x": 1}, None]},
        400,
        "invalid_request",
    ),
    ("POST", "/v1/experiments", {"name": "ok", "experiment_id": "bad id!"}, 400, "invalid_request"),
    ("POST", "/v1/experiments", {"name": "ok", "experiment_id": 12}, 400, "invalid_request"),
    ("POST", "/v1/experiments/{E}/variations", {}, 400, "invalid_request"),
    ("POST", "/v1/experiments/{E}/variations", {"config": [1]}, 400, "invalid_request"),
    ("POST", "/v1/experiments/{E}/variations", {"config": "lr=1"}, 400, "invalid_request"),
    (
        "POST",
        "/v1/experiments/{E}/variations",
        {"config": {}, "request_id": "short"},
        400,
        "invalid_request",
    ),
    (
        "POST",
        "/v1/experiments/{E}/variations/0/runs",
        {"request_id": "bad id!!"},
        400,
        "invalid_request",
    ),
    ("POST", "{PENDING}/start", {"resume": "yes"}, 400, "invalid_request"),
    ("POST", "{PENDING}/start", {"resume": 1}, 400, "invalid_request"),
    ("POST", "{PENDING}/start", {"lease": "short"}, 400, "invalid_request"),
    ("POST", "{PENDING}/start", {"lease": 12345678901}, 400, "invalid_request"),
    ("POST", "{PENDING}/start", {"holder": ["a"]}, 400, "invalid_request"),
    ("POST", "{RUN}/heartbeat", {"lease": 5}, 400, "invalid_request"),
    ("POST", "{RUN}/fail", None, 400, "invalid_request"),
    ("POST", "{RUN}/fail", {}, 400, "invalid_request"),
    ("POST", "{RUN}/fail", {"reason": "oops", "lease": "{LEASE}"}, 400, "invalid_request"),
    (
        "POST",
        "{RUN}/fail",
        {"reason": "crash", "message": 5, "lease": "{LEASE}"},
        400,
        "invalid_request",
    ),
    ("POST", "{RUN}/uploads", {"lease": "{LEASE}"}, 400, "invalid_request"),
    (
        "POST",
        "{RUN}/uploads",
        {"name": "x.bin", "size": -1, "lease": "{LEASE}"},
        400,
        "invalid_request",
    ),
    (
        "POST",
        "{RUN}/uploads",
        {"name": "x.bin", "size": "10", "lease": "{LEASE}"},
        400,
        "invalid_request",
    ),
    (
        "POST",
        "{RUN}/uploads",
        {"name": "x.bin", "size": 1.5, "lease": "{LEASE}"},
        400,
        "invalid_request",
    ),
    (
        "POST",
        "{RUN}/uploads",
        {"name": "x.bin", "size": True, "lease": "{LEASE}"},
        400,
        "invalid_request",
    ),
    (
        "POST",
        "{RUN}/uploads",
        {"name": "x.bin", "size": 2**64, "lease": "{LEASE}"},
        400,
        "invalid_request",
    ),
    (
        "POST",
        "{RUN}/uploads",
        {"name": "x.bin", "upload_id": "bad id", "lease": "{LEASE}"},
        400,
        "invalid_request",
    ),
    (
        "POST",
        "{RUN}/uploads",
        {"name": "x.bin", "upload_id": "{U}", "lease": "{LEASE}"},
        400,
        "invalid_request",
    ),  # an upload id of another asset
    ("POST", "/v1/uploads/{U}/complete", {}, 400, "invalid_request"),
    ("POST", "/v1/uploads/{U}/complete", {"sha256": "ABC"}, 400, "invalid_request"),
    ("POST", "/v1/uploads/{U}/complete", {"sha256": "A" * 64}, 400, "invalid_request"),
    ("POST", "/v1/uploads/{U}/complete", {"sha256": 5}, 400, "invalid_request"),
    # wrong upload offsets
    ("PUT", "/v1/uploads/{U}?offset=0", None, 409, "offset_mismatch"),
    ("PUT", "/v1/uploads/{U}?offset=4", None, 409, "offset_mismatch"),
    ("PUT", "/v1/uploads/{U}?offset=1000", None, 409, "offset_mismatch"),
    ("PUT", "/v1/uploads/{U}", None, 400, "invalid_request"),
    ("PUT", "/v1/uploads/{U}?offset=-3", None, 400, "invalid_request"),
    ("PUT", "/v1/uploads/{U}?offset=abc", None, 400, "invalid_request"),
    ("PUT", "/v1/uploads/{U}?offset=3.0", None, 400, "invalid_request"),
    ("PUT", "/v1/uploads/{U}?offset=" + "9" * 30, None, 400, "invalid_request"),
    # invalid transitions and leases
    ("POST", "{RUN}/start", None, 409, "invalid_transition"),
    ("POST", "{PENDING}/heartbeat", None, 409, "invalid_transition"),
    ("POST", "{PENDING}/succeed", None, 409, "invalid_transition"),
    ("POST", "{RUN}/heartbeat", None, 409, "lease_conflict"),
    ("POST", "{RUN}/heartbeat", {"lease": "not-the-lease"}, 409, "lease_conflict"),
    ("POST", "{RUN}/succeed", {"lease": "not-the-lease"}, 409, "lease_conflict"),
    ("POST", "{RUN}/fail", {"reason": "crash"}, 409, "lease_conflict"),
    ("POST", "{RUN}/uploads", {"name": "x.bin"}, 409, "lease_conflict"),
    ("POST", "{RUN}/heartbeat", {"lease": "\u00e9t\u00e9-lease-123"}, 409, "lease_conflict"),
    ("POST", "{RUN}/succeed", {"lease": "\u00e9t\u00e9-lease-123"}, 409, "lease_conflict"),
    (
        "POST",
        "{RUN}/fail",
        {"reason": "crash", "lease": "\u00e9t\u00e9-lease-1"},
        409,
        "lease_conflict",
    ),
    (
        "POST",
        "{RUN}/uploads",
        {"name": "x.bin", "lease": "\u00e9t\u00e9-lease-123"},
        409,
        "lease_conflict",
    ),
    # NUL characters (PostgreSQL text cannot hold them) anywhere in a body
    ("POST", "{RUN}/heartbeat", {"lease": "a\u0000b"}, 400, "invalid_request"),
    (
        "POST",
        "{RUN}/fail",
        {"reason": "crash", "lease": "{LEASE}", "message": "m\u0000"},
        400,
        "invalid_request",
    ),
    ("POST", "{PENDING}/start", {"holder": "h\u0000"}, 400, "invalid_request"),
    (
        "POST",
        "{PENDING}/fail",
        {"reason": "abandoned", "message": "\u0000"},
        400,
        "invalid_request",
    ),
    ("POST", "{RUN}/uploads", {"name": "x.bin", "lease": "a\u0000b"}, 400, "invalid_request"),
    ("POST", "/v1/experiments", {"name": "other", "experiment_id": "{E}"}, 409, "already_exists"),
]


def _fill(value: Any, world: World) -> Any:
    if isinstance(value, str):
        return (
            value.replace("{RUN}", world.run)
            .replace("{PENDING}", world.pending)
            .replace("{E}", world.eid)
            .replace("{U}", world.upload_id)
            .replace("{LEASE}", world.lease)
        )
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    CASES,
    ids=[
        f"{m} {p} {json.dumps(b)[:40] if b is not None else ''}".strip() for m, p, b, _, _ in CASES
    ],
)
def test_bad_request(
    world: World, method: str, path: str, body: Any, status: int, code: str
) -> None:
    before = world.snapshot()
    data = json.dumps(_fill(body, world)).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    answer = raw(world.url, method, _fill(path, world), data, headers)
    check_raw(answer, status, code)
    assert world.snapshot() == before  # ... which also shows the server still serving


BAD_ASSET_NAMES = [
    "../escape.bin",
    "a/../../escape.bin",
    "/etc/passwd",
    "a\\b.bin",
    "nul\x00byte",
    "a//b",
    "./a",
    "a/./b",
    "a/",
    "",
    "x" * 1025,
    "seg" + "y" * 256 + "/z",
    "ctrl\x07char",
    "..",
]


@pytest.mark.parametrize("name", BAD_ASSET_NAMES, ids=repr)
def test_bad_asset_names_refused_by_begin_upload(world: World, name: str) -> None:
    before = world.snapshot()
    error = assert_error(
        world.api.post(f"{world.run}/uploads", json={"name": name, "lease": world.lease}),
        400,
        "invalid_request",
    )
    assert error["field"] == "name"
    assert world.snapshot() == before


@pytest.mark.parametrize(
    "raw_name",
    [
        "../../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "a%5Cb",
        "nul%00byte",
        "a/./b",
        "a//b",
        "%2e%2e",
    ],
)
def test_bad_asset_names_refused_by_download(world: World, raw_name: str) -> None:
    before = world.snapshot()
    check_raw(raw(world.url, "GET", f"{world.run}/assets/{raw_name}"), 400, "invalid_request")
    assert world.snapshot() == before


def test_encoded_slash_is_a_plain_slash(world: World) -> None:
    # done.bin exists; "sub%2Fdone.bin" means "sub/done.bin", which does not.
    check_raw(raw(world.url, "GET", f"{world.run}/assets/sub%2Fdone.bin"), 404, "not_found")
    status, _, data = raw(world.url, "GET", f"{world.run}/assets/done%2Ebin")
    assert (status, data) == (200, b"done")


# ------------------------------------------------------------------------------ JSON bodies
MALFORMED_BODIES = {
    "truncated": b'{"name": ',
    "not json": b"name=x",
    "trailing garbage": b'{"name": "x"} extra',
    "single quotes": b"{'name': 'x'}",
    "invalid utf-8": b'{"name": "\xff\xfe"}',
    "lone surrogate": b'{"name": "\\ud800"}',
    "NUL in a string": b'{"name": "x", "holder": "a\\u0000b"}',
    "NUL in a key": b'{"name": "x", "a\\u0000": 1}',
    "array": b'[{"name": "x"}]',
    "string": b'"x"',
    "number": b"12",
    "null": b"null",
    "true": b"true",
    "deeply nested": b'{"name": "x", "variations": [' + b"[" * 30_000 + b"]" * 30_000 + b"]}",
    "nested config": b'{"name": "x", "variations": [' + b'{"a":' * 70 + b"1" + b"}" * 70 + b"]}",
    "huge integer": b'{"name": "x", "variations": [{"a": ' + b"9" * 5000 + b"}]}",
    "NaN": b'{"name": "x", "variations": [{"a": NaN}]}',
    "Infinity": b'{"name": "x", "resume": -Infinity}',
}


@pytest.mark.parametrize("body", list(MALFORMED_BODIES.values()), ids=list(MALFORMED_BODIES))
def test_malformed_json(world: World, body: bytes) -> None:
    before = world.snapshot()
    assert len(body) <= JSON_LIMIT
    for path in ("/v1/experiments", f"{world.pending}/start"):
        answer = raw(world.url, "POST", path, body, {"Content-Type": "application/json"})
        check_raw(answer, 400, "invalid_request")
    assert world.snapshot() == before


def test_deep_nesting_under_the_size_limit(world: World) -> None:
    before = world.snapshot()
    depth = JSON_LIMIT // 2 - 100
    body = b"[" * depth + b"]" * depth
    error = check_raw(
        raw(world.url, "POST", "/v1/experiments", body, {"Content-Type": "application/json"}),
        400,
        "invalid_request",
    )
    assert "nested" in error["message"] or "object" in error["message"]
    assert world.snapshot() == before


def test_wrong_content_type(world: World) -> None:
    before = world.snapshot()
    answer = raw(
        world.url, "POST", "/v1/experiments", b'{"name": "x"}', {"Content-Type": "text/plain"}
    )
    error = check_raw(answer, 400, "invalid_request")
    assert "application/json" in error["message"]
    assert world.snapshot() == before


def test_oversized_json_body(world: World) -> None:
    before = world.snapshot()
    big = json.dumps({"name": "big", "variations": [{"pad": "x" * JSON_LIMIT}]}).encode()
    # With a Content-Length: refused before reading.
    check_raw(
        raw(world.url, "POST", "/v1/experiments", big, {"Content-Type": "application/json"}),
        413,
        "payload_too_large",
    )
    # Chunked (no Content-Length): refused while reading.
    pieces = [big[i : i + 8192] for i in range(0, len(big), 8192)]
    check_raw(
        raw(
            world.url,
            "POST",
            "/v1/experiments",
            headers={"Content-Type": "application/json"},
            chunks=pieces,
        ),
        413,
        "payload_too_large",
    )
    # Exactly at the limit is fine (and then refused for what it says, not for its size).
    at_limit = b'{"name": "' + b"n" * (JSON_LIMIT - 12) + b'"}'
    assert len(at_limit) == JSON_LIMIT
    check_raw(
        raw(world.url, "POST", "/v1/experiments", at_limit, {"Content-Type": "application/json"}),
        400,
        "invalid_request",
    )
    assert world.snapshot() == before


def test_oversized_chunk(world: World) -> None:
    api = world.api
    uid = api.ok(
        "POST", f"{world.run}/uploads", 201, json={"name": "big.bin", "lease": world.lease}
    )["upload_id"]
    before = world.snapshot()
    too_big = b"z" * (CHUNK_LIMIT + 1)
    # Declared too large: refused before a byte is stored.
    answer = raw(
        world.url,
        "PUT",
        f"/v1/uploads/{uid}?offset=0",
        too_big,
        {"Content-Type": "application/octet-stream"},
    )
    error = check_raw(answer, 413, "payload_too_large")
    assert error["limit"] == CHUNK_LIMIT
    assert api.ok("GET", f"/v1/uploads/{uid}")["offset"] == 0
    # Chunked: refused once the limit is passed; what came before is kept, as after a cut,
    # and the upload goes on from the offset the server reports.
    pieces = [too_big[i : i + 65536] for i in range(0, len(too_big), 65536)]
    answer = raw(
        world.url,
        "PUT",
        f"/v1/uploads/{uid}?offset=0",
        headers={"Content-Type": "application/octet-stream"},
        chunks=pieces,
    )
    check_raw(answer, 413, "payload_too_large")
    offset = api.ok("GET", f"/v1/uploads/{uid}")["offset"]
    assert 0 <= offset <= CHUNK_LIMIT
    api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": offset}, data=too_big[offset:][:10])
    assert world.snapshot() == before  # other records untouched
    assert api.ok("GET", "/v1/health")["status"] == "ok"


def test_bad_content_length(world: World) -> None:
    # A declared length beyond the limit is refused before the body is read (raw socket:
    # http.client would not send a length that does not match its body).
    address = urlsplit(world.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/experiments HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 99999999999999\r\n"
            b"\r\n{}"
        )
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        body = reply.read()
    assert reply.status == 413, body
    assert json.loads(body)["error"]["code"] == "payload_too_large"


def test_no_server_error_was_logged(world: World, limited_server: Any) -> None:
    """After all of the above, the server logged no traceback and answered no 5xx."""
    assert world.api.ok("GET", "/v1/health")["status"] == "ok"
    output = limited_server.output()
    assert "Traceback" not in output
    assert '" 500' not in output and 'HTTP/1.1" 5' not in output
