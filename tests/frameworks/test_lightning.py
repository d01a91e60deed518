"""Real Lightning fits on CPU, tracked by ``ChronicleCallback``, against the embedded store
and a real server.

The training itself is in ``_lightning_app.py``: a 4-feature regression MLP, 64 samples,
4 steps per epoch, two recording checkpoint callbacks (epoch-level top-2 + last, and a
step-level top-2 that evicts inside the save call writing its replacement). Signals,
``KeyboardInterrupt`` and DDP run the same app as a script in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
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

from chronicle_integrations import Chronicle, Run, RunState

pytest.importorskip("lightning")
pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))
import _lightning_app as app_module

pytestmark = [pytest.mark.frameworks, pytest.mark.filterwarnings("ignore")]

APP = Path(__file__).with_name("_lightning_app.py")
STEPS = app_module.STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def app() -> Any:
    return app_module.build("lightning")


@pytest.fixture(scope="module")
def shared_server(module_server_factory: Any) -> Any:
    return module_server_factory()


@pytest.fixture(params=["embedded", "http"])
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Chronicle]]:
    """Opens clients on one store: the embedded home, or a real server (shared per module)."""
    server = request.getfixturevalue("shared_server") if request.param == "http" else None
    clients: list[Chronicle] = []

    def make(**kwargs: Any) -> Chronicle:
        if server is None:
            client = Chronicle(home=tmp_path / "home", **kwargs)
        else:
            client = Chronicle(url=server.url, home=tmp_path / f"home{len(clients)}", **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close(timeout=10)


@pytest.fixture(params=["embedded", "http"])
def env_store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The environment names the store (the embedded home, or a real server) and no run:
    the callback makes its own client, as for a user who passes nothing. Returns the home."""
    for var in ("CHRONICLE_EXPERIMENT", "CHRONICLE_VARIATION", "CHRONICLE_RUN"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("CHRONICLE_HOME", str(home))
    if request.param == "http":
        monkeypatch.setenv("CHRONICLE_URL", request.getfixturevalue("shared_server").url)
    else:
        monkeypatch.delenv("CHRONICLE_URL", raising=False)
    return home


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Chronicle]:
    client = Chronicle(home=tmp_path / "home")
    yield client
    client.close(timeout=10)


def fit(
    app: Any,
    root: Path,
    chronicle: Chronicle | None,
    epochs: int = 3,
    model_kwargs: dict[str, Any] | None = None,
    extra: list[Any] | None = None,
    checkpoints: list[Any] | None = None,
    **cb_kwargs: Any,
) -> tuple[Any, Any, list[Any], BaseException | None]:
    """Fit once; returns (trainer, chronicle callback, checkpoint callbacks, exception)."""
    cb_kwargs.setdefault("heartbeat_interval", 0.2)
    cb = app.ChronicleCallback(chronicle=chronicle, **cb_kwargs)
    cks = app.checkpoints(root) if checkpoints is None else checkpoints
    trainer = app.trainer(root, [cb, *cks, *(extra or [])], epochs=epochs)
    error = None
    try:
        trainer.fit(app.Model(**(model_kwargs or {})), datamodule=app.Data())
    except Exception as exc:
        error = exc
    return trainer, cb, cks, error


def saved_files(cks: list[Any]) -> list[dict[str, str]]:
    return [entry for ck in cks for entry in ck.saved]


