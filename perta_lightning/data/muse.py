"""MUSE-format data (Shi et al. 2024, the unlearning of a text corpus): where splits come from, their checks,
and raw text as next-token training examples.

A MUSE benchmark (``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books``) has four hub configs, each with its
splits; this package names a split ``"<config>/<split>"``:

* ``raw/forget``, ``raw/retain1``, ``raw/retain2``, ``raw/holdout``: the corpora, column ``text``;
* ``verbmem/forget``: ``prompt`` (the first tokens of a forget excerpt) and ``gt`` (its true continuation);
* ``knowmem/forget_qa``, ``knowmem/retain_qa`` and their few-shot ``*_icl`` sets: ``question``, ``answer``;
* ``privleak/forget``, ``privleak/retain``, ``privleak/holdout``: ``text``, for the membership-inference test.

``pretrain/background`` (column ``text``) is ours, not MUSE's: a corpus of other articles of the same kind,
written by the synthetic generator, on which a small model is pre-trained from scratch into a θ0 that knows
the language of the articles but none of the benchmark's own. The hub has no such split.

Raw text trains with next-token loss over every token (:class:`EncodedText`)::

    ids      = [bos] (when the tokenizer has one) + tokens(text) + [eos]
    chunks   = ids[0:L], ids[L:2L], ...   (a last chunk shorter than 2 tokens is dropped)
    labels   = input_ids                  (the shift happens in the loss)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from perta_lightning.data.muse_synthetic import MuseSyntheticSpec, generate_muse_benchmark
from perta_lightning.data.tofu import _read_json_rows
from perta_lightning.errors import PertaFileNotFoundError, PertaValueError

#: MUSE's published layout: split ``"<config>/<split>"`` -> the columns every row must have.
MUSE_SPLITS: dict[str, tuple[str, ...]] = {
    "raw/forget": ("text",),
    "raw/retain1": ("text",),
    "raw/retain2": ("text",),
    "raw/holdout": ("text",),
    "verbmem/forget": ("prompt", "gt"),
    "knowmem/forget_qa": ("question", "answer"),
    "knowmem/retain_qa": ("question", "answer"),
    "knowmem/forget_qa_icl": ("question", "answer"),
    "knowmem/retain_qa_icl": ("question", "answer"),
    "privleak/forget": ("text",),
    "privleak/retain": ("text",),
    "privleak/holdout": ("text",),
}

#: Our background corpus for pre-training a from-scratch θ0 (synthetic benchmarks only; not part of MUSE).
PRETRAIN_BACKGROUND = "pretrain/background"

#: Every split this package reads: MUSE's and the background corpus.
SPLIT_COLUMNS: dict[str, tuple[str, ...]] = {**MUSE_SPLITS, PRETRAIN_BACKGROUND: ("text",)}

#: The splits the MUSE evaluation reads.
VERBMEM = "verbmem/forget"
KNOWMEM_FORGET = "knowmem/forget_qa"
KNOWMEM_RETAIN = "knowmem/retain_qa"
PRIVLEAK_FORGET = "privleak/forget"
PRIVLEAK_HOLDOUT = "privleak/holdout"


def check_split_name(split: str, where: str) -> tuple[str, str]:
    """``(config, split)`` of a known ``"<config>/<split>"`` name; refuse any other, listing the known ones."""
    if split not in SPLIT_COLUMNS:
        raise PertaValueError(f"{where}: unknown MUSE split {split!r}; known splits: {', '.join(SPLIT_COLUMNS)}")
    config, _, name = split.partition("/")
    return config, name


@dataclass
class MuseSource:
    """Where MUSE-format splits come from: exactly one of ``path``, ``hub`` or ``synthetic``; or ``files``,
    alone or beside ``path``.

    Args:
        path: a local folder holding ``<config>/<split>.json`` files (JSON lines or a JSON list), such as the
            one ``perta data muse-synthetic`` writes.
        files: a file per split, e.g. ``{raw/forget: /x/forget.jsonl}`` (same formats as in ``path``). A split
            named here is read from its file; any other from ``path`` when it is given.
        hub: a Hugging Face dataset id, e.g. ``muse-bench/MUSE-News``; ``raw/forget`` is config ``raw``, split
            ``forget``.
        hub_revision: optional revision (commit or tag) of the hub dataset, for reproducibility.
        synthetic: generate the seeded synthetic news benchmark in memory.
    """

    path: str | None = None
    files: dict[str, str] | None = None
    hub: str | None = None
    hub_revision: str | None = None
    synthetic: MuseSyntheticSpec | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("path", "hub", "synthetic") if getattr(self, name) is not None]
        if self.files is not None:
            if given not in ([], ["path"]):
                raise PertaValueError(f"MuseSource: files= goes alone or beside path=, not beside {given[-1]}=")
            if not isinstance(self.files, dict) or not self.files:
                raise PertaValueError(f"MuseSource: files= must map split names to files, got {self.files!r}")
            for split, file in self.files.items():
                check_split_name(split, "MuseSource files=")
                if not isinstance(file, (str, os.PathLike)) or not str(file):
                    raise PertaValueError(f"MuseSource: files[{split!r}] must be a non-empty path, got {file!r}")
        elif len(given) != 1:
            raise PertaValueError(
                f"MuseSource needs exactly one of path=, files=, hub= or synthetic=, got {given or 'none'}"
            )

    def split_file(self, split: str) -> Path | None:
        """The local file of ``split`` (``None`` for hub and synthetic sources)."""
        if self.files is not None and split in self.files:
            return Path(self.files[split])
        if self.path is not None:
            return Path(self.path) / f"{split}.json"
        if self.files is not None:
            raise PertaValueError(
                f"MUSE split {split!r} is not in files= (which names {sorted(self.files)}) and no path= folder "
                "is given to find it in"
            )
        return None

    def describe(self, split: str) -> str:
        """Where ``split`` comes from, for messages: its file, ``hub:config/split`` or the generator's spec."""
        if self.files is not None or self.path is not None:
            return str(self.split_file(split))
        if self.hub is not None:
            revision = f"@{self.hub_revision}" if self.hub_revision is not None else ""
            return f"{self.hub}{revision}:{split}"
        spec = self.synthetic
        return f"muse-synthetic(num_articles={spec.num_articles}, seed={spec.seed}):{split}"

    def rows(self, split: str) -> list[dict[str, Any]]:
        """Load one split as row dicts and check it (:func:`check_rows`).

        Raises:
            PertaValueError: an unknown split name, a hub source asked for ``pretrain/background``, or rows that
                fail :func:`check_rows`.
            PertaFileNotFoundError: a local source without the split's file.
        """
        config, name = check_split_name(split, f"MuseSource({self._kind()})")
        file = self.split_file(split)
        if file is not None:
            if not file.is_file():
                named = f"files[{split!r}]" if self.files is not None and split in self.files else "path="
                raise PertaFileNotFoundError(f"MUSE split {split!r} not found: no file {file} ({named})")
            rows = _read_json_rows(file)
        elif self.synthetic is not None:
            rows = generate_muse_benchmark(self.synthetic)[split]
        else:
            if split not in MUSE_SPLITS:
                raise PertaValueError(
                    f"{self.describe(split)}: {split!r} is written by the synthetic generator only; the MUSE hub "
                    "datasets have no such split"
                )
            import datasets  # imported lazily: only hub users pay for it

            dataset = datasets.load_dataset(self.hub, config, split=name, revision=self.hub_revision)
            rows = [dict(row) for row in dataset]
        check_rows(rows, split, self.describe(split))
        return rows

    def _kind(self) -> str:
        """Which origin this source has, as its argument: ``path=``, ``files=``, ``hub=`` or ``synthetic=``."""
        return "files=" if self.files is not None else next(
            f"{name}=" for name in ("path", "hub", "synthetic") if getattr(self, name) is not None)


