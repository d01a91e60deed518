"""A tiny Lightning training for the Chronicle callback tests, in-process or as a script.

``build(ns)`` returns the model, datamodule and a recording checkpoint class for the
``lightning`` or ``pytorch_lightning`` namespace. Run as a script (``python _lightning_app.py
'<json>'``) it trains once with the options in the JSON (see :func:`main`): signal tests,
KeyboardInterrupt and DDP need a process of their own. DDP re-executes this script with the
same arguments for rank 1.

Every checkpoint written is recorded, right after the write and before any eviction, as
``{"name", "path", "sha256"}`` (a JSON line in ``record``): the test compares the run's
assets and upload events with that ground truth.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

STEPS_PER_EPOCH = 4  # 64 training samples, batches of 16


def sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(ns: str = "lightning") -> SimpleNamespace:
    """Classes for one namespace: Model, Data, RecordingCheckpoint, Callback, Trainer, and
    ChronicleCallback (from the matching chronicle_integrations module)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    if ns == "lightning":
        import lightning.pytorch as pl

        from chronicle_integrations.lightning import ChronicleCallback
    else:
        import pytorch_lightning as pl  # type: ignore[no-redef]

        from chronicle_integrations.pytorch_lightning import (  # type: ignore[assignment]
            ChronicleCallback,
        )

    class Model(pl.LightningModule):
        def __init__(
            self,
            hidden: int = 8,
            lr: float = 0.05,
            fail: str | None = None,
            marker: str | None = None,
            slow: float = 0.0,
            val_losses: list[float] | None = None,
        ) -> None:
            super().__init__()
            self.save_hyperparameters("hidden", "lr")
            self.fail, self.marker, self.slow = fail, marker, slow
            #: Logged as ``val/loss`` per epoch (the last value repeats): a metric with a
            #: ``/``, which a checkpoint ``filename`` turns into sub-folders.
            self.val_losses = val_losses
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
            )

        def _maybe_fail(self, where: str) -> None:
            if not self.fail:
                return
            kind, _, at = self.fail.partition("@")
            step = self.trainer.global_step
            if kind == where and step >= int(at or 0):
                raise RuntimeError(f"boom in {where} at step {step}")
            if kind == "keyboard" and where == "train" and step >= int(at or 0):
                raise KeyboardInterrupt
            if (
                kind == "rank1"
                and where == "train"
                and self.global_rank == 1
                and step >= int(at or 0)
            ):
                raise RuntimeError(f"boom on rank 1 at step {step}")

        def setup(self, stage: str) -> None:
            if self.fail == "setup":
                raise RuntimeError("boom in setup")

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self._maybe_fail("train")
            if self.marker and self.trainer.global_step >= 6:
                Path(self.marker).touch()
                time.sleep(self.slow)
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if self.fail == "sanity" and self.trainer.sanity_checking:
                raise ValueError("boom in the sanity check")
            self._maybe_fail("val")
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))
            # A score that improves every epoch: top-k eviction happens deterministically.
            self.log("val_score", float(self.current_epoch))
            if self.val_losses:
                epoch = min(self.current_epoch, len(self.val_losses) - 1)
                self.log("val/loss", self.val_losses[epoch])

        def test_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    class Data(pl.LightningDataModule):
        def __init__(self, batch_size: int = 16) -> None:
            super().__init__()
            self.save_hyperparameters()
            g = torch.Generator().manual_seed(0)
            x = torch.randn(96, 4, generator=g)
            y = x.sum(dim=1, keepdim=True)
            self.train_set = TensorDataset(x[:64], y[:64])
            self.val_set = TensorDataset(x[64:], y[64:])

        def train_dataloader(self) -> Any:
            return DataLoader(self.train_set, batch_size=self.hparams.batch_size)

        def val_dataloader(self) -> Any:
            return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

        def test_dataloader(self) -> Any:
            return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    class RecordingCheckpoint(pl.callbacks.ModelCheckpoint):
        """Records every file right after it is written (test-only use of a private hook)."""

        def __init__(self, *args: Any, record: str | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.record = record
            self.saved: list[dict[str, str]] = []

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            super()._save_checkpoint(trainer, filepath)
            if trainer.is_global_zero:
                # The asset name: the path under the checkpoint directory, prefixed by its name.
                relative = Path(os.path.relpath(filepath, self.dirpath)).as_posix()
                entry = {
                    "name": f"{Path(self.dirpath).name}/{relative}",
                    "path": os.path.abspath(filepath),
                    "sha256": sha256(filepath),
                }
                self.saved.append(entry)
                if self.record:
                    with open(self.record, "a") as fh:
                        fh.write(json.dumps(entry) + "\n")

    def checkpoints(root: str | os.PathLike[str], record: str | None = None) -> list[Any]:
        """An epoch-level top-2 + last checkpoint, and a step-level top-2 one that evicts
        inside the same save call that writes its replacement (every 3 steps)."""
        return [
            RecordingCheckpoint(
                dirpath=Path(root, "checkpoints"),
                monitor="val_score",
                mode="max",
                save_top_k=2,
                save_last=True,
                filename="{epoch}",
                record=record,
            ),
            RecordingCheckpoint(
                dirpath=Path(root, "steps"),
                monitor="step",
                mode="max",
                save_top_k=2,
                every_n_train_steps=3,
                filename="{step}",
                record=record,
            ),
        ]

    def trainer(
        root: str | os.PathLike[str], callbacks: list[Any], epochs: int = 3, **kwargs: Any
    ) -> Any:
        kwargs.setdefault("accelerator", "cpu")
        kwargs.setdefault("devices", 1)
        return pl.Trainer(
            max_epochs=epochs,
            callbacks=callbacks,
            default_root_dir=str(root),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **kwargs,
        )

    # Module-level names, so that ddp_spawn can pickle the model, data and callbacks.
    for cls in (Model, Data, RecordingCheckpoint):
        cls.__name__ = cls.__qualname__ = f"{cls.__name__}_{ns}"
        globals()[cls.__name__] = cls

    return SimpleNamespace(
        pl=pl,
        Model=Model,
        Data=Data,
        RecordingCheckpoint=RecordingCheckpoint,
        checkpoints=checkpoints,
        trainer=trainer,
        ChronicleCallback=ChronicleCallback,
    )


def main(argv: list[str]) -> int:
    """Options (JSON): ns, root, epochs, fail, marker, slow, ckpt_path, strategy, devices,
    heartbeat_interval, result (a JSON file written by rank 0 at the end)."""
    opts = json.loads(argv[1])
    app = build(opts.get("ns", "lightning"))
    root = opts["root"]
    record = str(Path(root, "saved.jsonl"))
    chronicle_cb = app.ChronicleCallback(heartbeat_interval=opts.get("heartbeat_interval", 0.5))
    trainer = app.trainer(
        root,
        [chronicle_cb, *app.checkpoints(root, record)],
        epochs=opts.get("epochs", 3),
        strategy=opts.get("strategy", "auto"),
        devices=opts.get("devices", 1),
    )
    model = app.Model(fail=opts.get("fail"), marker=opts.get("marker"), slow=opts.get("slow", 0.0))
    trainer.fit(model, datamodule=app.Data(), ckpt_path=opts.get("ckpt_path"))
    if trainer.is_global_zero and opts.get("result"):
        run = chronicle_cb.run
        Path(opts["result"]).write_text(
            json.dumps(
                {
                    "key": list(run.key_tuple) if run is not None else None,
                    "global_step": trainer.global_step,
                }
            )
        )
    return 0


if __name__ == "__mp_main__":  # a ddp_spawn worker re-imports this script to unpickle
    build(json.loads(sys.argv[1]).get("ns", "lightning"))

if __name__ == "__main__":
    sys.exit(main(sys.argv))
