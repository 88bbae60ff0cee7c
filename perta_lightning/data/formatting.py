"""Question/answer formatting, tokenizers and padding: how every benchmark's rows become token ids.

Formatting turns one question/answer pair into token ids with labels::

    input_ids = prompt(question) + answer_ids + [eos]
    labels    = [-100] * len(prompt(question)) + answer_ids + [eos]

so that the loss (and every score) covers the answer tokens only. The prompt is the tokenizer's chat template
when it has one (:class:`PromptFormat` says which system prompt and date), else ``Question: ...\nAnswer: ``.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perta_lightning.checkpoints import load_tokenizer
from perta_lightning.errors import PertaValueError

# IGNORE_INDEX, the label no loss or score counts (prompt and padding), is defined once beside the
# losses, because functional/ imports nothing of the package outside it; data modules import it from here.
from perta_lightning.functional.losses import IGNORE_INDEX

__all__ = ["DEFAULT_DATE_STRING", "IGNORE_INDEX", "PromptFormat", "QAFormatter", "check_disjoint", "collate_examples",
           "load_tokenizer", "pad_batch", "run_model_dir"]

#: Pinned so that chat templates that print today's date (Llama 3) give the same tokens every day.
DEFAULT_DATE_STRING = "10 Apr 2025"


def check_disjoint(forget: list[dict[str, Any]], retain: list[dict[str, Any]], where: str) -> None:
    """Raise if a forget question (or, for raw-text corpora, a forget text) also appears in the retain split
    (TOFU splits go by author, MUSE corpora by article)."""
    column = "question" if forget and "question" in forget[0] else "text"
    retain_values = {row.get(column) for row in retain}
    overlap = [row[column] for row in forget if row[column] in retain_values]
    if overlap:
        raise ValueError(
            f"{where}: {len(overlap)} row(s) of the forget split also appear in the retain split, "
            f"column {column!r}, e.g. {overlap[0][:80]!r}"
        )


class QAFormatter:
    """Turns questions and answers into token ids, with the chat template when the tokenizer has one.

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token.
        system_prompt: system message for chat templates (``None``, the default: no system turn).
        date_string: pinned date for templates that print one (Llama 3).
        max_length: truncate the answer so that prompt + answer + EOS fits; the prompt is never cut.
        use_chat_template: ``None`` uses the template when the tokenizer has one.
    """

    def __init__(
        self,
        tokenizer: Any,
        system_prompt: str | None = None,
        date_string: str = DEFAULT_DATE_STRING,
        max_length: int = 256,
        use_chat_template: bool | None = None,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before formatting")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.date_string = date_string
        self.max_length = max_length
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        if self.use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        # every stage of a study encodes the same questions and answers: each text is tokenized once
        self._prompt_ids: dict[str, list[int]] = {}
        self._answer_ids: dict[str, list[int]] = {}

    def prompt_text(self, question: str) -> str:
        """The text before the answer: the chat template's user turn and assistant header, or plain Q/A."""
        if not self.use_chat_template:
            return f"Question: {question}\nAnswer: "
        messages = [{"role": "user", "content": question}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, date_string=self.date_string
        )

    def prompt_ids(self, question: str) -> list[int]:
        ids = self._prompt_ids.get(question)
        if ids is None:
            # Chat templates already carry their special tokens (BOS included); plain prompts get the
            # tokenizer's usual specials.
            ids = self._prompt_ids[question] = self.tokenizer(
                self.prompt_text(question), add_special_tokens=not self.use_chat_template)["input_ids"]
        return list(ids)

    def answer_ids(self, answer: str) -> list[int]:
        ids = self._answer_ids.get(answer)
        if ids is None:
            ids = self._answer_ids[answer] = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return list(ids)

    def encode(self, question: str, answer: str) -> dict[str, list[int]]:
        """``input_ids`` and ``labels`` for one pair; labels are -100 on the prompt."""
        prompt = self.prompt_ids(question)
        answer_ids = self.answer_ids(answer)[: max(0, self.max_length - len(prompt) - 1)]
        answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        return {"input_ids": prompt + answer_ids, "labels": [IGNORE_INDEX] * len(prompt) + answer_ids}


