"""Metrics from real tiny Lightning and HF trainings: the callbacks record what the framework
logged (at validation / evaluation, never per step), each checkpoint carries the monitored
value it was saved for, and ``best`` names the checkpoint the framework itself chose, whose
download is byte-identical. Bad metrics never harm the training."""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chronicle_integrations import Chronicle, RunState

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))

pytestmark = [pytest.mark.frameworks, pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def shared_server(module_server_factory: Any) -> Any:
    return module_server_factory()


@pytest.fixture(params=["embedded", "http"])
def chronicle(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chronicle]:
    if request.param == "http":
        url = request.getfixturevalue("shared_server").url
        client = Chronicle(url=url, home=tmp_path / "home")
    else:
        client = Chronicle(home=tmp_path / "home")
    yield client
    client.close(timeout=10)


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- Lightning
def test_lightning_metrics_and_best_checkpoint(
    chronicle: Chronicle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("lightning")
    import _lightning_app
    import lightning.pytorch as pl
    import torch

    app = _lightning_app.build("lightning")

    class BadMetrics(pl.Callback):
        """Puts what no tracker can store into ``callback_metrics``: training goes on."""

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            trainer.callback_metrics["a/../b"] = torch.tensor(1.0)
            trainer.callback_metrics["vector"] = torch.ones(3)
            trainer.callback_metrics["nan_metric"] = torch.tensor(float("nan"))

    ck = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "root" / "checkpoints",
        monitor="val/loss",
        mode="min",
        save_top_k=2,
        save_last=True,
        filename="{epoch}",
        auto_insert_metric_name=False,
    )
    cb = app.ChronicleCallback(chronicle=chronicle, heartbeat_interval=0.2)
    trainer = app.trainer(tmp_path / "root", [cb, BadMetrics(), ck], epochs=4)
    model = app.Model(val_losses=[0.9, 0.3, 0.5, 0.4])
    with caplog.at_level(logging.WARNING):
        trainer.fit(model, datamodule=app.Data())
    run = cb.run
    info = run.info()
    assert info.state is RunState.SUCCEEDED
    loss = info.metrics["val/loss"]
    assert (loss["min"], loss["max"], loss["last"]) == (
        pytest.approx(0.3),
        pytest.approx(0.9),
        pytest.approx(0.4),
    )
    assert loss["last_step"] == trainer.global_step
    assert loss["min_step"] == 2 * _lightning_app.STEPS_PER_EPOCH  # end of epoch 1
    assert "val_loss" in info.metrics and "val_score" in info.metrics
    assert math.isnan(info.metrics["nan_metric"]["last"])
    assert "a/../b" not in info.metrics and "vector" not in info.metrics
    warned = [r for r in caplog.records if "metric not recorded" in r.getMessage()]
    assert len(warned) == 1  # logged once, then DEBUG
    best = chronicle.best(run.experiment_id, "val/loss", "min")
    assert best.key == run.key and best.value == pytest.approx(0.3)
    # The checkpoint Lightning itself names as best, byte-identical after download.
    best_path = Path(ck.best_model_path)
    assert best.checkpoint["name"] == f"checkpoints/{best_path.name}"
    assert best.checkpoint["value"] == pytest.approx(float(ck.best_model_score))
    got = run.download_asset(best.checkpoint["name"], tmp_path / "best.ckpt")
    assert _sha256(got) == _sha256(best_path)


def test_lightning_metrics_off(chronicle: Chronicle, tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    import _lightning_app

    app = _lightning_app.build("lightning")
    cb = app.ChronicleCallback(chronicle=chronicle, heartbeat_interval=0.2, log_metrics=False)
    trainer = app.trainer(tmp_path / "root", [cb], epochs=1)
    trainer.fit(app.Model(), datamodule=app.Data())
    assert cb.run.info().state is RunState.SUCCEEDED
    assert cb.run.info().metrics is None


# ------------------------------------------------------------------------------- HF
def test_hf_metrics_and_best_checkpoint(chronicle: Chronicle, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import _hf_app

    from chronicle_integrations.transformers import ChronicleTrainerCallback

    callback = ChronicleTrainerCallback(chronicle=chronicle, heartbeat_interval=0.2)
    trainer = _hf_app.make_trainer(
        tmp_path / "out",
        [callback],
        eval_dataset=_hf_app.Tokens(16),
        max_steps=8,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        learning_rate=5e-2,
    )
    trainer.train()
    run = callback.run
    info = run.info()
    assert info.state is RunState.SUCCEEDED
    assert {"loss", "eval_loss", "learning_rate"} <= set(info.metrics)
    history = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert info.metrics["eval_loss"]["min"] == pytest.approx(min(history))
    best = chronicle.best(run.experiment_id, "eval_loss", "min")
    assert best.value == pytest.approx(trainer.state.best_metric)
    # The folder HF names as best (kept through save_total_limit rotation).
    best_dir = Path(trainer.state.best_model_checkpoint)
    assert best.checkpoint["name"] == best_dir.name and best.checkpoint["directory"]
    assert best.checkpoint["metric"] == "eval_loss"
    assert best.checkpoint["step"] == int(best_dir.name.split("-")[1])
    got = run.download_directory(best.checkpoint["name"], tmp_path / "got")
    for name, path in got.items():
        assert _sha256(path) == _sha256(best_dir / name.split("/", 1)[1]), name
