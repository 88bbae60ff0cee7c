"""``perta pipeline``: the whole PerTA study, end to end, resumable.

Stages, each writing one artifact under ``--output`` with the settings that made it (``perta_stage.json``)
and skipped when that artifact already exists with the same settings:

1. ``data``: the synthetic benchmark and its tokenizer (or a local / hub TOFU source and a pretrained model);
2. ``models/base``: θ0 pre-trained on the world-knowledge corpus;
3. ``models/full`` and ``models/retain``: θ0 fine-tuned on all authors / on the retain authors only;
4. ``models/reinforced``: θ_full fine-tuned further on the forget split; τ = θ_r − θ_full;
5. ``importance/at_<model>``: forget and retain importance (grad and Fisher) on equally many examples;
6. ``models/<tv|perta_grad|perta_fisher>/alpha_<α>``: streaming merges over the α grid;
7. ``models/<grad_ascent|grad_diff|npo>``: training-based baselines;
8. ``eval/<name>.json``: TOFU evaluation of every model, Forget Quality against θ_retain;
9. ``report.json``, ``report.md``, ``tradeoff.png``, ``weights.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from perta_lightning.data.synthetic import SyntheticSpec, write_benchmark
from perta_lightning.data.tofu import TofuSource
from perta_lightning.io import atomic_write_text

STAGE_FILE = "perta_stage.json"


@dataclass
class Preset:
    """Sizes and schedules of one run of the study (``tiny`` for tests, ``demo`` for the README)."""

    num_authors: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    pretrain_epochs: int
    finetune_epochs: int
    reinforce_epochs: int
    unlearn_epochs: int
    alphas: list[float]
    importance_examples: int
    eval_max_new_tokens: int
    finetune_lr: float = 2e-3
    pretrain_lr: float = 3e-3
    reinforce_lr: float = 1e-3
    unlearn_lr: float = 5e-4
    batch_size: int = 16
    num_background_authors: int = 6
    perta_beta: float = 1.0


PRESETS = {
    "tiny": Preset(num_authors=20, hidden_size=64, num_layers=2, vocab_size=512, pretrain_epochs=6,
                   finetune_epochs=8, reinforce_epochs=3, unlearn_epochs=2, alphas=[1.0, 8.0], perta_beta=16.0,
                   importance_examples=20, eval_max_new_tokens=24, num_background_authors=2),
    "demo": Preset(num_authors=40, hidden_size=128, num_layers=3, vocab_size=768, pretrain_epochs=15,
                   finetune_epochs=20, reinforce_epochs=5, unlearn_epochs=5,
                   alphas=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0], perta_beta=16.0,
                   importance_examples=40, eval_max_new_tokens=32),
}


@dataclass
class Stage:
    """An artifact directory and the settings that made it; ``run`` is skipped when they match."""

    directory: Path
    settings: dict[str, Any]

    def done(self) -> bool:
        marker = self.directory / STAGE_FILE
        return marker.is_file() and json.loads(marker.read_text())["settings"] == _plain(self.settings)

    def run(self, work: Callable[[], Any]) -> float:
        """Run ``work`` unless done; return its wall-clock seconds (recorded, so resumed runs report them)."""
        if self.done():
            print(f"[perta pipeline] {self.directory}: up to date, skipped", flush=True)
            return json.loads((self.directory / STAGE_FILE).read_text())["seconds"]
        print(f"[perta pipeline] {self.directory}: running", flush=True)
        start = time.perf_counter()
        work()
        seconds = time.perf_counter() - start
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / STAGE_FILE,
                          json.dumps({"settings": _plain(self.settings), "seconds": seconds}, indent=2))
        return seconds


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: asdict(v) if hasattr(v, "__dataclass_fields__") else str(v)))


def train_stage(module: Any, source: TofuSource, tokenizer: str, split: str | list[str], epochs: int,
                batch_size: int, accelerator: str, devices: int, paired_split: str | None = None) -> None:
    """Fit ``module`` for ``epochs`` on ``split`` (plus ``paired_split`` batches); the module saves itself."""
    import lightning as L

    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.data.tofu import PromptFormat

    data = TofuDataModule(source, PromptFormat(tokenizer=tokenizer), train_split=split, paired_split=paired_split,
                          batch_size=batch_size)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, data)


def pipeline(
    output: str = "runs/demo",
    preset: Literal["tiny", "demo"] = "demo",
    source: TofuSource | None = None,
    base_model: str | None = None,
    forget_split: str = "forget10",
    retain_split: str = "retain90",
    alphas: list[float] | None = None,
    perta_beta: float | None = None,
    importance_at: list[Literal["full", "base"]] | None = None,
    baselines: list[Literal["grad_ascent", "grad_diff", "npo"]] | None = None,
    seed: int = 0,
    accelerator: str = "cpu",
    devices: int = 1,
) -> Path:
    """Run the PerTA study end to end and write its report; returns the output folder.

    Args:
        output: folder for every artifact; an interrupted run resumes from it.
        preset: sizes and schedules (``tiny``: a few minutes for tests; ``demo``: the README's main job).
        source: TOFU source; by default the synthetic benchmark of the preset, written to ``<output>/data``.
        base_model: a pretrained model directory to use as θ0 instead of pre-training one from scratch.
        forget_split: the forget split (``forget01``, ``forget05``, ``forget10``).
        retain_split: the matching retain split (``retain99``, ``retain95``, ``retain90``).
        alphas: α grid of the merges (the preset's by default).
        perta_beta: β of the PerTA weight w = s_f / (s_f + β·s_r + ε) (the preset's by default: 16, which
            protects parameters the retain set needs much more strongly than the paper's default β = 1; the
            weights are then smaller, so PerTA's useful α are larger than TV's).
        importance_at: models at which importance is estimated (default ``[full]``); adding ``base`` adds
            PerTA rows with importance at θ0, to compare with importance at θ_full.
        baselines: training-based unlearning baselines (default: ``grad_ascent``, ``grad_diff``, ``npo``).
        seed: seed of every stage.
        accelerator: Lightning accelerator of the training and evaluation stages.
        devices: devices per stage.
    """
    import lightning as L

    from perta_lightning.pipeline_stages import run_study

    settings = replace(PRESETS[preset], alphas=list(alphas or PRESETS[preset].alphas))
    if perta_beta is not None:
        settings = replace(settings, perta_beta=perta_beta)
    out = Path(output)
    L.seed_everything(seed, verbose=False)
    if source is None:
        spec = SyntheticSpec(settings.num_authors, seed, settings.num_background_authors)
        Stage(out / "data", {"spec": spec, "vocab": settings.vocab_size}).run(
            partial(write_benchmark, spec, str(out / "data"), True, settings.vocab_size))
        source = TofuSource(path=str(out / "data"))
    run_study(out, settings, source, base_model, forget_split, retain_split, list(importance_at or ["full"]),
              list(baselines if baselines is not None else ["grad_ascent", "grad_diff", "npo"]), seed,
              accelerator, devices)
    return out


def build_parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="perta pipeline", description=pipeline.__doc__.splitlines()[0])
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(pipeline)
    return parser


def cli_main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    options = {key: value for key, value in vars(args).items() if key != "config" and not key.startswith("__")}
    if isinstance(options.get("source"), dict):
        options["source"] = TofuSource(**options["source"])
    torch.set_float32_matmul_precision("high")
    out = pipeline(**options)
    print(f"[perta pipeline] report: {out / 'report.md'}")
