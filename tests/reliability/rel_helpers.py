"""Helpers for the reliability suite (a unique module name: test directories are not packages).

* :func:`spawn_worker` / :func:`read_journal`: the real client in a subprocess (``worker.py``)
  and what it recorded as sent and acknowledged;
* :class:`FaultyProxy`: a TCP proxy on 127.0.0.1 that delays, cuts and resets connections at
  random byte offsets, and counts what it forwarded;
* :class:`Api`: raw HTTP against a server, for checks that must not go through the client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import testkit
from testkit import HttpApi, assert_error, sha256_file

from chronicle_integrations.lifecycle import is_valid_path

__all__ = [
    "Api",
    "FaultyProxy",
    "Plan",
    "assert_error",
    "assert_valid_path",
    "has",
    "read_journal",
    "run_path",
    "sha256_file",
    "spawn_worker",
    "wait_until",
]

WORKER = Path(__file__).with_name("worker.py")


# ------------------------------------------------------------------------------ waiting
def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """:func:`testkit.wait_until`, polling faster (fault windows are short)."""
    return testkit.wait_until(predicate, timeout=timeout, interval=interval, what=what)


# ------------------------------------------------------------------------------ workers
def spawn_worker(
    config: dict[str, Any],
    log: Path,
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``worker.py`` with ``config`` (stdout/stderr to ``log``)."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("CHRONICLE_URL", "CHRONICLE_API_KEY")
    }
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    with log.open("ab") as out:
        return testkit.spawn(
            [*(prefix or []), sys.executable, str(WORKER), json.dumps(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The worker's journal lines (a torn last line, from a SIGKILL mid-write, is dropped)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entries.append(json.loads(line))
    return entries


def has(entries: list[dict[str, Any]], op: str, phase: str, **match: Any) -> bool:
    return any(
        e["op"] == op and e["phase"] == phase and all(e.get(k) == v for k, v in match.items())
        for e in entries
    )


# ------------------------------------------------------------------------------ raw HTTP
class Api(HttpApi):
    """Raw HTTP against one server, with the reliability suite's shortcuts (runs by key)."""

    def experiment(self, variations: int = 1) -> str:
        eid = f"rel-{os.urandom(6).hex()}"
        self.ok(
            "POST",
            "/v1/experiments",
            201,
            json={
                "name": "reliability",
                "variations": [{"i": i} for i in range(variations)],
                "experiment_id": eid,
            },
        )
        return eid

    def run(self, experiment_id: str, variation: int = 0) -> tuple[str, int, int]:
        info = self.ok("POST", f"/v1/experiments/{experiment_id}/variations/{variation}/runs", 201)
        return (experiment_id, variation, int(info["run"]))

    def get_run(self, key: tuple[str, int, int]) -> dict[str, Any]:
        return dict(self.ok("GET", run_path(key)))

    def state(self, key: tuple[str, int, int]) -> str:
        return str(self.get_run(key)["state"])

    def events(self, key: tuple[str, int, int]) -> list[dict[str, Any]]:
        return list(self.ok("GET", run_path(key) + "/events")["events"])

    def edges(self, key: tuple[str, int, int]) -> list[tuple[str | None, str]]:
        return [
            (e["from_state"], e["to_state"]) for e in self.events(key) if e["kind"] == "transition"
        ]

    def assets(self, key: tuple[str, int, int]) -> dict[str, dict[str, Any]]:
        return {a["name"]: a for a in self.ok("GET", run_path(key) + "/assets")["assets"]}

    def download_sha(self, key: tuple[str, int, int], name: str) -> str:
        hasher = hashlib.sha256()
        with self.request("GET", f"{run_path(key)}/assets/{name}", stream=True) as resp:
            assert resp.status_code == 200, resp.text
            for block in resp.iter_content(1 << 20):
                hasher.update(block)
        return hasher.hexdigest()


