"""Retry policy and deadlines for the HTTP transport: how long one call may take, in total.

* :class:`RetryPolicy`: full-jitter exponential backoff within a time budget, honouring the
  server's ``Retry-After`` (:func:`_retry_after`);
* :class:`_Cutoffs`: ``requests`` bounds each socket read, not an answer that trickles in a
  byte at a time; every call registers its deadline, and one daemon thread shuts down the
  sockets of the calls that outlived theirs. :class:`_Adapter` mounts connections it can end.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import math
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.response


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. ``budget`` bounds the total time spent on one call, retries included."""

    budget: float = 60.0
    base: float = 0.25
    cap: float = 8.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    #: Bound each attempt's timeouts by the time left in the budget, so that ``budget`` really
    #: bounds the call even against a server that accepts connections and never answers.
    #: Off for upload chunks, whose bodies legitimately take long to send.
    cap_to_budget: bool = True
    #: The budget of every call until the server has answered this client once (None: the
    #: full budget). A server that is down, or a black hole, when a training starts costs the
    #: training thread this long, not ``budget``: the integrations then carry on untracked,
    #: with a warning. Once the server has answered, outages get the full budget.
    first_contact: float | None = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter exponential backoff; a server's ``Retry-After`` takes precedence."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.cap * 4)
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


#: Heartbeats are retried by the keep-alive loop itself: one quick try per beat.
QUICK = RetryPolicy(budget=10.0, read_timeout=10.0)


def _retry_after(response: requests.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP-date), or None when absent or
    unusable: garbage, ``nan``, infinite, negative or a date in the past fall back to backoff."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if parsed.tzinfo is None:  # RFC 9110 dates are GMT
            parsed = parsed.replace(tzinfo=datetime.timezone.utc)
        seconds = parsed.timestamp() - time.time()
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class _Cutoffs:
    """Ends calls that outlive their deadline, however slowly their answer trickles in.

    ``requests`` applies its read timeout to each socket read: a peer sending one byte a
    second keeps a call alive forever. Each call registers its deadline for its thread
    (:meth:`bounded`); the connection registers its socket just before reading the answer
    (:class:`_CutoffConnection`); one daemon thread shuts down the sockets whose deadline
    passed, which ends the blocked read at once (as a connection error, retried or raised
    within the budget like any other).
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._watched: dict[int, tuple[float, socket.socket]] = {}
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def bounded(self, cutoff: float | None) -> Iterator[None]:
        """Within the block, this thread's connections are shut down at ``cutoff``
        (``time.monotonic()``; None: no bound)."""
        self._local.cutoff = cutoff
        try:
            yield
        finally:
            self._local.cutoff = None
            if cutoff is not None:
                with self._cond:
                    self._watched.pop(threading.get_ident(), None)

    def watch(self, sock: socket.socket | None) -> None:
        """Called by the connection, in the calling thread, before it reads an answer."""
        cutoff = getattr(self._local, "cutoff", None)
        if cutoff is None or sock is None:
            return
        with self._cond:
            self._watched[threading.get_ident()] = (cutoff, sock)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._reap, daemon=True, name="chronicle-http-deadlines"
                )
                self._thread.start()
            self._cond.notify()

    def _reap(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for ident, (cutoff, sock) in list(self._watched.items()):
                    if cutoff <= now:
                        del self._watched[ident]
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                nearest = min((c for c, _ in self._watched.values()), default=None)
                self._cond.wait(None if nearest is None else nearest - now)


_CUTOFFS = _Cutoffs()


class _CutoffConnection(urllib3.connection.HTTPConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        _CUTOFFS.watch(self.sock)
        return super().getresponse()


class _CutoffTLSConnection(urllib3.connection.HTTPSConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        _CUTOFFS.watch(self.sock)
        return super().getresponse()


class _CutoffPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _CutoffConnection


class _CutoffTLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _CutoffTLSConnection


_POOLS = {"http": _CutoffPool, "https": _CutoffTLSPool}


class _Adapter(requests.adapters.HTTPAdapter):
    """``requests``' adapter with connections that :class:`_Cutoffs` can end."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager
