"""Slow and hostile peers: raw sockets against real server subprocesses.

* Connection level: half-sent requests by the hundred, connections that trickle their head a
  byte at a time (slowloris), one endless header, ten thousand headers. Each is bounded (a
  head deadline, a head size and header count, a connection cap within the open-file limit,
  which the server raises) while a normal client's heartbeats keep succeeding, and the log
  stays small (a failed ``accept()`` is one line per interval, not one traceback each).
* Request level: a keyless (loopback) server refuses foreign ``Host`` names (DNS rebinding)
  and cross-site ``Origin`` s (a web page's POST) with 403 ``forbidden``; heartbeats are small
  (413 beyond 16 KiB); ``/docs`` (third-party scripts) is off by default.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from rel_helpers import Api, assert_error, run_path, wait_until

from chronicle_integrations import Chronicle

HEAD = b"POST /v1/experiments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-"


# ------------------------------------------------------------------------------ helpers
def _connect(port: int, data: bytes = b"", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if data:
        sock.sendall(data)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed (or reset) the connection; never blocks."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def _answer(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    parts = []
    with contextlib.suppress(OSError):
        while data := sock.recv(65536):
            parts.append(data)
    return b"".join(parts)


def _error_code(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]["code"]


class LimitedServer:
    """``python -m chronicle_integrations.server`` started under a given RLIMIT_NOFILE (the
    shared fixtures start servers with the test runner's own limits)."""

    def __init__(self, directory: Path, soft: int, hard: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "server.log"
        argv = [
            "chronicle-server",
            *("--port", str(self.port), "--store", f"sqlite:///{directory / 'db.sqlite'}"),
            *("--assets", str(directory / "assets"), "--log-level", "info"),
        ]
        shim = (
            "import resource, runpy, sys\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_module('chronicle_integrations.server', run_name='__main__')\n"
        )
        env = {
            k: v for k, v in os.environ.items() if k not in ("CHRONICLE_API_KEY", "CHRONICLE_URL")
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", shim],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            wait_until(self._healthy, timeout=60, what="the server to answer /v1/health")
        except BaseException:
            self.close()
            raise

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            return requests.get(self.url + "/v1/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def soft_fd_limit(self) -> int:
        return int(resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE)[0])

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def limited_server(directory: Path, soft: int, hard: int) -> Iterator[LimitedServer]:
    server = LimitedServer(directory, soft, hard)
    try:
        yield server
    finally:
        server.close()


def _started_run(url: str, home: Path) -> tuple[Chronicle, Any]:
    chronicle = Chronicle(url=url, home=home, timeout=20)
    experiment = chronicle.create_experiment("hostile-peers", variations=[{}])
    return chronicle, chronicle.create_run(experiment, 0).start()


class Beats:
    """A normal client heartbeating on a thread (a fresh connection each time: what a client
    reconnecting during an attack does), counting successes and failures."""

    def __init__(self, url: str, key: tuple[str, int, int], lease: str) -> None:
        self.url = url + run_path(key) + "/heartbeat"
        self.lease = lease
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        step = 0
        while not self._stop.is_set():
            step += 1
            try:
                resp = requests.post(
                    self.url, json={"lease": self.lease, "progress": {"step": step}}, timeout=10
                )
                if resp.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{resp.status_code} {resp.text[:200]}")
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self._stop.wait(0.1)

    def __enter__(self) -> Beats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


# ------------------------------------------------------------------------------ connections
@pytest.mark.parametrize(
    "hard",
    [
        pytest.param(resource.getrlimit(resource.RLIMIT_NOFILE)[1], id="soft-limit-raised"),
        pytest.param(256, id="at-the-hard-limit"),
    ],
)
def test_hundreds_of_half_sent_requests_do_not_stop_heartbeats(
    tmp_path: Path, hard: int, figures: Any
) -> None:
    """400 connections that never finish their head, against a server started with a soft
    open-file limit of 256: it raises the limit to the hard one; where it cannot (hard = 256),
    its connection cap evicts the oldest half-sent connection for each new one. Either way
    the client's heartbeat() succeeds and the log stays small."""
    with limited_server(tmp_path / "server", 256, hard) as server:
        attackers: list[socket.socket] = []
        chronicle = None
        try:
            for _ in range(400):
                try:
                    attackers.append(_connect(server.port, HEAD, timeout=2))
                except OSError:
                    break  # the kernel's accept queue is full: the server is saturated
            # A client arriving now (new connections, within a 20 s retry budget).
            chronicle, run = _started_run(server.url, tmp_path / "home")
            for step in range(5):
                run.heartbeat({"step": step})
            assert server.soft_fd_limit() == hard
            figures["fault:half-sent request"] += len(attackers)
        finally:
            if chronicle is not None:
                chronicle.close()
            for sock in attackers:
                sock.close()
        assert server.proc.poll() is None
        assert server.log_path.stat().st_size < 100_000, server.log_path.read_text()[-3000:]


def test_slowloris_and_silent_connections_are_closed_at_the_head_deadline(
    server_factory: Any, figures: Any
) -> None:
    """Connections trickling a head one byte per second, and connections that send nothing,
    are closed by the server (the head deadline, 10 s) instead of being held forever."""
    server = server_factory()
    trickling = [_connect(server.port, b"P") for _ in range(20)]
    silent = [_connect(server.port) for _ in range(20)]
    try:
        started = time.monotonic()
        byte = iter(HEAD[1:] * 100)
        while time.monotonic() - started < 30:
            value = bytes([next(byte)])
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.sendall(value)
            if all(_closed_by_server(s) for s in trickling + silent):
                break
            time.sleep(1.0)
        open_ = [s for s in trickling + silent if not _closed_by_server(s)]
        assert not open_, f"{len(open_)} of 40 connections still open after 30 s"
        figures["fault:slowloris"] += len(trickling) + len(silent)
    finally:
        for sock in trickling + silent:
            sock.close()
    assert requests.get(server.url + "/v1/health", timeout=10).status_code == 200


def _stream_endless_header(port: int, limit: int, results: list[tuple[int, bytes]]) -> None:
    """One header whose value never ends: send up to ``limit`` bytes or until refused."""
    sock = _connect(port, b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
    sent = 0
    block = b"a" * 65536
    with contextlib.suppress(OSError):
        while sent < limit:
            sock.sendall(block)
            sent += len(block)
    results.append((sent, _answer(sock)))
    sock.close()


def test_endless_headers_and_header_floods_are_refused_and_memory_stays_bounded(
    server_factory: Any, tmp_path: Path, figures: Any
) -> None:
    server = server_factory()
    process = psutil.Process(server.proc.pid)
    chronicle, run = _started_run(server.url, tmp_path / "home")
    before = process.memory_info().rss
    limit = 64 * 2**20
    try:
        with Beats(server.url, run.key_tuple, run.lease) as beats:
            results: list[tuple[int, bytes]] = []
            streams = [
                threading.Thread(target=_stream_endless_header, args=(server.port, limit, results))
                for _ in range(3)
            ]
            for thread in streams:
                thread.start()
            many = _connect(server.port, b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            with contextlib.suppress(OSError):
                many.sendall(b"".join(b"X-H-%d: v\r\n" % i for i in range(10_000)) + b"\r\n")
            flood_answer = _answer(many)
            many.close()
            for thread in streams:
                thread.join(120)
            time.sleep(1.0)  # heartbeats after the attack, too
        grown = process.memory_info().rss - before
    finally:
        chronicle.close()
    assert _error_code(flood_answer) == (431, "invalid_request"), flood_answer[:300]
    assert len(results) == 3
    for sent, answer in results:
        assert sent < limit, "the server read a 64 MiB header without refusing it"
        assert _error_code(answer) == (431, "invalid_request"), answer[:300]
    assert grown < 32 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"
    assert beats.ok > 0 and not beats.failures, beats.failures[:5]
    figures["fault:endless header"] += 3
    figures["fault:header flood"] += 1


def test_a_head_near_the_limit_with_its_body_in_the_same_read_is_served(
    server_factory: Any,
) -> None:
    """Only an unfinished head is cut at the limit: a 15 KiB head followed by its body in one
    write (one read on the server, well past 16 KiB) is parsed whole and answered."""
    server = server_factory()
    config = {"blob": "x" * 60_000}
    body = json.dumps({"name": "near-the-limit", "config": config}).encode()
    head = (
        b"POST /v1/experiments HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"X-Pad: " + b"p" * (15 * 1024) + b"\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    assert len(head) < 16 * 1024 < len(head) + len(body)
    sock = _connect(server.port, head + body)
    answer = _answer(sock)
    sock.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 201 " in status_line, answer[:300]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["name"] == "near-the-limit"


def test_a_refused_head_is_answered_before_the_connection_is_closed(server_factory: Any) -> None:
    """An over-limit head gets its 431 at once; the server then stops reading and closes the
    connection itself a moment later, with no further answer (the linger that slows peers
    re-opening endless heads)."""
    server = server_factory()
    sock = _connect(server.port, b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")
    sock.sendall(b"a" * (64 * 1024))
    sock.settimeout(30)
    first = sock.recv(65536)
    assert _error_code(first) == (431, "invalid_request"), first[:300]
    with contextlib.suppress(OSError):  # the server no longer reads: this is never parsed
        sock.sendall(b"b" * 1024 + b"\r\n\r\nGET /v1/health HTTP/1.1\r\n\r\n")
    rest = _answer(sock)
    sock.close()
    assert rest == b"", rest[:300]


# ------------------------------------------------------------------------------ requests
def test_keyless_server_refuses_foreign_hosts_and_cross_site_origins(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory()
    api = Api(server.url)
    experiment = api.experiment()
    pending = api.run(experiment)
    runs_before = api.ok("GET", "/v1/runs")

    def post(path: str, headers: dict[str, str]) -> requests.Response:
        return requests.post(server.url + path, headers=headers, timeout=10)

    # DNS rebinding: the page's own name, resolving to 127.0.0.1.
    for method, path in (
        ("GET", "/v1/runs"),
        ("POST", f"/v1/experiments/{experiment}/variations/0/runs"),
    ):
        resp = requests.request(
            method, server.url + path, headers={"Host": "attacker.example"}, timeout=10
        )
        assert_error(resp, 403, "forbidden")
    assert_error(
        post(run_path(pending) + "/start", {"Host": "attacker.example:8765"}), 403, "forbidden"
    )
    # A page's body-less cross-site POSTs (a form, or fetch in no-cors mode).
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example"):
        assert_error(
            post(f"/v1/experiments/{experiment}/variations/0/runs", {"Origin": origin}),
            403,
            "forbidden",
        )
        assert_error(post(run_path(pending) + "/start", {"Origin": origin}), 403, "forbidden")
    assert api.ok("GET", "/v1/runs") == runs_before
    assert api.state(pending) == "pending"

    # This machine's names and origins are served (any port), and the real client works.
    for host in ("localhost", "LOCALHOST:1234", "[::1]:8765", f"127.0.0.1:{server.port}"):
        resp = requests.get(server.url + "/v1/runs", headers={"Host": host}, timeout=10)
        assert resp.status_code == 200, (host, resp.text)
    resp = requests.get(
        server.url + "/v1/runs", headers={"Origin": f"http://localhost:{server.port}"}, timeout=10
    )
    assert resp.status_code == 200, resp.text
    with Chronicle(url=server.url, home=tmp_path / "home") as chronicle:
        run = chronicle.create_run(experiment, 0).start()
        run.heartbeat({"step": 1})
        run.succeed()
    api.close()

    # With an API key (e.g. behind a reverse proxy with its own name) the key decides.
    keyed = server_factory(api_key="k-" + os.urandom(8).hex())
    headers = {**keyed.headers, "Host": "chronicle.example", "Origin": "https://ui.example"}
    assert requests.get(keyed.url + "/v1/runs", headers=headers, timeout=10).status_code == 200


def test_heartbeat_bodies_are_small(server_factory: Any, tmp_path: Path) -> None:
    """A heartbeat is a lease and a small progress object: 2 MiB of ignored fields is
    refused with 413 before it is parsed, declared or chunked, and the run is unaffected."""
    server = server_factory()
    api = Api(server.url)
    key = api.run(api.experiment())
    lease = api.ok("POST", run_path(key) + "/start")["lease"]
    url = server.url + run_path(key) + "/heartbeat"
    padding = "x" * (2 * 2**20)
    big = json.dumps({"lease": lease, "progress": {"step": 1}, "junk": padding}).encode()
    headers = {"Content-Type": "application/json"}
    assert_error(
        requests.post(url, data=big, headers=headers, timeout=30), 413, "payload_too_large"
    )
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))  # no Content-Length
    assert_error(
        requests.post(url, data=chunks, headers=headers, timeout=30), 413, "payload_too_large"
    )
    just_over = json.dumps({"lease": lease, "junk": "y" * 16 * 1024}).encode()
    assert_error(
        requests.post(url, data=just_over, headers=headers, timeout=30), 413, "payload_too_large"
    )
    # A full-sized legitimate heartbeat (16 progress entries of 64-character names and
    # values) is served.
    progress = {f"{i:02d}".ljust(64, "k"): "v" * 64 for i in range(16)}
    api.ok("POST", run_path(key) + "/heartbeat", json={"lease": lease, "progress": progress})
    assert api.get_run(key)["progress"] == progress
    api.close()


def test_api_docs_load_no_third_party_scripts(server_factory: Any) -> None:
    server = server_factory()
    for path in ("/docs", "/redoc"):
        assert_error(requests.get(server.url + path, timeout=10), 404, "not_found")
    schema = requests.get(server.url + "/openapi.json", timeout=10)
    assert schema.status_code == 200 and schema.json()["info"]["title"] == "Chronicle"
