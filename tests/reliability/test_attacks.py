"""Crafted attacks, table-driven, against a real server started with ``--api-key``.

Every attack must be answered with a 4xx and the standard error body, persist nothing (checked
by GETs of everything a successful request would have changed: experiments, runs, their
states and events, assets) and leave the server serving. Client-side attacks (symlinks in an
uploaded directory, traversal in a name) must be stopped before anything leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from rel_helpers import Api, assert_error

from chronicle_integrations import Chronicle
from chronicle_integrations._errors import InvalidRequest, UploadError

KEY = "reliability-" + secrets.token_urlsafe(16)
MAX_CHUNK = 2**20
PUBLIC = {("get", "/v1/health"), ("get", "/v1/ready")}  # probes for load balancers


class World:
    """A keyed server with one experiment, a pending run, a running run (lease) and an asset."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.api = Api(server.url, KEY)
        self.anon = Api(server.url)
        self.experiment = self.api.experiment(variations=2)
        self.pending = self.api.run(self.experiment)
        self.running = self.api.run(self.experiment)
        self.lease = self.api.ok("POST", self.path(self.running) + "/start")["lease"]
        data = b"the real asset"
        status = self.api.ok(
            "POST",
            self.path(self.running) + "/uploads",
            201,
            json={"name": "model.ckpt", "size": len(data), "lease": self.lease},
        )
        self.upload_id = status["upload_id"]
        self.api.ok("PUT", f"/v1/uploads/{self.upload_id}", params={"offset": 0}, data=data)
        self.api.ok(
            "POST",
            f"/v1/uploads/{self.upload_id}/complete",
            json={"sha256": hashlib.sha256(data).hexdigest()},
        )
        #: An upload left open (nothing stored yet), for the offset attacks.
        self.open_upload = self.api.ok(
            "POST",
            self.path(self.running) + "/uploads",
            201,
            json={"name": "open.bin", "size": 100, "lease": self.lease},
        )["upload_id"]

    @staticmethod
    def path(key: tuple[str, int, int]) -> str:
        return f"/v1/runs/{key[0]}/{key[1]}/{key[2]}"

    def snapshot(self) -> Any:
        """Everything an attack could have changed (read with the key)."""
        runs = self.api.ok("GET", "/v1/runs")["runs"]
        keys = [(r["experiment_id"], r["variation"], r["run"]) for r in runs]
        return json.dumps(
            {
                "experiments": self.api.ok("GET", "/v1/experiments")["experiments"],
                "runs": runs,
                "events": {
                    self.path(k): self.api.ok("GET", self.path(k) + "/events") for k in keys
                },
                "assets": {
                    self.path(k): self.api.ok("GET", self.path(k) + "/assets") for k in keys
                },
                "variations": [
                    self.api.request(
                        "GET", f"/v1/experiments/{self.experiment}/variations/{v}"
                    ).status_code
                    for v in range(4)
                ],
            },
            sort_keys=True,
        )

    def serving(self) -> None:
        assert requests.get(self.server.url + "/v1/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def world(module_server_factory: Any) -> Iterator[World]:
    server = module_server_factory(api_key=KEY, extra_args=["--max-chunk-bytes", str(MAX_CHUNK)])
    w = World(server)
    yield w
    w.api.close()
    w.anon.close()


@pytest.fixture
def unchanged(world: World, figures: Any) -> Iterator[None]:
    """Asserts that the test persisted nothing and the server still serves."""
    before = world.snapshot()
    yield
    world.serving()
    assert world.snapshot() == before, "an attack changed persisted state"
    figures["fault:attack"] += 1


# ------------------------------------------------------------------------------ API key
def _operations(world: World) -> list[tuple[str, str, dict[str, Any]]]:
    """Every operation of /openapi.json, with path parameters pointing at real objects and a
    body that would succeed with the key (so only the key stops it)."""
    schema = requests.get(world.server.url + "/openapi.json", timeout=10).json()
    e, v, r = world.pending
    values = {
        "experiment_id": e,
        "variation": str(v),
        "run": str(r),
        "upload_id": world.upload_id,
        "name": "model.ckpt",
    }
    bodies: dict[str, Any] = {
        "/v1/experiments": {
            "json": {"name": "intruder", "variations": [{}], "experiment_id": "intruder-exp"}
        },
        "/variations": {"json": {"config": {"x": 1}}},
        "/runs": {"json": {}},
        "/start": {"json": {}},
        "/heartbeat": {"json": {}},
        "/succeed": {"json": {}},
        "/fail": {"json": {"reason": "abandoned"}},
        "/uploads": {"json": {"name": "evil.bin", "size": 4}},
        "/complete": {"json": {"sha256": "0" * 64}},
    }
    ops = []
    for template, item in schema["paths"].items():
        for method in item:
            path = re.sub(r"\{(\w+)(?::path)?\}", lambda m: values[m.group(1)], template)
            kwargs: dict[str, Any] = {}
            if method == "put":
                kwargs = {"params": {"offset": 0}, "data": b"evil"}
            elif method == "post":
                kwargs = next(
                    (b for suffix, b in bodies.items() if template.endswith(suffix)), {"json": {}}
                )
            ops.append((method, path, kwargs))
    return ops


BAD_AUTH: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": f"Bearer {KEY.upper()}"},
    {"X-Api-Key": KEY},
]


def test_every_endpoint_refuses_a_missing_or_wrong_key(
    world: World, unchanged: None, figures: Any
) -> None:
    operations = _operations(world)
    assert len(operations) >= 15
    tried = 0
    for method, path, kwargs in operations:
        if (method, path) in PUBLIC:
            continue
        for headers in BAD_AUTH:
            resp = requests.request(
                method, world.server.url + path, headers=headers, timeout=10, **kwargs
            )
            assert_error(resp, 401, "unauthorized")
            assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer"), path
            tried += 1
    figures["unauthorised requests refused"] += tried


def test_the_key_opens_every_endpoint(world: World) -> None:
    """The counterpart: with the key, no operation is refused for authentication (so the test
    above can fail). Runs after it: it changes state."""
    for method, path, kwargs in _operations(world):
        resp = world.api.request(method, path, **kwargs)
        assert resp.status_code != 401, (method, path, resp.text)


# ------------------------------------------------------------------------------ names
TRAVERSAL_NAMES = [
    "../x",
    "../../etc/passwd",
    "a/../../x",
    "a/..",
    "..",
    ".",
    "./x",
    "a/./b",
    "/etc/passwd",
    "//x",
    "a//b",
    "a\\..\\x",
    "..\\x",
    "",
    "a\x00b",
    "a\nb",
    "x/" * 600,
    "a" * 256,
    "ok/" + "b" * 256,
]


@pytest.mark.parametrize("name", TRAVERSAL_NAMES, ids=repr)
def test_traversal_names_refused_by_begin_upload(world: World, unchanged: None, name: str) -> None:
    resp = world.api.request(
        "POST",
        world.path(world.running) + "/uploads",
        json={"name": name, "size": 4, "lease": world.lease},
    )
    assert_error(resp, 400, "invalid_request")


ENCODED_PATHS = [
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%2f..%2fchronicle.db",
    "%2e%2e/x",
    "..%2fmodel.ckpt",
    "%252e%252e%252fx",
    "..%252fx",
    "..%c0%afx",
    "%c0%ae%c0%ae/x",
    "%2fetc%2fpasswd",
    "%5c..%5cx",
    "model.ckpt%00.png",
    "%E2%80%A4%E2%80%A4/x",
    "%EF%BC%8E%EF%BC%8E/x",
    "a/%2e/model.ckpt",
    "..;/x",
    "%ff%fe",
]


