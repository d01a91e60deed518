"""A host whose wall clock is wrong, for the one-clock test: a Python started with this
directory on ``PYTHONPATH`` sees ``time.time()`` (and ``time.time_ns()``) shifted by
``$CHRONICLE_TEST_CLOCK_SKEW`` seconds. Nothing else changes (monotonic clocks included)."""

from __future__ import annotations

import os
import time

_SKEW = float(os.environ.get("CHRONICLE_TEST_CLOCK_SKEW", "0"))
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _SKEW  # type: ignore[assignment]
time.time_ns = lambda: _time_ns() + int(_SKEW * 1e9)  # type: ignore[assignment]
