"""Slow and hostile peers: what stands between a client and its server in real life.

A raw-socket peer (``hostile_peer.py``) answers some requests itself, in the ways proxies and
broken networks do, and forwards the others to a real server subprocess:

* an answer that trickles in (one byte at a time, in the headers or the body) cannot hold a
  call past its budget: ``heartbeat()`` raises ``TransportError``, ``succeed()`` spools;
* an answer larger than any Chronicle answer is refused unread (no 6 GiB in memory);
* a proxy's 404, 408 or 401 page on a beat does not end the heartbeats for good;
* a 200 whose JSON has the wrong shape, and a garbage ``Retry-After``, become one typed error
  or are ignored, never a ``TypeError`` or ``ValueError``;
* a redirect is never taken as an acknowledgement: ``succeed()`` is spooled, then synced;
* a 502/503/504 (or a 500) lasting the whole budget spools the transition like an outage.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_peer import (
    HostilePeer,
    Reply,
    Request,
    endless,
    html,
    json_reply,
    raw,
    trickle,
)
from rel_helpers import Api, wait_until
from testkit import bounded_call

from chronicle_integrations import Chronicle, RunState, TransportError
from chronicle_integrations._errors import ProtocolError

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

RUN_JSON = (
    b'{"experiment_id": "hostile", "variation": 0, "run": 0, "state": "running", "created_at": 1.0}'
)


@pytest.fixture(scope="module")
def server(module_server_factory: Any) -> Any:
    return module_server_factory()


@pytest.fixture
def tracked(server: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A real run started on the real server through a peer that forwards everything until
    the test gives it a ``behaviour``; the client has a short budget."""
    rules: dict[str, Any] = {"misbehave": None}

    def behaviour(request: Request) -> Reply | None:
        rule = rules["misbehave"]
        return rule(request) if rule is not None else None

    with HostilePeer(behaviour, upstream_port=server.port) as peer:
        chronicle = Chronicle(url=peer.url, home=tmp_path / "home", timeout=3)
        try:
            exp = chronicle.create_experiment("hostile", variations=[{}])
            run = chronicle.create_run(exp, 0).start()
            yield {"peer": peer, "chronicle": chronicle, "run": run, "rules": rules}
        finally:
            rules["misbehave"] = None
            chronicle.close(timeout=10)


def _sync_through(tracked: dict[str, Any]) -> None:
    """Let everything through again and replay the spool (its entries name the peer)."""
    tracked["rules"]["misbehave"] = None
    report = tracked["chronicle"].sync()
    assert report.sent and not report.refused and not report.waiting, report


# ---------------------------------------------------------------------- 2: time budget
TRICKLES = {
    # 10 000 bytes at 0.2 s each: half an hour, unless the budget bounds the whole answer
    "body": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
    + b" " * 10000,
    "headers": b"HTTP/1.1 200 OK\r\n" + b"X-Padding: " + b"a" * 10000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("where", sorted(TRICKLES))
def test_a_trickled_answer_cannot_outlast_the_budget(
    tracked: dict[str, Any], where: str, figures: Any
) -> None:
    peer, run = tracked["peer"], tracked["run"]
    tracked["rules"]["misbehave"] = lambda request: trickle(TRICKLES[where], every=0.2)

    beat = bounded_call(run.heartbeat, timeout=25)  # budget 3 s; the bug: half an hour
    assert beat.finished, "heartbeat() was still reading a trickled answer after 25 s"
    assert isinstance(beat.error, TransportError), beat.error

    end = bounded_call(run.succeed, timeout=25)
    assert end.finished, "succeed() was still reading a trickled answer after 25 s"
    assert end.error is None, end.error
    assert run.spooled
    assert peer.stats.get("trickled bytes", 0) > 0
    figures["fault:trickled answer"] += 2

    _sync_through(tracked)
    assert Api(f"http://127.0.0.1:{tracked['peer'].upstream_port}").state(run.key_tuple) == (
        RunState.SUCCEEDED.value
    )


HUGE = 6 * 2**30


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_answer_larger_than_any_chronicle_answer_is_refused(
    tracked: dict[str, Any], framing: str, figures: Any
) -> None:
    """A 6 GiB answer: refused unread (declared) or after 16 MiB (chunked), not held."""
    peer, chronicle = tracked["peer"], tracked["chronicle"]
    if framing == "content-length":
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {HUGE}\r\n\r\n".encode()
        )
        block = b"[" * 65536
    else:
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        block = b"10000\r\n" + b"[" * 65536 + b"\r\n"
    tracked["rules"]["misbehave"] = lambda request: endless(head, block, limit=64 * 2**20)

    listing = bounded_call(chronicle.experiments, timeout=60)
    assert listing.finished, "experiments() was still reading a huge answer after 60 s"
    assert isinstance(listing.error, ProtocolError), listing.error
    assert "MiB" in str(listing.error)
    # the client stopped reading: the peer could not send all it had
    wait_until(lambda: peer.stats.get("endless bytes", 0) < 64 * 2**20, what="a refusal")
    figures["fault:huge answer"] += 1