@pytest.mark.parametrize("raw", ENCODED_PATHS)
def test_encoded_traversal_in_download_paths(world: World, unchanged: None, raw: str) -> None:
    """Percent-encoded, double-encoded, overlong UTF-8 and unicode-dot names: never a file
    outside the run's assets (decoding happens once; the result is checked as a name)."""
    url = world.server.url + world.path(world.running) + "/assets/" + raw
    resp = requests.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert_error(resp, (400, 404))


LITERAL_NAMES = [
    "%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252f",
    "\u2024\u2024/x",
    "\uff0e\uff0e/x",
    "..\u2215x",
    "\u202e..",
    "...",
    "a..b/..c",
]


@pytest.mark.parametrize("name", LITERAL_NAMES, ids=repr)
def test_lookalike_names_are_plain_names(world: World, name: str, tmp_path: Path) -> None:
    """Names that only *look* like traversal are legal relative names: stored and served under
    exactly that name (nothing decodes them), and the bytes live only in the blob store."""
    data = os.urandom(64)
    before = {p for p in world.server.assets.parent.rglob("*")}
    resp = world.api.request(
        "POST",
        world.path(world.running) + "/uploads",
        json={"name": name, "size": len(data), "lease": world.lease},
    )
    if resp.status_code != 201:
        assert_error(resp, 400, "invalid_request")
        return
    uid = resp.json()["upload_id"]
    world.api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=data)
    world.api.ok(
        "POST", f"/v1/uploads/{uid}/complete", json={"sha256": hashlib.sha256(data).hexdigest()}
    )
    assets = world.api.assets(world.running)
    assert name in assets
    got = world.api.request("GET", world.path(world.running) + "/assets/" + quote(name, safe="/"))
    assert got.status_code == 200 and got.content == data
    new = {p for p in world.server.assets.parent.rglob("*")} - before
    outside = [
        p
        for p in new
        if world.server.assets not in p.parents and p.suffix not in (".db-wal", ".db-shm", ".log")
    ]
    assert not outside, outside


# ------------------------------------------------------------------------------ JSON bodies
def _chunked(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


BAD_BODIES: list[tuple[str, Any, int]] = [
    ("huge", json.dumps({"name": "x", "variations": [{"pad": "a" * (3 * 2**20)}]}).encode(), 413),
    ("huge chunked", "CHUNKED", 413),
    (
        "deep 100",
        ('{"name":"x","variations":[' + '{"a":' * 100 + "1" + "}" * 100 + "]}").encode(),
        400,
    ),
    ("deep 200k", b'{"name":"x","variations":[' + b"[" * 200000 + b"]" * 200000 + b"]}", 400),
    ("invalid utf-8", b'{"name":"\xff\xfe\xc0\xaf","variations":[]}', 400),
    ("overlong utf-8", b'{"name":"\xc0\xae\xc0\xae","variations":[]}', 400),
    ("lone surrogate", b'{"name":"\\ud800","variations":[]}', 400),
    ("NaN", b'{"name":"x","variations":[{"lr":NaN}]}', 400),
    ("Infinity", b'{"name":"x","variations":[{"lr":-Infinity}]}', 400),
    ("big int", b'{"name":"x","variations":[{"n":' + b"9" * 5000 + b"}]}", 400),
    ("array", b'[{"name":"x"}]', 400),
    ("string", b'"x"', 400),
    ("truncated", b'{"name":"x","variations":[', 400),
    ("nul", b'{"name":"x\\u0000y","variations":[]}', 400),
    ("wrong types", b'{"name":5,"variations":"abc"}', 400),
]


@pytest.mark.parametrize(("label", "body", "status"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_hostile_json_bodies(
    world: World, unchanged: None, label: str, body: Any, status: int
) -> None:
    if body == "CHUNKED":  # no Content-Length: the limit must hold while reading
        body = _chunked(json.dumps({"name": "x", "pad": "a" * (3 * 2**20)}).encode())
    resp = world.api.request(
        "POST", "/v1/experiments", data=body, headers={"Content-Type": "application/json"}
    )
    assert_error(resp, status)


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "99999999999999999999999", " 5"])
def test_lying_content_length(world: World, unchanged: None, length: str) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", world.server.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/experiments")
        conn.putheader("Authorization", f"Bearer {KEY}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", length)
        conn.endheaders(b'{"name":"x"}')
        resp = conn.getresponse()
        assert 400 <= resp.status < 500, (resp.status, resp.read())
    except (ConnectionError, http.client.HTTPException):
        pass  # refused at the HTTP layer: also fine, as long as the server still serves
    finally:
        conn.close()


