"""A plain LightningModule that logs the MUSE torchmetrics from its validation step.

``python muse_lightning_metrics.py OUT.json DEVICES`` validates on ``DEVICES`` CPU processes (``ddp``, gloo) and
writes rank zero's logged values. Lightning's ddp launcher re-executes this file for rank 1, so it is a program.
13 rows (7 forget, 6 holdout) in batches of 2: on 2 ranks the sampler pads rank 1 with a repeat of row 0.
"""

from __future__ import annotations

import json
import random
import sys

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from perta_lightning.benchmarks.muse.metrics import KnowMem, MiaAUC, MuseMetrics, VerbMem
from perta_lightning.functional import muse_metrics as M

NUM_FORGET, NUM_HOLDOUT, LENGTH, VOCAB = 7, 6, 9, 11
WORDS = ["the", "cat", "cats", "sat", "sitting", "on", "a", "mat", "mats", "runs", "running", "dog"]
RETAIN_AUC = 0.3


def rows() -> tuple[tuple[torch.Tensor, ...], list[str], list[str]]:
    """Tensors ``(row, index, holdout, logits (N, T, V), labels (N, T))``; a generation and a reference per row."""
    generator = torch.Generator().manual_seed(0)
    count = NUM_FORGET + NUM_HOLDOUT
    index = torch.cat([torch.arange(NUM_FORGET), torch.arange(NUM_HOLDOUT)])
    holdout = torch.arange(count) >= NUM_FORGET
    logits = torch.randn(count, LENGTH, VOCAB, generator=generator) * 3
    labels = torch.randint(0, VOCAB, (count, LENGTH), generator=generator)
    for row in range(count):  # right padding of varied length, at least 3 tokens
        labels[row, 3 + row % (LENGTH - 3):] = -100
    pick = random.Random(0)
    generations = [" ".join(pick.choices(WORDS, k=pick.randint(0, 6))) for _ in range(count)]
    references = [" ".join(pick.choices(WORDS, k=pick.randint(1, 6))) for _ in range(count)]
    return (torch.arange(count), index, holdout, logits, labels), generations, references


def expected() -> dict[str, float]:
    """The same aggregates from the functionals over the whole data, in one process."""
    (_, _, holdout, logits, labels), generations, references = rows()
    forget = ~holdout
    rouge_f = M.verbmem_scores(generations[:NUM_FORGET], references[:NUM_FORGET])
    rouge_h = M.knowmem_scores(generations[NUM_FORGET:], references[NUM_FORGET:])
    plus = M.min_k_plus_plus_score(logits, labels, 0.4)
    min_k = M.min_k_text_score(logits, labels, 0.4)
    auc_plus = M.auc_forget_vs_holdout(plus[forget], plus[holdout])
    return {
        "verbmem": rouge_f.mean().item(),
        "knowmem": rouge_h.mean().item(),
        "mia_min_k_plus_plus_auc": auc_plus,
        "forget_verbmem_rouge": rouge_f.mean().item(),
        "forget_knowmem_rouge": M.knowmem_scores(generations[:NUM_FORGET], references[:NUM_FORGET]).mean().item(),
        "retain_knowmem_rouge": rouge_h.mean().item(),
        "privleak": M.privleak(M.auc_forget_vs_holdout(min_k[forget], min_k[holdout]), RETAIN_AUC),
    }


class UserModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)  # a real module has weights; this one is not used
        _, self.generations, self.references = rows()
        self.verbmem, self.knowmem, self.mia = VerbMem(), KnowMem(), MiaAUC()
        self.muse = MuseMetrics(retain_auc=RETAIN_AUC)

    def validation_step(self, batch, batch_idx):
        row, index, holdout, logits, labels = batch
        texts = [self.generations[i] for i in row.tolist()], [self.references[i] for i in row.tolist()]
        forget = ~holdout
        plus = M.min_k_plus_plus_score(logits, labels, 0.4)
        min_k = M.min_k_text_score(logits, labels, 0.4)
        for group, chosen in (("forget", forget), ("holdout", holdout)):
            if not chosen.any():
                continue
            picked = [i for i, keep in enumerate(chosen.tolist()) if keep]
            generations, references = [texts[0][i] for i in picked], [texts[1][i] for i in picked]
            if group == "forget":
                self.verbmem.update(index[chosen], generations, references)
                self.muse["forget_verbmem_rouge"].update(index[chosen], generations, references)
                self.muse["forget_knowmem_rouge"].update(index[chosen], generations, references)
            else:
                self.knowmem.update(index[chosen], generations, references)
                self.muse["retain_knowmem_rouge"].update(index[chosen], generations, references)
            self.mia.update(index[chosen], plus[chosen], holdout=group == "holdout")
            self.muse["privleak"].update(index[chosen], min_k[chosen], holdout=group == "holdout")
        self.log("verbmem", self.verbmem)
        self.log("knowmem", self.knowmem)
        self.log("mia_min_k_plus_plus_auc", self.mia)
        self.log_dict(self.muse)  # the collection as the module docstring shows


def validate(devices: int) -> tuple[dict[str, float], Trainer]:
    loader = DataLoader(TensorDataset(*rows()[0]), batch_size=2, shuffle=False)
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
