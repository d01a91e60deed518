"""The HuggingFace ``TrainerCallback``: real ``Trainer`` runs on a tiny CPU model.

Each outcome a training can have is produced for real (a dataset that raises, a callback that
raises, a save that fails, Ctrl+C and SIGTERM delivered to a subprocess, a server-side cancel,
torchrun with two processes) and the run's state, message, events and assets are checked
against the store - the embedded one, and for the main outcomes a real server subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import testkit

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))
import _hf_app as app
from transformers import EarlyStoppingCallback

from chronicle_integrations import Chronicle, RunState
from chronicle_integrations.transformers import ChronicleTrainerCallback, track

pytestmark = [pytest.mark.frameworks, pytest.mark.timeout(300)]

HERE = Path(__file__).parent
APP = HERE / "_hf_app.py"


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server_url(module_server_factory: Any) -> str:
    return str(module_server_factory().url)


@pytest.fixture(params=["embedded", "server"])
def chronicle(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chronicle]:
    """A client on the embedded store, or on a real server subprocess."""
    if request.param == "server":
        client = Chronicle(url=request.getfixturevalue("server_url"), home=tmp_path / "home")
    else:
        client = Chronicle(home=tmp_path / "home")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Chronicle]:
    client = Chronicle(home=tmp_path / "home")
    try:
        yield client
    finally:
        client.close()


def callback_for(client: Chronicle, **kwargs: Any) -> ChronicleTrainerCallback:
    kwargs.setdefault("heartbeat_interval", 0.2)
    return ChronicleTrainerCallback(chronicle=client, **kwargs)


def only_run(client: Chronicle, callback: ChronicleTrainerCallback | None = None) -> Any:
    """The one run in the store (the server is shared by the module: of the callback's
    experiment)."""
    experiment = callback.run.experiment_id if callback is not None and callback.run else None
    runs = client.runs(experiment_id=experiment)
    assert len(runs) == 1, runs
    return client.run(runs[0].experiment_id, runs[0].variation, runs[0].run)


def transitions(run: Any) -> list[tuple[str | None, str | None, str]]:
    return [(e.from_state, e.to_state, e.cause) for e in run.events() if e.kind == "transition"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env.update(
        CHRONICLE_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra
    )
    return env


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"child exited early ({proc.returncode}):\n"
                f"{proc.stdout.read().decode() if proc.stdout else ''}"
            )
        if time.monotonic() > deadline:
            testkit.reap(proc, signal.SIGKILL, grace=0)
            raise AssertionError("child never became ready")
        time.sleep(0.05)
    return dict(json.loads(path.read_text()))


def signal_child(tmp_path: Path, sig: int, *extra: str) -> tuple[int, str, dict[str, Any]]:
    """Run ``_hf_app.py wait``, deliver ``sig`` while it pauses at step 3, let it go on."""
    out = tmp_path / "child"
    proc = testkit.spawn(
        [sys.executable, str(APP), "wait", str(out), *extra],
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    ready = wait_for(out / "ready", proc)
    os.kill(proc.pid, sig)
    (out / "go").touch()
    output, _ = proc.communicate(timeout=240)
    return proc.returncode, output.decode(errors="replace"), ready


# ------------------------------------------------------------------------------- success
def test_normal_training_succeeds_with_every_checkpoint(
    chronicle: Chronicle, tmp_path: Path
) -> None:
    callback = callback_for(chronicle)
    recorder = app.RecordSaves()  # after ours: what each folder held at on_save time
    trainer = app.make_trainer(
        tmp_path / "out",
        [callback, recorder],
        max_steps=6,
        save_steps=2,
        save_total_limit=1,
        hub_token="hf_SECRET",
    )
    trainer.train()

    run = only_run(chronicle, callback)
    assert run.key == callback.run.key
    assert run.state is RunState.SUCCEEDED
    assert recorder.steps == [2, 4, 6]
    # checkpoint-2 and -4 were rotated away by save_total_limit=1, yet uploaded intact
    assert not (tmp_path / "out" / "checkpoint-2").exists()
    assets = {a.name: a.sha256 for a in run.assets()}
    assert assets == recorder.files
    assert {name.split("/")[0] for name in assets} == {
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    }
    assert "checkpoint-2/model.safetensors" in assets
    assert transitions(run) == [
        (None, "pending", "create"),
        ("pending", "running", "start"),
        ("running", "succeeded", "succeed"),
    ]
    config = run.get_variation_config()
    assert config["training_args"]["max_steps"] == 6
    assert config["model_config"]["hidden_size"] == 16
    assert "hub_token" not in config["training_args"]
    assert "pad_token_id" in config["model_config"]  # not a secret
    assert "hf_SECRET" not in json.dumps(config)


class NestedCheckpointTrainer(app.Trainer):  # type: ignore[misc]
    """Writes sub-folders into each ``checkpoint-N`` (as FSDP's ``pytorch_model_fsdp_0/`` or
    PEFT adapters do), with a file name repeated at several depths and different contents."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        for rel in ("part.bin", "shards/part.bin", "shards/deeper/part.bin"):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(f"{rel} at {self.state.global_step}".encode())


