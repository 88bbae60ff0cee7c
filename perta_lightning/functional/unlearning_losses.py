"""Losses of the training-based unlearning baselines. Pure functions of per-example answer NLLs.

Notation: ``nll_f`` is the answer NLL on a forget batch, ``nll_r`` on a retain batch, ``nll_ref`` the forget
NLL of a frozen reference model (the target before unlearning). GradAscent and GradDiff take the batch's
mean token NLL; NPO takes per-example *sequence* NLLs (summed over answer tokens), as in the NPO paper.

* GradAscent:  L = −nll_f
* GradDiff:    L = −nll_f + nll_r
* NPO:         L = mean_i( −(2/β) · logsigmoid(β · (nll_f,i − nll_ref,i)) ) + nll_r
* SimNPO:      L = γ · mean_i( −(2/β) · logsigmoid(β · (nll_f,i / |y_i| − δ)) ) + α · nll_r
* RMU:         L = γ · act(h_f, c·u) + α · act(h_r, h_r^ref)

SimNPO (Fan et al., 2024) drops NPO's reference model and normalises by length: its forget term uses the mean
token NLL of each example, ``nll_f,i / |y_i|``, against a margin δ. RMU (Li et al., 2024, the WMDP paper) works
on the hidden states ``h`` that one layer outputs: it steers those of forget examples towards a fixed random
direction ``u`` (unit norm) scaled by the steering coefficient ``c``, and keeps those of retain examples at the
frozen target's, ``h^ref``. ``act(a, b)`` is the activation distance both terms use: per example, the mean over
hidden units of (a − b)², summed over the example's answer tokens and divided by their number; then the mean
over examples.

NPO (Zhang et al., 2024) is −(2/β)·E[logsigmoid(−β·log π_θ(y|x)/π_ref(y|x))], and log π_θ/π_ref = −(nll_f −
nll_ref), hence the sign above: the loss falls towards 0 as the model's forget NLL rises above the
reference's, and unlike gradient ascent it is bounded below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grad_ascent_loss(nll_f: torch.Tensor) -> torch.Tensor:
    """``−nll_f``: maximise the forget NLL (a scalar or per-example values, averaged)."""
    return -nll_f.mean()


def grad_diff_loss(nll_f: torch.Tensor, nll_r: torch.Tensor) -> torch.Tensor:
    """``−nll_f + nll_r``: ascend on forget, descend on retain."""
    return -nll_f.mean() + nll_r.mean()


def npo_loss(nll_f: torch.Tensor, nll_ref: torch.Tensor, nll_r: torch.Tensor | None, beta: float = 0.1) -> torch.Tensor:
    """``mean_i(−(2/β)·logsigmoid(β·(nll_f,i − nll_ref,i))) [+ nll_r]``; ``nll_f``, ``nll_ref``: ``(B,)``."""
    if beta <= 0:
        raise ValueError(f"NPO needs beta > 0, got {beta}")
    forget_term = (-(2.0 / beta) * F.logsigmoid(beta * (nll_f - nll_ref))).mean()
    return forget_term if nll_r is None else forget_term + nll_r.mean()


def simnpo_loss(nll_sum_f: torch.Tensor, tokens_f: torch.Tensor, nll_r: torch.Tensor | None, beta: float = 4.5,
                delta: float = 0.0, gamma: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """``γ · mean_i(−(2/β)·logsigmoid(β·(nll_f,i/|y_i| − δ))) [+ α·nll_r]``; ``nll_sum_f``, ``tokens_f``: ``(B,)``
    summed answer NLL and answer-token count of each forget example."""
    if beta <= 0:
        raise ValueError(f"SimNPO needs beta > 0, got {beta}")
    forget_term = (-(2.0 / beta) * F.logsigmoid(beta * (nll_sum_f / tokens_f - delta))).mean()
    return gamma * forget_term if nll_r is None else gamma * forget_term + alpha * nll_r.mean()


def activation_distance(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's distance between hidden states ``(B, T, D)`` and targets of the same shape (or broadcastable), over
    the tokens ``mask`` ``(B, T)`` keeps: mean over examples of (Σ_t mask·mean_d (h − t)²) / Σ_t mask."""
    squared = (hidden - target.expand_as(hidden)).pow(2).mean(dim=2)  # (B, T)
    mask = mask.to(squared.dtype)
    return ((squared * mask).sum(dim=1) / mask.sum(dim=1)).mean()


def rmu_loss(hidden_f: torch.Tensor, control: torch.Tensor, mask_f: torch.Tensor, hidden_r: torch.Tensor,
             reference_r: torch.Tensor, mask_r: torch.Tensor, gamma: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """``γ · act(h_f, c·u) + α · act(h_r, h_r^ref)`` (:func:`activation_distance`); ``control`` is ``c·u``,
    ``(1, 1, D)``."""
    return gamma * activation_distance(hidden_f, control, mask_f) + alpha * activation_distance(hidden_r, reference_r,
                                                                                               mask_r)


def control_vector(dim: int, steering_coeff: float, generator: torch.Generator) -> torch.Tensor:
    """RMU's steering target ``c·u``: a uniform random vector in [0, 1)^dim scaled to norm ``steering_coeff``,
    ``(1, 1, dim)``."""
    vector = torch.rand(1, 1, dim, generator=generator)
    return vector / vector.norm() * steering_coeff
