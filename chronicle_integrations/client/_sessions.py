"""Per-thread HTTP sessions: a ``requests.Session`` is not safe to share between threads (the
upload workers, ``keep_alive``'s beat thread and the caller's), so each thread gets its own,
made on first use, and :meth:`ThreadSessions.close` closes every one of them."""

from __future__ import annotations

import threading
from collections.abc import Callable

import requests


class ThreadSessions:
    """One session per thread, built by ``make``; all closed together."""

    def __init__(self, make: Callable[[], requests.Session]) -> None:
        self._make = make
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        """This thread's session (made now if it has none)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._make()
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close every session made so far."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
