"""Importance estimation versus one training epoch over the same examples (CPU, demo-size Llama).

    PYTHONPATH=. python bench/bench_importance.py [--rows 32] [--rounds 3] [--batch-size 8]

One "round" runs, side by side: a training epoch of ``CausalLMModule`` + AdamW over forget ∪ retain,
then ``grad``, ``fisher`` by batch, and exact ``fisher`` by example with ``fisher_mode`` ``loop`` (one
backward per example) and ``hooks`` (one batched backward) over forget and retain (same examples,
same batch size). Only ``trainer.fit`` is timed. Prints the median seconds of each and its ratio to
the training epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from perta_lightning.benchmarks.tofu.source import TofuSource
from perta_lightning.data.datamodule import TofuDataModule
from perta_lightning.data.formatting import PromptFormat
from perta_lightning.data.importance import ImportanceDataModule
from perta_lightning.modules.finetune import CausalLMModule
from perta_lightning.modules.importance import ImportanceModule, importance_trainer_defaults
from tests.tiny import make_tiny_assets, write_tofu_folder

QUIET = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False,
         "enable_checkpointing": False, "enable_model_summary": False}


class Finetune(CausalLMModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def timed_fit(module, data, **trainer_kwargs) -> float:
    trainer = Trainer(**{**trainer_kwargs, **QUIET})
    start = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32, help="rows per split")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="bench_importance-"))
    assets = make_tiny_assets(root, hidden=256, layers=4)
    data_dir = write_tofu_folder(root / "bench_data", forget=args.rows, retain=args.rows)
    full = (data_dir / "forget10.json").read_text() + (data_dir / "retain90.json").read_text()
    (data_dir / "full.json").write_text(full)
    model, source = str(assets["model"]), TofuSource(path=str(data_dir))
    runs: dict[str, list[float]] = {"train_epoch": [], "grad": [], "fisher_batch": [], "fisher_example_loop": [],
                                    "fisher_example_hooks": []}
    for round_index in range(args.rounds):
        data = TofuDataModule(source, PromptFormat(tokenizer=model), train_split="full", batch_size=args.batch_size, shuffle=False)
        runs["train_epoch"].append(timed_fit(Finetune(model=model), data, max_epochs=1))
        for name, statistic, granularity, mode in (
            ("grad", "grad", "example", "auto"), ("fisher_batch", "fisher", "batch", "auto"),
            ("fisher_example_loop", "fisher", "example", "loop"), ("fisher_example_hooks", "fisher", "example", "hooks"),
        ):
            out = root / f"out-{round_index}-{name}"
            module = ImportanceModule(model, str(out), statistic, granularity, mode)
            data = ImportanceDataModule(source, PromptFormat(tokenizer=model), batch_size=args.batch_size)
            runs[name].append(timed_fit(module, data, **importance_trainer_defaults()))
    base = statistics.median(runs["train_epoch"])
    report = {name: {"median_s": round(statistics.median(t), 3), "ratio_to_train_epoch":
                     round(statistics.median(t) / base, 2), "runs_s": [round(x, 3) for x in t]}
              for name, t in runs.items()}
    print(json.dumps({"examples": 2 * args.rows, "batch_size": args.batch_size, "model": "Llama hidden 256, 4 layers",
                      "results": report}, indent=2))


if __name__ == "__main__":
    main()
