"""A Hydra app fitting a tiny Lightning model per job (run as a script by the tests).

``lr`` is swept. Each job checkpoints the best ``val_loss`` (top 1) with ``ChronicleCallback``
inside the job and writes ``<report_dir>/<lr>.json``: what Lightning's ``ModelCheckpoint``
chose (``best_model_path``, ``best_model_score``), for the test to compare with
``chronicle best``. Returns ``{"val_loss": ...}`` (recorded by the launcher as metrics).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "frameworks"))


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: DictConfig) -> Any:
    import _lightning_app
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    app = _lightning_app.build("lightning")
    out = Path(HydraConfig.get().runtime.output_dir)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=out / "checkpoints",
        monitor="val_loss",
        mode="min",
        save_top_k=1,
        filename="{epoch}",
    )
    callback = app.ChronicleCallback(heartbeat_interval=0.5)
    trainer = app.trainer(out, [callback, checkpoint], epochs=int(cfg.get("epochs", 3)))
    trainer.fit(app.Model(lr=float(cfg.lr)), datamodule=app.Data())
    report = Path(cfg.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    (report / f"{cfg.lr}.json").write_text(
        json.dumps(
            {
                "lr": float(cfg.lr),
                "best_model_path": checkpoint.best_model_path,
                "best_model_score": float(checkpoint.best_model_score),
            }
        )
    )
    return {"val_loss": float(trainer.callback_metrics["val_loss"])}


if __name__ == "__main__":
    main()
