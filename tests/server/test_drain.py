"""A replica shutting down (SIGTERM) through real server processes: the readiness check fails
for the whole drain while the requests in flight finish, an upload chunk still arriving is
stopped with its bytes kept (the client resumes), and the process exits within about
``--shutdown-timeout`` whatever is stuck (see ``chronicle_integrations/server/drain.py``)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import sqlite3
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import requests
import testkit
from server_helpers import Api

MiB = 1024 * 1024
#: ``--shutdown-timeout`` of the tests that measure the bound.
BOUND = 3.0


def _connect(url: str, receive_buffer: int | None = None) -> socket.socket:
    address = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # (fixed before connecting: no autotuning past it)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((address.hostname, address.port))
    sock.settimeout(60)
    return sock


def _head(method: str, url: str, target: str, **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {urlsplit(url).netloc}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP/1.1 responses (each with a Content-Length) one after the other in ``data``."""
    found = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response head: {data[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
        length = int(headers["content-length"])
        assert len(rest) >= length, f"a cut body ({len(rest)} of {length} bytes)"
        found.append((int(status_line.split()[1]), headers, rest[:length]))
        data = rest[length:]
    return found


def _read_to_end(sock: socket.socket) -> bytes:
    parts = []
    while piece := sock.recv(1 << 20):
        parts.append(piece)
    return b"".join(parts)


def _sigterm(server: Any) -> float:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    return time.monotonic()


def _exited(server: Any, since: float) -> float:
    """Seconds from ``since`` until the server process ended (checked: a graceful end)."""
    code = server.proc.wait(120)
    elapsed = time.monotonic() - since
    # uvicorn re-raises the SIGTERM once its shutdown is complete: exit by that signal.
    assert code in (0, -signal.SIGTERM), server.output()[-3000:]
    assert "Application shutdown complete" in server.output()
    return elapsed


class SlowChunk(threading.Thread):
    """``PUT /v1/uploads/{id}?offset=N`` whose body is sent slowly (64 KiB every 50 ms) on a
    raw connection until the server answers, or closes, or the body is all sent. ``sent``:
    body bytes sent; ``answer``: what the server sent back (b"" if nothing)."""

    def __init__(self, url: str, upload_id: str, offset: int, body: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = _connect(url)
        self.sock.sendall(
            _head(
                "PUT",
                url,
                f"/v1/uploads/{upload_id}?offset={offset}",
                Content_Type="application/octet-stream",
                Content_Length=str(len(body)),
            )
        )
        self.body = body
        self.sent = 0
        self.answer = b""

    def run(self) -> None:
        try:
            while self.sent < len(self.body):
                if select.select([self.sock], [], [], 0)[0]:
                    break  # the server answered (or closed): stop sending, as a client does
                self.sock.sendall(self.body[self.sent : self.sent + 64 * 1024])
                self.sent = min(self.sent + 64 * 1024, len(self.body))
                time.sleep(0.05)
            self.answer = _read_to_end(self.sock)
        except OSError:
            pass  # the process died under the connection
        finally:
            self.sock.close()


def _upload_begun(api: Api, size: int) -> tuple[str, str, str, bytes]:
    """A running run's upload of ``size`` random bytes, whose first MiB is stored
    (acknowledged); returns the run's path and lease, the upload id and the content."""
    path, lease = api.started()
    data = os.urandom(size)
    uid = api.ok(
        "POST", f"{path}/uploads", 201, json={"name": "model.ckpt", "size": size, "lease": lease}
    )["upload_id"]
    stored = api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": 0}, data=data[:MiB])
    assert stored["offset"] == MiB
    return path, lease, uid, data


def _resume_and_complete(server: Any, path: str, uid: str, data: bytes) -> int:
    """What a client does on another (here: the restarted) replica: read the offset back,
    send the rest, complete; the asset must be exactly ``data``. Returns the offset read."""
    with Api(server.url) as api:
        offset = int(api.ok("GET", f"/v1/uploads/{uid}")["offset"])
        api.ok("PUT", f"/v1/uploads/{uid}", params={"offset": offset}, data=data[offset:])
        digest = hashlib.sha256(data).hexdigest()
        asset = api.ok("POST", f"/v1/uploads/{uid}/complete", json={"sha256": digest})
        assert asset["sha256"] == digest and asset["size"] == len(data)
        assert api.get(f"{path}/assets/model.ckpt").content == data
    return offset


def test_ready_is_503_on_an_open_connection_for_the_whole_drain(server_factory: Any) -> None:
    """A download in flight holds the drain; behind it, on the same (already open)
    connection, a readiness probe and a liveness probe were pipelined: after SIGTERM the
    download completes, ``/v1/ready`` answers 503 ``shutting_down`` and ``/v1/health`` 200,
    then the connection closes. (uvicorn closes idle kept-alive connections when it starts
    draining and lets a busy one finish what it had received: pipelined requests are the
    ones an open connection can still carry; see server/drain.py.)"""
    server = server_factory(extra_args=["--shutdown-timeout", "60"])
    data = os.urandom(16 * MiB)  # far more than the socket buffers hold: the download waits
    with Api(server.url) as api:
        path, lease = api.started()
        api.upload(path, "big.bin", data, lease)
        assert api.get("/v1/ready").status_code == 200
    sock = _connect(server.url, receive_buffer=64 * 1024)
    try:
        sock.sendall(
            _head("GET", server.url, f"{path}/assets/big.bin")
            + _head("GET", server.url, "/v1/ready")
            + _head("GET", server.url, "/v1/health")
        )
        assert select.select([sock], [], [], 30)[0], "the download did not start"
        _sigterm(server)
        testkit.wait_until(lambda: "Shutting down" in server.output(), 30, what="the drain")
        assert server.proc is not None and server.proc.poll() is None  # still draining
        answers = _responses(_read_to_end(sock))  # ends when the server closes it
    finally:
        sock.close()
    assert [status for status, _, _ in answers] == [200, 503, 200], answers[1:]
    (_, _, body), (_, _, not_ready), (_, headers, alive) = answers
    assert body == data  # the request in flight completed
    error = json.loads(not_ready)["error"]
    assert error["code"] == "unavailable" and error["reason"] == "shutting_down", error
    assert json.loads(alive)["status"] == "ok"
    assert headers.get("connection") == "close"
    _exited(server, time.monotonic())


def test_a_slow_upload_is_stopped_within_the_bound_and_resumes(server_factory: Any) -> None:
    """An upload chunk arriving slowly at SIGTERM does not hold the shutdown: near the end of
    the bound the server writes what arrived and answers 408 ``shutting_down`` with the
    offset; that offset is what the restarted server holds, and the upload resumes there."""
    server = server_factory(extra_args=["--shutdown-timeout", str(BOUND)])
    with Api(server.url) as api:
        path, _, uid, data = _upload_begun(api, 12 * MiB)
        chunk = SlowChunk(server.url, uid, MiB, data[MiB:])
        chunk.start()
        # Bytes of the slow chunk are being written...
        testkit.wait_until(
            lambda: api.ok("GET", f"/v1/uploads/{uid}")["offset"] > MiB, 60, what="a write"
        )
    since = _sigterm(server)
    chunk.join(120)
    elapsed = _exited(server, since)
    assert elapsed < 3 * BOUND, (elapsed, server.output()[-3000:])
    answers = _responses(chunk.answer)
    assert answers and answers[0][0] == 408, (chunk.answer[:500], server.output()[-3000:])
    error = json.loads(answers[0][2])["error"]
    assert error["code"] == "request_timeout" and error["reason"] == "shutting_down", error
    assert answers[0][1].get("connection") == "close"
    assert MiB < error["offset"] <= MiB + chunk.sent < len(data)  # stopped mid-body
    server.restart()  # "another replica": same store
    # Everything the answer counted is stored: the client resumes exactly there.
    assert _resume_and_complete(server, path, uid, data) == error["offset"]


def test_shutdown_ends_within_the_bound_whatever_is_stuck(server_factory: Any) -> None:
    """SIGTERM while the database is locked by another process (heartbeats waiting in the
    lane, the watchdog's sweep) and an upload's write waits for the partial file's lock
    (held by another process): the requests in flight and the three drain steps share one
    bound, so the process exits within about ``--shutdown-timeout`` (each step used to get
    the whole bound anew: four times it). The acknowledged bytes of the upload stay stored."""
    server = server_factory(
        heartbeat_timeout=4.0,  # the watchdog sweeps every second
        extra_args=["--shutdown-timeout", str(BOUND)],
    )
    api = Api(server.url)
    path, lease, uid, data = _upload_begun(api, 12 * MiB)
    chunk = SlowChunk(server.url, uid, MiB, data[MiB:])
    chunk.start()
    testkit.wait_until(
        lambda: api.ok("GET", f"/v1/uploads/{uid}")["offset"] > MiB, 60, what="a write"
    )
    api.close()
    partial = os.open(os.path.join(server.assets, "partial", uid), os.O_RDONLY)
    fcntl.flock(partial, fcntl.LOCK_EX)  # (after the append running, if any): the next waits
    db_path = server.store_url.removeprefix("sqlite:///")
    database = sqlite3.connect(db_path, timeout=60, isolation_level=None)
    database.execute("BEGIN IMMEDIATE")  # every write of the server waits (busy timeout: 60 s)

    def beat() -> None:
        with contextlib.suppress(requests.RequestException):  # (it dies before answering)
            requests.post(f"{server.url}{path}/heartbeat", json={"lease": lease}, timeout=120)

    beats = [threading.Thread(target=beat, daemon=True) for _ in range(4)]
    try:
        for thread in beats:
            thread.start()
        time.sleep(1.5)  # the heartbeats reach the lane; a sweep starts and waits
        since = _sigterm(server)
        elapsed = _exited(server, since)
    finally:
        database.rollback()
        database.close()
        fcntl.flock(partial, fcntl.LOCK_UN)
        os.close(partial)
    chunk.join(60)
    for thread in beats:
        thread.join(60)
    assert elapsed < 2.5 * BOUND, (elapsed, server.output()[-3000:])
    assert "still busy at the end of" in server.output()
    server.restart()
    assert _resume_and_complete(server, path, uid, data) >= MiB
