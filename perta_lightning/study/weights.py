"""A PerTA variant's weights, streamed tensor by tensor from its importance files: the one place the study
computes them (for ``weights.png``, ``diagnostic.json`` and the analysis notebook).

    w = s_f^p / (s_f^p + β·s_r^p + ε)      (:func:`perta_lightning.functional.weights.perta_weights`)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perta_lightning.checkpoints import TensorSource
from perta_lightning.functional.weights import perta_weights


@dataclass(frozen=True)
class WeightFiles:
    """What a variant's weights are made of: its forget and retain importance files, β and p (handed on by the
    stages that made them)."""

    forget: Path
    retain: Path
    beta: float = 1.0
    power: float = 1.0


def layer_type(name: str) -> str:
    """Group a Hugging Face parameter name by the kind of layer it belongs to."""
    for key in ("embed", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        if key in name:
            return key
    return "norm" if "norm" in name else "other"


def streamed_weights(files: WeightFiles) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(name, s_f, s_r, w)`` of every tensor, in name order; one tensor's statistics in memory at a time."""
    with TensorSource.from_path(files.forget) as s_f, TensorSource.from_path(files.retain) as s_r:
        for name in sorted(s_f.infos):
            forget, retain = s_f.read(name).float(), s_r.read(name).float()
            yield name, forget, retain, perta_weights(forget, retain, power=files.power, beta=files.beta)


def weights_by_layer_type(files: WeightFiles, samples: int = 20000) -> dict[str, torch.Tensor]:
    """PerTA weights of every parameter, by layer type (a seeded subsample of ``samples`` each)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, _, _, w in streamed_weights(files):
        groups.setdefault(layer_type(name), []).append(w.flatten())
    generator = torch.Generator().manual_seed(0)
    out = {}
    for key, parts in groups.items():
        flat = torch.cat(parts)
        out[key] = flat[torch.randperm(flat.numel(), generator=generator)[:samples]]
    return out


def weight_concentration(files: WeightFiles) -> list[dict[str, Any]]:
    """Per parameter tensor: layer index, layer type, mean PerTA weight and the share above 0.5."""
    rows = []
    for name, _, _, w in streamed_weights(files):
        layer = re.search(r"layers\.(\d+)\.", name)
        rows.append({"name": name, "layer": int(layer.group(1)) if layer else None, "type": layer_type(name),
                     "mean_weight": w.mean().item(), "share_above_half": (w > 0.5).float().mean().item(),
                     "numel": w.numel()})
    return rows
