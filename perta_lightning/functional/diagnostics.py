"""What a PerTA weighting does to a task vector: pure functions over tensors.

* :func:`average_ranks`, :func:`rank_correlation`: Spearman's ρ of two importance vectors, ties given the
  mean of their ranks (importance has many exact zeros: embedding rows of tokens a split never uses).
  ρ(s_f, s_r) near 1 means the same entries matter for forgetting and for retaining, so
  ``w = s_f / (s_f + β s_r)`` is nearly one number and PerTA is nearly TV with a smaller α.
* :func:`kept_energy`: ``(Σ (w ⊙ τ)², Σ τ²)`` of one tensor; summed over tensors, the first over the second
  is the share of the task vector's squared norm that the weights keep. TV keeps 1; uniform importance
  keeps ``1 / (1 + β)²``.
* :func:`weight_histogram`: counts of ``w`` in equal bins of [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..n of the entries of a 1-D tensor, tied entries sharing the mean of their ranks (float64)."""
    if values.dim() != 1:
        raise ValueError(f"average_ranks: expected a 1-D tensor, got shape {tuple(values.shape)}")
    n = values.numel()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # 1-based rank of the last entry of each run
    run_ranks = ends - (counts.double() - 1) / 2
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = run_ranks[inverse]
    return ranks


def rank_correlation(x: Tensor, y: Tensor) -> float:
    """Spearman's ρ of two equally long 1-D tensors (Pearson correlation of their average ranks).

    ``nan`` when either is constant (its ranks have no spread).
    """
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"rank_correlation: need two 1-D tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denominator == 0:
        return float("nan")
    return float((rx * ry).sum() / denominator)


def kept_energy(weights: Tensor, task_vector: Tensor) -> tuple[float, float]:
    """``(Σ (w ⊙ τ)², Σ τ²)`` over one tensor (float64 sums); shapes must match."""
    if weights.shape != task_vector.shape:
        raise ValueError(f"kept_energy: shape {tuple(weights.shape)} != {tuple(task_vector.shape)}")
    tau = task_vector.double()
    return float(((weights.double() * tau) ** 2).sum()), float((tau * tau).sum())


def weight_histogram(weights: Tensor, bins: int = 10) -> list[int]:
    """Counts of the entries of ``weights`` (in [0, 1]) in ``bins`` equal bins; 1.0 falls in the last."""
    flat = weights.detach().flatten().double()
    if flat.numel() and (flat.min() < 0 or flat.max() > 1):
        raise ValueError(f"weight_histogram: weights outside [0, 1] (min {flat.min():.3g}, max {flat.max():.3g})")
    index = torch.clamp((flat * bins).long(), max=bins - 1)
    return torch.bincount(index, minlength=bins).tolist()