# ------------------------------------------------------------------------------ numbers
HUGE_NUMBERS = [
    "2147483648",
    "9223372036854775808",
    "18446744073709551616",
    "1" + "0" * 30,
    "-1",
    "1e3",
    "0x10",
    "+1",
    "1.0",
    "%201",
    "\u0661",
    "NaN",
    "00000000000000000000001",
]


@pytest.mark.parametrize("number", HUGE_NUMBERS)
def test_overflowing_numbers_in_paths(world: World, unchanged: None, number: str) -> None:
    e = world.experiment
    for path in (
        f"/v1/runs/{e}/{number}/0",
        f"/v1/runs/{e}/0/{number}",
        f"/v1/runs/{e}/0/{number}/start",
        f"/v1/experiments/{e}/variations/{number}",
        f"/v1/experiments/{e}/variations/{number}/runs",
    ):
        method = "POST" if path.endswith(("/start", "/runs")) else "GET"
        resp = world.api.request(method, path, json={} if method == "POST" else None)
        assert_error(resp, (400, 404))


@pytest.mark.parametrize(
    "offset",
    [
        "-1",
        "9223372036854775808",
        "18446744073709551616",
        "9007199254740993",
        "1.5",
        "1e3",
        "",
        "0x0",
        "\uff11",
    ],
)
def test_bad_offsets(world: World, unchanged: None, offset: str) -> None:
    resp = world.api.request(
        "PUT", f"/v1/uploads/{world.open_upload}?offset={quote(offset)}", data=b"x"
    )
    assert_error(resp, (400, 409))
    assert world.api.ok("GET", f"/v1/uploads/{world.open_upload}")["offset"] == 0


@pytest.mark.parametrize("size", [-1, 2**53 + 1, 2**63, 2**64, 10**30, 1.5, True, "5", None])
def test_bad_declared_sizes(world: World, unchanged: None, size: Any) -> None:
    body: dict[str, Any] = {"name": f"s-{secrets.token_hex(4)}", "lease": world.lease, "size": size}
    if size is None:
        body["size"] = {"n": 1}
    resp = world.api.request("POST", world.path(world.running) + "/uploads", json=body)
    assert_error(resp, 400, "invalid_request")


# ------------------------------------------------------------------------------ leases
def test_forged_and_replayed_leases(world: World, figures: Any) -> None:
    key = world.api.run(world.experiment)
    path = world.path(key)
    old = world.api.ok("POST", path + "/start")["lease"]
    new = world.api.ok("POST", path + "/start", json={"resume": True})["lease"]
    assert old != new
    events_before = world.api.ok("GET", path + "/events")
    forged = secrets.token_urlsafe(24)
    for lease in (old, forged, old.upper(), old[:-1] + ("A" if old[-1] != "A" else "B")):
        for action, body in (
            ("heartbeat", {"lease": lease}),
            ("succeed", {"lease": lease}),
            ("fail", {"reason": "crash", "lease": lease}),
        ):
            assert_error(
                world.api.request("POST", f"{path}/{action}", json=body), 409, "lease_conflict"
            )
        assert_error(
            world.api.request(
                "POST", path + "/uploads", json={"name": "stolen.bin", "size": 1, "lease": lease}
            ),
            409,
            "lease_conflict",
        )
        # Without resume, a start cannot take the run over, whatever lease it proposes.
        assert_error(
            world.api.request("POST", path + "/start", json={"lease": lease}),
            409,
            "invalid_transition",
        )
        figures["fault:forged lease"] += 1
    for lease in ("short", "a" * 200, "../../etc", "lease with spaces"):
        resp = world.api.request("POST", path + "/heartbeat", json={"lease": lease})
        assert_error(resp, (400, 409))
    for missing in ({}, {"lease": None}):
        assert_error(
            world.api.request("POST", path + "/succeed", json=missing), 409, "lease_conflict"
        )
    assert world.api.ok("GET", path + "/events") == events_before
    assert world.api.state(key) == "running"
    assert world.api.assets(key) == {}
    world.api.ok("POST", path + "/heartbeat", json={"lease": new})  # the holder still can