def assert_every_checkpoint_uploaded(run: Run, saved: list[dict[str, str]]) -> None:
    """Each version of each file written is an upload event with its digest, the final
    assets hold each name's last version, and some of them were evicted locally."""
    uploads = [(e.detail or {}).get("name") for e in run.events() if e.kind == "asset"]
    digests = {
        ((e.detail or {}).get("name"), (e.detail or {}).get("sha256"))
        for e in run.events()
        if e.kind == "asset"
    }
    missing = [s for s in saved if (s["name"], s["sha256"]) not in digests]
    assert not missing, f"checkpoint versions never uploaded: {missing}"
    assets = {a.name: a.sha256 for a in run.assets()}
    final = {s["name"]: s["sha256"] for s in saved}
    assert len(uploads) == len(digests), f"a version was uploaded twice: {uploads}"
    assert assets == final
    evicted = [s for s in saved if not Path(s["path"]).exists()]
    assert len(evicted) >= 2, "the scenario should evict top-k files"
    versions_of_last = [s for s in saved if s["name"] == "checkpoints/last.ckpt"]
    assert len(versions_of_last) >= 3
    last_file = Path(versions_of_last[-1]["path"])
    assert app_module.sha256(last_file) == assets["checkpoints/last.ckpt"]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


# ----------------------------------------------------------------------------- in-process fits
def test_fit_succeeds_with_every_checkpoint(
    app: Any, tmp_path: Path, connect: Callable[..., Chronicle]
) -> None:
    trainer, cb, cks, error = fit(app, tmp_path / "root", connect(), epochs=4)
    assert error is None
    assert trainer.global_step == 4 * STEPS
    run = cb.run
    info = run.info()
    assert info.state is RunState.SUCCEEDED
    # The training step is reported to the client, whose heartbeats carry it.
    assert run.progress.snapshot() == {"step": 4 * STEPS, "epoch": 3}
    assert run.get_variation_config() == {"hidden": 8, "lr": 0.05, "batch_size": 16}
    assert_every_checkpoint_uploaded(run, saved_files(cks))
    # The callback state in the final checkpoint names the run (for resume).
    import torch

    state = torch.load(tmp_path / "root/checkpoints/last.ckpt", weights_only=False)
    assert state["callbacks"]["ChronicleCallback"] == dict(
        zip(("experiment_id", "variation", "run"), run.key_tuple, strict=True)
    )


def test_newest_last_ckpt_wins_when_an_older_upload_finishes_last(
    app: Any, tmp_path: Path, embedded: Chronicle
) -> None:
    """The client uploads in parallel: hold the first ``last.ckpt`` upload back while later
    versions are queued; the asset must still end as the final ``last.ckpt`` (the client keeps
    same-name uploads in submission order)."""
    upload = embedded._pool._upload
    delayed: list[str] = []

    def slow_first_last(task: Any) -> Any:
        if task.staged.name == "checkpoints/last.ckpt" and not delayed:
            delayed.append(task.staged.name)
            time.sleep(1.5)
        return upload(task)

    embedded._pool._upload = slow_first_last
    _, cb, cks, error = fit(app, tmp_path / "root", embedded, epochs=3)
    assert error is None and delayed
    assert cb.run.state is RunState.SUCCEEDED
    assert_every_checkpoint_uploaded(cb.run, saved_files(cks))


def test_checkpoints_in_sub_folders_keep_their_relative_paths(
    app: Any, tmp_path: Path, connect: Callable[..., Chronicle]
) -> None:
    """``filename="{epoch}-{val/loss:.2f}"`` writes ``ckpts/epoch=0-val/loss=1.00.ckpt``: one
    sub-folder per epoch. Epochs 0 and 1 log the same loss (same file name, different
    folders), epoch 2 another one: every file is its own asset, with its own bytes."""
    root = tmp_path / "root"
    ck = app.RecordingCheckpoint(
        dirpath=root / "ckpts",
        monitor="val/loss",
        filename="{epoch}-{val/loss:.2f}",
        save_top_k=-1,
    )
    _, cb, _, error = fit(
        app,
        root,
        connect(),
        epochs=3,
        model_kwargs={"val_losses": [1.0, 1.0, 2.0]},
        checkpoints=[ck],
    )
    assert error is None
    assert cb.run.state is RunState.SUCCEEDED
    expected = {s["name"]: s["sha256"] for s in ck.saved}
    assert sorted(expected) == [
        "ckpts/epoch=0-val/loss=1.00.ckpt",
        "ckpts/epoch=1-val/loss=1.00.ckpt",
        "ckpts/epoch=2-val/loss=2.00.ckpt",
    ]
    assert {a.name: a.sha256 for a in cb.run.assets()} == expected


