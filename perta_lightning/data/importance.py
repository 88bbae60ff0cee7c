"""``ImportanceDataModule``: the forget and retain splits as pre-collated, per-rank batches for importance
estimation (:mod:`perta_lightning.modules.importance`).

Every rank gets the same number of batches of the same sizes (examples padded with copies marked
``valid = 0``), and no batch mixes the two splits; each batch carries ``split`` (``forget`` or ``retain``)
and ``source`` (where its rows came from) besides the tensors of :func:`~perta_lightning.data.formatting.collate_examples`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from perta_lightning import distributed
from perta_lightning.benchmarks.tofu.source import TofuSource
from perta_lightning.data.datamodule import encode_rows, subsample
from perta_lightning.data.formatting import PromptFormat, collate_examples, run_model_dir
from perta_lightning.errors import PertaValueError


class _RankBatches(IterableDataset):
    """Pre-collated batches of this rank (Lightning injects no sampler into an IterableDataset)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _unwrap(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


def rank_batches(
    examples: Sequence[dict[str, Any]], label: str, source: str, batch_size: int, rank: int, world: int, pad_id: int
) -> list[dict[str, Any]]:
    """This rank's batches of one split. Examples are padded to a multiple of ``world`` with copies
    marked ``valid = 0``, dealt round-robin, then cut into batches: every rank gets the same number of
    batches of the same sizes, and no batch mixes splits."""
    padded = [(example, 1.0) for example in examples]
    padded += [(examples[0], 0.0)] * (-len(padded) % world)
    mine = padded[rank::world]
    batches = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        batch = collate_examples([example for example, _ in chunk], pad_id)
        batch["valid"] = torch.tensor([weight for _, weight in chunk])
        batch["split"], batch["source"] = label, source
        batches.append(batch)
    return batches


class ImportanceDataModule(LightningDataModule):
    """The forget and retain splits of a TOFU source, each on a seeded subsample of equal size.

    Args:
        source: where the splits come from.
        prompt: tokenizer and prompt formatting; its ``tokenizer`` defaults to the directory of the model the
            statistics are taken at (``ImportanceModule``'s ``model``), and ``system_prompt`` to none.
        forget_split: split whose statistics are written as ``forget``.
        retain_split: split whose statistics are written as ``retain``.
        num_examples: use a seeded subsample of this many rows of each split (all when ``None``).
        subsample_seed: seed of the subsamples.
        batch_size: examples per batch and per process.
    """

    def __init__(
        self,
        source: TofuSource,
        prompt: PromptFormat = PromptFormat(),
        forget_split: str = "forget10",
        retain_split: str = "retain90",
        num_examples: int | None = None,
        subsample_seed: int = 0,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise PertaValueError(f"batch_size must be positive, got {batch_size}")
        self.save_hyperparameters()
        self.source = source
        self.prompt = prompt
        self.batches: list[dict[str, Any]] = []

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        formatter = self.prompt.formatter(run_model_dir(self.trainer))
        tokenizer = formatter.tokenizer
        strategy = self.trainer.strategy if self.trainer else None
        world = distributed.data_parallel_size(strategy) if strategy else 1
        rank = distributed.data_parallel_rank(strategy) if strategy else 0
        self.batches = []
        for label, split in (("forget", hp.forget_split), ("retain", hp.retain_split)):
            where = self.source.describe(split)
            rows = subsample(self.source.rows(split), hp.num_examples, hp.subsample_seed)
            examples = encode_rows(rows, formatter, where).examples
            self.batches += rank_batches(examples, label, where, hp.batch_size, rank, world, tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        # batch_size=1 over pre-collated batches (rather than batch_size=None) gives the loader a
        # batch_sampler, which DeepSpeedStrategy reads to fill its logging batch size.
        return DataLoader(_RankBatches(self.batches), batch_size=1, collate_fn=_unwrap)
