"""Train a tiny BERT-like classifier with the HuggingFace Trainer, tracked by Chronicle.

Nothing is downloaded: the model is built from a config, and the data are scikit-learn's
bundled 8x8 digits read as 64 "tokens" (pixel intensities 0-16), or generated sequences when
scikit-learn is absent. Runs on the embedded store (no server needed)::

    pip install "chronicle-integrations[transformers,examples]"
    python examples/train_transformers.py --home ./chronicle --max-steps 30

Set ``CHRONICLE_URL`` to track on a server instead. Passing the callback is all it takes:
the run starts with training, each ``checkpoint-N`` folder is uploaded as it is written
(also those ``save_total_limit`` deletes right after), and the run ends ``succeeded``,
``failed_crash`` (with the exception) or ``failed_abandoned`` (Ctrl+C); SIGTERM leaves it
resumable: run again with ``--resume`` to continue the same run.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from chronicle_integrations import Chronicle
from chronicle_integrations.transformers import ChronicleTrainerCallback


class Digits(torch.utils.data.Dataset):
    """8x8 digit images as sequences of 64 tokens (vocabulary 17), 10 labels."""

    def __init__(self) -> None:
        try:
            from sklearn.datasets import load_digits

            digits = load_digits()
            self.ids = torch.tensor(digits.data, dtype=torch.long)
            self.labels = torch.tensor(digits.target, dtype=torch.long)
        except ImportError:  # generated stand-in: label = the most frequent token mod 10
            gen = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, 17, (512, 64), generator=gen)
            self.labels = self.ids.mode(dim=1).values % 10

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default="chronicle", help="embedded store directory")
    parser.add_argument("--output-dir", default="hf_output", help="Trainer output_dir")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from the last checkpoint in --output-dir (same run)",
    )
    opts = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=17,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=10,
    )
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=opts.output_dir,
        max_steps=opts.max_steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=1,
        logging_steps=10,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    with Chronicle(home=opts.home) as chronicle:
        callback = ChronicleTrainerCallback(chronicle=chronicle, experiment_name="digits-bert-tiny")
        trainer = Trainer(model=model, args=args, train_dataset=Digits(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=True if opts.resume else None)

        run = callback.run
        if run is None:
            print("tracking was unavailable; training finished anyway")
            return
        info = run.info()
        print(f"run {run.key}: {info.state.value} ({chronicle.target})")
        folders: dict[str, int] = {}
        for asset in run.assets():
            folder = asset.name.split("/")[0]
            folders[folder] = folders.get(folder, 0) + asset.size
        for folder, size in sorted(folders.items(), key=lambda kv: int(kv[0].split("-")[-1])):
            print(f"  asset {folder}/  {size / 1024:.1f} KiB")
        print(f"  events: {' -> '.join(e.to_state or '' for e in run.events() if e.to_state)}")


if __name__ == "__main__":
    main()
