"""Fixtures for the reliability suite: fault figures, a seeded RNG, and soak sizing.

Every test that injects a fault, verifies an upload or runs a fuzz case adds to
:data:`FIGURES`; the totals are printed at the end of the session (``pytest_terminal_summary``)
so a green run also says *how much* was survived.

``CHRONICLE_SOAK=1`` makes the tests larger (more uploads, more kills, more fuzz cases).
``CHRONICLE_RELIABILITY_SEED`` replays a run's random choices (the seed is printed).
"""

from __future__ import annotations

import os
import random
import secrets
from collections import Counter
from typing import Any

import pytest

SOAK = os.environ.get("CHRONICLE_SOAK", "").strip().lower() in ("1", "true", "yes", "on")

#: Session totals: "faults injected: ...", "uploads verified", "fuzz cases", ...
FIGURES: Counter[str] = Counter()

_SEED = int(os.environ.get("CHRONICLE_RELIABILITY_SEED") or secrets.randbelow(2**31))


@pytest.fixture(scope="session")
def figures() -> Counter[str]:
    """The session's figures (a Counter; keys are printed as they are)."""
    return FIGURES


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A per-test RNG derived from the session seed (replay with CHRONICLE_RELIABILITY_SEED)."""
    return random.Random(f"{_SEED}:{request.node.nodeid}")


@pytest.fixture(scope="session")
def soak() -> bool:
    """True under CHRONICLE_SOAK=1."""
    return SOAK


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures", sep="=", bold=True)
    terminalreporter.write_line(
        f"seed: CHRONICLE_RELIABILITY_SEED={_SEED}" + ("  (soak)" if SOAK else "")
    )
    faults = sum(v for k, v in FIGURES.items() if k.startswith("fault:"))
    terminalreporter.write_line(f"faults injected: {faults}")
    for key in sorted(FIGURES):
        terminalreporter.write_line(f"  {key}: {FIGURES[key]}")