def check_rows(rows: Sequence[Mapping[str, Any]], split: str, where: str) -> None:
    """Refuse a split that is empty, lacks a required column, has a non-string value in one, a ``knowmem``
    row with an empty ``answer`` or a ``verbmem`` row with an empty ``prompt`` or ``gt``."""
    if not rows:
        raise PertaValueError(f"{where}: the split is empty")
    for column in SPLIT_COLUMNS[split]:
        missing = [index for index, row in enumerate(rows) if column not in row]
        if missing:
            raise PertaValueError(f"{where}: column {column!r} is missing (first in row {missing[0]})")
        for index, row in enumerate(rows):
            if not isinstance(row[column], str):
                raise PertaValueError(
                    f"{where}: row {index}, column {column!r} must be a string, got {type(row[column]).__name__}"
                )
    config = split.partition("/")[0]
    must_say = {"knowmem": ("answer",), "verbmem": ("prompt", "gt")}.get(config, ())
    for column in must_say:
        empty = [index for index, row in enumerate(rows) if not row[column].strip()]
        if empty:
            what = ("a question set with no answers" if column == "answer"
                    else "a verbatim-memorisation set needs a prompt and its true continuation")
            raise PertaValueError(f"{where}: row {empty[0]}, column {column!r} is empty ({what})")