@dataclass(frozen=True)
class PromptFormat:
    """How questions and answers become tokens: one group of options shared by every DataModule.

    In YAML it is a nested block, e.g. ``prompt: {tokenizer: runs/x/full, system_prompt: null}``.

    Args:
        tokenizer: path or hub id of the tokenizer. ``None`` (the default) means the run's model: the
            LightningModule's ``tokenizer`` hyper-parameter when it has one, else its ``model`` directory.
            Outside a run (no model attached) it must be set.
        max_length: longest prompt + answer in tokens; the answer is cut, never the prompt.
        system_prompt: system message for chat templates. ``None`` (the default) writes no system turn, so
            an outside model is not given a prompt it never saw; configs that want one pin it (the Llama-3
            configs pin open-unlearning's ``"You are a helpful assistant."``).
        date_string: the date for chat templates that print one (Llama 3), pinned so that the tokens do
            not change from day to day.
        use_chat_template: ``None`` uses the tokenizer's chat template when it has one, else the plain
            ``Question: ...\\nAnswer: `` prompt; ``True`` requires a template; ``False`` never uses one.
    """

    tokenizer: str | None = None
    max_length: int = 256
    system_prompt: str | None = None
    date_string: str = DEFAULT_DATE_STRING
    use_chat_template: bool | None = None

    def __post_init__(self) -> None:
        if self.max_length <= 0:
            raise PertaValueError(f"prompt.max_length must be positive, got {self.max_length}")

    def tokenizer_path(self, model_dir: str | None = None) -> str:
        """``tokenizer`` when set, else ``model_dir``; refuse when neither names one."""
        path = self.tokenizer if self.tokenizer is not None else model_dir
        if path is None:
            raise PertaValueError(
                "prompt.tokenizer is not set and no model is attached to default to: set prompt.tokenizer "
                "to the tokenizer's path (usually the model directory)"
            )
        return str(path)

    def formatter(self, model_dir: str | None = None) -> QAFormatter:
        """The ``QAFormatter`` of the tokenizer (``tokenizer``, else ``model_dir``) with these options.

        Formatters are kept per process, keyed by the tokenizer files' contents and these options, so the
        stages of a study, each with its own copy of the same tokenizer, load it and tokenize each text once."""
        path = self.tokenizer_path(model_dir)
        key = _tokenizer_fingerprint(path)
        if key is not None:
            key = (key, self.system_prompt, self.date_string, self.max_length, self.use_chat_template)
            if key in _FORMATTERS:
                _FORMATTERS.move_to_end(key)
                return _FORMATTERS[key]
        formatter = QAFormatter(load_tokenizer(path), self.system_prompt, self.date_string, self.max_length,
                                self.use_chat_template)
        if key is not None:
            _FORMATTERS[key] = formatter
            while len(_FORMATTERS) > _MAX_FORMATTERS:
                _FORMATTERS.popitem(last=False)
        return formatter


_FORMATTERS: OrderedDict[tuple, QAFormatter] = OrderedDict()
_MAX_FORMATTERS = 4
#: The files a tokenizer is loaded from (``config.json`` only lends its ``model_type``).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "merges.txt", "spiece.model")


def _tokenizer_fingerprint(path: str) -> str | None:
    """A digest of the tokenizer files of a local folder (``None`` for a hub id: not cached)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    digest, found = hashlib.sha256(), False
    for name in _TOKENIZER_FILES:
        file = folder / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
            found = True
    if not found:
        return None
    config = folder / "config.json"
    if config.is_file():
        try:
            digest.update(str(json.loads(config.read_text()).get("model_type")).encode())
        except (ValueError, AttributeError):
            return None  # let the loader report it
    return digest.hexdigest()


def run_model_dir(trainer: Any) -> str | None:
    """The tokenizer a run's model was saved with: the attached LightningModule's ``tokenizer``
    hyper-parameter, else its ``model`` (``None`` when there is no trainer, module or such value).
    ``CausalLMModule`` and its baselines, ``TofuEvaluator`` and ``ImportanceModule`` all have ``model``."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    hparams = getattr(module, "hparams", None) or {}
    path = hparams.get("tokenizer") or hparams.get("model")
    return str(path) if path is not None else None


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right"
) -> torch.Tensor:
    """Stack variable-length sequences into a ``(batch, max_len)`` long tensor padded on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(sequence) for sequence in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence) == 0:
            continue
        values = torch.as_tensor(list(sequence), dtype=torch.long)
        if side == "right":
            out[row, : len(sequence)] = values
        else:
            out[row, width - len(sequence) :] = values
    return out


def collate_examples(examples: Sequence[dict[str, Any]], pad_token_id: int, side: str = "right") -> dict[str, Any]:
    """Batch encoded examples: ``input_ids``, ``attention_mask``, ``labels`` (and ``index`` when present).

    Right padding is for training and scoring; left padding is for batched generation.
    """
    ids = [example["input_ids"] for example in examples]
    batch = {
        "input_ids": pad_batch(ids, pad_token_id, side),
        "attention_mask": pad_batch([[1] * len(sequence) for sequence in ids], 0, side),
    }
    if "labels" in examples[0]:
        batch["labels"] = pad_batch([example["labels"] for example in examples], IGNORE_INDEX, side)
    if "index" in examples[0]:
        batch["index"] = torch.tensor([example["index"] for example in examples], dtype=torch.long)
    return batch
