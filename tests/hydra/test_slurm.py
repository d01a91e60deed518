"""The Hydra launcher on a real one-node SLURM cluster (``scripts/services/slurm.sh``): jobs run
under ``submitit_slurm``, and the launcher's watcher tears down the jobs whose runs went
``lost`` or were cancelled (``scancel``), while a job pre-empted with ``scontrol requeue``
comes back and resumes its run.

Every SLURM job a test submits carries a job name of its own and is cancelled at the end
(``scancel --name``), and the test waits until none of its processes is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testkit

from chronicle_integrations import Chronicle
from chronicle_integrations.lifecycle import RunState

pytest.importorskip("hydra")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

pytestmark = [pytest.mark.hydra, pytest.mark.slurm]

HERE = Path(__file__).parent
APP = HERE / "_sweep_app.py"
ROOT = HERE.parent.parent
TIMEOUT = 3.0  # the test server's heartbeat timeout
GRACE = 8.0  # teardown_grace: longer than the cluster's KillWait (5 s), so scancel suffices


def _slurm_ready() -> bool:
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False)
    states = done.stdout.split()
    return done.returncode == 0 and any(
        s.rstrip("*~#").startswith(("idle", "mixed", "allocated")) for s in states
    )


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """The local cluster: skipped only where SLURM is not installed; started here when it is
    installed but down and we are root (CI starts it with scripts/services.sh)."""
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM is not installed here (no sinfo): see scripts/services/slurm.sh")
    if not _slurm_ready() and os.geteuid() == 0:
        testkit.run(["bash", str(ROOT / "scripts" / "services" / "slurm.sh")], timeout=300)
    if not _slurm_ready():
        pytest.fail("the SLURM cluster is not up: run `bash scripts/services.sh` as root")


def _squeue(name: str) -> list[str]:
    done = subprocess.run(
        ["squeue", "-h", "--name", name, "-o", "%i %T"], capture_output=True, text=True, check=False
    )
    return done.stdout.split("\n") if done.stdout.strip() else []


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


@pytest.fixture
def job_name(slurm_cluster: None, tmp_path: Path) -> Iterator[str]:
    """A SLURM job name for the test's jobs; at the end they are all cancelled and gone."""
    name = f"chronicle-test-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        subprocess.run(["scancel", "--name", name], capture_output=True, check=False)
        testkit.wait_until(lambda: not _squeue(name), 60, what=f"the SLURM jobs {name} gone")
        testkit.wait_until(
            lambda: not _processes_mentioning(str(tmp_path / "sweep")),
            30,
            what="no process of the test's SLURM jobs left",
        )


def _start_sweep(tmp_path: Path, url: str, name: str, *args: str) -> subprocess.Popen[Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    command = [
        sys.executable,
        str(APP),
        "-m",
        "hydra/launcher=chronicle",
        "hydra/launcher@hydra.launcher.executor=submitit_slurm",
        f"hydra.launcher.executor.name={name}",
        "hydra.launcher.executor.mem_gb=1",
        "hydra.launcher.executor.cpus_per_task=1",
        "hydra.launcher.executor.timeout_min=10",
        f"hydra.launcher.url={url}",
        "hydra.launcher.heartbeat_interval=0.5",
        f"hydra.launcher.teardown_grace={GRACE}",
        "hydra.launcher.experiment_id=slurm-sweep",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"+marker_dir={tmp_path / 'markers'}",
        *args,
    ]
    return testkit.spawn(
        command,
        cwd=tmp_path,
        env=env,
        stdout=(tmp_path / "sweep.out").open("wb"),
        stderr=subprocess.STDOUT,
    )


def _wait_sweep(proc: subprocess.Popen[Any], tmp_path: Path, timeout: float = 180) -> int:
    try:
        return int(proc.wait(timeout))
    except subprocess.TimeoutExpired:
        testkit.reap(proc)
        raise AssertionError((tmp_path / "sweep.out").read_text()[-4000:]) from None


def _runs(url: str) -> dict[int, list[Any]]:
    with Chronicle(url=url) as chronicle:
        out: dict[int, list[Any]] = {}
        for info in sorted(chronicle.runs(experiment_id="slurm-sweep"), key=lambda r: r.run):
            out.setdefault(info.variation, []).append(info)
        return out


def _events(url: str, variation: int) -> list[Any]:
    with Chronicle(url=url) as chronicle:
        return chronicle.run("slurm-sweep", variation, 0).events()


def _slurm_job_of(url: str, variation: int) -> str | None:
    started = [e for e in _events(url, variation) if e.cause == "worker_started"]
    return str(started[-1].detail["job_id"]) if started else None


def _sacct_state(job_id: str) -> str:
    done = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip().split("\n")[-1].split()[0] if done.stdout.strip() else ""


def _job_active(job_id: str) -> bool:
    done = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False
    )
    return done.returncode == 0 and bool(done.stdout.strip())


