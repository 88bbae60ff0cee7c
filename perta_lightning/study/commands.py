"""A study's stage as a ``perta`` command: what a training, importance or evaluation stage runs when it has
several devices (:class:`~perta_lightning.study.options.Runtime`), so that Lightning's launcher starts its ranks by
re-running that command line, as it does for a user's.
"""

from __future__ import annotations

import sys
from typing import Any

from perta_lightning.stages import StageRunner
from perta_lightning.study.options import Runtime


def optimizer_config(lr: float) -> dict[str, Any]:
    """The study's optimizer (AdamW at ``lr``, weight decay 0.01) as a config block."""
    return {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr, "weight_decay": 0.01}}


def trainer_config(runtime: Runtime, **options: Any) -> dict[str, Any]:
    return {"accelerator": runtime.accelerator, "devices": runtime.devices, "precision": runtime.precision,
            "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
            "enable_progress_bar": False, **options}


def fit_config(model_class: str, model_args: dict[str, Any], source: Any, tokenizer: str, splits: list[str],
                epochs: int, batch_size: int, runtime: Runtime, seed: int, paired_split: str | None = None,
                max_length: int | None = None) -> dict[str, Any]:
    """The ``perta fit`` config of a training stage: what :func:`perta_lightning.study.stages.fit` runs in this
    process."""
    from dataclasses import asdict

    from perta_lightning.data.formatting import PromptFormat

    prompt = PromptFormat(tokenizer=tokenizer) if max_length is None else PromptFormat(tokenizer, max_length)
    return {"seed_everything": seed,
            "trainer": trainer_config(runtime, max_epochs=epochs, limit_val_batches=0),
            "model": {"class_path": model_class, "init_args": model_args},
            "data": {"class_path": "perta_lightning.data.datamodule.TofuDataModule",
                     "init_args": {"source": asdict(source), "prompt": asdict(prompt), "train_split": list(splits),
                                   "paired_split": paired_split, "batch_size": batch_size}}}


def launch(runner: StageRunner, name: str, subcommand: str, config: dict[str, Any]) -> None:
    """Run a stage as ``perta <subcommand> --config <file>``: its own process tree, on every device its config
    names (Lightning's launcher starts the other ranks by re-running that command line). The config is kept in
    ``stages/commands/`` and the command's output in a log beside it; a failure is one error naming the log."""
    import json
    import subprocess

    from perta_lightning.errors import PertaError
    from perta_lightning.io import atomic_write_text

    folder = runner.root / "stages" / "commands"
    stem = name.replace("/", "__")
    config_file, log = folder / f"{stem}.json", folder / f"{stem}.log"
    atomic_write_text(config_file, json.dumps(config, indent=2, default=str))
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "perta_lightning", subcommand, "--config", str(config_file)],
                              stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise PertaError(f"stage {name}: perta {subcommand} on {config['trainer']['devices']} devices failed "
                         f"(exit status {done.returncode}; log {log}): {' / '.join(tail)}")
