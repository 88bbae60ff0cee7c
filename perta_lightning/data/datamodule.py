"""``TofuDataModule``: TOFU-format question/answer splits as Lightning dataloaders.

Each batch is a dict of right-padded ``(batch, length)`` tensors: ``input_ids``, ``attention_mask``,
``labels`` (-100 on prompt and padding) and ``index`` (the row's position in its split). When
``paired_split`` is set (for GradDiff and NPO), every batch also holds the same keys prefixed with
``paired_`` from that split, cycled to the length of the main split.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from perta_lightning.benchmarks.tofu.source import TofuSource
from perta_lightning.data.formatting import (
    IGNORE_INDEX,
    PromptFormat,
    QAFormatter,
    check_disjoint,
    collate_examples,
    run_model_dir,
)
from perta_lightning.errors import PertaValueError


class EncodedQA(Dataset):
    """Rows of a split encoded once with a ``QAFormatter`` (subsample the rows first with :func:`subsample`).

    Refuses a split in which no example has an answer token besides the EOS that ends every answer: training
    or importance on it would score EOS alone.
    """

    def __init__(self, rows: list[dict[str, Any]], formatter: QAFormatter, where: str) -> None:
        self.examples = []
        for index, row in enumerate(rows):
            encoded = formatter.encode(row["question"], row["answer"])
            encoded["index"] = index
            self.examples.append(encoded)
        # every example ends with a labelled EOS; more than one label means a real answer token
        if not any(sum(label != IGNORE_INDEX for label in example["labels"]) > 1 for example in self.examples):
            raise PertaValueError(
                f"{where}: no answer tokens in the split, only EOS (every 'answer' is empty or cut by "
                f"prompt.max_length={formatter.max_length})"
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.examples[item]


class _Paired(Dataset):
    """Each item of ``main`` with an item of ``paired`` (cycled), keys of the latter prefixed."""

    def __init__(self, main: Dataset, paired: Dataset) -> None:
        self.main, self.paired = main, paired

    def __len__(self) -> int:
        return len(self.main)

    def __getitem__(self, item: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.main[item], self.paired[item % len(self.paired)]


def _collate_paired(items: list[tuple[dict[str, Any], dict[str, Any]]], pad_token_id: int) -> dict[str, Any]:
    batch = collate_examples([main for main, _ in items], pad_token_id)
    paired = collate_examples([other for _, other in items], pad_token_id)
    batch.update({f"paired_{key}": value for key, value in paired.items()})
    return batch


def encode_rows(rows: list[dict[str, Any]], formatter: QAFormatter, where: str) -> Dataset:
    """Rows as training examples: question/answer pairs (:class:`EncodedQA`, loss on the answer), or raw text
    when the rows have a ``text`` column (:class:`~perta_lightning.data.text.EncodedText`: next-token loss over
    the whole text, chunked to ``formatter.max_length`` tokens), as MUSE corpora are."""
    if rows and "text" in rows[0] and "question" not in rows[0]:
        from perta_lightning.data.text import EncodedText

        return EncodedText(rows, formatter.tokenizer, formatter.max_length, where)
    return EncodedQA(rows, formatter, where)


def subsample(rows: list[dict[str, Any]], num_examples: int | None, seed: int) -> list[dict[str, Any]]:
    """A seeded subsample of ``num_examples`` rows in their original order (all rows when ``None``)."""
    if num_examples is None or num_examples >= len(rows):
        return rows
    if num_examples <= 0:
        raise PertaValueError(f"num_examples must be positive, got {num_examples}")
    generator = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(rows), generator=generator)[:num_examples].tolist())
    return [rows[index] for index in keep]


class TofuDataModule(LightningDataModule):
    """Question/answer fine-tuning data from a TOFU source.

    Args:
        source: where the splits come from (local folder, hub, or the synthetic generator).
        prompt: tokenizer and prompt formatting; its ``tokenizer`` defaults to the trained module's
            ``tokenizer`` (else ``model``), and ``system_prompt`` to none.
        train_split: split used for training (``full``, ``retain90``, ``forget10``, the world corpus ...), or a
            list of splits trained on together (e.g. ``[full, world_corpus]`` to replay pre-training data).
        val_split: optional split whose answer loss is logged as ``val_loss``.
        paired_split: optional second split zipped into each training batch under ``paired_*`` keys (the
            retain split of GradDiff and NPO); checked to share no question with ``train_split``.
        batch_size: examples per batch and per process.
        num_examples: train on a seeded subsample of this many rows of ``train_split`` (all when ``None``);
            ``paired_split`` is used whole.
        subsample_seed: seed of that subsample.
        shuffle: shuffle the training split every epoch.
        num_workers: dataloader workers.
    """

    def __init__(
        self,
        source: TofuSource,
        prompt: PromptFormat = PromptFormat(),
        train_split: str | list[str] = "full",
        val_split: str | None = None,
        paired_split: str | None = None,
        batch_size: int = 16,
        num_examples: int | None = None,
        subsample_seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise PertaValueError(f"batch_size must be positive, got {batch_size}")
        self.save_hyperparameters()
        self.source = source
        self.prompt = prompt
        self.tokenizer: Any = None
        self.datasets: dict[str, Dataset] = {}

    def _rows(self, splits: str | list[str]) -> list[dict[str, Any]]:
        names = [splits] if isinstance(splits, str) else list(splits)
        return [row for name in names for row in self.source.rows(name)]

    def _encoded(self, splits: str | list[str], formatter: QAFormatter, num_examples: int | None = None) -> Dataset:
        rows = subsample(self._rows(splits), num_examples, self.hparams.subsample_seed)
        where = ", ".join(self.source.describe(name) for name in ([splits] if isinstance(splits, str) else splits))
        return encode_rows(rows, formatter, where)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        formatter = self.prompt.formatter(run_model_dir(self.trainer))
        self.tokenizer = formatter.tokenizer
        train = self._encoded(hp.train_split, formatter, hp.num_examples)
        if hp.paired_split is not None:
            check_disjoint(
                self._rows(hp.train_split), self._rows(hp.paired_split), f"{hp.train_split} vs {hp.paired_split}"
            )
            train = _Paired(train, self._encoded(hp.paired_split, formatter))
        self.datasets["train"] = train
        if hp.val_split is not None:
            self.datasets["val"] = self._encoded(hp.val_split, formatter)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        collate = partial(_collate_paired if isinstance(dataset, _Paired) else collate_examples, pad_token_id=pad)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.datasets["val"], False) if "val" in self.datasets else []
