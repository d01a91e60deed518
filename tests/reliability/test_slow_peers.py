"""Slow and hostile peers on the upload and download paths, against real server subprocesses.

* Frozen uploaders (chunk headers, a few bytes, then silence) must not stop anyone else's
  upload: a chunk holds a worker thread and the partial's lock only while it writes bytes it
  already has. A stalled upload resumes on a new connection, and the stale request's later
  bytes are refused (writer generations), so the asset ends byte-identical.
* A chunk body that goes silent, or trickles below the minimum rate, is abandoned with 408
  ``request_timeout``; the bytes received are kept and the client resumes.
* ``Range`` headers with absurdly long numbers or upper-case units are answered per RFC 9110.
* Unfinished uploads expire (their bytes are deleted); an upload without a declared size is
  bounded by ``--max-asset-bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import testkit
from rel_helpers import Api, assert_error, run_path, wait_until

from chronicle_integrations import Chronicle

MiB = 2**20
#: Frozen uploaders: more than the server's 16 upload worker threads.
FROZEN = 20


# ------------------------------------------------------------------------------ raw sockets
def open_chunk(server: Any, upload_id: str, offset: int, length: int, head: bytes) -> socket.socket:
    """A raw connection that sent the headers of a chunk PUT of ``length`` bytes and the
    first bytes of its body (``head``), then nothing more (the caller decides what follows)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        (
            f"PUT /v1/uploads/{upload_id}?offset={offset} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
        + head
    )
    return sock


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], Any]:
    """Status, headers and decoded JSON body of the one response on ``sock``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        block = sock.recv(65536)
        if not block:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += block
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        block = sock.recv(65536)
        if not block:
            break
        body += block
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def begin(api: Api, key: tuple[str, int, int], lease: str, name: str, size: int | None) -> str:
    body: dict[str, Any] = {"name": name, "lease": lease}
    if size is not None:
        body["size"] = size
    return str(api.ok("POST", run_path(key) + "/uploads", 201, json=body)["upload_id"])


def offset_of(api: Api, upload_id: str) -> int:
    return int(api.ok("GET", f"/v1/uploads/{upload_id}")["offset"])


@contextlib.contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def in_thread(fn: Any, timeout: float, what: str) -> Any:
    """``fn()`` on a daemon thread, bounded: AssertionError naming ``what`` if it hangs (the
    old server hung these calls for ever; the thread is left to die with the test process's
    sockets)."""
    outcome = testkit.bounded_call(fn, timeout)
    if not outcome.finished:
        raise AssertionError(f"{what} did not finish within {timeout:.0f} s")
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def resume_with_fresh_client(
    server: Any,
    key: tuple[str, int, int],
    lease: str,
    upload_id: str,
    name: str,
    data: bytes,
    tmp_path: Path,
) -> None:
    """A new client process's resume path (``chronicle sync``): re-open the upload by id,
    read its offset, send the rest, complete; the asset must hash to ``data``'s SHA-256."""
    path = tmp_path / name
    path.write_bytes(data)
    fresh = Chronicle(url=server.url, home=tmp_path / f"fresh-{name}", timeout=20)
    try:
        info = in_thread(
            lambda: fresh.transport.upload_file(
                *key, name, str(path), lease=lease, upload_id=upload_id
            ),
            30,
            f"resuming upload {name}",
        )
    finally:
        fresh.close(timeout=5)
    assert info.sha256 == hashlib.sha256(data).hexdigest()


@pytest.fixture
def started(server_factory: Any, tmp_path: Path) -> Any:
    """A server factory whose servers each come with a started run (``world(...)``)."""

    def world(*extra: str) -> tuple[Any, Api, tuple[str, int, int], str]:
        server = server_factory(extra_args=list(extra))
        api = Api(server.url)
        key = api.run(api.experiment())
        lease = str(api.ok("POST", run_path(key) + "/start")["lease"])
        return server, api, key, lease

    return world