def check_prompt_length(
    rows: Sequence[Mapping[str, Any]],
    prompt_length: int,
    where: str,
    tokenizer: Any | None = None,
    continuation_length: int = 1,
    column: str = "text",
) -> None:
    """Refuse texts too short to cut a verbatim-memorisation prompt from.

    A VerbMem item is the first ``prompt_length`` units of a text and the units after it, so every text needs
    at least ``prompt_length + continuation_length`` of them. Units are the tokenizer's tokens (special tokens
    not counted) or, with ``tokenizer=None``, whitespace-separated words.

    Args:
        rows: rows with a ``column`` text.
        prompt_length: prompt length in units.
        where: the source of the rows, for the message.
        tokenizer: a Hugging Face tokenizer, or ``None`` to count words.
        continuation_length: units that must follow the prompt (at least 1: something to continue).
        column: the text column.

    Raises:
        PertaValueError: naming ``where``, the first short row and its length.
    """
    if prompt_length < 1 or continuation_length < 1:
        raise PertaValueError(f"{where}: prompt_length and continuation_length must be at least 1, got "
                              f"{prompt_length} and {continuation_length}")
    unit = "words" if tokenizer is None else "tokens"
    needed = prompt_length + continuation_length
    for index, row in enumerate(rows):
        text = row[column]
        if tokenizer is None:
            length = len(text.split())
        else:
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if length < needed:
            raise PertaValueError(
                f"{where}: row {index}, column {column!r} has {length} {unit}, fewer than the prompt's "
                f"{prompt_length} plus {continuation_length} to continue (a corpus shorter than the prompt length)"
            )


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """``[bos]`` (when the tokenizer has one) + the text's tokens + ``[eos]``."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def chunk_ids(ids: Sequence[int], max_length: int) -> list[list[int]]:
    """Consecutive pieces of ``ids`` of ``max_length`` tokens (the last may be shorter); a last piece of fewer
    than 2 tokens, which has no next token to predict, is dropped."""
    if max_length < 2:
        raise PertaValueError(f"max_length must be at least 2 (a token and the next one), got {max_length}")
    chunks = [list(ids[start : start + max_length]) for start in range(0, len(ids), max_length)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


class EncodedText(Dataset):
    """Raw texts as next-token training examples: each text is encoded with :func:`text_ids` and cut by
    :func:`chunk_ids`; an example is ``{"input_ids", "labels" (the same ids), "index"}`` where ``index`` is the
    chunk's position in the dataset. ``row_of[index]`` is the row the chunk comes from.

    Args:
        rows: rows with a ``text`` column.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        max_length: tokens per chunk, at least 2.
        where: the source of the rows, for messages.

    Raises:
        PertaValueError: naming ``where``: no EOS token, a row without ``text``, or no chunk at all.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int, where: str) -> None:
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise PertaValueError(f"{where}: the tokenizer has no EOS token; set tokenizer.eos_token first")
        if max_length < 2:
            raise PertaValueError(
                f"{where}: max_length must be at least 2 (a token and the next one), got {max_length}")
        self.examples: list[dict[str, Any]] = []
        self.row_of: list[int] = []
        for row_index, row in enumerate(rows):
            if not isinstance(row.get("text"), str):
                raise PertaValueError(f"{where}: row {row_index} has no string column 'text'")
            for chunk in chunk_ids(text_ids(tokenizer, row["text"]), max_length):
                self.examples.append({"input_ids": chunk, "labels": list(chunk), "index": len(self.examples)})
                self.row_of.append(row_index)
        if not self.examples:
            raise PertaValueError(f"{where}: no text to train on ({len(rows)} row(s), none with 2 tokens or more)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.examples[item]