def test_checkpoint_sub_folders_keep_their_relative_paths(
    embedded: Chronicle, tmp_path: Path
) -> None:
    """Every file under ``checkpoint-N`` keeps its path relative to it (nested folders too)
    under the asset name ``checkpoint-N``: nothing merged, nothing flattened."""
    callback = callback_for(embedded)
    recorder = app.RecordSaves()
    trainer = NestedCheckpointTrainer(
        model=app.make_model(),
        train_dataset=app.Tokens(),
        args=app.make_args(tmp_path / "out", max_steps=4, save_total_limit=None),
        callbacks=[callback, recorder],
    )
    trainer.train()
    run = only_run(embedded)
    assets = {a.name: a.sha256 for a in run.assets()}
    assert assets == recorder.files
    for step in (2, 4):
        assert {
            f"checkpoint-{step}/part.bin",
            f"checkpoint-{step}/shards/part.bin",
            f"checkpoint-{step}/shards/deeper/part.bin",
        } <= set(assets)
    for rel in ("part.bin", "shards/part.bin", "shards/deeper/part.bin"):
        got = run.download_asset(f"checkpoint-4/{rel}", tmp_path / rel.replace("/", "_"))
        assert got.read_bytes() == f"{rel} at 4".encode()


def test_early_stopping_is_success(embedded: Chronicle, tmp_path: Path) -> None:
    callback = callback_for(embedded)
    trainer = app.make_trainer(tmp_path / "out", [callback, app.StopAt(3)], max_steps=20)
    trainer.train()
    assert trainer.state.global_step == 3
    assert only_run(embedded).state is RunState.SUCCEEDED


def test_early_stopping_callback_on_eval_is_success(embedded: Chronicle, tmp_path: Path) -> None:
    callback = callback_for(embedded)
    trainer = app.make_trainer(
        tmp_path / "out",
        [callback, EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)],
        eval_dataset=app.Tokens(8),
        max_steps=40,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    trainer.train()
    assert trainer.state.global_step < 40
    assert only_run(embedded).state is RunState.SUCCEEDED


# ------------------------------------------------------------------------------- crashes
def _model_failing_to_save() -> Any:
    class FailingSave(app.BertForSequenceClassification):  # type: ignore[misc,valid-type]
        saves = 0

        def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
            type(self).saves += 1
            if type(self).saves >= 2:
                raise OSError("No space left on device (simulated)")
            super().save_pretrained(*args, **kwargs)

    base = app.make_model()
    model = FailingSave(base.config)
    model.load_state_dict(base.state_dict())
    return model


CRASHES: dict[str, tuple[Callable[[], dict[str, Any]], type[BaseException], str]] = {
    "dataset": (lambda: {"dataset": app.Tokens(fail_after=13)}, RuntimeError, "dataset exploded"),
    "callback": (
        lambda: {"callbacks": [app.RaiseAt("on_step_end", 3, ValueError("callback says no"))]},
        ValueError,
        "callback says no",
    ),
    "saving": (lambda: {"model": _model_failing_to_save()}, OSError, "No space left on device"),
}


@pytest.mark.parametrize("where", sorted(CRASHES))
def test_exception_is_failed_crash(chronicle: Chronicle, tmp_path: Path, where: str) -> None:
    make, exc_type, text = CRASHES[where]
    kwargs = make()
    callback = callback_for(chronicle)
    trainer = app.make_trainer(
        tmp_path / "out", [callback, *kwargs.pop("callbacks", [])], max_steps=8, **kwargs
    )
    with pytest.raises(exc_type, match=text):
        trainer.train()
    info = only_run(chronicle, callback).info()
    assert info.state is RunState.FAILED_CRASH
    assert info.reason == "crash"
    assert info.message is not None
    assert info.message.startswith(f"{exc_type.__name__}: ")
    assert text in info.message
    assert "Traceback" in info.message


