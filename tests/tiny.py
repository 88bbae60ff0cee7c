"""Tiny data, tokenizers and random Llama models for tests, benchmarks and the scripts tests launch.

One model builder, :func:`write_tiny_model` (a seeded random Llama sized by :func:`tiny_model_config`, saved
as a Hugging Face directory with its tokenizer), used by three set-ups:

* the ``tiny_model_dir`` fixture (``conftest.py``): the synthetic benchmark's tokenizer, 2 heads;
* :func:`make_tiny_setup`: a synthetic benchmark and a model whose larger output scale makes greedy
  generations varied (evaluation tests and ``bench/bench_eval.py``);
* :func:`make_tiny_assets`: a hand-made TOFU folder (forget10: 7 rows, retain90: 9 rows) with its own
  BPE tokenizer (importance tests, ``bench/bench_importance.py``).

Tests that need a model in memory only, over hand-written token ids, take :func:`random_llama`.

Import it as ``from tests.tiny import ...`` (the repository root is on the path under pytest and for the
benchmarks). It is a plain module, not a fixture, so that scripts in other processes can use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perta_lightning.benchmarks.tofu.synthetic import SyntheticSpec, write_benchmark


def random_llama(vocab_size: int, seed: int) -> Any:
    """A seeded random Llama in eval mode, in memory (4 heads with 2 key/value heads, so grouped-query attention
    is exercised), for tests over hand-written token ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


#: The default tiny Llama (about 25 k parameters besides the embeddings).
TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def tiny_model_config(tokenizer: Any, **overrides: Any) -> dict[str, Any]:
    """A ``model_config`` dict (``CausalLMModule``'s) for a tiny Llama over ``tokenizer``'s vocabulary, with
    its pad and EOS ids (EOS doubling as BOS); ``overrides`` replace any field."""
    return {**TINY_LLAMA, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.eos_token_id, **overrides}


def write_tiny_model(folder: Path, tokenizer_dir: Path, seed: int = 0, output_scale: float = 1.0,
                     **overrides: Any) -> Path:
    """The one tiny-model builder: a random Llama (``tiny_model_config`` plus ``overrides``) initialised under
    ``torch.manual_seed(seed)`` without touching the global random state, its ``lm_head`` times
    ``output_scale``, saved to ``folder`` with the tokenizer of ``tokenizer_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = tiny_model_config(tokenizer, **overrides)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if output_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(output_scale)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_setup(root: Path, num_authors: int = 10, hidden: int = 32, layers: int = 2, seed: int = 0,
                    vocab_size: int = 400, intermediate: int | None = None, heads: int = 4) -> tuple[Path, Path]:
    """Write ``root/data`` (synthetic TOFU splits + tokenizer) and ``root/model`` (random Llama + tokenizer)."""
    data = root / "data"
    write_benchmark(SyntheticSpec(num_authors=num_authors, seed=seed, num_world_items=12), str(data),
                    overwrite=True, tokenizer_vocab_size=vocab_size)
    # a larger output scale makes greedy generations varied, not one repeated token
    model_dir = write_tiny_model(
        root / "model", data / "tokenizer", seed=seed, output_scale=20.0, hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=512, bos_token_id=None,
    )
    return data, model_dir


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


def make_tiny_assets(root: Path, hidden: int = 32, layers: int = 2) -> dict[str, Path]:
    """``{"data": folder, "model": model dir with tokenizer}`` under ``root``."""
    root = Path(root)
    data = write_tofu_folder(root / "tofu")
    model_dir = write_tokenizer(root / "model")
    write_tiny_model(model_dir, model_dir, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=256)
    return {"data": data, "model": model_dir}
