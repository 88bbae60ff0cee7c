"""Turn a GGUF checkpoint into a Hugging Face model directory that every ``perta`` stage reads.

Transformers dequantises GGUF weights on load (``gguf_file=``); saving the result as safetensors with its
tokenizer gives a directory that fine-tuning, importance, merging and evaluation take like any other.
"""

from __future__ import annotations

from pathlib import Path

from perta_lightning.io import atomic_directory


def gguf_to_hf(gguf_path: str, output: str, torch_dtype: str = "float32", overwrite: bool = False) -> Path:
    """Dequantise ``gguf_path`` into a Hugging Face directory ``output`` (weights in ``torch_dtype``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    dtype = getattr(torch, torch_dtype)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The loaded model still carries its GGUF quantisation marker, which save_pretrained refuses; the weights
    # are already dequantised, so copy them into a plain model of the same architecture.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(output)
