"""Figure 1: training-loop overhead of tracking.

A small CPU model is fitted again and again, the variants interleaved (rotating order, one
warm-up fit each, discarded), in ONE process per venv, so the baseline is measured in the same
run and under the same load as the tracked fits:

  project venv:  none | chronicle-embedded | chronicle-http   (ChronicleCallback()/
                 ChronicleTrainerCallback() configured from the environment, as a user would)
  peers venv:    none | mlflow  (Lightning MLFlowLogger / HF report_to="mlflow" against an
                 `mlflow server` on loopback)

Reported: fit wall time per variant (median, min-max) and the ratio of medians to the
baseline of the same process; for Chronicle also the time spent inside the callback's hooks
(exact attribution, immune to machine noise).

``--metrics``: every variant's fit validates every ``--val-every`` steps (Lightning: a
validation loop logging ``val_loss`` and ``ModelCheckpoint(monitor="val_loss")``; HF: eval
steps with ``metric_for_best_model="loss"``), so the callbacks record metrics and each
checkpoint's monitored value. The variant ``chronicle-embedded-nometrics`` is the same fit
and callback with the metric recording off (Lightning: ``ChronicleCallback(log_metrics=
False)``; HF, which has no such switch: the callback's ``_record_metrics`` replaced by a
no-op on the instance, its hooks still called); checkpoint records still go with uploads.
Each repeat runs it next to ``chronicle-embedded``, and ``metrics_on_vs_off`` is their paired
ratio: what recording metrics costs the fit.

    .venv/bin/python benchmarks/bench_training.py --framework lightning [--quick]
    .venv/bin/python benchmarks/bench_training.py --framework hf --metrics [--quick]
    benchmarks/.peers-venv/bin/python benchmarks/bench_training.py --framework lightning \
        --variants none,mlflow [--quick]
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
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

#: The variant whose callback records no metric summaries (see the module's doc).
NO_METRICS = "chronicle-embedded-nometrics"
#: Validation batches of 32 samples per validation (``--metrics``).
VAL_BATCHES = 8


HOOK_TIMES: dict[str, float] = defaultdict(float)
HOOK_CALLS: dict[str, int] = defaultdict(int)


def timed_hooks(obj: object, names: list[str]) -> None:
    """Wrap the instance's hooks to accumulate the time spent inside them."""
    for name in names:
        fn = getattr(obj, name, None)
        owner = next((k for k in type(obj).__mro__ if name in vars(k)), None)
        if fn is None or owner is None or not owner.__module__.startswith("chronicle"):
            continue  # the framework's own no-op hook: not ours to time

        @functools.wraps(fn)
        def wrapper(*a, __fn=fn, __name=name, **kw):
            t0 = time.perf_counter()
            try:
                return __fn(*a, **kw)
            finally:
                HOOK_TIMES[__name] += time.perf_counter() - t0
                HOOK_CALLS[__name] += 1

        setattr(obj, name, wrapper)


LIGHTNING_HOOKS = [
    "setup",
    "on_fit_start",
    "on_fit_end",
    "on_train_start",
    "on_train_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_validation_start",
    "on_validation_end",
    "on_save_checkpoint",
    "on_exception",
    "teardown",
    "state_dict",
    "on_before_backward",
    "on_after_backward",
]
HF_HOOKS = [
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_step_end",
    "on_substep_end",
    "on_save",
    "on_log",
    "on_evaluate",
    "on_pre_optimizer_step",
    "on_optimizer_step",
]


