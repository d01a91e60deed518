"""A tiny HuggingFace training setup for the Transformers integration tests.

Importable by the tests (``make_trainer`` & co.) and runnable as a script for what needs a
process of its own (Ctrl+C, SIGTERM, torchrun)::

    python _hf_app.py wait OUT_DIR [--jit]   # writes OUT_DIR/ready at step 3, then waits
    python _hf_app.py ddp OUT_DIR [--cancel] # under torchrun: a short DDP run (gloo, CPU)
    python _hf_app.py train OUT_DIR STEPS [--resume]
    python _hf_app.py added OUT_DIR crash|thread|catch NAME  # trainer.add_callback(...)

Identity and store come from the environment (``$CHRONICLE_EXPERIMENT`` ...,
``$CHRONICLE_HOME`` or ``$CHRONICLE_URL``), like a Chronicle-managed worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

torch.set_num_threads(1)

SEQ_LEN = 8
VOCAB = 32


def make_model(seed: int = 0) -> BertForSequenceClassification:
    """A BERT-like classifier small enough to train in milliseconds (built, not downloaded)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ_LEN,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    """Generated token sequences; the label is whether token 1 appears. ``fail_after``
    makes the ``fail_after``-th ``__getitem__`` call raise."""

    def __init__(self, size: int = 64, fail_after: int | None = None) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (size, SEQ_LEN), generator=gen)
        self.labels = (self.ids == 1).any(dim=1).long()
        self.fail_after = fail_after
        self.calls = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError(f"dataset exploded at item call {self.calls}")
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def make_args(output_dir: str | os.PathLike[str], **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=1,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        learning_rate=1e-3,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def make_trainer(
    output_dir: str | os.PathLike[str],
    callbacks: list[Any],
    dataset: torch.utils.data.Dataset | None = None,
    model: Any = None,
    eval_dataset: torch.utils.data.Dataset | None = None,
    **overrides: Any,
) -> Trainer:
    return Trainer(
        model=model or make_model(),
        args=make_args(output_dir, **overrides),
        train_dataset=dataset if dataset is not None else Tokens(),
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )


class SlowRankOneTrainer(Trainer):
    """Rank 1 writes its part of each checkpoint (``rng_state_1.pth``) late, so that rank 0
    would see an incomplete folder in ``on_save`` without the callback's barrier."""

    def _save_rng_state(self, output_dir: str) -> None:
        if self.args.process_index == 1:
            time.sleep(1.0)
        super()._save_rng_state(output_dir)


class CancelAt(TrainerCallback):
    """At ``step`` (world process zero), another client cancels the run, then this waits
    (bounded) until the Chronicle callback's heartbeats noticed."""

    def __init__(self, ours: Any, client: Any, step: int) -> None:
        self.ours = ours
        self.client = client
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        run = self.ours.run
        if state.global_step == self.step and run is not None:
            self.client.run(run.experiment_id, run.variation, run.run).fail(
                "abandoned", "cancelled by the agent"
            )
            run.cancelled.wait(30)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RecordSaves(TrainerCallback):
    """Placed after the Chronicle callback: the SHA-256 of every file of each checkpoint
    folder as it was at ``on_save`` time, keyed by asset name (``checkpoint-N/<rel>``)."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.steps: list[int] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir, f"checkpoint-{state.global_step}")
        self.steps.append(state.global_step)
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                self.files[f"{folder.name}/{file.relative_to(folder).as_posix()}"] = digest(file)


class RaiseAt(TrainerCallback):
    """Raises ``exc`` in ``hook`` at ``step``."""

    def __init__(self, hook: str, step: int, exc: BaseException) -> None:
        self.step = step
        self.exc = exc
        setattr(self, hook, self._maybe_raise)

    def _maybe_raise(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            raise self.exc


class StopAt(TrainerCallback):
    """Asks training to stop at ``step`` (what EarlyStoppingCallback does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


class Pause(TrainerCallback):
    """At ``step``: write ``ready`` (with the run key) into ``out``, then wait for ``go``
    (for the parent to send a signal meanwhile); later steps sleep ``slow`` seconds."""

    def __init__(self, out: Path, chronicle_cb: Any, step: int = 2, slow: float = 0.0) -> None:
        self.out = out
        self.chronicle_cb = chronicle_cb
        self.step = step
        self.slow = slow

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            run = self.chronicle_cb.run
            (self.out / "ready.tmp").write_text(
                json.dumps({"key": run.key if run else None, "pid": os.getpid()})
            )
            os.replace(self.out / "ready.tmp", self.out / "ready")
            deadline = time.monotonic() + 60
            while not (self.out / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        elif state.global_step > self.step and self.slow:
            time.sleep(self.slow)


def _write_result(out: Path, callback: Any, trainer: Trainer, outcome: str) -> None:
    run = callback.run
    (out / "result.json").write_text(
        json.dumps(
            {
                "key": run.key if run else None,
                "outcome": outcome,
                "global_step": trainer.state.global_step,
            }
        )
    )


def main(argv: list[str]) -> int:
    from chronicle_integrations.transformers import ChronicleTrainerCallback

    mode, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    callback = ChronicleTrainerCallback(heartbeat_interval=0.5)
    if mode == "wait":
        jit = "--jit" in argv
        pause = Pause(out, callback, step=3, slow=0.3 if jit else 0.0)
        trainer = make_trainer(
            out / "output",
            [callback, pause],
            max_steps=200 if jit else 20,
            enable_jit_checkpoint=jit,
            save_steps=1000 if jit else 2,
        )  # jit: its checkpoint only
        trainer.train()
        _write_result(out, callback, trainer, "returned")
        return 0
    if mode == "ddp":
        recorder = RecordSaves()
        callbacks = [callback, recorder]
        cancel = "--cancel" in argv
        if cancel:
            from chronicle_integrations import Chronicle

            callbacks.append(
                CancelAt(
                    callback,
                    Chronicle(home=out / "other" if os.environ.get("CHRONICLE_URL") else None),
                    2,
                )
            )
        trainer = SlowRankOneTrainer(
            model=make_model(),
            train_dataset=Tokens(),
            args=make_args(
                out / "output", max_steps=40 if cancel else 4, save_steps=2, ddp_backend="gloo"
            ),
            callbacks=callbacks,
        )
        trainer.train()
        if trainer.is_world_process_zero():
            _write_result(out, callback, trainer, "returned")
            (out / "files.json").write_text(json.dumps(recorder.files))
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # Leave together and tear the process group down explicitly: a rank exiting
            # while gloo's threads still run can abort ("terminate called without an
            # active exception") under load.
            dist.barrier()
            dist.destroy_process_group()
        return 0
    if mode == "train":
        steps = int(argv[2])
        trainer = make_trainer(out / "output", [callback], max_steps=steps)
        trainer.train(resume_from_checkpoint="--resume" in argv or None)
        _write_result(out, callback, trainer, "returned")
        return 0
    if mode == "added":
        return added(out, argv[2], argv[3])
    raise SystemExit(f"unknown mode {mode!r}")


def added(out: Path, how: str, name: str) -> int:
    """The callback added the way HF's docs show, ``trainer.add_callback(...)`` after the
    Trainer was built; the dataset raises at step 3. ``how``: ``crash`` (uncaught, main
    thread), ``thread`` (uncaught in a worker thread), ``catch`` (the program catches the
    exception and goes on to exit normally)."""
    import threading

    from chronicle_integrations.transformers import ChronicleTrainerCallback

    callback = ChronicleTrainerCallback(heartbeat_interval=0.5, experiment_name=name)
    trainer = make_trainer(out / "output", [], dataset=Tokens(fail_after=9), max_steps=8)
    trainer.add_callback(callback)
    if how == "crash":
        trainer.train()
    elif how == "thread":
        worker = threading.Thread(target=trainer.train)
        worker.start()
        worker.join()
    elif how == "catch":
        try:
            trainer.train()
        except RuntimeError as exc:
            (out / "caught.json").write_text(
                json.dumps({"error": str(exc), "state": str(callback.run.state)})  # type: ignore[union-attr]
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
