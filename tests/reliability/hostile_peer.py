"""A hostile HTTP peer on 127.0.0.1, written on raw sockets: what a client meets between it
and its server in real life (a proxy's error pages, redirects, answers that trickle in or never
end, malformed JSON), optionally in front of a real server it forwards the other requests to.

It is not a mock of the Chronicle server: it never imitates the store. It either forwards a
request, byte for byte, to the real server (``upstream_port``) or misbehaves on it, as its
``behaviour`` decides for each request.

Usage::

    def behaviour(request: Request) -> Reply | None:   # None: forward to the real server
        if request.path.endswith("/heartbeat"):
            return html(404)
        return None

    with HostilePeer(behaviour, upstream_port=server.port) as peer:
        chronicle = Chronicle(url=peer.url, ...)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HostilePeer",
    "Reply",
    "Request",
    "endless",
    "html",
    "json_reply",
    "raw",
    "trickle",
]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


#: What the peer does with one connection once it read the request: write to the socket.
Reply = Callable[[socket.socket, "HostilePeer"], None]


def raw(data: bytes) -> Reply:
    """Send ``data`` as it is, then close."""

    def reply(sock: socket.socket, peer: HostilePeer) -> None:
        sock.sendall(data)

    return reply


def _answer(status: int, body: bytes, kind: str, extra: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'Whatever')}"]
    headers = {"Content-Type": kind, "Content-Length": str(len(body)), "Connection": "close"}
    headers.update(extra or {})
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def html(status: int, extra: dict[str, str] | None = None) -> Reply:
    """A proxy's HTML error page (no Chronicle error code)."""
    page = f"<html><body><h1>{status}</h1><p>nginx</p></body></html>".encode()
    return raw(_answer(status, page, "text/html", extra))


def json_reply(status: int, value: Any, extra: dict[str, str] | None = None) -> Reply:
    """A JSON answer with any value (the peer does not care what it means)."""
    return raw(_answer(status, json.dumps(value).encode(), "application/json", extra))


def trickle(data: bytes, every: float) -> Reply:
    """Send ``data`` one byte every ``every`` seconds (until the client goes away)."""

    def reply(sock: socket.socket, peer: HostilePeer) -> None:
        for i in range(len(data)):
            if peer.closed:
                return
            sock.sendall(data[i : i + 1])
            peer.count("trickled bytes")
            time.sleep(every)

    return reply


def endless(head: bytes, block: bytes, limit: int) -> Reply:
    """Send ``head``, then ``block`` repeatedly, up to ``limit`` bytes, then hold the
    connection open (the rest of a huge answer that never comes)."""

    def reply(sock: socket.socket, peer: HostilePeer) -> None:
        sock.sendall(head)
        sent = 0
        while sent < limit and not peer.closed:
            sock.sendall(block)
            sent += len(block)
            peer.count("endless bytes", len(block))
        while not peer.closed:
            time.sleep(0.05)

    return reply


class HostilePeer:
    """A threaded HTTP/1.1 peer on 127.0.0.1 (one request per connection, then close).

    ``behaviour(request)`` returns a :data:`Reply` to misbehave with, or None to forward the
    request to ``upstream_port`` (a real server) and relay its answer. ``requests`` records
    every request seen (method and path); ``stats`` counts what was sent.
    """

    def __init__(
        self, behaviour: Callable[[Request], Reply | None], upstream_port: int | None = None
    ) -> None:
        self.behaviour = behaviour
        self.upstream_port = upstream_port
        self.requests: list[Request] = []
        self.stats: dict[str, int] = {}
        self.closed = False
        self._lock = threading.Lock()
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                peer._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HostilePeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        self._server.shutdown()
        self._server.server_close()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def seen(self, method: str, suffix: str) -> int:
        """How many requests ``method ...suffix`` arrived."""
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and r.path.endswith(suffix))

    # ------------------------------------------------------------------ one connection
    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        with contextlib.suppress(OSError):
            request = _read_request(sock)
            if request is None:
                return
            with self._lock:
                self.requests.append(request)
            reply = self.behaviour(request)
            if reply is None:
                reply = raw(self._forward(request))
            reply(sock, self)

    def _forward(self, request: Request) -> bytes:
        assert self.upstream_port is not None, "no real server to forward to"
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "connection"}
            conn.request(request.method, request.path, body=request.body, headers=headers)
            answer = conn.getresponse()
            body = answer.read()
            kind = answer.getheader("Content-Type", "application/json")
            extra = {
                k: v
                for k, v in answer.getheaders()
                if k.lower() not in ("content-type", "content-length", "connection", "date")
                and k.lower() != "transfer-encoding"
            }
            self.count("forwarded")
            return _answer(answer.status, body, kind, extra)
        finally:
            conn.close()


def _read_request(sock: socket.socket) -> Request | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Request(method, path, headers, body)