@pytest.mark.parametrize("fail", [None, "train@5"])
def test_the_run_ends_showing_its_final_progress(
    app: Any, tmp_path: Path, connect: Callable[..., Chronicle], fail: str | None
) -> None:
    """The final (step, epoch) goes with ``succeed`` / ``fail``: a finished run shows where it
    ended. Heartbeats are an hour apart, so only the terminal transition can carry it."""
    _, cb, _, error = fit(
        app,
        tmp_path / "root",
        connect(),
        epochs=3,
        model_kwargs={"fail": fail},
        checkpoints=[],
        heartbeat_interval=3600,
    )
    info = cb.run.info()
    if fail is None:
        assert error is None and info.state is RunState.SUCCEEDED
        assert info.progress == {"step": 3 * STEPS, "epoch": 2}
    else:
        assert error is not None and info.state is RunState.FAILED_CRASH
        assert info.progress == {"step": 5, "epoch": 1}


def test_pytorch_lightning_namespace(tmp_path: Path, embedded: Chronicle) -> None:
    pytest.importorskip("pytorch_lightning")
    pl_app = app_module.build("pytorch_lightning")
    import pytorch_lightning

    assert isinstance(pl_app.ChronicleCallback(), pytorch_lightning.Callback)
    _, cb, cks, error = fit(pl_app, tmp_path / "root", embedded, epochs=4)
    assert error is None
    assert cb.run.state is RunState.SUCCEEDED
    assert_every_checkpoint_uploaded(cb.run, saved_files(cks))


def test_weights_only_checkpoints_are_caught_without_on_save_checkpoint(
    app: Any, tmp_path: Path, embedded: Chronicle
) -> None:
    """``save_weights_only=True`` skips ``Callback.on_save_checkpoint``: the scans of the
    other hooks must still catch every file before its eviction."""
    root = tmp_path / "root"
    cks = [
        app.RecordingCheckpoint(
            dirpath=root / "checkpoints",
            monitor="val_score",
            mode="max",
            save_top_k=2,
            save_last=True,
            filename="{epoch}",
            save_weights_only=True,
        ),
        app.RecordingCheckpoint(
            dirpath=root / "steps",
            monitor="step",
            mode="max",
            save_top_k=1,
            every_n_train_steps=2,
            filename="{step}",
            save_weights_only=True,
        ),
    ]
    _, cb, _, error = fit(app, root, embedded, epochs=4, checkpoints=cks)
    assert error is None
    assert cb.run.state is RunState.SUCCEEDED
    assert_every_checkpoint_uploaded(cb.run, saved_files(cks))


def test_best_and_last_uploads_only_those(app: Any, tmp_path: Path, embedded: Chronicle) -> None:
    _, cb, cks, error = fit(app, tmp_path / "root", embedded, upload="best_and_last")
    assert error is None
    names = sorted(a.name for a in cb.run.assets())
    expected = sorted(
        {
            f"{Path(ck.dirpath).name}/{Path(p).name}"
            for ck in cks
            for p in (ck.best_model_path, ck.last_model_path)
            if p
        }
    )
    assert names == expected