# ---------------------------------------------------------------------- 3: foreign 4xx
FOREIGN_4XX = {
    "html 404": html(404),
    "408": html(408),
    "json 401 without a code": json_reply(401, {"detail": "Unauthorized"}),
}


@pytest.mark.parametrize("answer", sorted(FOREIGN_4XX))
def test_a_proxy_4xx_on_a_beat_does_not_end_the_heartbeats(
    tracked: dict[str, Any], answer: str, caplog: pytest.LogCaptureFixture, figures: Any
) -> None:
    peer, run = tracked["peer"], tracked["run"]
    hostile = {"left": 3}

    def misbehave(request: Request) -> Reply | None:
        if request.path.endswith("/heartbeat") and hostile["left"] > 0:
            hostile["left"] -= 1
            return FOREIGN_4XX[answer]
        return None

    tracked["rules"]["misbehave"] = misbehave
    caplog.set_level(logging.INFO, logger="chronicle_integrations")
    keepalive = run.keep_alive(interval=0.3)
    wait_until(lambda: hostile["left"] == 0, timeout=30, what="three hostile answers")
    seen = peer.seen("POST", "/heartbeat")
    wait_until(
        lambda: peer.seen("POST", "/heartbeat") >= seen + 3,
        timeout=30,
        what="heartbeats going on after the proxy's answers",
    )
    assert keepalive.alive and not run.cancelled.is_set()
    assert keepalive.beats >= 2
    assert "without a Chronicle error code" in caplog.text  # said, not swallowed
    figures["fault:foreign 4xx"] += 3

    # the other side of the rule: a refusal with a Chronicle error code is final
    tracked["rules"]["misbehave"] = lambda request: (
        json_reply(409, {"error": {"code": "lease_conflict", "message": "taken over"}})
        if request.path.endswith("/heartbeat")
        else None
    )
    wait_until(lambda: not keepalive.alive, timeout=30, what="the heartbeats to stop")
    assert run.cancelled.is_set()


# ---------------------------------------------------------------------- 6: malformed answers
MALFORMED = {
    "empty object": {},
    "a list": [1, 2],
    "a string": "ok",
    "null": None,
    "unknown state": {
        "experiment_id": "hostile",
        "variation": 0,
        "run": 0,
        "state": "exploded",
        "created_at": 1.0,
    },
}


@pytest.mark.parametrize("answer", sorted(MALFORMED))
def test_a_malformed_200_is_one_typed_error_and_succeed_spools(
    tracked: dict[str, Any], answer: str, figures: Any
) -> None:
    run, chronicle = tracked["run"], tracked["chronicle"]
    tracked["rules"]["misbehave"] = lambda request: json_reply(200, MALFORMED[answer])
    with pytest.raises(ProtocolError):
        run.heartbeat()
    with pytest.raises(ProtocolError):
        chronicle.experiments()
    with pytest.raises(ProtocolError):
        run.info()
    run.succeed()
    assert run.spooled
    figures["fault:malformed answer"] += 4
    _sync_through(tracked)
    assert run.state is RunState.SUCCEEDED


