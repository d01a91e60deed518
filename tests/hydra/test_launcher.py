"""``hydra/launcher=chronicle`` end to end: real ``python app.py -m ...`` sweeps, real stores.

Each test runs the tiny app ``_sweep_app.py`` (or the Lightning example) in a subprocess and
checks what Chronicle recorded: runs and their states, messages, assets, variations.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import testkit

pytest.importorskip("hydra")

from chronicle_integrations import Chronicle
from chronicle_integrations.lifecycle import RunState
from hydra_plugins.chronicle_launcher._core import derive_experiment_id

pytestmark = pytest.mark.hydra

HERE = Path(__file__).resolve().parent
APP = HERE / "_sweep_app.py"
EXAMPLE = HERE.parent.parent / "examples" / "hydra_app" / "train.py"
SUBMITIT = "hydra/launcher@hydra.launcher.executor=submitit_local"
#: Generous bounds for waits on a loaded 2-core machine (never asserted as durations).
WAIT = 120.0


def sweep(
    app: Path, args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """``python app -m hydra/launcher=chronicle <args>``, waited for."""
    return testkit.run(
        [sys.executable, str(app), "-m", "hydra/launcher=chronicle", *args],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHRONICLE_") or k == "CHRONICLE_HOME"
    }
    env.update(extra or {})
    return env


def runs_by_variation(chronicle: Chronicle, experiment_id: str) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for info in sorted(chronicle.runs(experiment_id), key=lambda r: (r.variation, r.run)):
        out.setdefault(info.variation, []).append(info)
    return out


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    return testkit.wait_until(predicate, timeout=timeout, interval=0.2, what=what)


@pytest.fixture
def reap() -> Iterator[list[Path]]:
    """Marker dirs whose ``pid-*`` files name job processes to kill at teardown (a failed
    test must not leave sleeping jobs behind)."""
    dirs: list[Path] = []
    yield dirs
    for directory in dirs:
        for pid_file in directory.glob("pid-*"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


# ---------------------------------------------------------------------------------- crash
def test_four_jobs_one_crash_on_a_server(server_factory: Any, tmp_path: Path) -> None:
    """4 jobs, one raises: 4 runs, 3 succeeded, 1 failed_crash with the exception, outputs
    attached, return values recorded, and Hydra still exits non-zero."""
    server = server_factory()
    sweep_dir = tmp_path / "sweep"
    done = sweep(
        APP,
        ["+x=0,1,2,3", "+fail_on=2", f"hydra.sweep.dir={sweep_dir}"],
        tmp_path,
        {"CHRONICLE_URL": server.url},
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "failed on purpose" in done.stderr

    experiment_id = derive_experiment_id("_sweep_app", str(sweep_dir))
    with Chronicle(url=server.url) as chronicle:
        assert chronicle.experiment(experiment_id).name == "_sweep_app"
        runs = runs_by_variation(chronicle, experiment_id)
        assert sorted(runs) == [0, 1, 2, 3]  # variation numbers are the job numbers
        assert all(len(r) == 1 for r in runs.values())
        states = {v: r[0].state for v, r in runs.items()}
        assert states == {
            0: RunState.SUCCEEDED,
            1: RunState.SUCCEEDED,
            2: RunState.FAILED_CRASH,
            3: RunState.SUCCEEDED,
        }
        crashed = runs[2][0]
        assert crashed.reason == "crash"
        assert crashed.message.startswith("ValueError: job with x=2 failed on purpose")
        assert "Traceback" in crashed.message

        for variation, (info,) in runs.items():
            run = chronicle.run(experiment_id, variation, 0)
            config = run.get_variation_config()
            assert config["overrides"] == [f"+x={variation}", "+fail_on=2"]
            assert config["config"] == {"x": variation, "fail_on": 2}
            names = {a.name for a in run.assets()}
            assert {".hydra/config.yaml", ".hydra/overrides.yaml", "result.txt"} <= names
            run.download_asset("result.txt", tmp_path / f"result-{variation}.txt")
            assert (tmp_path / f"result-{variation}.txt").read_text() == f"x={variation}\n"
            if info.state is RunState.SUCCEEDED:
                run.download_asset("return_value.json", tmp_path / f"rv-{variation}.json")
                value = json.loads((tmp_path / f"rv-{variation}.json").read_text())
                assert value == {"x": variation, "score": 2.0 * variation}
            else:
                assert "return_value.json" not in names


# ---------------------------------------------------------------------------------- Lightning
def test_lightning_callback_inside_the_jobs(chronicle_home: Path, tmp_path: Path) -> None:
    """The example app (ChronicleCallback inside each job): still one run per job, the
    callback's checkpoints attached to it (once), every run succeeded."""
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    sweep_dir = tmp_path / "sweep"
    done = sweep(
        EXAMPLE,
        [
            "model.lr=0.01,0.003",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=2",
            f"hydra.sweep.dir={sweep_dir}",
            "hydra.launcher.experiment_id=lit",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with Chronicle(home=chronicle_home) as chronicle:
        assert [e.experiment_id for e in chronicle.experiments()] == ["lit"]  # no 2nd one
        runs = runs_by_variation(chronicle, "lit")
        assert sorted(runs) == [0, 1]
        for variation, infos in runs.items():
            assert [i.state for i in infos] == [RunState.SUCCEEDED]
            assets = chronicle.run("lit", variation, 0).assets()
            names = [a.name for a in assets]
            assert "checkpoints/last.ckpt" in names
            assert ".hydra/config.yaml" in names
            assert "return_value.json" in names
            # the launcher did not upload the callback's checkpoints a second time
            assert not any(n.startswith("checkpoints/") and n.count("/") > 1 for n in names)
            digests = [
                a.sha256
                for a in assets
                if a.name.endswith(".ckpt") and a.name != "checkpoints/last.ckpt"
            ]
            assert len(digests) == len(set(digests)) >= 1
            assert (
                chronicle.run("lit", variation, 0).get_variation_config()["config"]["model"]["lr"]
                == [0.01, 0.003][variation]
            )


# ---------------------------------------------------------------------------------- Ctrl+C
@pytest.mark.parametrize(
    "engine", [pytest.param([], id="basic"), pytest.param([SUBMITIT], id="submitit_local")]
)
def test_ctrl_c_abandons_the_sweep(
    engine: list[str], chronicle_home: Path, tmp_path: Path, reap: list[Path]
) -> None:
    """Ctrl+C (SIGINT to the sweep's process group, as a terminal sends it) while job 1 of 3
    runs: that run and every run not finished -> failed_abandoned; nothing left running."""
    if engine:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    markers = tmp_path / "markers"
    reap.append(markers)
    proc = testkit.spawn(
        [
            sys.executable,
            str(APP),
            "-m",
            "hydra/launcher=chronicle",
            *engine,
            "+x=0,1,2",
            "+block_on=1",
            f"+marker_dir={markers}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.launcher.experiment_id=ctrlc",
            "hydra.launcher.heartbeat_interval=1",
        ],
        cwd=tmp_path,
        env=_env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: (markers / "started-1").exists() or proc.poll() is not None, "job 1 to start"
        )
        assert proc.poll() is None, proc.communicate()[0]
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=WAIT)[0].decode(errors="replace")
    finally:
        testkit.reap(proc, signal.SIGKILL, grace=0)  # the group: submitit's children too
    assert proc.returncode != 0, output

    with Chronicle(home=chronicle_home) as chronicle:

        def settled() -> dict[int, list[Any]] | None:
            runs = runs_by_variation(chronicle, "ctrlc")
            done = all(i.state.is_terminal for r in runs.values() for i in r)
            return runs if done else None

        runs = wait_until(settled, "every run to end")
        assert sorted(runs) == [0, 1, 2]
        states = {v: r[0].state for v, r in runs.items()}
        assert states[1] is RunState.FAILED_ABANDONED, output
        if not engine:  # basic: job 0 finished before, job 2 never started
            assert states == {
                0: RunState.SUCCEEDED,
                1: RunState.FAILED_ABANDONED,
                2: RunState.FAILED_ABANDONED,
            }
            assert runs[2][0].started_at is None
        else:  # submitit_local runs the jobs at once: the others finished or were abandoned
            assert set(states.values()) <= {RunState.SUCCEEDED, RunState.FAILED_ABANDONED}


# ---------------------------------------------------------------------------------- cancel
def test_job_of_a_cancelled_run_does_not_run(chronicle_home: Path, tmp_path: Path) -> None:
    """A run cancelled (``chronicle cancel``) before its job starts: the job's task is not run,
    Hydra reports that job as failed, the run stays failed_abandoned, the others succeed."""
    markers = tmp_path / "markers"
    release = tmp_path / "release"
    proc = testkit.spawn(
        [
            sys.executable,
            str(APP),
            "-m",
            "hydra/launcher=chronicle",
            "+x=0,1,2",
            "+block_on=0",
            f"+release_file={release}",
            f"+marker_dir={markers}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.launcher.experiment_id=cancel",
        ],
        cwd=tmp_path,
        env=_env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: (markers / "started-0").exists() or proc.poll() is not None, "job 0 to start"
        )
        with Chronicle(home=chronicle_home) as chronicle:
            chronicle.run("cancel", 2, 0).fail("abandoned", "cancelled by the test")
        release.touch()
        output = proc.communicate(timeout=WAIT)[0].decode(errors="replace")
    finally:
        testkit.reap(proc, signal.SIGKILL, grace=0)  # the group: submitit's children too
    assert proc.returncode != 0, output
    assert "RunNotRunnable" in output
    assert not (markers / "pid-2").exists()  # the task of job 2 never ran
    with Chronicle(home=chronicle_home) as chronicle:
        states = {i.variation: i.state for i in chronicle.runs("cancel")}
        assert states == {
            0: RunState.SUCCEEDED,
            1: RunState.SUCCEEDED,
            2: RunState.FAILED_ABANDONED,
        }
        assert chronicle.run("cancel", 2, 0).info().message == "cancelled by the test"


# ---------------------------------------------------------------------------------- SystemExit
def test_preempted_job_is_left_resumable(
    chronicle_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job leaving with SystemExit (pre-emption) gets no terminal state: its heartbeats stop
    and the run goes lost (resumable); the sweep's unstarted jobs -> failed_abandoned."""
    monkeypatch.setenv("CHRONICLE_HEARTBEAT_TIMEOUT", "1")
    done = sweep(
        APP,
        [
            "+x=0,1,2",
            "+exit_on=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.launcher.experiment_id=preempt",
            "hydra.launcher.heartbeat_interval=0.2",
        ],
        tmp_path,
    )
    assert "left resumable" in done.stdout + done.stderr, done.stdout + done.stderr
    with Chronicle(home=chronicle_home) as chronicle:
        runs = runs_by_variation(chronicle, "preempt")
        assert runs[0][0].state is RunState.SUCCEEDED
        assert runs[2][0].state is RunState.FAILED_ABANDONED
        assert runs[2][0].started_at is None
        assert not runs[1][0].state.is_terminal
        assert {a.name for a in chronicle.run("preempt", 1, 0).assets()} >= {
            ".hydra/config.yaml",
            "result.txt",
        }  # outputs flushed before leaving
        wait_until(
            lambda: chronicle.run("preempt", 1, 0).state is RunState.LOST,
            "the pre-empted run to go lost",
        )


# ---------------------------------------------------------------------------------- SIGKILL
def test_killed_job_goes_lost_under_submitit(
    chronicle_home: Path, tmp_path: Path, reap: list[Path]
) -> None:
    """A job SIGKILLed under submitit_local: its run goes lost (heartbeat timeout), the other
    jobs finish and succeed."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    markers = tmp_path / "markers"
    reap.append(markers)
    env = {"CHRONICLE_HEARTBEAT_TIMEOUT": "2"}
    proc = testkit.spawn(
        [
            sys.executable,
            str(APP),
            "-m",
            "hydra/launcher=chronicle",
            SUBMITIT,
            "+x=0,1,2",
            "+block_on=1",
            "+sleep=2",
            f"+marker_dir={markers}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.launcher.experiment_id=killed",
            "hydra.launcher.heartbeat_interval=0.5",
        ],
        cwd=tmp_path,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: (markers / "started-1").exists() or proc.poll() is not None, "job 1 to start"
        )
        assert proc.poll() is None, proc.communicate()[0]
        os.kill(int((markers / "started-1").read_text()), signal.SIGKILL)
        output = proc.communicate(timeout=WAIT)[0].decode(errors="replace")
    finally:
        testkit.reap(proc, signal.SIGKILL, grace=0)  # the group: submitit's children too
    assert proc.returncode != 0, output  # submitit reports the killed job

    with Chronicle(home=chronicle_home, heartbeat_timeout=2) as chronicle:

        def settled() -> dict[int, RunState] | None:
            states = {i.variation: i.state for i in chronicle.runs("killed")}
            ok = (
                states.get(1) is RunState.LOST
                and states.get(0) is states.get(2) is RunState.SUCCEEDED
            )
            return states if ok else None

        wait_until(settled, "run 1 lost and runs 0 and 2 succeeded")


# ---------------------------------------------------------------------------------- batches
def test_batches_share_one_experiment(chronicle_home: Path, tmp_path: Path) -> None:
    """A sweeper launching in batches (here the basic sweeper with max_batch_size=1, which
    calls launch() once per job): one experiment, unique variation numbers."""
    done = sweep(
        APP,
        [
            "+x=10,20,30",
            "hydra.sweeper.max_batch_size=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.launcher.experiment_id=batched",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("Launching 1 jobs locally") == 3  # three launch() calls
    with Chronicle(home=chronicle_home) as chronicle:
        assert [e.experiment_id for e in chronicle.experiments()] == ["batched"]
        runs = runs_by_variation(chronicle, "batched")
        assert sorted(runs) == [0, 1, 2]
        xs = [
            chronicle.run("batched", v, 0).get_variation_config()["config"]["x"]
            for v in sorted(runs)
        ]
        assert xs == [10, 20, 30]
        assert all([i.state for i in r] == [RunState.SUCCEEDED] for r in runs.values())


# ---------------------------------------------------------------------------------- reruns
def test_rerun_failed_variations(chronicle_home: Path, tmp_path: Path) -> None:
    """``hydra.launcher.rerun_failed_of=E``: only failed variations run again, as new runs of
    the same variations; the others are left alone."""
    flag = tmp_path / "still-broken"
    flag.touch()
    common = [
        "+x=0,1,2",
        f"+fail_if_exists={flag}",
        f"hydra.sweep.dir={tmp_path / 's1'}",
        "hydra.launcher.experiment_id=rerun",
    ]
    assert sweep(APP, common, tmp_path).returncode != 0  # job x=1 fails (see the app)

    with Chronicle(home=chronicle_home) as chronicle:
        states = {i.variation: i.state for i in chronicle.runs("rerun")}
        assert states == {0: RunState.SUCCEEDED, 1: RunState.FAILED_CRASH, 2: RunState.SUCCEEDED}

        # `-m` with no sweep: every failed variation, with its recorded overrides (it fails
        # again: the cause is still there).
        done = sweep(
            APP,
            ["hydra.launcher.rerun_failed_of=rerun", f"hydra.sweep.dir={tmp_path / 's2'}"],
            tmp_path,
        )
        assert done.returncode != 0, done.stdout + done.stderr
        assert [i.state for i in runs_by_variation(chronicle, "rerun")[1]] == [
            RunState.FAILED_CRASH,
            RunState.FAILED_CRASH,
        ]

        # The same command as before + rerun_failed_of, after fixing the cause: only
        # variation 1 runs again.
        flag.unlink()
        args = [a for a in common if not a.startswith("hydra.launcher.experiment_id")]
        args[2] = f"hydra.sweep.dir={tmp_path / 's3'}"
        done = sweep(APP, [*args, "hydra.launcher.rerun_failed_of=rerun"], tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        runs = runs_by_variation(chronicle, "rerun")
        assert {v: [i.state for i in r] for v, r in runs.items()} == {
            0: [RunState.SUCCEEDED],
            1: [RunState.FAILED_CRASH, RunState.FAILED_CRASH, RunState.SUCCEEDED],
            2: [RunState.SUCCEEDED],
        }
        assert chronicle.experiment("rerun").variations == 3  # no new variation

        # Nothing failed any more: a rerun launches nothing.
        done = sweep(
            APP,
            ["hydra.launcher.rerun_failed_of=rerun", f"hydra.sweep.dir={tmp_path / 's4'}"],
            tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(chronicle.runs("rerun")) == 5