@pytest.mark.parametrize(
    "backend, where, message",
    [
        ("embedded", "train@5", "RuntimeError: boom in train at step 5"),
        ("http", "train@5", "RuntimeError: boom in train at step 5"),
        ("embedded", "setup", "RuntimeError: boom in setup"),
        ("embedded", "sanity", "ValueError: boom in the sanity check"),
    ],
)
def test_exception_marks_the_run_crashed(
    app: Any, tmp_path: Path, backend: str, where: str, message: str, request: pytest.FixtureRequest
) -> None:
    if backend == "http":
        server = request.getfixturevalue("shared_server")
        chronicle = Chronicle(url=server.url, home=tmp_path / "home")
    else:
        chronicle = Chronicle(home=tmp_path / "home")
    try:
        _, cb, _, error = fit(app, tmp_path / "root", chronicle, model_kwargs={"fail": where})
        assert error is not None and message.split(": ", 1)[1] in str(error)
        info = cb.run.info()
        assert info.state is RunState.FAILED_CRASH
        assert info.reason == "crash"
        assert info.message.startswith(message)
        assert "Traceback" in info.message
        if where == "train@5":  # the checkpoints written before the crash are there
            assert {a.name for a in cb.run.assets()} >= {"checkpoints/last.ckpt"}
    finally:
        chronicle.close(timeout=10)


def test_cancel_stops_training_and_stays_abandoned(
    app: Any, tmp_path: Path, connect: Callable[..., Chronicle]
) -> None:
    operator = connect()
    pl = app.pl

    class Canceller(pl.Callback):
        """At step 3 an operator cancels the run (``chronicle cancel``)."""

        def __init__(self, chronicle_cb: Any) -> None:
            self.chronicle_cb = chronicle_cb
            self.done = False

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3 and not self.done:
                self.done = True
                key = self.chronicle_cb.run.key_tuple
                operator.run(*key).fail("abandoned", "cancelled by the operator")
                wait_for(
                    lambda: self.chronicle_cb.run.cancelled.is_set(),
                    20,
                    "the heartbeat to notice the cancellation",
                )

    cb = app.ChronicleCallback(chronicle=connect(), heartbeat_interval=0.2)
    cks = app.checkpoints(tmp_path / "root")
    trainer = app.trainer(tmp_path / "root", [cb, Canceller(cb), *cks], epochs=30)
    trainer.fit(app.Model(), datamodule=app.Data())
    assert trainer.global_step < 10 * STEPS  # stopped early, not after 30 epochs
    info = cb.run.info()
    assert info.state is RunState.FAILED_ABANDONED
    assert info.message == "cancelled by the operator"
    assert not any(e.to_state == "succeeded" for e in cb.run.events())


def test_validate_and_test_after_fit_do_not_touch_the_run(
    app: Any, tmp_path: Path, embedded: Chronicle
) -> None:
    trainer, cb, _, error = fit(app, tmp_path / "root", embedded, epochs=2)
    assert error is None
    run = cb.run
    before = (run.info(), len(run.events()), len(run.assets()))
    trainer.validate(datamodule=app_module.build("lightning").Data(), ckpt_path="last")
    trainer.test(datamodule=app.Data(), ckpt_path="best")
    with pytest.raises(RuntimeError):  # an exception in validate is not the fit's
        trainer.validate(app.Model(fail="val"), datamodule=app.Data())
    after = (run.info(), len(run.events()), len(run.assets()))
    assert after[0].state is RunState.SUCCEEDED
    assert after[0].ended_at == before[0].ended_at
    assert after[1:] == before[1:]
    assert len(embedded.runs()) == 1


