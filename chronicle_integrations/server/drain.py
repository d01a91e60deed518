"""A server's shutdown as its handlers see it: :class:`Drain`, one per app.

A replica stops (SIGTERM, or SIGINT) within one bound, ``--shutdown-timeout``
(:attr:`Drain.timeout`), counted from the moment uvicorn starts draining:

1. From the signal on (:attr:`Drain.begun`), ``GET /v1/ready`` answers 503 ``unavailable``
   with ``reason: shutting_down``: a load balancer stops sending it work, while
   ``GET /v1/health`` (liveness) still answers 200.
2. uvicorn notices the signal at its next tick (within about 0.1 s; until then it accepts
   and serves as usual, the readiness check already failing), closes its listening socket,
   closes every idle kept-alive connection at once and lets each busy one finish its
   request, then close (``Connection: close``). No connection carries a new request after
   that, except requests a client had already pipelined behind one in flight, which are
   still served: a readiness probe among them gets the 503. (A load balancer's own checks,
   on new connections, are then refused: HAProxy takes the replica out either way.) Upload
   chunks still arriving shortly before the bound (:func:`upload_margin`) are stopped: what
   arrived is written and the chunk is answered 408 ``request_timeout`` (``reason:
   shutting_down``) with the offset to resume from, through the balancer, on another
   replica. At the bound uvicorn cancels whatever still runs.
3. The app's lifespan then drains the heartbeat lane's pending group commit, the watchdog
   and the upload writes already started, in what is left of the bound (at least
   :data:`DRAIN_FLOOR` seconds, so that a pending group commit is always tried), and the
   process exits whether or not they finished.

So a replica exits within about ``timeout + DRAIN_FLOOR`` seconds of the signal, whatever is
stuck (a database lock, an asset store that stopped answering).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

__all__ = ["DRAIN_FLOOR", "Drain", "upload_margin"]

#: Seconds the lifespan's drain (heartbeat lane, watchdog, upload writers) gets even when the
#: requests in flight used the whole bound.
DRAIN_FLOOR = 1.0
#: Most seconds before the bound at which upload chunks still arriving are stopped.
UPLOAD_MARGIN = 1.0


def upload_margin(timeout: float) -> float:
    """How long before the end of a ``timeout`` s drain upload chunks are stopped: long
    enough for their last bytes to be written and their answers sent before uvicorn cancels
    what is left, short against the bound (a quarter of it at most)."""
    return min(UPLOAD_MARGIN, timeout / 4)


class Drain:
    """Whether, and until when, the server is shutting down (see the module docstring).

    :meth:`begin` may be called from a signal handler (it only sets a flag); everything else
    runs on the event loop.
    """

    def __init__(self, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError("the shutdown timeout must be > 0")
        self.timeout = float(timeout)
        #: True once a shutdown was asked for: the readiness check fails from then on.
        self.begun = False
        self._deadline: float | None = None  # event-loop time
        self._uploads: set[asyncio.Timeout] = set()

    def begin(self) -> None:
        """A shutdown was asked for (the signal arrived)."""
        self.begun = True

    def start(self) -> None:
        """The server starts draining: the bound starts now, and upload chunks waiting for
        bytes are woken at their stop time. Idempotent."""
        self.begun = True
        if self._deadline is not None:
            return
        self._deadline = asyncio.get_running_loop().time() + self.timeout
        for waiting in list(self._uploads):
            # Only a chunk waiting for the socket is armed; one whose write runs looks at the
            # stop time when it waits again (a write is never interrupted).
            if waiting.when() is not None and not waiting.expired():
                waiting.reschedule(self.upload_deadline(waiting.when()))

    @property
    def started(self) -> bool:
        """True once :meth:`start` ran."""
        return self._deadline is not None

    def remaining(self) -> float:
        """Seconds left of the bound: all of it before :meth:`start`, 0 past the bound."""
        if self._deadline is None:
            return self.timeout
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def upload_deadline(self, when: float | None) -> float | None:
        """``when`` (an event-loop time, None for never), or the time at which upload chunks
        must stop if that is earlier."""
        if self._deadline is None:
            return when
        stop = self._deadline - upload_margin(self.timeout)
        return stop if when is None else min(when, stop)

    def stopping_uploads(self) -> bool:
        """True when upload chunks still arriving must stop now (a timer armed at the stop
        time may fire a clock tick early: a millisecond's tolerance)."""
        stop = self.upload_deadline(None)
        return stop is not None and asyncio.get_running_loop().time() >= stop - 1e-3

    @contextlib.contextmanager
    def watching(self, waiting: asyncio.Timeout) -> Iterator[None]:
        """Let :meth:`start` hurry ``waiting``, the timeout an upload chunk waits for its
        bytes under, while the block runs."""
        self._uploads.add(waiting)
        try:
            yield
        finally:
            self._uploads.discard(waiting)