# ------------------------------------------------------------------------------ frozen peers
def test_frozen_uploaders_stop_no_one_and_a_stalled_upload_resumes(
    started: Any, tmp_path: Path, figures: Any
) -> None:
    # A long idle timeout: the server must stay available *while* the peers are frozen, not
    # merely recover once it abandons them.
    server, api, key, lease = started("--upload-idle-timeout", "600")
    data = os.urandom(3 * MiB + 12345)
    acknowledged = MiB + 4321
    victim = begin(api, key, lease, "victim.bin", len(data))
    api.ok("PUT", f"/v1/uploads/{victim}", params={"offset": 0}, data=data[:acknowledged])
    others = [begin(api, key, lease, f"frozen-{i}.bin", 4 * MiB) for i in range(FROZEN)]
    socks = [open_chunk(server, victim, acknowledged, len(data) - acknowledged, b"x" * 100)]
    socks += [open_chunk(server, u, 0, 4 * MiB, b"y" * 100) for u in others]
    with closing_all(socks):
        figures["fault:frozen_uploader"] += len(socks)
        time.sleep(1.0)  # every frozen request reached its route

        # A healthy upload through the real client.
        src = tmp_path / "healthy.bin"
        src.write_bytes(os.urandom(MiB))
        chronicle = Chronicle(url=server.url, home=tmp_path / "client", timeout=20)
        try:
            run = chronicle.run(*key, lease=lease)
            info = run.upload_asset(src).result(timeout=30)
            assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
            assert api.download_sha(key, "healthy.bin") == info.sha256

            # The stalled upload, resumed by a fresh client on a new connection.
            resume_with_fresh_client(server, key, lease, victim, "victim.bin", data, tmp_path)
        finally:
            chronicle.close(timeout=5)

        # The frozen request wakes up and sends the rest of its body: refused, nothing kept.
        victim_sock = socks[0]
        victim_sock.sendall(b"z" * (len(data) - acknowledged - 100))
        status, _, body = read_response(victim_sock, 30)
        assert status == 409 and body["error"]["code"] == "offset_mismatch", body
        assert api.download_sha(key, "victim.bin") == hashlib.sha256(data).hexdigest()
        figures["uploads verified"] += 2


def test_a_stale_request_cannot_write_between_a_newer_ones_bytes(started: Any) -> None:
    server, api, key, lease = started("--upload-idle-timeout", "600")
    data = os.urandom(3 * MiB)
    acknowledged = MiB // 2
    upload = begin(api, key, lease, "model.bin", len(data))
    api.ok("PUT", f"/v1/uploads/{upload}", params={"offset": 0}, data=data[:acknowledged])
    rest = len(data) - acknowledged
    stale = open_chunk(server, upload, acknowledged, rest, data[acknowledged : acknowledged + 10])
    time.sleep(0.5)
    newer = open_chunk(server, upload, acknowledged, rest, b"")  # takes the upload over
    with closing_all([stale, newer]):
        # The newer request's claim must land first: generation 3 (1: the first PUT, 2: the
        # stale one). Waiting for "2" returned at once and raced the newer claim under load.
        writers = Path(server.assets) / "writers" / upload
        wait_until(lambda: writers.exists() and writers.read_text() == "3", timeout=60)
        # The stale request wakes up with a full body of other bytes: they must not land.
        stale.sendall(b"\x00" * (rest - 10))
        status, _, body = read_response(stale, 30)
        assert status == 409 and body["error"]["code"] == "offset_mismatch", body
        assert offset_of(api, upload) == acknowledged
        newer.sendall(data[acknowledged:])
        status, _, body = read_response(newer, 30)
        assert status == 200 and body["offset"] == len(data), body
    done = api.ok(
        "POST",
        f"/v1/uploads/{upload}/complete",
        json={"sha256": hashlib.sha256(data).hexdigest()},
    )
    assert done["size"] == len(data)
    assert api.download_sha(key, "model.bin") == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ stalled bodies
@pytest.mark.parametrize("peer", ["silent", "trickle"])
def test_a_stalled_chunk_body_is_abandoned_and_its_bytes_kept(
    started: Any, tmp_path: Path, peer: str, figures: Any
) -> None:
    server, api, key, lease = started("--upload-idle-timeout", "2", "--upload-min-rate", "1000")
    data = os.urandom(2 * MiB)
    upload = begin(api, key, lease, "slow.bin", len(data))
    sock = open_chunk(server, upload, 0, len(data), data[:10])
    sent = 10
    with closing_all([sock]):
        if peer == "trickle":  # one byte every 0.3 s: never silent for 2 s, far below 1000 B/s
            sock.setblocking(False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    sock.recv(1, socket.MSG_PEEK)
                    break  # the server answered (or closed)
                except BlockingIOError:
                    pass
                with contextlib.suppress(OSError):
                    sent += sock.send(data[sent : sent + 1])
                time.sleep(0.3)
            sock.setblocking(True)
        status, headers, body = read_response(sock, 30)
    figures[f"fault:{peer}_chunk_body"] += 1
    assert status == 408, body
    assert body["error"]["code"] == "request_timeout", body
    assert headers.get("connection") == "close"
    kept = offset_of(api, upload)
    assert body["error"]["offset"] == kept
    assert 0 < kept <= sent  # the bytes received were kept for the resume
    # The client resumes at the acknowledged offset and the asset is intact.
    resume_with_fresh_client(server, key, lease, upload, "slow.bin", data, tmp_path)
    assert api.download_sha(key, "slow.bin") == hashlib.sha256(data).hexdigest()
    figures["uploads verified"] += 1


# ------------------------------------------------------------------------------ ranges
def test_range_headers_with_huge_numbers_and_any_case(started: Any) -> None:
    _, api, key, lease = started()
    data = bytes(range(256)) * 4
    upload = begin(api, key, lease, "r.bin", len(data))
    api.ok("PUT", f"/v1/uploads/{upload}", params={"offset": 0}, data=data)
    api.ok(
        "POST", f"/v1/uploads/{upload}/complete", json={"sha256": hashlib.sha256(data).hexdigest()}
    )
    url = run_path(key) + "/assets/r.bin"
    huge = "9" * 5000  # more digits than Python converts (4300)
    for header, (start, end) in {
        "BYTES=0-1": (0, 2),
        "Bytes=10-": (10, len(data)),
        f"bytes=0-{huge}": (0, len(data)),  # a last position past the end: to the end
        f"bytes=5-{huge}": (5, len(data)),
        f"bytes=-{huge}": (0, len(data)),  # a suffix longer than the asset: all of it
        f"bytes=00000000000000000000000000{len(data) - 1}-": (len(data) - 1, len(data)),
    }.items():
        resp = api.get(url, headers={"Range": header})
        assert resp.status_code == 206, (header[:40], resp.status_code, resp.text[:200])
        assert resp.content == data[start:end], header[:40]
        assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
    for header in (f"bytes={huge}-", f"bytes={huge}-{huge}", f"BYTES={len(data)}-"):
        resp = api.get(url, headers={"Range": header})
        error = assert_error(resp, 416, "invalid_request")
        assert error["size"] == len(data)
        assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
        assert len(error["message"]) < 500  # the header is not echoed back in full
    assert api.get("/v1/health").status_code == 200


# ------------------------------------------------------------------------------ disk leaks
def test_unfinished_uploads_expire_and_their_bytes_are_deleted(started: Any) -> None:
    # --heartbeat-timeout 4: the watchdog sweeps every second.
    server, api, key, lease = started("--upload-expiry", "3", "--heartbeat-timeout", "4")
    partial = Path(server.assets) / "partial"
    abandoned = begin(api, key, lease, "abandoned.bin", 10 * MiB)
    api.ok("PUT", f"/v1/uploads/{abandoned}", params={"offset": 0}, data=b"a" * MiB)
    never = begin(api, key, lease, "never.bin", None)  # no chunk at all
    done_data = b"complete"
    done = begin(api, key, lease, "done.bin", len(done_data))
    api.ok("PUT", f"/v1/uploads/{done}", params={"offset": 0}, data=done_data)
    api.ok(
        "POST",
        f"/v1/uploads/{done}/complete",
        json={"sha256": hashlib.sha256(done_data).hexdigest()},
    )
    busy = begin(api, key, lease, "busy.bin", None)
    assert (partial / abandoned).stat().st_size == MiB

    # "busy" gets a chunk every half second for longer than the expiry: it stays.
    offset = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        api.ok("PUT", f"/v1/uploads/{busy}", params={"offset": offset}, data=b"b" * 1000)
        offset += 1000
        time.sleep(0.5)
    wait_until(
        lambda: api.get(f"/v1/uploads/{abandoned}").status_code == 404,
        timeout=30,
        what="the abandoned upload to expire",
    )
    for upload in (abandoned, never):
        assert_error(api.get(f"/v1/uploads/{upload}"), 404, "not_found")
        error = assert_error(
            api.put(f"/v1/uploads/{upload}", params={"offset": 0}, data=b"late"),
            404,
            "not_found",
        )
        assert "expire" in error["message"]
        assert not (partial / upload).exists()
    assert offset_of(api, busy) == offset
    assert api.ok("GET", f"/v1/uploads/{done}")["completed"] is True
    assert api.download_sha(key, "done.bin") == hashlib.sha256(done_data).hexdigest()


def test_an_upload_without_a_declared_size_is_bounded(started: Any) -> None:
    _, api, key, lease = started("--max-asset-bytes", str(MiB))
    upload = begin(api, key, lease, "endless.bin", None)
    api.ok("PUT", f"/v1/uploads/{upload}", params={"offset": 0}, data=b"e" * (MiB - 10))
    error = assert_error(
        api.put(f"/v1/uploads/{upload}", params={"offset": MiB - 10}, data=b"e" * 11),
        413,
        "payload_too_large",
    )
    assert error["limit"] == MiB
    assert offset_of(api, upload) == MiB - 10  # nothing past the bound was kept
    api.ok("PUT", f"/v1/uploads/{upload}", params={"offset": MiB - 10}, data=b"e" * 10)
    # A declared size beyond the bound is refused up front.
    resp = api.post(
        run_path(key) + "/uploads", json={"name": "big.bin", "size": MiB + 1, "lease": lease}
    )
    assert_error(resp, 413, "payload_too_large")


def test_the_chronicle_cli_passes_the_upload_limits_on(tmp_path: Path) -> None:
    """``chronicle server`` has its own copy of the server's options: they must reach it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log = tmp_path / "cli-server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("CHRONICLE_API_KEY", "CHRONICLE_URL")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chronicle_integrations.cli",
                "server",
                "--port",
                str(port),
                "--home",
                str(tmp_path / "home"),
                "--max-asset-bytes",
                "100",
                "--upload-expiry",
                "3600",
                "--upload-idle-timeout",
                "5",
                "--upload-min-rate",
                "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        api = Api(f"http://127.0.0.1:{port}")

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(requests.RequestException):
                return api.get("/v1/health", timeout=2).status_code == 200
            return False

        wait_until(healthy, timeout=60, what="chronicle server")
        key = api.run(api.experiment())
        lease = str(api.ok("POST", run_path(key) + "/start")["lease"])
        resp = api.post(
            run_path(key) + "/uploads", json={"name": "big.bin", "size": 101, "lease": lease}
        )
        assert_error(resp, 413, "payload_too_large")
        api.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