@pytest.mark.parametrize("action", ["heartbeat", "succeed", "fail", "uploads"])
def test_non_ascii_lease_is_refused_with_a_4xx(world: World, action: str) -> None:
    """Was a 500 (``secrets.compare_digest(str, str)`` raises TypeError on non-ASCII text),
    found by the live-run fuzz pass; fixed in store/core.py ``_same_lease``."""
    key = world.api.run(world.experiment)
    path = world.path(key)
    world.api.ok("POST", path + "/start")
    body: dict[str, Any] = {"lease": "\u00e9t\u00e9-" + secrets.token_hex(8)}
    if action == "fail":
        body["reason"] = "crash"
    if action == "uploads":
        body.update(name="x.bin", size=1)
    resp = world.api.request("POST", f"{path}/{action}", json=body)
    world.serving()
    assert world.api.state(key) == "running"
    assert_error(resp, (400, 409))


# ------------------------------------------------------------------------------ request ids
def test_replayed_create_run_request_id_on_another_variation(world: World) -> None:
    """An idempotency key answers retries of *its* request only: replayed on another
    variation it must create a run there (or be refused), never hand out another run."""
    rid = "replayed-" + secrets.token_hex(8)
    first = world.api.experiment()
    world.api.ok(
        "POST", f"/v1/experiments/{first}/variations/0/runs", 201, json={"request_id": rid}
    )
    other = world.api.experiment()
    for _ in range(3):
        world.api.run(other)  # runs 0, 1, 2 of someone else
    resp = world.api.request(
        "POST", f"/v1/experiments/{other}/variations/0/runs", json={"request_id": rid}
    )
    runs = world.api.ok("GET", "/v1/runs", params={"experiment_id": other})["runs"]
    if resp.status_code == 201:
        assert resp.json()["run"] == 3 and len(runs) == 4, (resp.json(), runs)
    else:
        assert_error(resp, (409, 422))
        assert len(runs) == 3


def test_replayed_add_variation_request_id_with_another_config(world: World) -> None:
    rid = "replayed-" + secrets.token_hex(8)
    experiment = world.api.experiment(variations=1)
    path = f"/v1/experiments/{experiment}/variations"
    world.api.ok("POST", path, 201, json={"config": {"lr": 0.1}, "request_id": rid})
    resp = world.api.request("POST", path, json={"config": {"lr": 0.5}, "request_id": rid})
    if resp.status_code == 201:
        number = resp.json()["variation"]
        config = world.api.ok("GET", f"{path}/{number}")["config"]
        assert config == {"lr": 0.5}, (number, config)
    else:
        assert_error(resp, (409, 422))


# ------------------------------------------------------------------------------ uploads
def _begin(world: World, key: tuple[str, int, int], lease: str, name: str, size: int | None) -> str:
    return str(
        world.api.ok(
            "POST",
            world.path(key) + "/uploads",
            201,
            json={"name": name, "size": size, "lease": lease},
        )["upload_id"]
    )


