"""Attacks on forgetting: does an unlearned model recover what it forgot when it is quantized, or fine-tuned a little?

* **Quantization** (:func:`quantize_model`): the model loaded through transformers' ``BitsAndBytesConfig`` as its
  users quantize it, 4-bit NormalFloat (``nf4``, with float32 compute) or LLM.int8() (``int8``), and saved as a
  quantized Hugging Face directory: ``from_pretrained`` of it gives the quantized model again, so the benchmark's
  own evaluation measures it unchanged. bitsandbytes runs these on CPUs too (0.50 is the release tested); 4-bit updates too small
  to cross a quantization step vanish (Zhang et al., arXiv 2410.16454).
* **Relearning** (:func:`relearn_model`): the model fine-tuned for a fixed number of optimizer steps on a relearn
  set (half of the forget set's authors, or as many retain examples), then measured on the forget examples it did
  not see (Hu et al., arXiv 2406.13356; Deeb and Roger, arXiv 2410.08827).

What share of the forgetting an attack undoes is :mod:`perta_lightning.functional.robustness`; the study runs the
attacks as stages, and ``perta attack`` attacks any model directory (:mod:`perta_lightning.study.attacks`).
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from perta_lightning.errors import PertaFileNotFoundError, PertaValueError

#: The quantization schemes, by name.
SCHEMES = ("nf4", "int8")


def quantization_config(scheme: str) -> Any:
    """transformers' ``BitsAndBytesConfig`` of ``scheme``: ``nf4`` (4-bit NormalFloat, blocks of 64, float32
    compute, no double quantization) or ``int8`` (LLM.int8(), outlier threshold 6)."""
    import torch
    from transformers import BitsAndBytesConfig

    if scheme == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise PertaValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")


def check_quantization_installed(where: str = "the quantization attack") -> None:
    """Refuse, in one line, a quantization without its libraries (bitsandbytes, and accelerate, which transformers
    places a quantized model with)."""
    import importlib.util

    missing = [name for name in ("bitsandbytes", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise PertaValueError(f"{where} needs {' and '.join(missing)}: pip install 'perta-lightning[attacks]' (it "
                              "runs on CPUs as well as GPUs)")


def quantize_model(model: str | os.PathLike, output: str | os.PathLike, scheme: str = "nf4",
                   overwrite: bool = False) -> Path:
    """Write ``model`` quantized by ``scheme`` to ``output`` (atomically), its tokenizer beside it; return
    ``output``. Loading ``output`` with ``from_pretrained`` gives the quantized model."""
    import torch
    from transformers import AutoModelForCausalLM

    from perta_lightning.checkpoints import from_pretrained, load_tokenizer
    from perta_lightning.io import atomic_directory

    check_quantization_installed()
    if not (Path(model) / "config.json").is_file():
        raise PertaFileNotFoundError(f"{model}: not a Hugging Face model directory (no config.json)")
    config = quantization_config(scheme)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    quantized = from_pretrained(AutoModelForCausalLM, str(model), quantization_config=config,
                                device_map={"": device}, dtype=torch.float32)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        quantized.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(str(model)).save_pretrained(tmp)
        (tmp / "perta_attack.json").write_text(json.dumps({"attack": "quantize", "scheme": scheme,
                                                           "model": str(model)}, indent=2))
    return Path(output)


def relearn_model(model: str | os.PathLike, rows: list[dict[str, Any]], output: str | os.PathLike, steps: int,
                  lr: float, batch_size: int, seed: int = 0, accelerator: str = "cpu",
                  max_length: int | None = None) -> Path:
    """Fine-tune ``model`` for ``steps`` optimizer steps (AdamW at ``lr``, the rows shuffled by ``seed`` and cycled
    as often as the steps need) on ``rows`` (question/answer pairs, answer tokens only) and write it to ``output``;
    return ``output``."""
    import lightning as L
    import torch

    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.callbacks.progress import progress_bar
    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.data.formatting import PromptFormat
    from perta_lightning.modules.finetune import CausalLMModule

    if steps < 1:
        raise PertaValueError(f"relearn steps must be at least 1, got {steps}")
    if not rows:
        raise PertaValueError("the relearn set is empty")
    L.seed_everything(seed, verbose=False)
    with tempfile.TemporaryDirectory(prefix="perta-relearn-") as folder:
        path = Path(folder) / "relearn.json"
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
        prompt = PromptFormat(tokenizer=str(model)) if max_length is None else PromptFormat(str(model), max_length)
        data = TofuDataModule(TofuSource(files={"relearn": str(path)}), prompt, train_split=["relearn"],
                              batch_size=batch_size)
        module = CausalLMModule(model=str(model), output_dir=str(output),
                                optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.01))
        trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, max_epochs=-1, logger=False,
                            enable_checkpointing=False, callbacks=[progress_bar()], enable_model_summary=False,
                            limit_val_batches=0)
        trainer.fit(module, data)
    return Path(output)
