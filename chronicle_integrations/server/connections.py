"""Connection-level limits: what a peer may cost the server before it has sent one request.

uvicorn's HTTP protocols bound nothing before a request's head is complete: a connection may
stay open without sending a byte, trickle its head one byte at a time (slowloris), or send one
endless header (httptools keeps concatenating it: seconds of CPU and hundreds of MB). The
:class:`GuardedProtocol` built by :func:`guarded_protocol` is uvicorn's httptools protocol
with the bounds that close those holes, applied before any ASGI code runs:

* a **head deadline**: from the accept (or from the first byte of a later request on a
  keep-alive connection) the whole head must arrive within ``head_timeout`` seconds, else the
  connection is closed (like nginx's ``client_header_timeout``: nothing is sent back);
* a **head size** limit (``max_head_bytes``) and a **header count** limit (``max_headers``):
  beyond either the request is answered ``431`` with the standard error body. The parser
  never sees more than ``max_head_bytes`` of an unfinished head (the rest of the read is
  dropped unparsed), and the refused connection is then held, not read, for
  ``refusal_linger`` seconds before it is closed: a peer that reads the answer closes first,
  while one that re-opens every connection the server closes (an endless-header stream) is
  slowed to one refusal per linger instead of hundreds a second of parsing work;
* a **lingering close**: when a response ends a connection (``Connection: close``, e.g. a 413
  sent before the body was read), the server half-closes its side and reads and discards what
  the peer still sends (up to ``close_linger_bytes``, for ``close_linger`` seconds at most)
  before it closes: a client still writing its body then reads the answer, instead of a
  connection reset that loses it (nginx's ``lingering_close``);
* a **connection cap** (``max_connections``, at most the descriptors the process may open, less
  a reserve for the database and the assets): a new connection beyond it evicts the oldest
  connection that is still waiting for a head (an idle or half-sent one), so peers that hold
  connections without sending requests cannot lock out the ones that do.

:func:`raise_fd_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard limit at server start (the
common soft default, 1024, is a few hundred slow peers), and :class:`Throttle` collapses
repeated log lines (one per failed ``accept()`` or bad request otherwise) into one per
interval with a count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .._errors import InvalidRequest

__all__ = [
    "ConnectionLimits",
    "GuardedProtocol",
    "Throttle",
    "connection_cap",
    "guarded_protocol",
    "raise_fd_limit",
]

log = logging.getLogger(__name__)

#: Descriptors kept free for everything but client connections (database, assets, threads).
FD_RESERVE = 128


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds :class:`GuardedProtocol` enforces (see the module docstring)."""

    head_timeout: float = 10.0
    max_head_bytes: int = 16 * 1024
    max_headers: int = 100
    max_connections: int = 4096
    refusal_linger: float = 1.0
    close_linger: float = 5.0
    close_linger_bytes: int = 64 * 2**20


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that broke a limit."""


class _LingeringTransport:
    """The transport uvicorn's protocol writes to, with ``close()`` made a lingering close
    (see :meth:`GuardedProtocol._linger`); everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, owner: GuardedProtocol) -> None:
        self._transport = transport
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._owner._linger()

    def is_closing(self) -> bool:
        return self._owner._lingering is not None or self._transport.is_closing()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`ConnectionLimits`.

    Use :func:`guarded_protocol` to get a subclass bound to one server's limits (the class
    keeps that server's set of connections still waiting for a head).
    """

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    #: Connections waiting for a request head, oldest first (a dict keeps insertion order).
    waiting: ClassVar[dict[GuardedProtocol, None]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._header_count = 0
        self._refusal: str | None = None
        self._refused = False
        self._raw: asyncio.Transport | None = None
        #: While lingering: the timer that ends it, and the bytes discarded so far.
        self._lingering: asyncio.TimerHandle | None = None
        self._discarded = 0

    # -- connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._await_head()
        if len(self.connections) > self.limits.max_connections:
            oldest = next(iter(self.waiting))
            log.warning(
                "more than %d connections: closing the oldest one still waiting for a request",
                self.limits.max_connections,
            )
            oldest._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._await_head()  # the first bytes of the next request on a kept-alive connection
        if self._lingering is not None:
            self._discarded += len(data)  # the rest of a body nobody will read
            if self._discarded > self.limits.close_linger_bytes:
                self._close()
            return
        if self._refused:
            return  # answered and lingering: nothing more is parsed
        if self._deadline is None:
            super().data_received(data)
            return
        budget = self.limits.max_head_bytes - self._head_bytes
        self._head_bytes += len(data)
        if len(data) <= budget:
            super().data_received(data)  # refusals from the callbacks end in send_400_response
            return
        # This read would take an unfinished head past the limit: parse only what the head may
        # still take. If the head completes inside it, the rest is body (or the next request)
        # and is parsed as usual; if not, the rest is dropped unparsed and the head refused.
        if budget > 0:
            super().data_received(data[:budget])
        if self.transport.is_closing() or self._refused:
            return
        if self._deadline is None:
            super().data_received(data[budget:])
            return
        self._refuse(f"the request head exceeds {self.limits.max_head_bytes} bytes")

    # -- parser callbacks ----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = f"a request may carry at most {self.limits.max_headers} headers"
            raise _Refused(self._refusal)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self.waiting[self] = None  # idle until the next request: evictable, oldest first

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._refuse(self._refusal)
        else:
            super().send_400_response(msg)

    # -- helpers -------------------------------------------------------------------------
    def _await_head(self) -> None:
        self._head_bytes = 0
        self._header_count = 0
        self._deadline = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)
        self.waiting.pop(self, None)
        self.waiting[self] = None  # (re-)inserted last: the newest

    def _head_done(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        self._deadline = None
        log.info("closing a connection that sent no complete request head in time")
        self._close()

    def _refuse(self, message: str) -> None:
        log.warning("refused a request: %s", message)
        body = json.dumps(InvalidRequest(message, field="headers").to_body()).encode()
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[431],
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self._refused = True
        self._head_done()
        self.transport.pause_reading()
        self.loop.call_later(self.limits.refusal_linger, self._close)
        self.waiting[self] = None  # evictable first under the connection cap

    def _linger(self) -> None:
        """Close after the response. When the request's body was not read to its end, send
        FIN now, discard what the peer still sends, and close when it closes too, or after
        ``close_linger`` s or ``close_linger_bytes``; otherwise close at once."""
        raw = self._raw
        if raw is None or raw.is_closing() or self._lingering is not None:
            return
        self._head_done()
        unread = self.cycle is not None and self.cycle.more_body
        if not unread or not raw.can_write_eof():
            raw.close()  # nothing left unread (an idle keep-alive, a shutdown): close at once
            return
        self._lingering = self.loop.call_later(self.limits.close_linger, self._close)
        raw.write_eof()  # after what is buffered: the peer reads the whole answer, then EOF
        raw.resume_reading()
        self.waiting[self] = None  # evictable under the connection cap

    def _close(self) -> None:
        self._head_done()
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` subclass for one server, to pass as uvicorn's ``http``."""
    return type("ChronicleHttpProtocol", (GuardedProtocol,), {"limits": limits, "waiting": {}})


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # e.g. above fs.nr_open
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    log.debug("raised the open-file limit from %d to %d", soft, target)
    return target


def connection_cap(fd_limit: int, wanted: int = ConnectionLimits.max_connections) -> int:
    """How many connections to admit with ``fd_limit`` descriptors (``wanted`` at most)."""
    return max(16, min(wanted, fd_limit - FD_RESERVE))


class Throttle(logging.Filter):
    """A logging filter that lets one record per message through each ``interval`` seconds;
    the next one that passes says how many were held back meanwhile.

    Under attack the same line repeats per connection (``socket.accept() out of system
    resource`` with a traceback, once per failed accept: hundreds of MB in a minute);
    distinct messages are unaffected.
    """

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        last, held = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self._seen[key] = (last, held + 1)
            return False
        if len(self._seen) > 1000:  # distinct messages are few; never grow without bound
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {now - last:.0f} s]"
        return True
