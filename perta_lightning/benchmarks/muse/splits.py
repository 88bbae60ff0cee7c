"""MUSE's split layout (Shi et al. 2024): the splits, their columns, and the checks of their rows.

A MUSE benchmark (``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books``) has four hub configs, each with its
splits; this package names a split ``"<config>/<split>"``:

* ``raw/forget``, ``raw/retain1``, ``raw/retain2``, ``raw/holdout``: the corpora, column ``text``;
* ``verbmem/forget``: ``prompt`` (the first tokens of a forget excerpt) and ``gt`` (its true continuation);
* ``knowmem/forget_qa``, ``knowmem/retain_qa`` and their few-shot ``*_icl`` sets: ``question``, ``answer``;
* ``privleak/forget``, ``privleak/retain``, ``privleak/holdout``: ``text``, for the membership-inference test.

``pretrain/background`` (column ``text``) is ours, not MUSE's: a corpus of other articles of the same kind,
written by the synthetic generator, on which a small model is pre-trained from scratch into a θ0 that knows
the language of the articles but none of the benchmark's own. The hub has no such split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from perta_lightning.errors import PertaValueError

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


