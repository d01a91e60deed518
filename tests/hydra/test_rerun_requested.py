"""``chronicle rerun E V`` composed with ``hydra.launcher.rerun_failed_of=E``: the pending run an
agent requested is the run the launcher executes (real sweeps of ``_sweep_app.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")

from test_launcher import APP, _env, runs_by_variation, sweep

from chronicle_integrations import Chronicle
from chronicle_integrations.lifecycle import RunState

pytestmark = pytest.mark.hydra


def test_rerun_failed_of_executes_the_requested_pending_run(
    chronicle_home: Path, tmp_path: Path
) -> None:
    """Variations 1 and 2 fail; an agent requests a rerun of 1 (`chronicle rerun`), then the
    launcher's rerun_failed_of runs it: variation 1's pending run 1 is executed (not skipped,
    not doubled by a new run), variation 2 gets a new run; nothing stays pending."""
    flag = tmp_path / "still-broken"
    flag.touch()
    first = sweep(
        APP,
        [
            "+x=0,1,2",
            f"+fail_if_exists={flag}",
            "+fail_on=2",
            f"hydra.sweep.dir={tmp_path / 's1'}",
            "hydra.launcher.experiment_id=req",
        ],
        tmp_path,
    )
    assert first.returncode != 0, first.stdout + first.stderr
    requested = subprocess.run(
        [sys.executable, "-m", "chronicle_integrations.cli", "rerun", "req", "1"],
        env=_env(None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert requested.returncode == 0, requested.stderr
    assert requested.stdout.strip() == "req/1/1"

    flag.unlink()  # variation 1's cause is fixed; variation 2 still fails (fail_on=2)
    done = sweep(
        APP,
        ["hydra.launcher.rerun_failed_of=req", f"hydra.sweep.dir={tmp_path / 's2'}"],
        tmp_path,
    )
    assert done.returncode != 0, done.stdout + done.stderr  # variation 2 failed again
    with Chronicle(home=chronicle_home) as chronicle:
        runs = runs_by_variation(chronicle, "req")
        assert {v: [i.state for i in r] for v, r in runs.items()} == {
            0: [RunState.SUCCEEDED],
            1: [RunState.FAILED_CRASH, RunState.SUCCEEDED],
            2: [RunState.FAILED_CRASH, RunState.FAILED_CRASH],
        }
        assert {a.name for a in chronicle.run("req", 1, 1).assets()} >= {"result.txt"}
