"""A plain LightningModule that logs TOFU torchmetrics from its validation step (the evaluator's own classes).

``python lightning_metrics.py OUT.json DEVICES`` validates on ``DEVICES`` CPU processes (``ddp``, gloo) and writes
rank zero's logged values. Lightning's ddp launcher re-executes this file for rank 1, so it is a program."""

from __future__ import annotations

import json
import sys

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from perta_lightning.benchmarks.metrics import MinKMiaAUC
from perta_lightning.benchmarks.tofu.metrics import TruthRatio
from perta_lightning.functional import tofu_metrics as F

NUM_FORGET, NUM_HOLDOUT, NUM_PERTURBED = 7, 6, 3  # 13 rows: 2 ranks pad with a repeat


def tensors() -> tuple[torch.Tensor, ...]:
    """Per-example values of 7 forget and 6 holdout examples: index, holdout flag, NLLs, Min-K% scores."""
    generator = torch.Generator().manual_seed(0)
    rows = NUM_FORGET + NUM_HOLDOUT
    index = torch.cat([torch.arange(NUM_FORGET), torch.arange(NUM_HOLDOUT)])
    holdout = torch.arange(rows) >= NUM_FORGET
    correct = torch.rand(rows, generator=generator, dtype=torch.float64) * 3
    perturbed = torch.rand(rows, NUM_PERTURBED, generator=generator, dtype=torch.float64) * 3
    min_k = torch.rand(rows, generator=generator, dtype=torch.float64) + holdout.double() * 0.3
    return index, holdout, correct, perturbed, min_k


def expected() -> dict[str, float]:
    """The same scores from the functional formulas over the whole data, in one process."""
    index, holdout, correct, perturbed, min_k = tensors()
    forget = ~holdout
    return {
        "forget_truth_ratio": F.truth_ratio_score(F.truth_ratio(correct[forget], perturbed[forget]), closer_to_one=True),
        "mia_min_k_auc": F.auc_forget_vs_holdout(min_k[forget], min_k[holdout]),
    }


class UserModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)  # a real module has weights; this one is not used
        self.forget_truth_ratio = TruthRatio(closer_to_one=True)
        self.mia = MinKMiaAUC()

    def validation_step(self, batch, batch_idx):
        index, holdout, correct, perturbed, min_k = batch
        forget = ~holdout
        if forget.any():
            self.forget_truth_ratio.update(index[forget], correct[forget], perturbed[forget])
            self.mia.update(index[forget], min_k[forget], holdout=False)
        if holdout.any():
            self.mia.update(index[holdout], min_k[holdout], holdout=True)
        self.log("forget_truth_ratio", self.forget_truth_ratio)
        self.log("mia_min_k_auc", self.mia)


def validate(devices: int) -> tuple[dict[str, float], Trainer]:
    loader = DataLoader(TensorDataset(*tensors()), batch_size=2, shuffle=False)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(UserModule(), loader, verbose=False)
    return {key: float(value) for key, value in trainer.callback_metrics.items()}, trainer


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    values, trainer = validate(devices)
    if trainer.is_global_zero:
        with open(out, "w") as file:
            json.dump({"world_size": trainer.world_size, "values": values}, file)
