"""Raw text as next-token training examples (a corpus benchmark's training data, MUSE's among them)::

    ids      = [bos] (when the tokenizer has one) + tokens(text) + [eos]
    chunks   = ids[0:L], ids[L:2L], ...   (a last chunk shorter than 2 tokens is dropped)
    labels   = input_ids                  (the shift happens in the loss)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from perta_lightning.errors import PertaValueError


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
