"""An agent drives the whole loop with the ``chronicle`` command alone: ``--json`` output, exit
codes and error codes, against a real server subprocess (and the embedded store).

The agent creates an experiment and its variations, starts worker processes (small scripts on
the Python client, the run identity in their environment), finds the one that failed, requests
a rerun and has the Hydra launcher's ``rerun_failed_of`` execute it, cancels another, waits for
terminal states and downloads a directory asset, checking every file's SHA-256.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testkit

from chronicle_integrations import Chronicle
from chronicle_integrations.cli import wait_exit_code
from chronicle_integrations.lifecycle import RunState

ROOT = Path(__file__).resolve().parent.parent
CHRONICLE = Path(sys.executable).parent / "chronicle"
SWEEP_APP = ROOT / "tests" / "hydra" / "_sweep_app.py"
#: A generous functional bound on a loaded 2-core machine (never asserted as a duration).
WAIT = 120.0

WORKER = textwrap.dedent(
    '''
    """A worker: runs the run named by $CHRONICLE_EXPERIMENT/_VARIATION/_RUN.

    x=0 waits for <work>/release, writes checkpoint-2/ (a directory) and uploads it;
    x=1 crashes; x=2 beats until the run is cancelled, then leaves.
    """
    import os
    import sys
    import time
    from pathlib import Path

    from chronicle_integrations import Chronicle

    work = Path(sys.argv[1])
    with Chronicle() as chronicle:
        run = chronicle.run(
            os.environ["CHRONICLE_EXPERIMENT"],
            int(os.environ["CHRONICLE_VARIATION"]),
            int(os.environ["CHRONICLE_RUN"]),
        )
        x = run.get_variation_config()["config"]["x"]
        run.start()
        run.keep_alive(interval=0.3)
        run.heartbeat({"step": 1})
        deadline = time.monotonic() + 300
        if x == 0:
            while not (work / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            ckpt = work / "checkpoint-2"
            (ckpt / "optimizer").mkdir(parents=True)
            (ckpt / "model.safetensors").write_bytes(os.urandom(300_000))
            (ckpt / "config.json").write_text('{"hidden": 8}')
            (ckpt / "optimizer" / "state.pt").write_bytes(os.urandom(5_000))
            run.upload_asset(ckpt)
            run.succeed()
        elif x == 1:
            run.fail("crash", "RuntimeError: the loss diverged")
            sys.exit(1)
        else:
            while not run.cancelled.is_set() and time.monotonic() < deadline:
                time.sleep(0.1)
            run.stop_keep_alive()
            sys.exit(0 if run.cancelled.is_set() else 3)
    '''
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


class Agent:
    """Runs ``chronicle ARGS`` (the installed command) with a fixed environment."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CHRONICLE), *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=WAIT + 60,
        )

    def json(self, *args: str, code: int = 0) -> Any:
        """``chronicle ARGS --json``: its decoded stdout, after checking the exit code."""
        done = self(*args, "--json")
        assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
        return json.loads(done.stdout)

    def error(self, *args: str, code: int) -> dict[str, Any]:
        """``chronicle ARGS --json`` that must fail: the one JSON error object on stderr."""
        done = self(*args, "--json")
        assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
        assert done.stdout == ""
        body = json.loads(done.stderr)
        assert set(body) == {"error"} and body["error"]["message"], body
        return dict(body["error"])


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts (each in its own session): their groups are killed at
    teardown, whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _requires_the_command() -> None:
    if not CHRONICLE.exists():
        pytest.skip(f"the chronicle command is not installed next to {sys.executable}")


