"""A Lightning sweep under ``hydra/launcher=chronicle`` (3 variations, real fits): ``chronicle
best E --metric val_loss --json`` names the variation with the lowest ``val_loss`` and the
checkpoint Lightning's ``ModelCheckpoint.best_model_path`` named; ``chronicle download`` of it
gives the same bytes. The launcher records the task's numeric return value as metrics."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import testkit

pytest.importorskip("hydra")
pytest.importorskip("lightning")

from chronicle_integrations import Chronicle
from chronicle_integrations.lifecycle import RunState
from hydra_plugins.chronicle_launcher._job import return_metrics

pytestmark = [pytest.mark.hydra, pytest.mark.filterwarnings("ignore")]

APP = Path(__file__).resolve().parent / "_lightning_sweep_app.py"


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHRONICLE_") or k == "CHRONICLE_HOME"
    }
    return env


def test_lightning_sweep_best_names_lightnings_best_checkpoint(
    chronicle_home: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    done = testkit.run(
        [
            sys.executable,
            str(APP),
            "-m",
            "hydra/launcher=chronicle",
            "+lr=0.2,0.05,0.001",
            f"+report_dir={report}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.launcher.experiment_id=lit-sweep",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    reports = {
        r["lr"]: r for r in (json.loads(p.read_text()) for p in sorted(report.glob("*.json")))
    }
    assert len(reports) == 3
    winner = min(reports.values(), key=lambda r: r["best_model_score"])
    cli = testkit.run(
        [
            sys.executable,
            "-m",
            "chronicle_integrations.cli",
            "best",
            "lit-sweep",
            "--metric",
            "val_loss",
            "--mode",
            "min",
            "--json",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    best = json.loads(cli.stdout)
    with Chronicle(home=chronicle_home) as chronicle:
        config = chronicle.run("lit-sweep", best["variation"], 0).get_variation_config()
        assert float(config["config"]["lr"]) == winner["lr"]
        infos = chronicle.runs("lit-sweep")
        assert [i.state for i in infos] == [RunState.SUCCEEDED] * 3
        for info in infos:  # the launcher's metrics next to the callback's
            assert {"val_loss", "val_score"} <= set(info.metrics)
    assert best["state"] == "succeeded"
    assert best["value"] == pytest.approx(winner["best_model_score"])
    best_path = Path(winner["best_model_path"])
    assert best["checkpoint"]["name"] == f"checkpoints/{best_path.name}"
    dest = tmp_path / "downloaded.ckpt"
    got = testkit.run(
        [
            sys.executable,
            "-m",
            "chronicle_integrations.cli",
            "download",
            best["key"],
            best["checkpoint"]["name"],
            str(dest),
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0, got.stderr
    assert (
        hashlib.sha256(dest.read_bytes()).digest()
        == hashlib.sha256(best_path.read_bytes()).digest()
    )


def test_return_metrics() -> None:
    assert return_metrics(0.5) == {"return_value": 0.5}
    assert return_metrics(3) == {"return_value": 3}
    assert return_metrics({"a": 1.0, "b": "text", "c": True, "d": 2}) == {"a": 1.0, "d": 2}
    assert return_metrics(True) == {} and return_metrics(None) == {} and return_metrics("x") == {}