def test_server_down_for_the_whole_fit(
    app: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The run cannot even be created: training completes, one WARNING says tracking is off.
    Nothing is spooled: there is no run a spooled ``succeed`` could apply to (a run number is
    assigned by the server, and ``succeed`` needs a started run)."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = Chronicle(url=f"http://127.0.0.1:{port}", home=tmp_path / "home", timeout=1)
    try:
        with caplog.at_level(logging.WARNING, logger="chronicle_integrations"):
            trainer, cb, _, error = fit(app, tmp_path / "root", client, epochs=2)
        assert error is None
        assert trainer.global_step == 2 * STEPS
        assert cb.run is None
        warnings = [
            r
            for r in caplog.records
            if r.name.startswith("chronicle_integrations") and r.levelno == logging.WARNING
        ]
        assert len(warnings) == 1 and "training continues" in warnings[0].getMessage()
        assert client.spool.entries() == []
    finally:
        client.close(timeout=5)


def test_server_lost_mid_fit_spools_what_sync_sends(
    app: Any, tmp_path: Path, server_factory: Any
) -> None:
    """The server dies after the run started: training completes; the uploads and the
    ``succeed`` go to the spool; ``chronicle sync`` delivers them once it is back."""
    server = server_factory()
    client = Chronicle(url=server.url, home=tmp_path / "home", timeout=1)
    pl = app.pl

    class KillServer(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.current_epoch == 1:
                server.kill()

    try:
        trainer, cb, cks, error = fit(
            app, tmp_path / "root", client, epochs=3, extra=[KillServer()]
        )
        assert error is None and trainer.global_step == 3 * STEPS
        run = cb.run
        assert run is not None and run.spooled
        kinds = [entry["kind"] for _, entry in client.spool.entries()]
        assert "transition" in kinds and "upload" in kinds
    finally:
        client.close(timeout=5)
    server.start(port=server.port)
    with Chronicle(url=server.url, home=tmp_path / "home") as again:
        report = again.sync()
        assert report.refused == [] and report.waiting == []
        synced = again.run(*run.key_tuple)
        assert synced.state is RunState.SUCCEEDED
        # The spooled succeed carried the final progress (the server died at epoch 1).
        assert (synced.info().progress or {}).get("step") == 3 * STEPS
        assets = {a.name: a.sha256 for a in synced.assets()}
        assert assets == {s["name"]: s["sha256"] for s in saved_files(cks)}


def test_default_client_and_a_second_fit_with_the_same_callback(
    app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``chronicle=``, the callback makes its own client from the environment and
    closes it when the fit ends; a second ``fit`` is a second run."""
    for var in ("CHRONICLE_URL", "CHRONICLE_EXPERIMENT", "CHRONICLE_VARIATION", "CHRONICLE_RUN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CHRONICLE_HOME", str(tmp_path / "home"))
    cb = app.ChronicleCallback(experiment_name="twice")
    keys = []
    for epochs in (1, 2):
        trainer = app.trainer(tmp_path / "root", [cb], epochs=epochs)
        trainer.fit(app.Model(), datamodule=app.Data())
        keys.append(cb.run.key_tuple)
        assert cb.chronicle is not None and cb.chronicle._closed
    with Chronicle(home=tmp_path / "home") as chronicle:
        runs = chronicle.runs()
        assert sorted((r.experiment_id, r.variation, r.run) for r in runs) == sorted(keys)
        assert {r.state for r in runs} == {RunState.SUCCEEDED}
        assert keys[0] != keys[1]


def test_a_model_saved_after_fit_joins_the_succeeded_run(
    app: Any, tmp_path: Path, env_store: Path
) -> None:
    """``trainer.save_checkpoint(path)`` after ``fit``: ``callback.upload_asset(path)``
    attaches it to the run the callback tracked, although the run succeeded and the
    callback's own client was closed when the fit ended; nothing stays behind in staging."""
    home = env_store
    cb = app.ChronicleCallback(heartbeat_interval=0.2)
    trainer = app.trainer(tmp_path / "root", [cb], epochs=1)
    trainer.fit(app.Model(), datamodule=app.Data())
    assert cb.chronicle is not None and cb.chronicle._closed
    export = tmp_path / "export" / "model.ckpt"
    trainer.save_checkpoint(export)
    handle = cb.upload_asset(export, "export/model.ckpt")
    assert handle is not None and handle.done()  # the run ended: the call waited
    info = handle.result(0)
    assert info.sha256 == app_module.sha256(export)
    with Chronicle() as chronicle:
        run = chronicle.run(*cb.run.key_tuple)
        assert run.state is RunState.SUCCEEDED
        assert {a.name: a.sha256 for a in run.assets()}["export/model.ckpt"] == info.sha256
    assert list((home / "staging").iterdir()) == []


def test_lightning_cli_config_is_the_variation_config(tmp_path: Path, env_store: Path) -> None:
    """``BoringModel`` saves no hyperparameters: the variation config is what LightningCLI
    resolved (trainer, seed, callbacks...), the content of the ``config.yaml`` it writes.
    The callback is given on the command line (jsonargparse checks its class)."""
    pytest.importorskip("jsonargparse")
    import yaml
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    from chronicle_integrations.lightning import ChronicleCallback

    root = tmp_path / "root"
    cli = LightningCLI(
        BoringModel,
        BoringDataModule,
        args=[
            "fit",
            "--seed_everything=7",
            "--trainer.max_steps=3",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={root}",
            "--trainer.callbacks+=chronicle_integrations.lightning.ChronicleCallback",
            "--trainer.callbacks.experiment_name=cli",
            "--trainer.callbacks.heartbeat_interval=0.2",
        ],
    )
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, ChronicleCallback)]
    assert cb.run.info().state is RunState.SUCCEEDED
    with Chronicle() as chronicle:
        config = chronicle.run(*cb.run.key_tuple).get_variation_config()
    written = yaml.safe_load((root / "config.yaml").read_text())
    assert config["seed_everything"] == written["seed_everything"] == 7
    assert config["trainer"]["max_steps"] == written["trainer"]["max_steps"] == 3
    [chronicle_cb] = config["trainer"]["callbacks"]
    assert chronicle_cb["class_path"] == "chronicle_integrations.lightning.ChronicleCallback"
    assert chronicle_cb["init_args"]["experiment_name"] == "cli"
    assert set(written) - {"config"} <= set(config)


def test_fits_with_the_same_experiment_name_share_its_experiment(
    app: Any, tmp_path: Path, connect: Callable[..., Chronicle]
) -> None:
    """Three fits, three callbacks, one ``experiment_name``: one experiment; the two fits
    with the same hyperparameters are two runs of one variation, the third a new one."""
    client = connect()
    name = f"grouped-{tmp_path.name}"
    keys = []
    for i, hidden in enumerate((8, 8, 16)):
        _, cb, _, error = fit(
            app,
            tmp_path / f"root{i}",
            client,
            epochs=1,
            model_kwargs={"hidden": hidden},
            checkpoints=[],
            experiment_name=name,
        )
        assert error is None
        keys.append(cb.run.key_tuple)
    assert len({key[0] for key in keys}) == 1
    assert [key[1:] for key in keys] == [(0, 0), (0, 1), (1, 0)]
    assert [e.name for e in client.experiments()].count(name) == 1
    assert client.run(*keys[2]).get_variation_config()["hidden"] == 16


def test_callback_pickles_without_live_objects(
    app: Any, tmp_path: Path, embedded: Chronicle
) -> None:
    cb = app.ChronicleCallback(chronicle=embedded, experiment_name="pickled")
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.chronicle is None and clone.run is None
    assert clone._tracked._client_spec == (None, str(embedded.home))
    rebuilt = clone._tracked._client()  # the worker's client: the same store, its own
    try:
        assert rebuilt is not embedded and rebuilt.home == embedded.home
        assert clone._tracked._own_client  # closed by the callback when its fit ends
    finally:
        rebuilt.close()
    _, cb, _, error = fit(app, tmp_path / "root", embedded, epochs=1)
    assert error is None
    clone = pickle.loads(pickle.dumps(cb))  # after a fit too (threads, locks dropped)
    assert clone.run is None


def test_bad_arguments_fail_at_construction(app: Any) -> None:
    with pytest.raises(ValueError, match="Hint"):
        app.ChronicleCallback(upload="some")
    with pytest.raises(ValueError):
        app.ChronicleCallback(run=3)


# ----------------------------------------------------------------------------- subprocesses
def spawn(
    tmp_path: Path, name: str, env_extra: dict[str, str] | None = None, **opts: Any
) -> subprocess.Popen[bytes]:
    opts.setdefault("root", str(tmp_path / "root"))
    opts.setdefault("result", str(tmp_path / f"{name}.json"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env.update(
        CHRONICLE_HOME=str(tmp_path / "home"),
        CHRONICLE_HEARTBEAT_TIMEOUT="2",
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
        **(env_extra or {}),
    )
    log = (tmp_path / f"{name}.log").open("wb")
    return testkit.spawn(
        [sys.executable, str(APP), json.dumps(opts)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(tmp_path),
    )


def finish(proc: subprocess.Popen[bytes], tmp_path: Path, name: str, timeout: float = 180) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        testkit.reap(proc, signal.SIGKILL, grace=0)
        raise AssertionError((tmp_path / f"{name}.log").read_text()[-4000:]) from None


def only_run(tmp_path: Path) -> Run:
    chronicle = Chronicle(home=tmp_path / "home", heartbeat_timeout=2)
    runs = chronicle.runs()
    assert len(runs) == 1, runs
    return chronicle.run(runs[0].experiment_id, runs[0].variation, runs[0].run)


def log_of(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text(errors="replace")[-4000:]


def test_keyboard_interrupt_abandons(tmp_path: Path) -> None:
    proc = spawn(tmp_path, "ki", fail="keyboard@5")
    assert finish(proc, tmp_path, "ki") == 1, log_of(tmp_path, "ki")
    info = only_run(tmp_path).info()
    assert info.state is RunState.FAILED_ABANDONED, log_of(tmp_path, "ki")
    assert "KeyboardInterrupt" in (info.message or "")


def test_sigterm_leaves_the_run_resumable_and_resume_continues_it(tmp_path: Path) -> None:
    marker = tmp_path / "mid-fit"
    proc = spawn(tmp_path, "first", epochs=4, marker=str(marker), slow=0.5)
    wait_for(lambda: marker.exists() or proc.poll() is not None, 120, "the fit to start")
    proc.send_signal(signal.SIGTERM)
    finish(proc, tmp_path, "first")
    run = only_run(tmp_path)
    assert not run.state.is_terminal, log_of(tmp_path, "first")
    assert not (tmp_path / "first.json").exists()  # the fit did not complete
    wait_for(lambda: run.state is RunState.LOST, 30, "the run to go lost")
    last = tmp_path / "root/checkpoints/last.ckpt"
    assert last.exists()

    proc = spawn(tmp_path, "resumed", epochs=4, ckpt_path=str(last))
    assert finish(proc, tmp_path, "resumed") == 0, log_of(tmp_path, "resumed")
    result = json.loads((tmp_path / "resumed.json").read_text())
    assert tuple(result["key"]) == run.key_tuple  # the SAME run
    assert result["global_step"] == 4 * STEPS
    assert only_run(tmp_path).state is RunState.SUCCEEDED
    froms = [(e.from_state, e.to_state) for e in run.events() if e.kind == "transition"]
    assert ("lost", "running") in froms or ("running", "running") in froms, froms


def test_sigkill_goes_lost(tmp_path: Path) -> None:
    marker = tmp_path / "mid-fit"
    proc = spawn(tmp_path, "killed", epochs=4, marker=str(marker), slow=0.5)
    wait_for(lambda: marker.exists() or proc.poll() is not None, 120, "the fit to start")
    proc.kill()
    proc.wait()
    run = only_run(tmp_path)
    wait_for(lambda: run.state is RunState.LOST, 30, "the run to go lost")


def test_ddp_two_processes_one_run(tmp_path: Path) -> None:
    proc = spawn(tmp_path, "ddp", strategy="ddp", devices=2, epochs=3)
    assert finish(proc, tmp_path, "ddp") == 0, log_of(tmp_path, "ddp")
    run = only_run(tmp_path)
    assert run.state is RunState.SUCCEEDED
    saved = [json.loads(line) for line in (tmp_path / "root/saved.jsonl").read_text().splitlines()]
    uploads = [(e.detail or {}).get("sha256") for e in run.events() if e.kind == "asset"]
    assert sorted(uploads) == sorted(s["sha256"] for s in saved)  # one set of uploads


def test_ddp_crash_on_rank_1(tmp_path: Path) -> None:
    proc = spawn(tmp_path, "ddp", strategy="ddp", devices=2, epochs=3, fail="rank1@5")
    assert finish(proc, tmp_path, "ddp") != 0
    run = only_run(tmp_path)
    # Rank 0 learns of the failure from its collective (a crash it records) - or Lightning
    # SIGKILLs it first, and the watchdog makes the run lost. Never succeeded, never running.
    wait_for(
        lambda: run.state in (RunState.FAILED_CRASH, RunState.LOST), 30, "a failed or lost run"
    )
    assert run.state is RunState.LOST or "RuntimeError" in (run.info().message or "")


def test_ddp_cancel_stops_every_rank(tmp_path: Path) -> None:
    """Only rank 0 hears of the cancellation; the ranks agree on stopping through a
    collective called on every rank, so nobody deadlocks."""
    marker = tmp_path / "mid-fit"
    proc = spawn(
        tmp_path, "ddp", strategy="ddp", devices=2, epochs=30, marker=str(marker), slow=0.3
    )
    wait_for(lambda: marker.exists() or proc.poll() is not None, 120, "the fit to start")
    run = only_run(tmp_path)
    run.fail("abandoned", "cancelled by the operator")
    assert finish(proc, tmp_path, "ddp") == 0, log_of(tmp_path, "ddp")
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert result["global_step"] < 30 * STEPS // 2  # stopped early (2 steps/epoch/rank)
    assert run.state is RunState.FAILED_ABANDONED


@pytest.mark.parametrize("fail", [None, "train@1"])
def test_ddp_spawn_pickles_and_tracks(tmp_path: Path, fail: str | None) -> None:
    """The callback is pickled into the workers; rank 0's worker owns the run. A worker's
    exception never reaches its ``on_exception`` (only the launcher's, on another instance,
    which must not create a second run): the worker records the crash at exit."""
    proc = spawn(tmp_path, "spawn", strategy="ddp_spawn", devices=2, epochs=1, fail=fail)
    code = finish(proc, tmp_path, "spawn")
    run = only_run(tmp_path)  # exactly one run
    if fail is None:
        assert code == 0, log_of(tmp_path, "spawn")
        assert run.state is RunState.SUCCEEDED
        assert {a.name for a in run.assets()} >= {"checkpoints/last.ckpt"}
    else:
        assert code != 0
        assert run.state is RunState.FAILED_CRASH, log_of(tmp_path, "spawn")


def test_namespaces_do_not_import_each_other() -> None:
    """``import chronicle_integrations`` imports no framework; each namespace module imports
    only its own framework (two fresh interpreters, run side by side)."""
    procs = []
    for module, other in (("lightning", "pytorch_lightning"), ("pytorch_lightning", "lightning")):
        code = (
            f"import sys, chronicle_integrations\n"
            f"assert not {{'lightning', 'pytorch_lightning', 'torch'}} & set(sys.modules)\n"
            f"import chronicle_integrations.{module}\n"
            f"assert {module!r} in sys.modules\n"
            f"assert {other!r} not in sys.modules, {other!r}\n"
        )
        procs.append(testkit.spawn([sys.executable, "-c", code]))
    assert [p.wait(120) for p in procs] == [0, 0]


def test_missing_framework_gives_an_install_hint() -> None:
    code = (
        "import sys\nsys.modules['lightning'] = None\nsys.modules['lightning.pytorch'] = None\n"
        "sys.modules['lightning.pytorch.callbacks'] = None\n"
        "try:\n    import chronicle_integrations.lightning\nexcept ImportError as e:\n"
        "    print(e)\n"
    )
    out = testkit.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert "pip install 'chronicle-integrations[lightning]'" in out
