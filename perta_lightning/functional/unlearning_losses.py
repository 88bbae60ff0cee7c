"""Losses of the training-based unlearning baselines. Pure functions of per-example answer NLLs.

Notation: ``nll_f`` is the answer NLL on a forget batch, ``nll_r`` on a retain batch, ``nll_ref`` the forget
NLL of a frozen reference model (the target before unlearning). GradAscent and GradDiff take the batch's
mean token NLL; NPO takes per-example *sequence* NLLs (summed over answer tokens), as in the NPO paper.

* GradAscent:  L = −nll_f
* GradDiff:    L = −nll_f + nll_r
* NPO:         L = mean_i( −(2/β) · logsigmoid(β · (nll_f,i − nll_ref,i)) ) + nll_r

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
