"""A real Lightning fit under ``chronicle exec``: the integration adopts the supervisor's run;
a fit that hangs in ``training_step`` is flagged stalled, goes ``lost`` and is torn down (it
ignores nothing, but a blocked main thread cannot act on SIGTERM: SIGKILL follows the grace);
``chronicle exec --resume`` from ``last.ckpt`` continues the same run to ``succeeded``."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import testkit

from chronicle_integrations import Chronicle, RunState

pytestmark = [pytest.mark.frameworks, pytest.mark.timeout(300)]

TIMEOUT = 2.0

SCRIPT = """
import os, sys, threading
import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from chronicle_integrations.lightning import ChronicleCallback

HANG_AT, CKPT_DIR = int(sys.argv[1]), sys.argv[2]
RESUME = sys.argv[3] if len(sys.argv) > 3 else None

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
    def training_step(self, batch, _):
        if self.global_step == HANG_AT:
            open(os.path.join(CKPT_DIR, "..", "hanging"), "w").close()
            threading.Event().wait()  # a deadlocked collective: the main thread is stuck
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
trainer = pl.Trainer(
    max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[
        ModelCheckpoint(dirpath=CKPT_DIR, save_last=True, every_n_train_steps=2),
        ChronicleCallback(heartbeat_interval=0.2, stall_timeout=TIMEOUT_S),
    ],
)
trainer.fit(Model(), DataLoader(data, batch_size=8), ckpt_path=RESUME)
""".replace("TIMEOUT_S", str(TIMEOUT))


EXEC = [sys.executable, "-m", "chronicle_integrations.cli", "exec"]


def _exec(tmp_path: Path, home: Path, head: list[str], *argv: str, name: str) -> Any:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_")}
    env.update(CHRONICLE_HOME=str(home), CHRONICLE_HEARTBEAT_TIMEOUT=str(TIMEOUT))
    env.update(CHRONICLE_STALL_TIMEOUT=str(TIMEOUT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return testkit.spawn(
        [*EXEC, *head, "--", sys.executable, str(script), *argv],
        env=env,
        stdout=(tmp_path / f"{name}.out").open("wb"),
        stderr=(tmp_path / f"{name}.err").open("wb"),
    )


def test_hung_fit_is_torn_down_and_resumed_under_exec(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    with Chronicle(home=home, heartbeat_timeout=TIMEOUT) as chronicle:
        exp = chronicle.create_experiment("exec-fit", variations=[{}])

    first = _exec(
        tmp_path, home, ["--experiment", exp, "--grace", "2"], "5", str(ckpts), name="first"
    )
    try:
        code = first.wait(240)
    finally:
        testkit.reap(first)
    err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "hanging").exists(), err[-3000:]
    assert code == 128 + signal.SIGKILL, err[-3000:]  # the stuck main thread outlived SIGTERM
    with Chronicle(home=home, heartbeat_timeout=TIMEOUT) as chronicle:
        run = chronicle.run(exp, 0, 0)
        events = run.events()
        assert run.state is RunState.LOST  # torn down, not ended: resumable
    teardown = [(e.cause, e.detail["signal"]) for e in events if e.kind == "teardown"]
    assert teardown == [
        ("teardown_requested", "SIGTERM"),
        ("teardown_requested", "SIGKILL"),
        ("teardown_done", "SIGKILL"),
    ]
    assert (ckpts / "last.ckpt").exists()

    second = _exec(
        tmp_path,
        home,
        [f"{exp}/0/0", "--resume"],
        "-1",
        str(ckpts),
        str(ckpts / "last.ckpt"),
        name="second",
    )
    try:
        assert second.wait(240) == 0, (tmp_path / "second.err").read_text()[-3000:]
    finally:
        testkit.reap(second)
    with Chronicle(home=home, heartbeat_timeout=TIMEOUT) as chronicle:
        runs = chronicle.runs(experiment_id=exp)
        assert [(r.run, r.state) for r in runs] == [(0, RunState.SUCCEEDED)]
        causes = [e.cause for e in chronicle.run(exp, 0, 0).events()]
    assert "resume" in causes
