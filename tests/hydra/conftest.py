"""Fixtures for the Hydra launcher tests: an embedded store per test, and a check that the
launcher never leaves a run pending or running behind it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chronicle_integrations import Chronicle
from chronicle_integrations.lifecycle import RunState


def open_runs(home: Path) -> list[str]:
    """Runs of the embedded store in ``home`` that are not terminal (nor lost)."""
    if not (home.exists() and any(home.iterdir())):
        return []
    with Chronicle(home=home) as chronicle:
        return [
            f"{r.key}: {r.state.value}"
            for r in chronicle.runs()
            if r.state in (RunState.PENDING, RunState.RUNNING)
        ]


@pytest.fixture
def chronicle_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """``$CHRONICLE_HOME`` pointing at a fresh embedded store (``$CHRONICLE_URL`` unset); at
    teardown, no run may be left pending or running."""
    home = tmp_path_factory.mktemp("chronicle-home")
    monkeypatch.setenv("CHRONICLE_HOME", str(home))
    monkeypatch.delenv("CHRONICLE_URL", raising=False)
    for name in ("CHRONICLE_EXPERIMENT", "CHRONICLE_VARIATION", "CHRONICLE_RUN", "CHRONICLE_LEASE"):
        monkeypatch.delenv(name, raising=False)
    yield home
    left = open_runs(home)
    assert not left, f"runs left open by the launcher: {left}"