def _teardown_events(url: str, variation: int) -> list[Any]:
    return [e for e in _events(url, variation) if e.kind == "teardown"]


def test_a_hung_slurm_job_goes_lost_and_is_scancelled(
    tmp_path: Path, server_factory: Any, job_name: str
) -> None:
    url = server_factory(heartbeat_timeout=TIMEOUT).url
    proc = _start_sweep(tmp_path, url, job_name, "+x=1,2,3", "+stop_on=3")
    code = _wait_sweep(proc, tmp_path)
    output = (tmp_path / "sweep.out").read_text()
    assert code != 0, output  # Hydra reports the job that was torn down
    runs = _runs(url)
    assert [r.state for r in runs[0]] == [RunState.SUCCEEDED], output
    assert [r.state for r in runs[1]] == [RunState.SUCCEEDED], output
    job_id = _slurm_job_of(url, 2)
    assert job_id is not None, output
    teardown = _teardown_events(url, 2)
    assert teardown, output
    assert teardown[0].cause == "teardown_requested"
    assert teardown[0].detail["signal"] == "scancel"
    assert teardown[0].detail["target"] == f"SLURM job {job_id}"
    assert "lost" in teardown[0].detail["why"]
    assert teardown[-1].cause == "teardown_done", [e.cause for e in teardown]
    assert not _job_active(job_id), "the SLURM job must be gone"
    assert _sacct_state(job_id) == "CANCELLED"
    # Teardown never changes the lifecycle: the run is lost (resumable), not failed.
    testkit.wait_until(lambda: _runs(url)[2][-1].state is RunState.LOST, 30, what="lost")
    assert len(_runs(url)[2]) == 1


def test_a_cancelled_slurm_job_is_scancelled_after_the_grace(
    tmp_path: Path, server_factory: Any, job_name: str
) -> None:
    url = server_factory(heartbeat_timeout=TIMEOUT).url
    markers = tmp_path / "markers"
    proc = _start_sweep(tmp_path, url, job_name, "+x=1,2", "+block_on=2", "+block_seconds=300")
    testkit.wait_until(
        lambda: (markers / "started-2").exists() and _slurm_job_of(url, 1),
        120,
        what="job x=2 running",
    )
    job_id = _slurm_job_of(url, 1)
    assert job_id is not None
    cancel = testkit.run(
        [
            sys.executable,
            "-m",
            "chronicle_integrations.cli",
            "cancel",
            "slurm-sweep/1/0",
            "--url",
            url,
            "-m",
            "no longer needed",
        ],
        capture_output=True,
        text=True,
    )
    assert cancel.returncode == 0, cancel.stderr
    code = _wait_sweep(proc, tmp_path)
    output = (tmp_path / "sweep.out").read_text()
    assert code != 0, output
    runs = _runs(url)
    assert [r.state for r in runs[0]] == [RunState.SUCCEEDED], output
    assert [r.state for r in runs[1]] == [RunState.FAILED_ABANDONED], output
    teardown = _teardown_events(url, 1)
    assert teardown and teardown[0].cause == "teardown_requested", output
    assert "cancelled" in teardown[0].detail["why"]
    assert teardown[-1].cause == "teardown_done"
    assert not _job_active(job_id)
    assert _sacct_state(job_id) == "CANCELLED"


def test_a_requeued_slurm_job_resumes_its_run_to_success(
    tmp_path: Path, server_factory: Any, job_name: str
) -> None:
    url = server_factory(heartbeat_timeout=TIMEOUT).url
    markers, release = tmp_path / "markers", tmp_path / "release"
    proc = _start_sweep(
        tmp_path, url, job_name, "+x=1,2", "+block_on=2", f"+release_file={release}"
    )
    testkit.wait_until(
        lambda: (markers / "started-2").exists() and _slurm_job_of(url, 1),
        120,
        what="job x=2 running",
    )
    job_id = _slurm_job_of(url, 1)
    assert job_id is not None
    (markers / "started-2").unlink()
    # Pre-emption: SLURM stops the job and puts it back in the queue.
    requeue = testkit.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    testkit.wait_until(
        lambda: _runs(url)[1][-1].state is RunState.LOST, 60, what="the pre-empted run lost"
    )
    time.sleep(2 * TIMEOUT)  # the watcher sees it lost, with its job pending: no teardown
    release.touch()
    # SLURM holds a requeued job back for a while (BeginTime); let it start again now.
    testkit.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
    code = _wait_sweep(proc, tmp_path)
    output = (tmp_path / "sweep.out").read_text()
    assert code == 0, output
    runs = _runs(url)
    assert [r.state for r in runs[0]] == [RunState.SUCCEEDED], output
    assert [r.state for r in runs[1]] == [RunState.SUCCEEDED], output  # the same run resumed
    events = _events(url, 1)
    assert len([e for e in events if e.cause == "worker_started"]) == 2
    assert not [e for e in events if e.kind == "teardown"], output
