"""``TofuEvalDataModule``: the TOFU evaluation sets as test dataloaders, one per set.

Sets, in dataloader order, as :mod:`perta_lightning.benchmarks.tofu.sets` describes them: ``forget``, ``retain``,
``real_authors``, ``world_facts`` and (for the MIA) ``holdout``. A batch holds, for its ``B`` examples:

* ``answer_ids`` / ``answer_mask`` / ``answer_labels``: every answer to score (its tokens and EOS, without the
  question), right padded, ``(N, A)``: rows ``[0, B)`` are the answers, then ``B`` paraphrased answers when
  the set has them (forget, retain), then ``B * K`` perturbed answers (example-major: rows of example ``b``
  are ``b*K .. b*K+K-1`` of that part); labels are the tokens, -100 on padding;
* ``answer_example``: ``(N,)`` the example (batch row) each answer belongs to;
* ``prompt_ids`` / ``prompt_mask``: the questions alone, padded after the prefix they all share (a chat
  template's system turn; :func:`~perta_lightning.prompt_cache.pad_after_shared_prefix`). The evaluator encodes them once, scores
  every answer against their key/value cache (:mod:`perta_lightning.prompt_cache`) and generates from it;
* ``index`` (row in the set), ``eval_set`` (the set's name), ``num_perturbed`` and ``has_paraphrase``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from perta_lightning.benchmarks.tofu.sets import EVAL_SET_BY_NAME, EvalSetSpec
from perta_lightning.benchmarks.tofu.source import TofuSource, load_split
from perta_lightning.data.formatting import (
    IGNORE_INDEX,
    PromptFormat,
    QAFormatter,
    load_tokenizer,
    pad_batch,
    run_model_dir,
)
from perta_lightning.errors import PertaFileNotFoundError, PertaValueError
from perta_lightning.prompt_cache import pad_after_shared_prefix


def load_eval_tokenizer(path: str) -> Any:
    """The tokenizer of a model directory (or hub id); a folder without tokenizer files is a user error."""
    try:
        return load_tokenizer(path)
    except FileNotFoundError as error:
        raise PertaFileNotFoundError(str(error)) from None


class EvalSet(Dataset):
    """One evaluation set, encoded once. Every row must have ``K`` perturbed answers when any has."""

    def __init__(self, spec: EvalSetSpec, rows: list[dict[str, Any]], formatter: QAFormatter, where: str) -> None:
        self.name, self.rows = spec.name, rows
        self.has_paraphrase = spec.has_paraphrase
        self.num_perturbed = len(rows[0].get("perturbed_answer", [])) if spec.scored else 0
        if spec.scored and self.num_perturbed == 0:
            raise PertaValueError(f"{where}: row 0, column 'perturbed_answer' is missing or empty")
        self.items = []
        for index, row in enumerate(rows):
            perturbed = row.get("perturbed_answer", []) if spec.scored else []
            if len(perturbed) != self.num_perturbed or not all(isinstance(a, str) for a in perturbed):
                raise PertaValueError(
                    f"{where}: row {index}, column 'perturbed_answer' has {len(perturbed)} answers, "
                    f"row 0 has {self.num_perturbed}"
                )
            prompt = formatter.prompt_ids(row["question"])
            answers = [row["answer"]] + ([row["paraphrased_answer"]] if self.has_paraphrase else []) + perturbed
            self.items.append(
                {
                    "index": index,
                    "answers": [answer_tokens(formatter.encode(row["question"], answer), prompt) for answer in answers],
                    "prompt": prompt,
                }
            )
        # batched in order of prompt length (stable: set order among equals), so that a batch's prompts, padded
        # to its longest, waste few positions; every value is keyed by ``index``, so the order changes no number
        # beyond the float rounding of a different batch
        self.items.sort(key=lambda item: len(item["prompt"]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.items[item]


def answer_tokens(encoded: dict[str, list[int]], prompt: list[int]) -> list[int]:
    """The answer part (labelled tokens, EOS included) of an encoded pair whose input starts with ``prompt``."""
    start = len(prompt)
    if encoded["input_ids"][:start] != prompt or encoded["labels"][start:] != encoded["input_ids"][start:]:
        raise ValueError("encoded question-answer pair does not split into the prompt and labelled answer tokens")
    return encoded["input_ids"][start:]


def collate_eval(items: list[dict[str, Any]], pad_token_id: int, name: str, has_paraphrase: bool, num_perturbed: int) -> dict[str, Any]:
    """Batch an evaluation set (layout in the module docstring)."""
    per_example = 1 + int(has_paraphrase) + num_perturbed
    # block order: all answers, all paraphrases, then perturbed answers example-major
    order = [(b, item["answers"][0]) for b, item in enumerate(items)]
    if has_paraphrase:
        order += [(b, item["answers"][1]) for b, item in enumerate(items)]
    first_perturbed = 1 + int(has_paraphrase)
    order += [(b, answer) for b, item in enumerate(items) for answer in item["answers"][first_perturbed:per_example]]
    answers = [answer for _, answer in order]
    prompts = [item["prompt"] for item in items]
    return {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "answer_ids": pad_batch(answers, pad_token_id, side="right"),
        "answer_mask": pad_batch([[1] * len(a) for a in answers], 0, side="right"),
        "answer_labels": pad_batch(answers, IGNORE_INDEX, side="right"),
        "answer_example": torch.tensor([b for b, _ in order], dtype=torch.long),
        **dict(zip(("prompt_ids", "prompt_mask"), pad_after_shared_prefix(prompts, pad_token_id))),
        "eval_set": name,
        "num_perturbed": num_perturbed,
        "has_paraphrase": has_paraphrase,
    }


class TofuEvalDataModule(LightningDataModule):
    """TOFU evaluation data (forget, retain, real authors, world facts, holdout) as test dataloaders.

    Args:
        source: where the splits come from (local folder, hub, or the synthetic generator).
        prompt: tokenizer and prompt formatting; its ``tokenizer`` defaults to the evaluated model's directory
            (``TofuEvaluator``'s ``model``), and ``system_prompt`` to none.
        forget_split: the forget set with paraphrased and perturbed answers (``forget10_perturbed``).
        retain_split: the retain evaluation set (``retain_perturbed``).
        real_authors_split: the real-authors set (``None`` to skip it; Model Utility then is not computed).
        world_facts_split: the world-facts set (``None`` to skip it).
        holdout_split: questions never trained on, for the Min-K% MIA against the forget set (``None``: no MIA).
        max_examples: evaluate the first ``max_examples`` rows of each set (TOFU's ``ds_size``; all when ``None``).
        batch_size: examples per batch and per process (each scored with all its answers in one pass).
    """

    def __init__(
        self,
        source: TofuSource,
        prompt: PromptFormat = PromptFormat(),
        forget_split: str = "forget10_perturbed",
        retain_split: str | None = "retain_perturbed",
        real_authors_split: str | None = "real_authors_perturbed",
        world_facts_split: str | None = "world_facts_perturbed",
        holdout_split: str | None = "holdout10",
        max_examples: int | None = None,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise PertaValueError(f"batch_size must be positive, got {batch_size}")
        if max_examples is not None and max_examples <= 0:
            raise PertaValueError(f"max_examples must be positive, got {max_examples}")
        self.save_hyperparameters()
        self.source = source
        self.prompt = prompt
        # keyed by the set names of perta_lightning.benchmarks.tofu.sets, in their order
        self.splits = {
            "forget": forget_split,
            "retain": retain_split,
            "real_authors": real_authors_split,
            "world_facts": world_facts_split,
            "holdout": holdout_split,
        }
        assert tuple(self.splits) == tuple(EVAL_SET_BY_NAME)
        self.sets: dict[str, EvalSet] = {}
        self.tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        hp = self.hparams
        self.check_splits()
        formatter = self.prompt.formatter(run_model_dir(self.trainer))
        self.tokenizer = formatter.tokenizer
        for name, split in self.splits.items():
            if split is None:
                continue
            spec = EVAL_SET_BY_NAME[name]
            rows = load_split(self.source, split, spec.required_columns)[: hp.max_examples]
            self.sets[name] = EvalSet(spec, rows, formatter, self.source.describe(split))

    def check_splits(self) -> None:
        """Refuse a split given for two sets (the forget split as the retain split, say): the scores would mean
        nothing. Checked in ``setup`` so that the command line reports it as one error line."""
        given: dict[str, str] = {}
        for name, split in self.splits.items():
            if split is None:
                continue
            if split in given:
                raise PertaValueError(
                    f"{given[split]}_split and {name}_split are both {split!r}; each evaluation set needs its own split"
                )
            given[split] = name

    def test_dataloader(self) -> list[DataLoader]:
        loaders = []
        for name, dataset in self.sets.items():
            collate = partial(
                collate_eval,
                pad_token_id=self.tokenizer.pad_token_id,
                name=name,
                has_paraphrase=dataset.has_paraphrase,
                num_perturbed=dataset.num_perturbed,
            )
            loaders.append(DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate))
        return loaders
