"""Honest liveness in real trainings: a hung training loop must not look alive.

Each training runs in a subprocess on the embedded store with test-sized settings: the store's
heartbeat timeout (3 s) and stall window (1 s), the callback's stall timeout (4 s). A hang is
first flagged ``stalled`` (beats carry no new progress), then, when the callback pauses its
heartbeats, the watchdog moves the run to ``lost`` while the process is still alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import testkit

from chronicle_integrations import Chronicle, RunState

pytestmark = [pytest.mark.frameworks, pytest.mark.timeout(300)]

LIGHTNING = """
import sys, threading, time
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from chronicle_integrations.lightning import ChronicleCallback

HANG_AT, STEP_SECONDS, HANG_RANK = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
    def training_step(self, batch, _):
        if self.global_step == HANG_AT and self.global_rank == HANG_RANK:
            threading.Event().wait()  # a deadlocked data loader / collective
        time.sleep(STEP_SECONDS)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=int(sys.argv[4]),
                     strategy="ddp" if int(sys.argv[4]) > 1 else "auto",
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False,
                     callbacks=[ChronicleCallback(heartbeat_interval=0.2, stall_timeout=4.0)])
trainer.fit(Model(), DataLoader(data, batch_size=8))
"""

TRANSFORMERS = """
import sys, threading, time
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
from chronicle_integrations.transformers import ChronicleTrainerCallback

HANG_AT, ITEM_SECONDS = int(sys.argv[1]), float(sys.argv[2])

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, i):
        if i == HANG_AT:
            threading.Event().wait()  # a data loader that never returns
        time.sleep(ITEM_SECONDS)
        return {"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(i % 2)}

config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
args = TrainingArguments(output_dir=sys.argv[3], per_device_train_batch_size=4,
                         num_train_epochs=1, use_cpu=True, report_to=[], disable_tqdm=True,
                         save_strategy="no", dataloader_num_workers=0)
trainer = Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=Data(),
                  callbacks=[ChronicleTrainerCallback(heartbeat_interval=0.2,
                                                      stall_timeout=4.0)])
trainer.train()
"""


def _start(script: str, args: list[str], home: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        CHRONICLE_HOME=str(home),
        CHRONICLE_HEARTBEAT_TIMEOUT="3",
        CHRONICLE_STALL_TIMEOUT="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("CHRONICLE_URL", None)
    # A file, not ``-c``: DDP re-executes the script for rank 1.
    path = home.parent / "train_script.py"
    path.write_text(textwrap.dedent(script))
    return testkit.spawn(
        [sys.executable, str(path), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=home.parent,
    )


def _observe(home: Path, proc: subprocess.Popen[bytes], until, timeout: float = 180.0):
    """Poll the store until ``until(info)``; return every snapshot seen."""
    seen = []
    deadline = time.monotonic() + timeout
    with Chronicle(home=home, heartbeat_timeout=3, stall_timeout=1) as chronicle:
        while time.monotonic() < deadline:
            runs = chronicle.runs()
            if runs:
                info = runs[0]
                seen.append(info)
                if until(info):
                    return seen
            if proc.poll() is not None and (not runs or runs[0].state.is_terminal):
                break
            time.sleep(0.1)
    stderr = proc.stderr.read().decode()[-3000:] if proc.poll() is not None else ""
    raise AssertionError(f"condition not met; last: {seen[-1:]} exit={proc.poll()}\n{stderr}")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """The whole tree: with DDP, the hung rank 1 is a child of the script, not the script."""
    testkit.reap(proc, signal.SIGKILL, grace=0)


@pytest.mark.parametrize("devices", [1, 2], ids=["single", "ddp-rank1-hangs"])
def test_lightning_hang_is_flagged_stalled_then_lost_while_alive(
    tmp_path: Path, devices: int
) -> None:
    home = tmp_path / "home"
    hang_rank = 1 if devices == 2 else 0
    proc = _start(LIGHTNING, ["5", "0", str(hang_rank), str(devices)], home)
    try:
        seen = _observe(home, proc, lambda i: i.state is RunState.LOST)
        assert proc.poll() is None, "the training process must still be alive"
        assert any(i.stalled and i.state is RunState.RUNNING for i in seen), (
            "the hang should be flagged stalled before the run goes lost"
        )
        assert seen[-1].progress is not None and seen[-1].progress["step"] <= 5
    finally:
        _kill(proc)


def test_lightning_slow_but_advancing_fit_is_never_flagged(tmp_path: Path) -> None:
    # Steps of 0.4 s: slower than the store's 1 s stall window? No - each step advances the
    # progress, so the window never passes without news.
    home = tmp_path / "home"
    proc = _start(LIGHTNING, ["-1", "0.4", "0", "1"], home)
    try:
        seen = _observe(home, proc, lambda i: i.state.is_terminal, timeout=240)
        assert proc.wait(60) == 0
        assert seen[-1].state is RunState.SUCCEEDED
        assert not any(i.stalled for i in seen)
        assert all(
            i.state in (RunState.PENDING, RunState.RUNNING, RunState.SUCCEEDED) for i in seen
        )
    finally:
        _kill(proc)


def test_transformers_blocking_dataset_is_flagged_stalled_then_lost(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = _start(TRANSFORMERS, ["20", "0", str(tmp_path / "out")], home)
    try:
        seen = _observe(home, proc, lambda i: i.state is RunState.LOST)
        assert proc.poll() is None
        assert any(i.stalled and i.state is RunState.RUNNING for i in seen)
    finally:
        _kill(proc)
