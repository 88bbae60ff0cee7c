"""A byte-level BPE tokenizer for models trained from scratch on a TOFU-format corpus.

Saved as a Hugging Face fast tokenizer with ``<|pad|>`` and ``<|eos|>`` tokens and a small chat template
(system, user and assistant turns), so the same formatting code serves it and pretrained instruct models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from perta_lightning.io import atomic_directory

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

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


def train_tokenizer(texts: Iterable[str], output: str, vocab_size: int = 1024, overwrite: bool = True) -> Path:
    """Train a byte-level BPE on ``texts`` and save it to ``output`` as a Hugging Face tokenizer."""
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
