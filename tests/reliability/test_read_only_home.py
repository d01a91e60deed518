"""A home this user may read but not write (an archived sweep, another user's results) can
still be listed and shown; changing it fails with a clear error, and nothing is written.

The tests run as root, whose CAP_DAC_OVERRIDE ignores permission bits: the CLI runs under
``setpriv`` without that capability (and without CAP_DAC_READ_SEARCH), as root still but
bound by the read-only modes like any other user.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chronicle_integrations import Chronicle
from chronicle_integrations.store.schema import SCHEMA_VERSION

SETPRIV = shutil.which("setpriv")
CAPS = "-dac_override,-dac_read_search"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``chronicle ARGS`` as a user bound by permission bits."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if SETPRIV is None:
            pytest.skip("running as root needs setpriv to drop CAP_DAC_OVERRIDE")
        prefix = [SETPRIV, f"--bounding-set={CAPS}", f"--inh-caps={CAPS}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "chronicle_integrations.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        start_new_session=True,
    )


def _chmod_tree(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A home with a finished run and a pending one, made read-only (restored afterwards)."""
    root = tmp_path / "home"
    with Chronicle(home=root) as chronicle:
        experiment = chronicle.create_experiment("archived", variations=[{"lr": 0.1}])
        run = chronicle.create_run(experiment, 0).start()
        run.heartbeat({"step": 3})
        run.succeed()
        chronicle.create_run(experiment, 0)
    yield root
    _chmod_tree(root, writable=True)


def _digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_read_only_home_can_be_listed_not_changed(home: Path) -> None:
    _chmod_tree(home, writable=False)
    before = _digest(home)
    listed = _cli("runs", "--home", str(home), "--json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    assert sorted(r["state"] for r in runs) == ["pending", "succeeded"]
    done = next(r for r in runs if r["state"] == "succeeded")
    key = f"{done['experiment_id']}/{done['variation']}/{done['run']}"
    shown = _cli("show", key, "--home", str(home), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["progress"] == {"step": 3}
    for args in (["experiments"], ["events", key], ["assets", key]):
        result = _cli(*args, "--home", str(home))
        assert result.returncode == 0, (args, result.stderr)

    pending = next(r for r in runs if r["state"] == "pending")
    cancel = _cli("cancel", f"{pending['experiment_id']}/0/{pending['run']}", "--home", str(home))
    assert cancel.returncode == 2, cancel.stderr
    assert "read-only" in cancel.stderr and "unexpected" not in cancel.stderr, cancel.stderr
    assert _digest(home) == before


def test_a_read_only_home_that_needs_a_migration_says_so(home: Path) -> None:
    with sqlite3.connect(home / "chronicle.db") as conn:
        conn.execute("UPDATE chronicle_schema SET version = ?", (SCHEMA_VERSION - 1,))
    _chmod_tree(home, writable=False)
    result = _cli("runs", "--home", str(home))
    assert result.returncode == 2, result.stderr
    assert "read-only" in result.stderr and "write access" in result.stderr, result.stderr
