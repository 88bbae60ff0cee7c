"""Tiny synthetic data, tokenizer and random Llama for evaluation tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

from perta_lightning.data.synthetic import SyntheticSpec, write_benchmark


def make_tiny_setup(root: Path, num_authors: int = 10, hidden: int = 32, layers: int = 2, seed: int = 0,
                    vocab_size: int = 400, intermediate: int | None = None) -> tuple[Path, Path]:
    """Write ``root/data`` (synthetic TOFU splits + tokenizer) and ``root/model`` (random Llama + tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    data = root / "data"
    write_benchmark(SyntheticSpec(num_authors=num_authors, seed=seed, num_world_items=12), str(data),
                    overwrite=True, tokenizer_vocab_size=vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a larger output scale makes greedy generations varied, not one repeated token
        model.lm_head.weight.mul_(20.0)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return data, model_dir
