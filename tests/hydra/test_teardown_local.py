"""The launcher's watcher on local job processes (``submitit_local``, ``joblib``): a job whose
run went ``lost`` (frozen: no more heartbeats) is torn down whole (SIGTERM, the grace, SIGKILL)
and the run stays ``lost``. The SLURM side is in ``test_slurm.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import testkit

from chronicle_integrations import Chronicle
from chronicle_integrations.lifecycle import RunState

pytest.importorskip("hydra")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

pytestmark = pytest.mark.hydra

APP = Path(__file__).parent / "_sweep_app.py"
TIMEOUT = 3.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.mark.parametrize("executor", ["submitit_local", "joblib"])
def test_a_frozen_local_job_goes_lost_and_is_torn_down(
    tmp_path: Path, server_factory: Any, executor: str
) -> None:
    if executor == "joblib":
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    url = server_factory(heartbeat_timeout=TIMEOUT).url
    markers = tmp_path / "markers"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    proc = testkit.spawn(
        [
            sys.executable,
            str(APP),
            "-m",
            "hydra/launcher=chronicle",
            f"hydra/launcher@hydra.launcher.executor={executor}",
            f"hydra.launcher.url={url}",
            "hydra.launcher.heartbeat_interval=0.5",
            "hydra.launcher.teardown_grace=2",
            "hydra.launcher.experiment_id=local-sweep",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"+marker_dir={markers}",
            "+x=1,2",
            "+stop_on=2",
        ],
        cwd=tmp_path,
        env=env,
        stdout=(tmp_path / "sweep.out").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        code = proc.wait(180)
    finally:
        testkit.reap(proc)
    output = (tmp_path / "sweep.out").read_text()
    assert code != 0, output  # Hydra reports the job that was torn down
    job_pid = int((markers / "started-2").read_text())
    testkit.wait_until(lambda: not _alive(job_pid), 10, what="the job process gone")
    with Chronicle(url=url) as chronicle:
        runs = {r.variation: r for r in chronicle.runs(experiment_id="local-sweep")}
        assert runs[0].state is RunState.SUCCEEDED, output
        events = chronicle.run("local-sweep", 1, 0).events()
        worker = [e for e in events if e.kind == "worker"]
        assert worker and worker[0].detail["pid"] == job_pid
        teardown = [e for e in events if e.kind == "teardown"]
        assert teardown and teardown[0].cause == "teardown_requested", output
        assert teardown[0].detail["signal"] == "SIGTERM"
        assert "lost" in teardown[0].detail["why"]
        assert teardown[-1].cause == "teardown_done", [e.cause for e in teardown]
        testkit.wait_until(
            lambda: chronicle.run("local-sweep", 1, 0).info().state is RunState.LOST,
            30,
            what="the run lost (teardown never changes the lifecycle)",
        )
