"""Figure 2: training-thread time blocked by tracking, per checkpoint save.

A Lightning fit whose model carries a ballast buffer of SIZE bytes writes a checkpoint every
few steps (ModelCheckpoint(every_n_train_steps=K, save_top_k=-1)). Measured on the training
thread, per checkpoint:

  chronicle-http / chronicle-embedded (project venv, ChronicleCallback()):
      upload_ms  : time inside the callback's upload_asset calls (the capture: hard link)
      hooks_ms   : ALL time inside the callback's hooks during training (per-batch scans,
                   checkpoint hooks; not on_fit_start/on_fit_end), divided by checkpoints
      fit_end_ms : on_fit_end (waits for the uploads still running, then succeeded)
  mlflow (peers venv): time inside MLFlowLogger(log_model="all").after_save_checkpoint
      (it uploads the new checkpoint synchronously to `mlflow server --serve-artifacts`)
  wandb-offline (peers venv): W&B offline, ``run.log_artifact(Artifact.add_file(ckpt))``
      per checkpoint file - what WandbLogger(log_model="all") does per checkpoint (Lightning
      refuses log_model with offline=True, so the call is timed directly on the same files)
and the fit's wall time against a fit without tracking in the same process.

    .venv/bin/python benchmarks/bench_checkpoint.py [--quick]
    benchmarks/.peers-venv/bin/python benchmarks/bench_checkpoint.py \
        --variants none,mlflow,wandb-offline
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
from bench_training import HOOK_CALLS, HOOK_TIMES, LIGHTNING_HOOKS, timed_hooks

UPLOAD_CALLS: list[float] = []
MLFLOW_CALLS: list[float] = []


def fit(variant: str, size: int, n_ckpt: int, root: Path, ctx: dict) -> dict:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    every = 5

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(32, 1)
            self.register_buffer("ballast", torch.empty(size // 4).uniform_())

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x = torch.randn(every * n_ckpt * 16, 32)
    loader = DataLoader(TensorDataset(x, x[:, :1]), batch_size=16)
    ckpt = ModelCheckpoint(
        dirpath=root / "checkpoints", every_n_train_steps=every, save_top_k=-1, save_last=False
    )
    callbacks: list = [ckpt]
    logger = False
    UPLOAD_CALLS.clear()
    MLFLOW_CALLS.clear()
    HOOK_TIMES.clear()
    HOOK_CALLS.clear()
    if variant.startswith("chronicle"):
        from chronicle_integrations.lightning import ChronicleCallback

        cb = ChronicleCallback()
        timed_hooks(cb, LIGHTNING_HOOKS)
        inner = cb._tracked.upload

        @functools.wraps(inner)
        def upload(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                UPLOAD_CALLS.append(time.perf_counter() - t0)

        cb._tracked.upload = upload
        callbacks.append(cb)
    elif variant == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(
            experiment_name="bench-ckpt", tracking_uri=ctx["mlflow_url"], log_model="all"
        )
        inner_m = logger.after_save_checkpoint

        def after_save(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner_m(*a, **kw)
            finally:
                MLFLOW_CALLS.append(time.perf_counter() - t0)

        logger.after_save_checkpoint = after_save
    trainer = pl.Trainer(
        max_steps=every * n_ckpt,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
        log_every_n_steps=1000,
    )
    model = Net()
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - t0
    files = sorted((root / "checkpoints").glob("*.ckpt"))
    out = {
        "wall_s": wall,
        "checkpoints": len(files),
        "ckpt_bytes": files[0].stat().st_size if files else 0,
    }
    if variant.startswith("chronicle"):
        during = {k: v for k, v in HOOK_TIMES.items() if k not in ("on_fit_start", "on_fit_end")}
        out.update(
            upload_ms=[t * 1e3 for t in UPLOAD_CALLS],
            hooks_per_ckpt_ms=sum(during.values()) * 1e3 / max(1, len(files)),
            fit_start_ms=HOOK_TIMES.get("on_fit_start", 0) * 1e3,
            fit_end_ms=HOOK_TIMES.get("on_fit_end", 0) * 1e3,
            hook_breakdown_ms={k: v * 1e3 for k, v in HOOK_TIMES.items()},
        )
        assert cb.run.state.value == "succeeded"
        assert len(cb.run.assets()) == len(files), (cb.run.assets(), files)
    if variant == "mlflow":
        out["after_save_ms"] = [t * 1e3 for t in MLFLOW_CALLS]
    if variant == "none":
        ctx.setdefault("files", {})[size] = files
    return out


def wandb_offline(files: list[Path], root: Path) -> list[float]:
    import wandb

    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    run = wandb.init(project="bench-ckpt", dir=str(root), mode="offline")
    times = []
    try:
        for i, path in enumerate(files):
            t0 = time.perf_counter()
            art = wandb.Artifact(f"model-{run.id}", type="model")
            art.add_file(str(path))
            run.log_artifact(art, aliases=[f"step-{i}"])
            times.append(time.perf_counter() - t0)
    finally:
        t0 = time.perf_counter()
        run.finish()
        times_finish = time.perf_counter() - t0
    return [t * 1e3 for t in times], times_finish


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="none,chronicle-http,chronicle-embedded")
    p.add_argument("--sizes", default=None, help="checkpoint sizes, e.g. 200M,1G")
    p.add_argument("--checkpoints", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    from bench_upload import fmt_size, parse_size

    sizes = [parse_size(s) for s in (a.sizes or ("20M,100M" if a.quick else "200M,1G")).split(",")]
    n_ckpt = a.checkpoints or (2 if a.quick else 3)
    variants = a.variants.split(",")
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-", dir=c.WORK))
    servers = contextlib.ExitStack()
    ctx: dict = {}
    out: dict = {
        "checkpoints_per_fit": n_ckpt,
        "sizes": {},
        "versions": c.versions("torch", "lightning", "mlflow", "wandb"),
    }
    try:
        if "chronicle-http" in variants:
            ctx["server"] = servers.enter_context(
                c.chronicle_server(
                    f"sqlite:///{scratch}/server.db",
                    scratch / "server-assets",
                    scratch / "server.log",
                )
            )
        if "mlflow" in variants:
            srv = servers.enter_context(
                c.mlflow_server(
                    f"sqlite:///{scratch}/mlflow.db", scratch / "mlflow-art", scratch / "mlflow.log"
                )
            )
            ctx["mlflow_url"] = srv.url
        for size in sizes:
            res: dict = {}
            for variant in variants:
                if variant == "wandb-offline":
                    continue
                for key in ("CHRONICLE_URL", "CHRONICLE_HOME"):
                    os.environ.pop(key, None)
                os.environ["CHRONICLE_HOME"] = str(scratch / f"home-{variant}")
                if variant == "chronicle-http":
                    os.environ["CHRONICLE_URL"] = ctx["server"].url
                root = scratch / f"{variant}-{size}"
                r = fit(variant, size, n_ckpt, root, ctx)
                res[variant] = r
                msg = f"  {fmt_size(size)} {variant:18s} fit {r['wall_s']:.2f}s"
                if "upload_ms" in r:
                    msg += (
                        f"  upload_asset {max(r['upload_ms']):.2f} ms max  hooks/ckpt "
                        f"{r['hooks_per_ckpt_ms']:.2f} ms  on_fit_end "
                        f"{r['fit_end_ms']:.0f} ms"
                    )
                if "after_save_ms" in r:
                    msg += f"  after_save_checkpoint {c.stats(r['after_save_ms'])['median']:.0f} ms"
                print(msg, flush=True)
                if variant != "none" or "wandb-offline" not in variants:
                    shutil.rmtree(root, ignore_errors=True)
                for d in (
                    scratch / "server-assets",
                    scratch / "mlflow-art",
                    scratch / f"home-{variant}" / "assets",
                ):
                    if d.exists():
                        for f in d.rglob("*"):
                            if f.is_file() and f.stat().st_size > 2**20:
                                f.unlink()
            if "wandb-offline" in variants:
                files = ctx["files"][size]
                w, finish = wandb_offline(files, scratch / "wandb")
                res["wandb-offline"] = {"log_artifact_ms": w, "finish_s": finish}
                print(
                    f"  {fmt_size(size)} wandb-offline      log_artifact "
                    f"{c.stats(w)['median']:.0f} ms median  finish {finish:.1f}s",
                    flush=True,
                )
                shutil.rmtree(scratch / "wandb", ignore_errors=True)
                shutil.rmtree(scratch / f"none-{size}", ignore_errors=True)
            base = res.get("none", {}).get("wall_s")
            for r in res.values():
                if base and "wall_s" in r:
                    r["fit_ratio"] = r["wall_s"] / base
                for k in ("upload_ms", "after_save_ms", "log_artifact_ms"):
                    if k in r:
                        r[k.replace("_ms", "_stats_ms")] = c.stats(r[k])
            out["sizes"][fmt_size(size)] = res
    finally:
        servers.close()
        shutil.rmtree(scratch, ignore_errors=True)
    tag = "peers" if ("mlflow" in variants or "wandb-offline" in variants) else "chronicle"
    c.save(f"fig2_checkpoint_{tag}" + ("_quick" if a.quick else ""), out)


if __name__ == "__main__":
    main()
