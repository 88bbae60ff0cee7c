"""``MuseEvalDataModule``: the MUSE evaluation sets as test dataloaders, one per set.

Sets, in dataloader order:

* ``verbmem``: ``verbmem/forget`` prompts (the first tokens of forget excerpts), to be continued greedily and
  compared with the true continuation ``gt``;
* ``knowmem_forget`` / ``knowmem_retain``: ``knowmem/forget_qa`` / ``knowmem/retain_qa`` questions, asked as
  ``Question: q\\nAnswer: `` (MUSE's cue, its trailing space included; ``answer_cue``) after the few-shot
  examples of the matching ``*_qa_icl`` split (MUSE's in-context prompt; none when that split is absent), to be
  answered greedily;
* ``privleak_forget`` / ``privleak_holdout``: ``privleak/forget`` and ``privleak/holdout`` texts, scored token by
  token for the membership-inference attack.

A generation batch holds ``prompt_ids`` / ``prompt_mask`` (left padded), ``index`` and ``eval_set``; a text batch
``input_ids`` / ``attention_mask`` / ``labels`` (right padded, labels -100 on padding), ``index`` and ``eval_set``.
Prompts and texts are plain text (no chat template): MUSE's models are language models of a corpus.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from perta_lightning.benchmarks.muse.source import MuseSource
from perta_lightning.benchmarks.muse.splits import (
    KNOWMEM_FORGET,
    KNOWMEM_RETAIN,
    PRIVLEAK_FORGET,
    PRIVLEAK_HOLDOUT,
    VERBMEM,
)
from perta_lightning.data.formatting import IGNORE_INDEX, collate_examples, load_tokenizer
from perta_lightning.errors import PertaFileNotFoundError, PertaValueError
from perta_lightning.prompt_cache import pad_after_shared_prefix

#: The evaluation sets: name -> (split, kind).
MUSE_EVAL_SETS: dict[str, tuple[str, str]] = {
    "verbmem": (VERBMEM, "verbatim"),
    "knowmem_forget": (KNOWMEM_FORGET, "knowledge"),
    "knowmem_retain": (KNOWMEM_RETAIN, "knowledge"),
    "privleak_forget": (PRIVLEAK_FORGET, "text"),
    "privleak_holdout": (PRIVLEAK_HOLDOUT, "text"),
}


#: How MUSE's code and open-unlearning end a knowledge prompt: ``Answer: ``, with its trailing space.
ANSWER_CUE = "Answer: "


def knowmem_prompt(question: str, examples: list[dict[str, Any]] = (), answer_cue: str = ANSWER_CUE) -> str:
    """MUSE's knowledge prompt: each in-context example as ``Question: q\\nAnswer: a\\n\\n``, then
    ``Question: q\\n`` and the answer cue.

    The cue is MUSE's ``Answer: `` unless asked otherwise. A model trained from scratch with a byte-level BPE
    tokenizer (the synthetic runs') never saw a bare space before an answer (the space is folded into the answer's
    first token), and after ``Answer: `` it answers nonsense: the synthetic studies ask with ``Answer:``."""
    shots = "".join(f"Question: {row['question']}\nAnswer: {row['answer']}\n\n" for row in examples)
    return f"{shots}Question: {question}\n{answer_cue}"


class MuseEvalSet(Dataset):
    """One MUSE evaluation set, encoded once."""

    def __init__(self, name: str, rows: list[dict[str, Any]], tokenizer: Any, where: str, *,
                 icl: list[dict[str, Any]] = (), prompt_tokens: int | None = None,
                 text_max_length: int = 256, answer_cue: str = ANSWER_CUE) -> None:
        self.name, self.rows = name, rows
        self.kind = MUSE_EVAL_SETS[name][1]
        self.items: list[dict[str, Any]] = []
        for index, row in enumerate(rows):
            if self.kind == "text":
                ids = _text_ids(tokenizer, row["text"])[:text_max_length]
                if len(ids) < 2:
                    raise PertaValueError(f"{where}: row {index}, column 'text' has fewer than 2 tokens")
                self.items.append({"input_ids": ids, "labels": list(ids), "index": index})
                continue
            if self.kind == "verbatim":
                ids = _text_ids(tokenizer, row["prompt"])
                if prompt_tokens is not None and len(ids) > prompt_tokens:  # keep the tokens nearest the gt
                    ids = ids[-prompt_tokens:]
            else:
                ids = _text_ids(tokenizer, knowmem_prompt(row["question"], icl, answer_cue))
            self.items.append({"prompt_ids": ids, "index": index})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.items[item]


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def collate_muse(items: list[dict[str, Any]], pad_token_id: int, name: str) -> dict[str, Any]:
    """A batch of one set: prompts for generation, padded after the prefix they share (KnowMem's few-shot
    questions; :func:`~perta_lightning.prompt_cache.pad_after_shared_prefix`), or right-padded texts with labels."""
    import torch

    if "prompt_ids" in items[0]:
        ids = [item["prompt_ids"] for item in items]
        prompt_ids, prompt_mask = pad_after_shared_prefix(ids, pad_token_id)
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                 "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}
    else:
        batch = collate_examples(items, pad_token_id)
        batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    batch["eval_set"] = name
    return batch


class MuseEvalDataModule(LightningDataModule):
    """The MUSE evaluation sets of a source as test dataloaders.

    Args:
        source: where the MUSE splits come from (hub, local folder or the synthetic generator).
        tokenizer: path of the tokenizer; ``None`` uses the evaluated model's directory.
        max_examples: evaluate the first this many rows of each set (all when ``None``).
        batch_size: examples per batch and per process.
        prompt_tokens: longest VerbMem prompt in tokens (its last tokens are kept); ``None``: the whole prompt, as
            MUSE gives it to the model.
        text_max_length: PrivLeak texts are cut to this many tokens.
        use_icl: put the ``*_qa_icl`` few-shot examples before each knowledge question, as MUSE does.
        answer_cue: what ends a knowledge prompt after the question's line (MUSE: ``"Answer: "``).
    """

    def __init__(self, source: MuseSource, tokenizer: str | None = None, max_examples: int | None = None,
                 batch_size: int = 8, prompt_tokens: int | None = None, text_max_length: int = 256,
                 use_icl: bool = True, answer_cue: str = ANSWER_CUE) -> None:
        super().__init__()
        if not answer_cue.strip():
            raise PertaValueError(f"answer_cue must hold a word the model can answer after, got {answer_cue!r}")
        for key, value in (("batch_size", batch_size), ("prompt_tokens", prompt_tokens),
                           ("text_max_length", text_max_length)):
            if value is not None and value <= 0:
                raise PertaValueError(f"{key} must be positive, got {value}")
        if max_examples is not None and max_examples <= 0:
            raise PertaValueError(f"max_examples must be positive or null, got {max_examples}")
        self.save_hyperparameters()
        self.source = source
        self.tokenizer: Any = None
        self.sets: dict[str, MuseEvalSet] = {}
        self.splits = {name: split for name, (split, _) in MUSE_EVAL_SETS.items()}

    def _tokenizer_path(self) -> str:
        if self.hparams.tokenizer is not None:
            return self.hparams.tokenizer
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        model = getattr(module, "hparams", {}).get("model") if module is not None else None
        if model is None:
            raise PertaValueError("MuseEvalDataModule: tokenizer is not set and no evaluated model gives one")
        return str(model)

    def _icl(self, split: str) -> list[dict[str, Any]]:
        if not self.hparams.use_icl:
            return []
        try:
            return self.source.rows(f"{split}_icl")
        except PertaFileNotFoundError:
            return []  # a folder without the few-shot split asks the questions bare

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        hp = self.hparams
        try:
            self.tokenizer = load_tokenizer(self._tokenizer_path())
        except FileNotFoundError as error:
            raise PertaFileNotFoundError(str(error)) from None
        for name, (split, kind) in MUSE_EVAL_SETS.items():
            rows = self.source.rows(split)[: hp.max_examples]
            icl = self._icl(split) if kind == "knowledge" else []
            self.sets[name] = MuseEvalSet(name, rows, self.tokenizer, self.source.describe(split), icl=icl,
                                          prompt_tokens=hp.prompt_tokens, text_max_length=hp.text_max_length,
                                          answer_cue=hp.answer_cue)

    def test_dataloader(self) -> list[DataLoader]:
        pad = self.tokenizer.pad_token_id
        return [DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=False,
                           collate_fn=partial(collate_muse, pad_token_id=pad, name=name))
                for name, dataset in self.sets.items()]