@pytest.mark.hydra
def test_agent_runs_the_whole_loop_with_the_command_line(
    server_factory: Any, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    _requires_the_command()
    pytest.importorskip("hydra")
    server = server_factory()
    env = _env(CHRONICLE_URL=server.url)
    agent = Agent(env, tmp_path)

    # -- the experiment: two variations at creation (argument + file), one added later
    configs = [{"overrides": [f"+x={x}"], "config": {"x": x}} for x in range(3)]
    (tmp_path / "v.json").write_text(json.dumps([configs[1]]))
    created = agent.json(
        "create",
        "agent sweep",
        "--experiment-id",
        "agent",
        "--variation",
        json.dumps(configs[0]),
        "--variations-file",
        str(tmp_path / "v.json"),
    )
    assert (created["experiment_id"], created["name"], created["variations"]) == (
        "agent",
        "agent sweep",
        2,
    )
    assert agent.json("add-variation", "agent", json.dumps(configs[2])) == {
        "experiment_id": "agent",
        "variation": 2,
        "config": configs[2],
    }
    assert agent.json("variations", "agent") == [
        {"variation": n, "config": c} for n, c in enumerate(configs)
    ]
    assert agent.error("variations", "no-such-exp", code=3)["code"] == "not_found"

    # -- one run per variation, each executed by a worker process
    (tmp_path / "worker.py").write_text(WORKER)
    workers = {}
    for variation in range(3):
        run = agent.json("rerun", "agent", str(variation))
        assert (run["variation"], run["run"], run["state"]) == (variation, 0, "pending")
        work = tmp_path / f"work-{variation}"
        work.mkdir()
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(work)],
            env={
                **env,
                "CHRONICLE_EXPERIMENT": "agent",
                "CHRONICLE_VARIATION": str(variation),
                "CHRONICLE_RUN": "0",
                "CHRONICLE_HOME": str(work / "home"),
            },
            cwd=work,
            start_new_session=True,
        )
        processes.append(proc)
        workers[variation] = proc

    # -- the failure: wait says so by its exit code; the agent finds it and reruns it
    failed = agent.json("wait", "agent/1/0", code=10)
    assert failed["state"] == "failed_crash" and "diverged" in failed["message"]
    found = agent.json("runs", "--experiment", "agent", "--state", "failed_crash")
    assert [r["run"] for r in found if r["variation"] == 1] == [0] and len(found) == 1
    assert agent.json("rerun", "agent", "1")["run"] == 1  # agent/1/1, pending
    shown = agent.json("show", "agent/1/1")
    assert shown["state"] == "pending" and shown["config"] == configs[1]

    # -- the Hydra launcher executes that very run (rerun_failed_of), nothing else
    sweep = subprocess.run(
        [
            sys.executable,
            str(SWEEP_APP),
            "-m",
            "hydra/launcher=chronicle",
            "hydra.launcher.rerun_failed_of=agent",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    rerun = agent.json("wait", "agent/1/1", "--timeout", str(WAIT))
    assert rerun["state"] == "succeeded"
    runs = agent.json("runs", "--experiment", "agent")
    assert [r["run"] for r in runs if r["variation"] == 1] == [0, 1]  # no extra run

    # -- cancel the run that beats for ever; its worker sees it and leaves
    assert agent.json("wait", "agent/2/0", "--state", "running")["state"] == "running"
    assert agent.json("cancel", "agent/2/0", "--message", "not promising")["state"] == (
        "failed_abandoned"
    )
    assert agent.json("wait", "agent/2/0", code=11)["reason"] == "abandoned"
    assert workers[2].wait(timeout=WAIT) == 0

    # -- the slow one: a bounded wait times out (exit 14), then it finishes
    pending = agent.json("wait", "agent/0/0", "--timeout", "0.5", "--interval", "0.1", code=14)
    assert pending["state"] == "running"
    (tmp_path / "work-0" / "release").touch()
    assert agent.json("wait", "agent/0/0", "--timeout", str(WAIT))["state"] == "succeeded"
    assert workers[0].wait(timeout=WAIT) == 0 and workers[1].wait(timeout=WAIT) == 1

    # -- the checkpoint directory, in one call, layout and content intact
    written = agent.json("download", "agent/0/0", "checkpoint-2", str(tmp_path / "dl"))
    source = tmp_path / "work-0" / "checkpoint-2"
    expected = {p.relative_to(source).as_posix(): p for p in source.rglob("*") if p.is_file()}
    assert sorted(f["name"] for f in written) == sorted(f"checkpoint-2/{n}" for n in expected)
    for entry in written:
        relative = entry["name"].removeprefix("checkpoint-2/")
        path = Path(entry["path"])
        assert path == (tmp_path / "dl" / relative).resolve()
        assert entry["sha256"] == testkit.sha256_file(path)
        assert entry["sha256"] == testkit.sha256_file(expected[relative])
        assert entry["size"] == expected[relative].stat().st_size

    # -- refusals carry the API's stable code, with the usual exit codes
    error = agent.error("cancel", "agent/0/0", code=4)
    assert error["code"] == "invalid_transition" and error["state"] == "succeeded"
    assert agent.error("wait", "agent/7/0", code=3)["code"] == "not_found"
    assert agent.error("download", "agent/0/0", "checkpoint-9", code=3)["code"] == "not_found"
    assert agent.error("wait", "agent/0", code=2)["code"] == "usage"
    assert agent.error("add-variation", "agent", "[1, 2]", code=2)["code"] == "usage"

    with Chronicle(url=server.url) as chronicle:
        assert {r.key: r.state for r in chronicle.runs("agent")} == {
            "agent/0/0": RunState.SUCCEEDED,
            "agent/1/0": RunState.FAILED_CRASH,
            "agent/1/1": RunState.SUCCEEDED,
            "agent/2/0": RunState.FAILED_ABANDONED,
        }


def test_the_same_commands_on_the_embedded_store(tmp_path: Path) -> None:
    """--home: `create` makes the store; variations, show, wait and directory downloads work
    as against a server; errors under --json are JSON with their code."""
    _requires_the_command()
    home = tmp_path / "home"
    agent = Agent(_env(), tmp_path)
    assert agent.error("variations", "e1", "--home", str(home), code=2)["code"] == (
        "configuration_error"
    )
    (tmp_path / "more.json").write_text('[{"lr": 0.2}, {"lr": 0.3}]')
    done = agent(
        "--home", str(home), "create", "lr", "--variations-file", str(tmp_path / "more.json")
    )
    assert done.returncode == 0, done.stderr
    experiment_id = done.stdout.strip()
    assert experiment_id.startswith("lr-") and home.is_dir()
    (tmp_path / "one.json").write_text('{"lr": 0.4}')
    added = agent(
        "--home", str(home), "add-variation", experiment_id, "@" + str(tmp_path / "one.json")
    )
    assert (added.returncode, added.stdout) == (0, "2\n")
    listed = agent("--home", str(home), "variations", experiment_id)
    assert listed.returncode == 0 and '{"lr": 0.4}' in listed.stdout

    nested = tmp_path / "out" / "checkpoint-7"
    (nested / "deep" / "er").mkdir(parents=True)
    (nested / "weights.bin").write_bytes(os.urandom(70_000))
    (nested / "deep" / "er" / "notes.txt").write_text("hi")
    with Chronicle(home=home) as chronicle:
        run = chronicle.create_run(experiment_id, 1).start()
        run.upload_asset(nested).result()
        run.upload_asset(nested / "weights.bin", "checkpoint-70").result()  # a prefix twin
        run.succeed()

    key = f"{experiment_id}/1/0"
    shown = agent.json("show", key, "--home", str(home))
    assert shown["config"] == {"lr": 0.3} and "lease" not in shown
    waited = agent("wait", key, "--home", str(home))
    assert (waited.returncode, waited.stdout) == (0, f"{key}: succeeded\n")
    assert (
        agent.json("wait", key, "--state", "running", "--home", str(home), code=13)["state"]
        == "succeeded"
    )

    (tmp_path / "dest").mkdir()  # an existing directory: checkpoint-7/ is made inside
    written = agent.json(
        "download", key, "checkpoint-7/", str(tmp_path / "dest"), "--home", str(home)
    )
    assert sorted(Path(f["path"]).relative_to(tmp_path / "dest").as_posix() for f in written) == [
        "checkpoint-7/deep/er/notes.txt",
        "checkpoint-7/weights.bin",
    ]
    for entry in written:
        assert testkit.sha256_file(entry["path"]) == entry["sha256"]
    single = agent.json(
        "download", key, "checkpoint-70", str(tmp_path / "w.bin"), "--home", str(home)
    )
    assert [(f["name"], f["path"]) for f in single] == [
        ("checkpoint-70", str((tmp_path / "w.bin").resolve()))
    ]
    plain = agent("download", key, "checkpoint-70", str(tmp_path / "w2.bin"), "--home", str(home))
    assert plain.stdout == f"{(tmp_path / 'w2.bin').resolve()}\n"


@pytest.mark.parametrize(
    ("state", "awaited", "timed_out", "code"),
    [
        (RunState.SUCCEEDED, None, False, 0),
        (RunState.FAILED_CRASH, None, False, 10),
        (RunState.FAILED_ABANDONED, None, False, 11),
        (RunState.FAILED_LOST, None, False, 12),
        (RunState.SUCCEEDED, RunState.RUNNING, False, 13),
        (RunState.RUNNING, None, True, 14),
        (RunState.LOST, RunState.LOST, False, 0),
        (RunState.FAILED_CRASH, RunState.FAILED_CRASH, False, 0),
    ],
)
def test_wait_exit_codes(
    state: RunState, awaited: RunState | None, timed_out: bool, code: int
) -> None:
    assert wait_exit_code(state, awaited, timed_out) == code