# ---------------------------------------------------------------------- Lightning
def lightning_fit(variant: str, steps: int, root: Path, ctx: dict) -> float:
    width = ctx["width"]
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Net(pl.LightningModule):
        def __init__(self, width: int = 256, lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(64, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, 1),
            )

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    class ValidatedNet(Net):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    torch.manual_seed(0)
    x = torch.randn(steps * 32, 64)
    loader = DataLoader(TensorDataset(x, x[:, :1] * 2), batch_size=32)
    callbacks: list = []
    validation: dict = {}
    if ctx["metrics"]:
        from lightning.pytorch.callbacks import ModelCheckpoint

        xv = torch.randn(VAL_BATCHES * 32, 64)
        validation = {"val_dataloaders": DataLoader(TensorDataset(xv, xv[:, :1] * 2), 32)}
        callbacks.append(
            ModelCheckpoint(dirpath=str(root / "checkpoints"), monitor="val_loss", save_top_k=2)
        )
    logger = False
    if variant.startswith("chronicle"):
        from chronicle_integrations.lightning import ChronicleCallback

        cb = ChronicleCallback(log_metrics=variant != NO_METRICS)
        timed_hooks(cb, LIGHTNING_HOOKS)
        callbacks.insert(0, cb)
    elif variant == "noop-callback":
        # What Lightning charges for *any* extra callback: the same hooks as ours, empty.
        callbacks.append(
            type(
                "Noop",
                (pl.Callback,),
                {
                    name: (lambda self, *a, **kw: None)
                    for name in LIGHTNING_HOOKS
                    if name not in ("state_dict", "setup", "teardown", "on_exception")
                },
            )()
        )
    elif variant == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(experiment_name="bench-fit", tracking_uri=ctx["mlflow_url"])
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        log_every_n_steps=50,
        **({"val_check_interval": ctx["val_every"]} if ctx["metrics"] else {}),
    )
    model = (ValidatedNet if ctx["metrics"] else Net)(width=width)
    t0, c0 = time.perf_counter(), time.thread_time()
    trainer.fit(model, loader, **validation)
    elapsed = time.perf_counter() - t0
    ctx["thread_cpu"] = time.thread_time() - c0
    if variant.startswith("chronicle"):
        run = cb.run
        assert run is not None and run.state.value == "succeeded", run
        _check_recorded(variant, run, ctx, "val_loss")
    return elapsed


def _check_recorded(variant: str, run, ctx: dict, metric: str) -> None:
    """With ``--metrics``, the run holds ``metric``'s summary exactly when the variant records
    metrics (outside the timed fit: the variant measures what it claims to)."""
    if not ctx["metrics"]:
        return
    recorded = metric in (run.info().metrics or {})
    assert recorded == (variant != NO_METRICS), (variant, run.info().metrics)


