"""Tiny TOFU folder, byte-level BPE tokenizer and Llama model for tests (seconds to build on a CPU).

Used by the pytest fixtures and by the scripts that tests launch in several processes, so it is a
plain module rather than a conftest fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = "author novel poem born city wrote story prize river mother father garden book dream night".split()


def _rows(count: int, seed: int) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)
    rows = []
    for index in range(count):
        subject = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1 + index % 3, 8)))
        rows.append({"question": f"What about the {subject} ({seed}-{index})?", "answer": answer.capitalize() + "."})
    return rows


def write_tofu_folder(folder: Path, forget: int = 7, retain: int = 9) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("forget10", forget, 1), ("retain90", retain, 2)):
        lines = [json.dumps(row) for row in _rows(count, seed)]
        (folder / f"{name}.json").write_text("\n".join(lines) + "\n")
    return folder


def write_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"], show_progress=False)
    corpus = [" ".join(WORDS)] * 4 + [f"Question: What about the {w}?\nAnswer: " for w in WORDS]
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")
    wrapped.save_pretrained(folder)
    return folder


def write_model(folder: Path, vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_assets(root: Path, hidden: int = 32, layers: int = 2) -> dict[str, Path]:
    """``{"data": folder, "model": model dir with tokenizer}`` under ``root``."""
    root = Path(root)
    data = write_tofu_folder(root / "tofu")
    model_dir = root / "model"
    write_tokenizer(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    write_model(model_dir, vocab_size=len(tokenizer), hidden=hidden, layers=layers)
    return {"data": data, "model": model_dir}