def test_oversized_uploads(world: World, figures: Any) -> None:
    key = world.api.run(world.experiment)
    lease = world.api.ok("POST", world.path(key) + "/start")["lease"]
    # More bytes than declared.
    uid = _begin(world, key, lease, "small.bin", 10)
    assert_error(
        world.api.request("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=b"x" * 20),
        400,
        "invalid_request",
    )
    assert world.api.ok("GET", f"/v1/uploads/{uid}")["offset"] <= 10
    assert_error(
        world.api.request(
            "POST",
            f"/v1/uploads/{uid}/complete",
            json={"sha256": hashlib.sha256(b"x" * 20).hexdigest()},
        ),
        (400, 422),
    )
    # A declared Content-Length over the chunk limit: refused before reading.
    uid = _begin(world, key, lease, "big.bin", None)
    big = os.urandom(2 * MAX_CHUNK)
    assert_error(
        world.api.request("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=big),
        413,
        "payload_too_large",
    )
    # The same without Content-Length (chunked): the limit holds while streaming.
    try:
        resp = world.api.request(
            "PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=_chunked(big)
        )
        assert_error(resp, 413, "payload_too_large")
    except requests.ConnectionError:
        pass  # the server may close the connection after answering 413 mid-body
    stored = world.api.ok("GET", f"/v1/uploads/{uid}")["offset"]
    assert stored <= MAX_CHUNK
    # Completing with the digest of everything: the bytes are not all there.
    assert_error(
        world.api.request(
            "POST", f"/v1/uploads/{uid}/complete", json={"sha256": hashlib.sha256(big).hexdigest()}
        ),
        (400, 422),
    )
    # Right size, wrong digest.
    uid = _begin(world, key, lease, "liar.bin", 4)
    world.api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=b"abcd")
    assert_error(
        world.api.request(
            "POST",
            f"/v1/uploads/{uid}/complete",
            json={"sha256": hashlib.sha256(b"abce").hexdigest()},
        ),
        422,
        "digest_mismatch",
    )
    assert world.api.assets(key) == {}
    assert [e for e in world.api.events(key) if e["kind"] == "asset"] == []
    world.serving()
    figures["fault:oversized upload"] += 4


# ------------------------------------------------------------------------------ client side
def test_symlinks_in_uploaded_directories_are_not_followed(
    world: World, tmp_path: Path, figures: Any
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_bytes(b"the host's secret " + os.urandom(16))
    (outside / "dir").mkdir()
    (outside / "dir" / "inner.txt").write_bytes(b"also secret " + os.urandom(16))
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "weights.bin").write_bytes(os.urandom(1000))
    (ckpt / "sub" / "opt.bin").write_bytes(os.urandom(1000))
    (ckpt / "link-to-secret").symlink_to(secret)
    (ckpt / "sub" / "up").symlink_to("../../outside/secret.txt")
    (ckpt / "link-to-dir").symlink_to(outside / "dir")
    (ckpt / "abs-root").symlink_to("/")
    (ckpt / "loop").symlink_to(ckpt)
    (ckpt / "dangling").symlink_to(tmp_path / "nothing")
    (tmp_path / "dirlink").symlink_to(outside)

    chronicle = Chronicle(url=world.server.url, api_key=KEY, home=tmp_path / "home")
    try:
        run = chronicle.create_run(world.experiment, 0).start()
        assets = run.upload_asset(ckpt, "ckpt").result(timeout=60)
        names = sorted(a.name for a in assets)
        assert names == ["ckpt/sub/opt.bin", "ckpt/weights.bin"], names
        with pytest.raises(UploadError):
            run.upload_asset(tmp_path / "dirlink", "stolen")
        for bad in ("../escape", "/abs", "a/../../b", "a\\b"):
            with pytest.raises(InvalidRequest):
                run.upload_asset(ckpt / "weights.bin", bad)
        run.succeed()
        listed = world.api.assets(run.key_tuple)
        assert sorted(listed) == names
        secrets_sha = {
            hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (secret, outside / "dir" / "inner.txt")
        }
        assert not secrets_sha & {a["sha256"] for a in listed.values()}
    finally:
        chronicle.close()
    figures["fault:symlink attack"] += 6