# ---------------------------------------------------------------------- HF Trainer
def hf_fit(variant: str, steps: int, root: Path, ctx: dict) -> float:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    width = ctx["width"]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(64, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, 1),
            )

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __init__(self, n: int, seed: int = 0) -> None:
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 64, generator=g)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.x[i, :1] * 2}

    torch.manual_seed(0)
    callbacks = []
    if variant.startswith("chronicle"):
        from chronicle_integrations.transformers import ChronicleTrainerCallback

        cb = ChronicleTrainerCallback()
        if variant == NO_METRICS:
            cb._record_metrics = lambda *a, **kw: None  # no public switch (module doc)
        timed_hooks(cb, HF_HOOKS)
        callbacks.append(cb)
    elif variant == "noop-callback":
        # What the Trainer charges for *any* extra callback: the same hooks as ours, empty.
        callbacks.append(
            type(
                "Noop",
                (TrainerCallback,),
                {name: (lambda self, *a, **kw: None) for name in HF_HOOKS},
            )()
        )
    evaluation: dict = {}
    save_steps = max(1, steps // 2)
    if ctx["metrics"]:
        # Saves at every second evaluation: each checkpoint is recorded with its eval_loss.
        save_steps = 2 * ctx["val_every"]
        evaluation = {
            "eval_strategy": "steps",
            "eval_steps": ctx["val_every"],
            "per_device_eval_batch_size": 32,
            "prediction_loss_only": True,
            "metric_for_best_model": "loss",
            "greater_is_better": False,
        }
    args = TrainingArguments(
        output_dir=str(root),
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=0.01,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=50,
        report_to=["mlflow"] if variant == "mlflow" else "none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_total_limit=2,
        **evaluation,
    )
    trainer = Trainer(
        model=Net(),
        args=args,
        train_dataset=Data(steps * 32),
        eval_dataset=Data(VAL_BATCHES * 32, seed=1) if ctx["metrics"] else None,
        callbacks=callbacks,
    )
    t0, c0 = time.perf_counter(), time.thread_time()
    trainer.train()
    elapsed = time.perf_counter() - t0
    ctx["thread_cpu"] = time.thread_time() - c0
    if variant.startswith("chronicle"):
        assert cb.run is not None and cb.run.state.value == "succeeded", cb.run
        _check_recorded(variant, cb.run, ctx, "eval_loss")
    return elapsed


# ---------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--framework", choices=["lightning", "hf"], default="lightning")
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated (default none,chronicle-embedded,chronicle-http; with "
        f"--metrics also {NO_METRICS}, next to chronicle-embedded)",
    )
    p.add_argument(
        "--metrics",
        action="store_true",
        help="validate every --val-every steps (val_loss, a monitoring ModelCheckpoint / "
        "metric_for_best_model), so the callbacks record metrics",
    )
    p.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="steps between validations with --metrics (default: a quarter of --steps)",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per epoch/fit")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--width",
        type=int,
        default=256,
        help="hidden width of the MLP (256: a ~1.5 ms step, the worst case for a "
        "per-step cost; 1024: a ~10x longer step, still a small model)",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the result file name (e.g. long)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, cProfile one fit per tracked variant (training thread)",
    )
    args = p.parse_args()
    steps = args.steps or (100 if args.quick else 600)
    repeats = args.repeats or (2 if args.quick else 5)
    default = f"none,chronicle-embedded,{NO_METRICS},chronicle-http" if args.metrics else None
    variants = (args.variants or default or "none,chronicle-embedded,chronicle-http").split(",")
    val_every = args.val_every or max(1, steps // 4)
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)

    c.WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"fit-{args.framework}-", dir=c.WORK))
    ctx: dict = {"width": args.width, "metrics": args.metrics, "val_every": val_every}
    servers = contextlib.ExitStack()
    fit = lightning_fit if args.framework == "lightning" else hf_fit
    times: dict[str, list[float]] = {v: [] for v in variants}
    #: CPU time of the training thread per fit: what the training thread itself executed
    #: (our hooks included), immune to other tenants' load, blind to GIL waits.
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    hooks: dict[str, dict] = {}
    try:
        if any(v.startswith("chronicle-http") for v in variants):
            ctx["chronicle_server"] = servers.enter_context(
                c.chronicle_server(
                    f"sqlite:///{scratch}/server.db",
                    scratch / "server-assets",
                    scratch / "chronicle-server.log",
                )
            )
        if "mlflow" in variants:
            srv = servers.enter_context(
                c.mlflow_server(
                    f"sqlite:///{scratch}/mlflow.db",
                    scratch / "mlflow-artifacts",
                    scratch / "mlflow-server.log",
                )
            )
            ctx["mlflow_url"] = srv.url
            os.environ["MLFLOW_TRACKING_URI"] = srv.url
            os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "bench-fit-hf")

        def one(variant: str, rep: int, record: bool) -> None:
            for key in ("CHRONICLE_URL", "CHRONICLE_HOME"):
                os.environ.pop(key, None)
            if variant.startswith("chronicle-embedded"):
                os.environ["CHRONICLE_HOME"] = str(scratch / "embedded-home")
            elif variant.startswith("chronicle-http"):
                os.environ["CHRONICLE_URL"] = ctx["chronicle_server"].url
                os.environ["CHRONICLE_HOME"] = str(scratch / "http-home")
            root = scratch / f"{variant}-{rep}"
            HOOK_TIMES.clear()
            HOOK_CALLS.clear()
            elapsed = fit(variant, steps, root, ctx)
            shutil.rmtree(root, ignore_errors=True)
            if record:
                times[variant].append(elapsed)
                cpu[variant].append(ctx["thread_cpu"])
                if HOOK_TIMES:
                    h = hooks.setdefault(
                        variant, {"total": [], "per_hook": defaultdict(list), "calls": {}}
                    )
                    h["total"].append(sum(HOOK_TIMES.values()))
                    for k, v in HOOK_TIMES.items():
                        h["per_hook"][k].append(v)
                    h["calls"] = dict(HOOK_CALLS)
            print(
                f"  {variant:20s} rep {rep}: {elapsed:.3f}s"
                + (f"  hooks {sum(HOOK_TIMES.values()) * 1e3:.1f} ms" if HOOK_TIMES else "")
                + ("" if record else "  (warm-up)"),
                flush=True,
            )

        for v in variants:
            one(v, -1, record=False)
        for rep in range(repeats):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for v in order:
                one(v, rep, record=True)
        if args.profile:
            import cProfile
            import pstats

            for v in variants:
                if v == "none":
                    continue
                prof = cProfile.Profile()
                prof.enable()
                one(v, 99, record=False)
                prof.disable()
                path = c.RESULTS / f"fig1_{args.framework}_{v}.prof.txt"
                with open(path, "w") as fh:
                    st = pstats.Stats(prof, stream=fh)
                    st.sort_stats("cumulative").print_stats("chronicle_integrations", 40)
                    st.sort_stats("tottime").print_stats(25)
                print(f"  profile: {path}")
    finally:
        servers.close()
        shutil.rmtree(scratch, ignore_errors=True)

    base = c.stats(times["none"])["median"] if "none" in times else None
    out = {
        "framework": args.framework,
        "steps": steps,
        "repeats": repeats,
        "torch_threads": args.threads,
        "width": args.width,
        "metrics": args.metrics,
        "val_every": val_every if args.metrics else None,
        "variants": {},
        "versions": c.versions(
            "torch", "lightning", "transformers", "mlflow", "chronicle-integrations"
        ),
    }
    for v, ts in times.items():
        s = c.stats(ts)
        entry = {
            "fit_s": s,
            "ratio": (s["median"] / base) if base else None,
            "thread_cpu_s": c.stats(cpu[v]),
        }
        if "none" in times and v != "none":
            # Each repeat runs every variant back to back: the ratio of a variant to the
            # untracked fit of the *same* repeat cancels the machine's slow drifts (other
            # tenants), which the ratio of medians does not.
            entry["paired_ratio"] = c.stats([t / b for t, b in zip(ts, times["none"], strict=True)])
            entry["thread_cpu_paired_ratio"] = c.stats(
                [t / b for t, b in zip(cpu[v], cpu["none"], strict=True)]
            )
        if v in hooks:
            h = hooks[v]
            entry["hook_s"] = c.stats(h["total"])
            entry["hook_fraction_of_baseline"] = (
                c.stats(h["total"])["median"] / base if base else None
            )
            entry["hook_breakdown_median_ms"] = {
                k: round(c.stats(vs)["median"] * 1e3, 3) for k, vs in h["per_hook"].items()
            }
            entry["hook_calls"] = h["calls"]
        out["variants"][v] = entry
        print(
            f"{v:20s} median {s['median']:.3f}s [{s['min']:.3f}-{s['max']:.3f}]"
            + (f"  ratio {entry['ratio']:.4f}" if entry["ratio"] else "")
            + (
                f"  paired {entry['paired_ratio']['median']:.4f} "
                f"[{entry['paired_ratio']['min']:.3f}-{entry['paired_ratio']['max']:.3f}]"
                if "paired_ratio" in entry
                else ""
            )
            + (
                f"  thread-cpu paired {entry['thread_cpu_paired_ratio']['median']:.4f}"
                if "thread_cpu_paired_ratio" in entry
                else ""
            )
            + (f"  hooks {entry['hook_s']['median'] * 1e3:.1f} ms" if v in hooks else "")
        )
    if "chronicle-embedded" in times and NO_METRICS in times:
        # Same fit, same callback, run next to each other in every repeat: the paired ratio
        # is what recording metrics costs (1.0: nothing measurable).
        on, off = "chronicle-embedded", NO_METRICS
        pair = {
            "paired_ratio": c.stats([a / b for a, b in zip(times[on], times[off], strict=True)]),
            "thread_cpu_paired_ratio": c.stats(
                [a / b for a, b in zip(cpu[on], cpu[off], strict=True)]
            ),
        }
        if on in hooks and off in hooks:
            pair["hook_ms_delta_median"] = round(
                (c.stats(hooks[on]["total"])["median"] - c.stats(hooks[off]["total"])["median"])
                * 1e3,
                3,
            )
        out["metrics_on_vs_off"] = pair
        print(
            f"metrics on/off (paired, same process): wall {pair['paired_ratio']['median']:.4f} "
            f"[{pair['paired_ratio']['min']:.3f}-{pair['paired_ratio']['max']:.3f}]  "
            f"thread-cpu {pair['thread_cpu_paired_ratio']['median']:.4f}"
            + (
                f"  hooks +{pair['hook_ms_delta_median']:.2f} ms"
                if "hook_ms_delta_median" in pair
                else ""
            )
        )
    tag = "peers" if "mlflow" in variants else "chronicle"
    c.save(
        f"fig1_{args.framework}_{tag}{'_metrics' if args.metrics else ''}"
        f"{'_quick' if args.quick else ''}"
        f"{'_profiled' if args.profile else ''}{'_' + args.tag if args.tag else ''}",
        out,
    )


if __name__ == "__main__":
    main()
