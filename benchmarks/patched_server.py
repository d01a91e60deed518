"""The Chronicle server with a proposed fix applied by monkeypatching, to measure a fix before
proposing it (the library itself is not changed). Same options as
``python -m chronicle_integrations.server``; the patches are named in $BENCH_PATCHES
(comma-separated):

  writelock : SQLite only - one process-local ``threading.Lock`` around every write
              transaction (``Store._write``), so the server's worker threads queue on a lock
              that wakes the next waiter at once, instead of colliding on ``BEGIN IMMEDIATE``
              and sleeping in SQLite's busy handler (back-off sleeps of up to 100 ms).
  nolane    : every heartbeat through its FastAPI route, one transaction each (the server
              before the heartbeat lane), for a same-run comparison.
  pgasync   : PostgreSQL only - ``SET LOCAL synchronous_commit = off`` in each write
              transaction, so a commit does not wait for its WAL flush (fdatasync). In this
              benchmark only heartbeats write; the proposal limits it to heartbeats (idempotent,
              re-sent every interval: losing the last few ms of them in a database crash is
              harmless; lifecycle transitions keep full durability).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from chronicle_integrations.store import core

patches = set(filter(None, os.environ.get("BENCH_PATCHES", "").split(",")))

if "writelock" in patches:
    _orig_write = core.Store._write
    _lock = threading.Lock()

    @contextlib.contextmanager
    def _write(self):  # type: ignore[no-untyped-def]
        if not self._sqlite:
            with _orig_write(self) as conn:
                yield conn
            return
        with _lock, _orig_write(self) as conn:
            yield conn

    core.Store._write = _write  # type: ignore[method-assign]

if "pgasync" in patches:
    import sqlalchemy as sa

    _orig_write2 = core.Store._write

    @contextlib.contextmanager
    def _write_async(self):  # type: ignore[no-untyped-def]
        with _orig_write2(self) as conn:
            if not self._sqlite:
                conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
            yield conn

    core.Store._write = _write_async  # type: ignore[method-assign]

if "nolane" in patches:
    # The server as it was before the heartbeat lane: every heartbeat through its FastAPI
    # route, one transaction each (for a same-run comparison with the lane).
    import functools

    from chronicle_integrations.server import app as _app
    from chronicle_integrations.server import runner as _runner

    _runner.create_app = functools.partial(_app.create_app, heartbeat_lane=False)

if __name__ == "__main__":
    from chronicle_integrations.server.__main__ import main

    if os.environ.get("BENCH_CPROFILE"):  # profile every thread until shutdown
        import cProfile
        import pstats

        profiles: list[cProfile.Profile] = []

        def _thread_profile(frame, event, arg):  # type: ignore[no-untyped-def]
            prof = cProfile.Profile()
            profiles.append(prof)
            threading.setprofile(None)
            sys.setprofile(None)
            prof.enable()

        threading.setprofile(_thread_profile)
        main_prof = cProfile.Profile()
        main_prof.enable()
        try:
            code = main()
        finally:
            main_prof.disable()
            with open(os.environ["BENCH_CPROFILE"], "w") as fh:
                st = pstats.Stats(main_prof, stream=fh)
                for p in profiles:
                    st.add(p)
                st.sort_stats("tottime").print_stats(40)
                st.sort_stats("cumulative").print_stats(40)
        sys.exit(code)
    sys.exit(main())
