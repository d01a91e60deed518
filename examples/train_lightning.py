"""Track a Lightning fit with Chronicle: a small MLP on scikit-learn's bundled digits.

    pip install 'chronicle-integrations[lightning,examples]'
    python examples/train_lightning.py                      # embedded store in ./chronicle
    python examples/train_lightning.py --fail-at-step 20    # see a crash recorded
    CHRONICLE_URL=http://127.0.0.1:8765 python examples/train_lightning.py   # a server

The run is started when the fit starts, every checkpoint (top-2 by validation accuracy and
``last.ckpt``) is uploaded in the background as it is written, and the run succeeds when the
fit ends (or is marked crashed, or abandoned on Ctrl+C). No download: the digits ship with
scikit-learn. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from chronicle_integrations import Chronicle
from chronicle_integrations.lightning import ChronicleCallback


class DigitsData(pl.LightningDataModule):
    """8x8 digit images (1797 samples), 80 % train / 20 % validation."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(x))
        self.train_set = TensorDataset(x[order[:cut]], y[order[:cut]])
        self.val_set = TensorDataset(x[order[cut:]], y[order[cut:]])

    def train_dataloader(self) -> DataLoader:
        batch_size: int = self.hparams["batch_size"]
        return DataLoader(self.train_set, batch_size=batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class MLP(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2, fail_at_step: int | None = None):
        super().__init__()
        self.save_hyperparameters("hidden", "lr")  # recorded as the variation config
        self.fail_at_step = fail_at_step
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
        )

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        if self.fail_at_step is not None and self.global_step >= self.fail_at_step:
            raise RuntimeError(f"--fail-at-step {self.fail_at_step}: failing on purpose")
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--home",
        default=None,
        help="Chronicle home (embedded store); default $CHRONICLE_HOME or "
        "./chronicle. Ignored when $CHRONICLE_URL names a server.",
    )
    parser.add_argument(
        "--fail-at-step",
        type=int,
        default=None,
        help="raise in training_step at this step, to see a crash recorded",
    )
    parser.add_argument(
        "--output", default="lightning_output", help="where checkpoints are written"
    )
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    with Chronicle(home=args.home) as chronicle:
        tracker = ChronicleCallback(chronicle=chronicle, experiment_name="digits-mlp")
        checkpoints = pl.callbacks.ModelCheckpoint(
            dirpath=Path(args.output, "checkpoints"),
            monitor="val_acc",
            mode="max",
            save_top_k=2,
            save_last=True,
            filename="{epoch}-{val_acc:.3f}",
        )
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            devices=1,
            callbacks=[tracker, checkpoints],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=args.output,
        )
        failed = None
        try:
            trainer.fit(MLP(fail_at_step=args.fail_at_step), datamodule=DigitsData())
        except Exception as exc:  # recorded as failed_crash by the callback; shown below
            failed = exc

        run = tracker.run
        if run is None:
            print("tracking was not available (see the warnings above)")
            return 1
        info = run.info()
        print(f"\nrun {run.key} on {chronicle.target}: {info.state.value}")
        if info.message:
            print(f"  message: {info.message.splitlines()[0]}")
        print(f"  config: {run.get_variation_config()}")
        for asset in run.assets():
            print(f"  {asset.name:40s} {asset.size:>9,d} B  sha256 {asset.sha256[:12]}")
        if failed is not None:
            print(f"the fit failed: {type(failed).__name__}: {failed}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