def test_swallowed_exception_is_still_failed_crash(chronicle: Chronicle, tmp_path: Path) -> None:
    callback = callback_for(chronicle)
    trainer = app.make_trainer(
        tmp_path / "out", [callback], dataset=app.Tokens(fail_after=9), max_steps=8
    )
    swallowed: Exception | None = None
    try:
        trainer.train()
    except RuntimeError as exc:  # the user's code swallows it; the run must not look fine
        swallowed = exc
    assert "dataset exploded" in str(swallowed)
    info = only_run(chronicle, callback).info()
    assert info.state is RunState.FAILED_CRASH
    assert "dataset exploded" in (info.message or "")


def run_named(client: Chronicle, name: str) -> Any:
    """The one run of the experiment called ``name``."""
    (exp,) = [e.experiment_id for e in client.experiments() if e.name == name]
    runs = client.runs(experiment_id=exp)
    assert len(runs) == 1, runs
    return client.run(exp, runs[0].variation, runs[0].run)


@pytest.fixture(params=["embedded", "server"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Where a child process tracks: the embedded store in ``tmp_path/home`` or a real
    server subprocess (as ``$CHRONICLE_URL``)."""
    if request.param == "server":
        yield {"CHRONICLE_URL": request.getfixturevalue("server_url")}
    else:
        yield {}


def client_for(env: dict[str, str], tmp_path: Path) -> Chronicle:
    """A client reading what a child with ``child_env(tmp_path, **env)`` tracked."""
    if "CHRONICLE_URL" in env:
        return Chronicle(url=env["CHRONICLE_URL"], home=tmp_path / "reader")
    return Chronicle(home=tmp_path / "home")


@pytest.mark.parametrize("how", ["crash", "thread"])
def test_added_callback_records_an_uncaught_crash(
    store_env: dict[str, str], tmp_path: Path, how: str
) -> None:
    """``trainer.add_callback(ChronicleTrainerCallback())`` (HF's documented way) and an
    uncaught exception mid-train: failed_crash with the exception's message and traceback,
    not a run left ``running`` for the watchdog."""
    name = f"added-{how}-{tmp_path.name}"
    env = child_env(tmp_path, **store_env)
    out = tmp_path / "child"
    proc = subprocess.run(
        [sys.executable, str(APP), "added", str(out), how, name],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
        start_new_session=True,
    )
    assert "dataset exploded" in proc.stderr, proc.stderr
    if how == "crash":
        assert proc.returncode == 1, proc.stderr
    with client_for(store_env, tmp_path) as client:
        info = run_named(client, name).info()
        assert info.state is RunState.FAILED_CRASH, proc.stderr
        assert info.reason == "crash"
        assert (info.message or "").startswith("RuntimeError: dataset exploded"), info.message
        assert "Traceback" in (info.message or "")


def test_added_callback_exception_caught_by_the_program_is_failed_crash_at_exit(
    tmp_path: Path,
) -> None:
    """The program catches the exception and exits normally: the exception was never seen
    (train() was not wrapped yet), but at exit the run is recorded failed_crash saying
    so, not left ``running``."""
    out = tmp_path / "child"
    proc = subprocess.run(
        [sys.executable, str(APP), "added", str(out), "catch", "caught"],
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr
    caught = json.loads((out / "caught.json").read_text())
    assert "dataset exploded" in caught["error"]
    with Chronicle(home=tmp_path / "home") as client:
        info = run_named(client, "caught").info()
        assert info.state is RunState.FAILED_CRASH, proc.stderr
        assert "did not finish" in (info.message or "")
        assert "before the process exited" in (info.message or "")


def test_added_callback_caught_exception_then_train_again(
    embedded: Chronicle, tmp_path: Path
) -> None:
    """Caught, then ``train()`` again (a notebook): the first run is recorded failed_crash
    when the second call starts, and the second call (now wrapped) is a run of its own."""
    callback = callback_for(embedded)
    dataset = app.Tokens(fail_after=9)
    trainer = app.make_trainer(tmp_path / "out", [], dataset=dataset, max_steps=8)
    trainer.add_callback(callback)
    with pytest.raises(RuntimeError, match="dataset exploded"):
        trainer.train()
    first = callback.run
    assert first is not None
    dataset.fail_after = None
    trainer.train()
    second = callback.run
    assert second is not None and second.key != first.key
    info = first.info()
    assert info.state is RunState.FAILED_CRASH
    assert "before this train() call started" in (info.message or "")
    assert second.state is RunState.SUCCEEDED
    assert getattr(trainer.train, "_chronicle_callback", None) is callback  # wrapped now


def test_keyboard_interrupt_is_failed_abandoned(tmp_path: Path) -> None:
    code, output, ready = signal_child(tmp_path, signal.SIGINT)
    assert code != 0, output
    assert "KeyboardInterrupt" in output
    with Chronicle(home=tmp_path / "home") as client:
        run = only_run(client)
        assert run.key == ready["key"]
        assert run.state is RunState.FAILED_ABANDONED, output
        assert run.info().reason == "abandoned"


# ------------------------------------------------------------------------ pre-emption, resume
def test_sigterm_leaves_the_run_resumable_and_resume_continues_it(tmp_path: Path) -> None:
    code, output, ready = signal_child(tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output
    with Chronicle(home=tmp_path / "home") as client:
        run = only_run(client)
        assert run.key == ready["key"]
        assert run.state is RunState.RUNNING, output  # no terminal transition: resumable
        # the uploads were flushed before the process exited
        assert {a.name.split("/")[0] for a in run.assets()} == {"checkpoint-2"}

        # A restarted worker resumes from the checkpoint: same run, not a new one.
        callback = callback_for(client)
        trainer = app.make_trainer(tmp_path / "child" / "output", [callback], max_steps=20)
        trainer.train(resume_from_checkpoint=True)
        assert callback.run is not None and callback.run.key == run.key
        assert len(client.runs()) == 1
        assert run.state is RunState.SUCCEEDED
        assert ("running", "running", "resume") in transitions(run)
        assert "checkpoint-20/model.safetensors" in {a.name for a in run.assets()}


@pytest.mark.parametrize("restore_states", [False, True])
def test_resume_from_checkpoint_continues_the_same_run(
    embedded: Chronicle, tmp_path: Path, restore_states: bool
) -> None:
    out = tmp_path / "out"
    first = callback_for(embedded)
    trainer = app.make_trainer(
        out, [first, app.RaiseAt("on_step_end", 3, SystemExit(143))], max_steps=6
    )
    with pytest.raises(SystemExit):  # a scheduler's pre-emption: not a crash
        trainer.train()
    run = only_run(embedded)
    assert run.state is RunState.RUNNING
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    ident = saved["stateful_callbacks"]["ChronicleTrainerCallback"]["attributes"]["_saved_run"]
    assert (ident["experiment_id"], ident["variation"], ident["run"]) == run.key_tuple

    second = callback_for(embedded)
    resumed = app.make_trainer(
        out, [second], max_steps=6, restore_callback_states_from_checkpoint=restore_states
    )
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 6
    assert len(embedded.runs()) == 1
    assert run.state is RunState.SUCCEEDED
    assert transitions(run)[-2:] == [
        ("running", "running", "resume"),
        ("running", "succeeded", "succeed"),
    ]
    names = {a.name.split("/")[0] for a in run.assets()}
    assert names == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}


def test_continuing_a_succeeded_run_makes_a_new_run_of_its_variation(
    embedded: Chronicle, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = callback_for(embedded)
    app.make_trainer(out, [first], max_steps=2).train()
    assert first.run is not None and first.run.state is RunState.SUCCEEDED
    second = callback_for(embedded)
    app.make_trainer(out, [second], max_steps=4).train(
        resume_from_checkpoint=str(out / "checkpoint-2")
    )
    assert second.run is not None
    assert second.run.key_tuple == (first.run.experiment_id, first.run.variation, 1)
    assert second.run.state is RunState.SUCCEEDED
    assert first.run.state is RunState.SUCCEEDED  # terminal states never change


@pytest.mark.parametrize("origin", ["ended", "another_chronicle"])
def test_resuming_an_unresumable_run_logs_one_clear_warning(
    embedded: Chronicle, tmp_path: Path, caplog: pytest.LogCaptureFixture, origin: str
) -> None:
    """The checkpoint's run already ended, or this store never had it. Was: "starting the
    run failed ...; training continues without it" then "tracking a new run instead" (two
    lines contradicting each other; for another Chronicle's run, no tracking at all)."""
    out = tmp_path / "out"
    writer = embedded if origin == "ended" else Chronicle(home=tmp_path / "elsewhere")
    first = callback_for(writer)
    app.make_trainer(out, [first], max_steps=2).train()
    assert first.run is not None
    old_key = first.run.key
    if writer is not embedded:
        writer.close()
    caplog.clear()
    second = callback_for(embedded)
    app.make_trainer(out, [second], max_steps=4).train(
        resume_from_checkpoint=str(out / "checkpoint-2")
    )
    assert second.run is not None and second.run.state is RunState.SUCCEEDED
    why, where = (
        ("already succeeded", " of the same variation")
        if origin == "ended"
        else ("is unknown to this Chronicle", "")
    )
    assert [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("chronicle_integrations") and r.levelno >= logging.WARNING
    ] == [
        f"chronicle: the checkpoint's run {old_key} {why}, so it cannot be resumed; this "
        f"training is tracked as new run {second.run.key}{where}"
    ]


def test_resume_from_a_checkpoint_written_without_the_callback(
    embedded: Chronicle, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    app.make_trainer(out, [], max_steps=2).train()
    callback = callback_for(embedded)
    trainer = app.make_trainer(out, [callback], max_steps=4)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))  # must not break saving
    run = only_run(embedded)
    assert run.state is RunState.SUCCEEDED
    assert "checkpoint-4/trainer_state.json" in {a.name for a in run.assets()}


# ------------------------------------------------------------------------------- cancellation
def test_server_side_cancel_stops_training(chronicle: Chronicle, tmp_path: Path) -> None:
    other = (
        Chronicle(url=chronicle.url, home=tmp_path / "other")
        if chronicle.url
        else Chronicle(home=tmp_path / "home")
    )
    try:
        callback = callback_for(chronicle)
        trainer = app.make_trainer(
            tmp_path / "out", [callback, app.CancelAt(callback, other, 3)], max_steps=30
        )
        trainer.train()
    finally:
        other.close()
    assert callback.run is not None and callback.run.cancelled.is_set()
    assert trainer.state.global_step < 30
    info = only_run(chronicle, callback).info()
    assert info.state is RunState.FAILED_ABANDONED
    assert info.message == "cancelled by the agent"


# ------------------------------------------------------------------------------- robustness
def test_tracking_server_down_does_not_harm_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = Chronicle(url=f"http://127.0.0.1:{free_port()}", home=tmp_path / "home", timeout=2)
    try:
        callback = callback_for(client)
        trainer = app.make_trainer(tmp_path / "out", [callback], max_steps=4)
        output = trainer.train()
    finally:
        client.close(timeout=5)
    assert output.global_step == 4
    assert callback.run is None
    assert any("chronicle:" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_strict_raises_tracking_errors(tmp_path: Path) -> None:
    from chronicle_integrations._errors import ChronicleError

    client = Chronicle(url=f"http://127.0.0.1:{free_port()}", home=tmp_path / "home", timeout=1)
    try:
        trainer = app.make_trainer(tmp_path / "out", [callback_for(client, strict=True)])
        with pytest.raises(ChronicleError):
            trainer.train()
    finally:
        client.close(timeout=5)


def test_run_owned_by_a_launcher_is_not_ended_by_the_callback(
    embedded: Chronicle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = embedded.create_experiment("launched", variations=[{}])
    run = embedded.create_run(exp, 0).start()  # the launcher started it and holds the lease
    assert run.lease is not None
    for name, value in (
        ("EXPERIMENT", exp),
        ("VARIATION", "0"),
        ("RUN", str(run.run)),
        ("LEASE", run.lease),
    ):
        monkeypatch.setenv(f"CHRONICLE_{name}", value)
    callback = callback_for(embedded)
    app.make_trainer(tmp_path / "out", [callback], max_steps=2).train()
    assert callback.run is not None and callback.run.key == run.key
    assert run.state is RunState.RUNNING  # the launcher records the outcome
    assert {a.name.split("/")[0] for a in run.assets()} == {"checkpoint-2"}


def test_callback_is_picklable_and_validates_its_arguments() -> None:
    import pickle

    callback = pickle.loads(pickle.dumps(ChronicleTrainerCallback(experiment_id="e", variation=0)))
    assert (callback.experiment_id, callback.variation) == ("e", 0)
    with pytest.raises(ValueError, match="run= needs"):
        ChronicleTrainerCallback(run=3)


def test_missing_transformers_gives_an_install_hint() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import chronicle_integrations.transformers\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = testkit.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'chronicle-integrations[transformers]'" in out.stdout, out.stderr


def test_explicit_identity_and_explicit_attach(embedded: Chronicle, tmp_path: Path) -> None:
    exp = embedded.create_experiment("explicit", variations=[{"lr": 0.1}])
    pending = embedded.create_run(exp, 0)
    callback = callback_for(embedded, experiment_id=exp, variation=0, run=pending.run)
    trainer = app.make_trainer(tmp_path / "out", [], dataset=app.Tokens(fail_after=5))
    trainer.add_callback(callback)  # after construction: on_init_end never saw it
    with pytest.raises(RuntimeError), track(trainer, callback):
        trainer.train()
    assert pending.state is RunState.FAILED_CRASH
    assert len(embedded.runs()) == 1


def test_second_train_call_is_a_new_run_of_the_same_experiment(
    embedded: Chronicle, tmp_path: Path
) -> None:
    callback = callback_for(embedded)
    trainer = app.make_trainer(tmp_path / "out", [callback], max_steps=2)
    trainer.train()
    first = callback.run
    trainer.train()
    second = callback.run
    assert first is not None and second is not None
    assert first.experiment_id == second.experiment_id
    assert (first.variation, second.variation) == (0, 1)
    assert first.state is RunState.SUCCEEDED and second.state is RunState.SUCCEEDED


@pytest.mark.parametrize("attached", [True, False])
def test_optuna_pruned_trials_are_failed_abandoned(
    embedded: Chronicle, tmp_path: Path, attached: bool
) -> None:
    """A real ``Trainer.hyperparameter_search(backend="optuna")`` whose pruner prunes trials
    0 and 2 at their first evaluation: pruning is the search cancelling a trial, not a
    crash. Added late (``attached=False``), trial 0 runs unwrapped: its pruning is seen in
    ``on_train_end``, which optuna's pruning calls before raising ``TrialPruned``."""
    optuna = pytest.importorskip("optuna")

    class PruneEven(optuna.pruners.BasePruner):  # type: ignore[misc]
        def prune(self, study: Any, trial: Any) -> bool:
            return bool(trial.number % 2 == 0)

    callback = callback_for(embedded)
    trainer = app.Trainer(
        model_init=lambda *_: app.make_model(),
        args=app.make_args(
            tmp_path / "out", max_steps=4, eval_strategy="steps", eval_steps=2, save_steps=2
        ),
        train_dataset=app.Tokens(),
        eval_dataset=app.Tokens(8),
        callbacks=[callback] if attached else [],
    )
    if not attached:
        trainer.add_callback(callback)
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2)},
        backend="optuna",
        n_trials=4,
        direction="minimize",
        pruner=PruneEven(),
    )
    runs = sorted(embedded.runs(), key=lambda r: r.variation)
    assert len({r.experiment_id for r in runs}) == 1  # one experiment, a variation per trial
    assert [(r.variation, r.state) for r in runs] == [
        (0, RunState.FAILED_ABANDONED),
        (1, RunState.SUCCEEDED),
        (2, RunState.FAILED_ABANDONED),
        (3, RunState.SUCCEEDED),
    ]
    for info in (runs[0], runs[2]):
        assert (info.reason, info.message) == ("abandoned", "pruned by optuna at step 2")
    # Each trial records its objective (eval_loss here) and its eval metrics.
    for info in runs:
        assert {"objective", "eval_loss"} <= set(info.metrics or {}), info.metrics
        assert info.metrics["objective"]["last"] == info.metrics["eval_loss"]["last"]
    best = embedded.best(runs[0].experiment_id, "objective", "min")
    assert best.variation in (1, 3)  # only succeeded trials count


class TrialDirTrainer(app.Trainer):  # type: ignore[misc]
    """Saves like a hyperparameter-search trial: into ``output_dir/run-3/checkpoint-N``
    (what ``_get_output_dir`` returns under optuna/ray/wandb, none of which is installed)."""

    def _get_output_dir(self, trial: Any) -> str:
        return os.path.join(self.args.output_dir, "run-3")


@pytest.mark.parametrize("attached", [True, False])
def test_trial_checkpoint_folders_are_found(
    embedded: Chronicle, tmp_path: Path, attached: bool, caplog: pytest.LogCaptureFixture
) -> None:
    callback = callback_for(embedded)
    trainer = TrialDirTrainer(
        model=app.make_model(),
        train_dataset=app.Tokens(),
        args=app.make_args(tmp_path / "out", max_steps=4),
        callbacks=[callback] if attached else [],
    )
    if not attached:  # added late and not attached: no Trainer at hand, folders are searched
        trainer.add_callback(callback)
    trainer.train()
    run = only_run(embedded)
    assert run.state is RunState.SUCCEEDED  # unattached: recorded by on_train_end
    assert {a.name.split("/")[0] for a in run.assets()} == {"checkpoint-2", "checkpoint-4"}
    assert (tmp_path / "out" / "run-3" / "checkpoint-4").is_dir()
    unwrapped = [r for r in caplog.records if "is not wrapped" in r.getMessage()]
    assert bool(unwrapped) is not attached


# ------------------------------------------------------------------------------- processes
def test_sigterm_with_jit_checkpoint_uploads_it(tmp_path: Path) -> None:
    """``enable_jit_checkpoint=True``: transformers saves a checkpoint after SIGTERM (without
    ``on_save``) and returns normally; the run is left resumable with that checkpoint."""
    code, output, _ = signal_child(tmp_path, signal.SIGTERM, "--jit")
    assert code == 0, output  # transformers handled SIGTERM: train() returned
    result = json.loads((tmp_path / "child" / "result.json").read_text())
    assert result["global_step"] < 200
    folders = sorted(
        (tmp_path / "child" / "output").glob("checkpoint-*"),
        key=lambda p: int(p.name.split("-")[1]),
    )
    assert len(folders) == 1  # save_steps=1000: the only checkpoint is the JIT one
    last = folders[0]
    assert not (last / "checkpoint-is-incomplete.txt").exists()
    with Chronicle(home=tmp_path / "home") as client:
        run = only_run(client)
        assert run.state is RunState.RUNNING, output
        assets = {a.name: a.sha256 for a in run.assets()}
        on_disk = {
            f"{last.name}/{f.relative_to(last).as_posix()}": app.digest(f)
            for f in last.rglob("*")
            if f.is_file()
        }
        assert on_disk and assets == on_disk


def torchrun(tmp_path: Path, *args: str) -> tuple[Path, str]:
    exe = Path(sys.executable).with_name("torchrun")
    if not exe.exists():
        pytest.skip("torchrun is not installed")
    out = tmp_path / "ddp"
    proc = testkit.run(
        [
            str(exe),
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(APP),
            "ddp",
            str(out),
            *args,
        ],
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        timeout=240,
    )
    output = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, output
    return out, output


def test_torchrun_two_processes_one_run(tmp_path: Path) -> None:
    out, _ = torchrun(tmp_path)
    result = json.loads((out / "result.json").read_text())
    recorded = json.loads((out / "files.json").read_text())
    with Chronicle(home=tmp_path / "home") as client:
        run = only_run(client)  # one run for two processes
        assert run.key == result["key"]
        assert run.state is RunState.SUCCEEDED
        assets = {a.name: a.sha256 for a in run.assets()}
        # one set of uploads, with every rank's files: rank 1 writes rng_state_1.pth late
        # (SlowRankOneTrainer); the barrier in on_save makes rank 0 wait for it
        assert assets == recorded
        for step in (2, 4):
            assert {
                f"checkpoint-{step}/rng_state_0.pth",
                f"checkpoint-{step}/rng_state_1.pth",
            } <= set(assets)
        assert [cause for _, _, cause in transitions(run)] == ["create", "start", "succeed"]


def test_torchrun_cancel_stops_every_rank(tmp_path: Path) -> None:
    out, _ = torchrun(tmp_path, "--cancel")  # a hang would time out instead
    result = json.loads((out / "result.json").read_text())
    assert result["global_step"] < 40
    with Chronicle(home=tmp_path / "home") as client:
        run = only_run(client)
        assert run.state is RunState.FAILED_ABANDONED
