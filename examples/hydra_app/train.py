"""A Hydra sweep tracked as one Chronicle experiment, with a Lightning fit in each job.

    pip install 'chronicle-integrations[lightning,hydra,examples]'
    python examples/hydra_app/train.py -m hydra/launcher=chronicle model.lr=0.01,0.003
    # the same on local worker processes (or on SLURM with submitit_slurm):
    pip install 'chronicle-integrations[hydra-submitit]'
    python examples/hydra_app/train.py -m hydra/launcher=chronicle \\
        'hydra/launcher@hydra.launcher.executor=submitit_local' model.lr=0.01,0.003
    chronicle runs                      # one run per job: succeeded / failed_crash / ...

The launcher registers the experiment (variations: each job's overrides and config),
starts each job's run and ends it; ``ChronicleCallback()`` inside the job finds the run in
``$CHRONICLE_EXPERIMENT`` / ``_VARIATION`` / ``_RUN`` / ``_LEASE`` and uploads checkpoints as
they are written. The job's output directory (``.hydra/``, logs) and the returned metrics
(``return_value.json``) are uploaded when the job ends. Without ``hydra/launcher=chronicle``
the callback alone tracks each fit as a run of a new experiment.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from chronicle_integrations.lightning import ChronicleCallback

# The model and data of the plain Lightning example, shared rather than copied.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_lightning import MLP, DigitsData


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    pl.seed_everything(cfg.seed, verbose=False)
    # Checkpoints go to the job's output dir (the working directory stays where the command
    # was run, so a relative $CHRONICLE_HOME / ./chronicle means the same store for every job).
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        monitor="val_acc",
        mode="max",
        save_top_k=2,
        save_last=True,
        filename="{epoch}-{val_acc:.3f}",
    )
    trainer = pl.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator="cpu",
        devices=1,
        limit_train_batches=cfg.trainer.limit_train_batches,
        limit_val_batches=cfg.trainer.limit_val_batches,
        callbacks=[ChronicleCallback(), checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=output_dir,
    )
    model = MLP(hidden=cfg.model.hidden, lr=cfg.model.lr, fail_at_step=cfg.trainer.fail_at_step)
    trainer.fit(model, datamodule=DigitsData(batch_size=cfg.data.batch_size))
    # Returned metrics are recorded as the run's return_value.json (JSON-serialisable only).
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