def run_path(key: tuple[str, int, int]) -> str:
    return f"/v1/runs/{key[0]}/{key[1]}/{key[2]}"


def assert_valid_path(edges: list[tuple[str | None, str]], what: str = "") -> None:
    assert is_valid_path(edges), f"{what}: the event log is not a walk through the table: {edges}"


# ------------------------------------------------------------------------------ TCP proxy
_PUT = re.compile(rb"PUT /v1/uploads/[A-Za-z0-9_-]+\?offset=(\d+) HTTP/1\.1")


@dataclass
class Plan:
    """One connection's fault: ``kind`` once ``offset`` bytes went ``direction``."""

    direction: str  # "up" (client -> server) or "down"
    kind: str  # "cut" (FIN), "reset" (RST), "delay"
    offset: int
    delay: float = 0.0


class FaultyProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of ``upstream_port`` (or, round-robin per
    connection, several ports: replicas of one server).

    Every connection carries a schedule of faults in each direction: the next one comes after
    a random number of bytes (on average ``mean_up`` client->server, a fifth of them within
    the first 4 KiB: headers and small JSON bodies; on average ``mean_down`` server->client:
    lost responses) and is a cut (FIN both ways), a reset (RST both ways) or a delay. Keep-alive
    connections therefore see faults too, not only new ones.

    ``stats``: bytes forwarded each way, faults applied by kind and direction, bytes forwarded
    upstream on connections that were then cut (``cut_up_bytes``: what restarting uploads
    from zero would have had to send again), and the upload chunks seen (``puts``,
    ``resumed_puts`` = chunks starting at an offset > 0).

    :meth:`refuse` makes the upstream unreachable for a while (an outage), whether or not
    random faults are enabled; set ``refuse_at`` to have the proxy begin the outage itself
    once that many bytes in all went upstream (mid-request, at an exact offset).
    """

    def __init__(
        self,
        upstream_port: int | list[int],
        rng: random.Random,
        *,
        mean_up: int = 24 * 2**20,
        mean_down: int = 4096,
        kinds: tuple[str, ...] = ("cut", "reset", "delay"),
        down_kinds: tuple[str, ...] | None = None,
        script: list[Plan] | None = None,
    ) -> None:
        #: Connections go to these ports in turn (several replicas of one server).
        self.upstream_ports = (
            [upstream_port] if isinstance(upstream_port, int) else list(upstream_port)
        )
        self.rng = rng
        self.mean_up = mean_up
        self.mean_down = mean_down
        self.kinds = kinds
        self.down_kinds = down_kinds or kinds
        #: When given: one planned fault per new connection, in order, then none at all.
        self.script = list(script) if script is not None else None
        #: Faults are injected only while True (set False to let traffic through cleanly).
        self.enabled = True
        self.stats: Counter[str] = Counter()
        #: True while :meth:`refuse` keeps the upstream unreachable.
        self.refusing = False
        #: When set: call ``refuse(True)`` once ``stats["bytes_up"]`` reaches it.
        self.refuse_at: int | None = None
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._listener = _listen_on_named_port()
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="faulty-proxy")

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def faults(self) -> int:
        return sum(v for k, v in self.stats.items() if k.startswith("fault:"))

    def refuse(self, on: bool = True) -> None:
        """Make the upstream unreachable (``on``), or reachable again: while unreachable, new
        connections are refused (ECONNREFUSED: the port stays bound, nothing listens on it)
        and every live one is reset, as when the server behind the proxy went away."""
        with self._lock:
            if on == self.refusing:
                return
            self.refusing = on
            if not on:
                self._listener.listen(128)
                return
            self.refuse_at = None
            self.stats["fault:outage"] += 1
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # (Linux: stops listening)
            live = list(self._live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
        self.count("fault:outage_reset", len(live) // 2)

    def _plan(self, direction: str, moved: int) -> Plan:
        with self._lock:
            if self.script is not None:
                if self.script and self.script[0].direction == direction:
                    return self.script.pop(0)
                return Plan(direction, "delay", 2**62)
            kind = self.rng.choice(self.kinds if direction == "up" else self.down_kinds)
            if direction == "up":
                top = 4096 if self.rng.random() < 0.2 else 2 * self.mean_up
            else:
                top = 2 * self.mean_down
            return Plan(
                direction, kind, moved + self.rng.randint(0, top), self.rng.uniform(0.05, 0.4)
            )

    def _outage_due(self, dst: socket.socket, data: bytes) -> bool:
        """Begin the outage planned by ``refuse_at`` if ``data`` reaches it: its bytes up to
        that offset are forwarded first. True when it began (the connection is reset)."""
        at = self.refuse_at
        if at is None or self.stats["bytes_up"] + len(data) < at:
            return False
        head = data[: max(0, at - self.stats["bytes_up"])]
        with contextlib.suppress(OSError):
            dst.sendall(head)
        self.count("bytes_up", len(head))
        self.refuse(True)
        return True

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.02)  # refusing (the listener is shut down): until listening again
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self.stats["connections"] += 1
            port = self.upstream_ports[self.stats["connections"] % len(self.upstream_ports)]
            refusing = self.refusing
        if refusing:  # accepted just before the outage began
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            self.count("upstream_refused")
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._live.update((client, upstream))
        moved = {"up": 0, "down": 0}
        plans = {"up": self._plan("up", 0), "down": self._plan("down", 0)}
        peers = {client: (upstream, "up"), upstream: (client, "down")}
        reading = [client, upstream]
        try:
            while reading:
                ready, _, _ = select.select(reading, [], [], 120)
                if not ready:
                    return
                for src in ready:
                    dst, direction = peers[src]
                    try:
                        data = src.recv(256 * 1024)
                    except OSError:
                        return
                    if not data:
                        reading.remove(src)
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                        continue
                    if direction == "up":
                        for match in _PUT.finditer(data):
                            self.count("puts")
                            if int(match.group(1)) > 0:
                                self.count("resumed_puts")
                    if direction == "up" and self._outage_due(dst, data):
                        return
                    plan = plans[direction]
                    while self.enabled and data and moved[direction] + len(data) >= plan.offset:
                        head = data[: plan.offset - moved[direction]]
                        data = data[len(head) :]
                        if head:
                            dst.sendall(head)
                            moved[direction] += len(head)
                            self.count(f"bytes_{direction}", len(head))
                        self.count(f"fault:{plan.kind}_{direction}")
                        if plan.kind == "delay":
                            time.sleep(plan.delay)
                            plan = plans[direction] = self._plan(direction, moved[direction])
                            continue
                        if direction == "up":
                            self.count("cut_up_bytes", moved["up"])
                        if plan.kind == "reset":
                            for sock in (client, upstream):
                                with contextlib.suppress(OSError):
                                    sock.setsockopt(
                                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                                    )
                        else:
                            for sock in (client, upstream):
                                with contextlib.suppress(OSError):
                                    sock.shutdown(socket.SHUT_RDWR)
                        return
                    if data:
                        dst.sendall(data)
                        moved[direction] += len(data)
                        self.count(f"bytes_{direction}", len(data))
        except OSError:
            return
        finally:
            with self._lock:
                self._live.difference_update((client, upstream))
            client.close()
            upstream.close()


def _listen_on_named_port() -> socket.socket:
    """A listening socket on 127.0.0.1, bound to a port given by number: Linux keeps such a
    bind when the listener is shut down (a port-0 bind is released), so
    :meth:`FaultyProxy.refuse` can stop listening and start again on the same port."""
    for _ in range(100):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", testkit.free_port()))
        except OSError:  # taken since: try another
            sock.close()
            continue
        sock.listen(128)
        return sock
    raise RuntimeError("no free loopback port for the proxy")