@pytest.mark.parametrize("value", ["nan", "soon", "inf", "1e400", "Mon, 32 Foo 2026 99:99:99 GMT"])
def test_a_garbage_retry_after_is_ignored(
    tracked: dict[str, Any], value: str, figures: Any
) -> None:
    """One 503 with an unusable ``Retry-After``; the retry (backoff) gets the answer."""
    run = tracked["run"]
    hostile = {"left": 1}

    def misbehave(request: Request) -> Reply | None:
        if request.path.endswith("/heartbeat") and hostile["left"]:
            hostile["left"] -= 1
            return html(503, {"Retry-After": value})
        return None

    tracked["rules"]["misbehave"] = misbehave
    run.heartbeat()
    assert hostile["left"] == 0
    figures["fault:garbage Retry-After"] += 1


# ---------------------------------------------------------------------- 13: redirects
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_an_acknowledgement(
    tracked: dict[str, Any], status: int, figures: Any
) -> None:
    peer, run = tracked["peer"], tracked["run"]
    target = f"{peer.url}/v1/runs/{run.experiment_id}/{run.variation}/{run.run}"

    def misbehave(request: Request) -> Reply | None:
        if request.path.endswith("/succeed"):
            return raw(
                f"HTTP/1.1 {status} Moved\r\nLocation: {target}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
        return None

    tracked["rules"]["misbehave"] = misbehave
    run.succeed()
    assert run.spooled, "a redirect was taken as the acknowledgement of succeed"
    assert peer.seen("GET", target.removeprefix(peer.url)) == 0  # not followed
    assert run.state is RunState.RUNNING
    figures["fault:redirect"] += 1
    _sync_through(tracked)
    assert run.state is RunState.SUCCEEDED


# ---------------------------------------------------------------------- 17: lasting 5xx
LASTING = {
    "proxy 502": html(502),
    "proxy 503": html(503, {"Retry-After": "1"}),
    "proxy 504": html(504),
    "chronicle 500": json_reply(500, {"error": {"code": "internal", "message": "a bug"}}),
}


@pytest.mark.parametrize("answer", sorted(LASTING))
def test_a_5xx_lasting_the_budget_spools_the_transition(
    tracked: dict[str, Any], answer: str, figures: Any
) -> None:
    run = tracked["run"]
    tracked["rules"]["misbehave"] = lambda request: (
        LASTING[answer] if request.path.endswith(("/succeed", "/fail")) else None
    )
    run.succeed()
    assert run.spooled
    assert run.state is RunState.RUNNING
    figures["fault:lasting 5xx"] += 1
    _sync_through(tracked)
    assert run.state is RunState.SUCCEEDED


def test_a_lasting_5xx_on_a_plain_call_is_a_transport_error(tracked: dict[str, Any]) -> None:
    tracked["rules"]["misbehave"] = lambda request: html(503)
    with pytest.raises(TransportError) as caught:
        tracked["chronicle"].experiments()
    assert "503" in str(caught.value)


# ---------------------------------------------------------------------- 2: first contact
def test_a_black_hole_at_first_contact_costs_seconds_not_the_budget(
    tmp_path: Path, server: Any, figures: Any
) -> None:
    """A listening socket nobody accepts from: connections open, nothing ever answers. With
    the default 60 s budget, the first call (an integration's start, on the training thread)
    gives up after the first-contact budget (10 s); once the server has answered, an outage
    gets the whole budget again."""
    hole = socket.socket()
    try:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        url = f"http://127.0.0.1:{hole.getsockname()[1]}"
        chronicle = Chronicle(url=url, home=tmp_path / "hole")
        try:
            first = bounded_call(lambda: chronicle.create_experiment("x"), timeout=30)
        finally:
            chronicle.close(timeout=5)
        assert first.finished, "the first call waited on a black hole for 30 s"
        assert isinstance(first.error, TransportError), first.error
        assert "never answered" in str(first.error)
        figures["fault:black hole"] += 1
    finally:
        hole.close()

    outage = {"until": 0.0}

    def misbehave(request: Request) -> Reply | None:
        return html(503) if time.monotonic() < outage["until"] else None

    with HostilePeer(misbehave, upstream_port=server.port) as peer:
        chronicle = Chronicle(url=peer.url, home=tmp_path / "home", first_contact_timeout=2)
        try:
            exp = chronicle.create_experiment("contact", variations=[{}])
            outage["until"] = time.monotonic() + 5  # longer than first contact, within budget
            run = chronicle.create_run(exp, 0)  # retried through the outage
            assert peer.seen("POST", "/runs") >= 2
            assert run.run == 0
        finally:
            chronicle.close(timeout=5)
