"""A byte-level BPE tokenizer for models trained from scratch on a TOFU-format corpus.

Saved as a Hugging Face fast tokenizer with ``<|pad|>`` and ``<|eos|>`` tokens and a small chat template
(system, user and assistant turns), so the same formatting code serves it and pretrained instruct models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from perta_lightning.io import atomic_directory

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

#: The smallest byte-level BPE: every byte and every special token.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% else %}<|assistant|>{{ message['content'] }}<|eos|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus_texts(splits: dict[str, list[dict]]) -> Iterator[str]:
    """Every question and answer text (paraphrases and perturbations included) of the splits."""
    for rows in splits.values():
        for row in rows:
            for key in ("question", "answer", "paraphrased_answer", "paraphrased_question"):
                if isinstance(row.get(key), str):
                    yield row[key]
            yield from row.get("perturbed_answer", [])


def check_vocab_size(vocab_size: int | None) -> None:
    """Refuse a vocabulary too small for the 256 bytes and the special tokens (the trainer would ignore it)."""
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        from perta_lightning.errors import PertaValueError

        raise PertaValueError(f"tokenizer_vocab_size must be at least {MIN_VOCAB_SIZE} (the 256 bytes and "
                              f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")


def train_tokenizer(texts: Iterable[str], output: str, vocab_size: int = 1024, overwrite: bool = True) -> Path:
    """Train a byte-level BPE on ``texts`` and save it to ``output`` as a Hugging Face tokenizer.

    ``vocab_size`` must hold the 256 bytes and the special tokens (:data:`MIN_VOCAB_SIZE`): a smaller one
    would be ignored by the trainer, and the tokenizer written would not have the size asked for."""
    check_vocab_size(vocab_size)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    with atomic_directory(output, overwrite=overwrite) as tmp:
        wrapped.save_pretrained(tmp)
    return Path(output)
