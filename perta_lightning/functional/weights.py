"""The PerTA per-parameter weight rule.

For each parameter entry, with forget importance ``s_f ≥ 0`` and retain importance ``s_r ≥ 0``::

    w = s_f^p / (s_f^p + β · s_r^p + ε)

so ``w ∈ [0, 1]`` (``w = 1`` only where ``β s_r^p + ε`` vanishes, or is lost to float32 rounding
beside ``s_f^p``): close to 1 where the entry matters for the forget set only, close to 0 where it
matters for the retain set. With uniform importance ``s_f = s_r = c > 0`` and ``ε ≪ c^p`` every
weight is ``1 / (1 + β)``, so PerTA reduces to plain task-vector negation with ``α / (1 + β)``.

``ε`` only guards ``0 / 0``: an entry with no importance on either set gets ``w = 0`` (it is left
at ``θ_t``). Its default, ``DEFAULT_EPS = 1e-20``, is far below typical squared-gradient
importances of large models (often 1e-8 … 1e-16, where 1e-12 would visibly bias ``w`` towards 0)
and far above the float32 underflow limit (~1e-38). Pass ``eps=0`` to forbid the guard: then an
entry with ``s_f = s_r = 0`` gives NaN, which the merge reports as an error.

Two transforms of the importances, applied per tensor before the rule (this project's variants, not the
paper's): :func:`rank_contrast` (the weight becomes the rank quantile of ``s_f / s_r``) and
:func:`excess_importance` (only the forget importance beyond what ``s_r`` predicts counts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from perta_lightning.functional.diagnostics import average_ranks

DEFAULT_EPS = 1e-20


def perta_weights(
    forget_importance: Tensor,
    retain_importance: Tensor,
    power: float = 1.0,
    beta: float = 1.0,
    eps: float = DEFAULT_EPS,
    *,
    out: Tensor | None = None,
    powered: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """PerTA weights ``w = s_f^p / (s_f^p + β · s_r^p + ε)`` in float32.

    Four elementwise passes (two more when ``p ≠ 1``): ``s^p`` of each, ``den = s_f^p + β s_r^p``,
    ``den += ε``, ``w = s_f^p / den``. With ``out`` (and ``powered``) given nothing is allocated, so a
    streaming merge reuses its buffers from block to block; the result is the same, bit for bit.

    Args:
        forget_importance: ``s_f``, shape ``S``, non-negative, any float dtype.
        retain_importance: ``s_r``, shape ``S``, non-negative, any float dtype.
        power: exponent ``p > 0``; ``p = 1`` skips the power.
        beta: weight ``β ≥ 0`` of the retain importance.
        eps: ``ε ≥ 0`` added to the denominator.
        out: float32 tensor of shape ``S`` to write ``w`` into (must not alias ``s_f``); a new one if ``None``.
        powered: two float32 tensors of shape ``S`` for ``s_f^p`` and ``s_r^p`` when ``p ≠ 1`` (they
            may be the importances themselves, which are then overwritten); new ones if ``None``.

    Returns:
        ``w``, shape ``S``, float32 (``out`` when given).
    """
    if forget_importance.shape != retain_importance.shape:
        raise ValueError(
            f"perta_weights: shape {tuple(forget_importance.shape)} != {tuple(retain_importance.shape)}"
        )
    if power <= 0 or beta < 0 or eps < 0:
        raise ValueError(f"perta_weights: need power > 0, beta >= 0, eps >= 0; got {power}, {beta}, {eps}")
    if out is not None and (out.dtype != torch.float32 or out.shape != forget_importance.shape):
        raise ValueError(f"perta_weights: out must be float32 of shape {tuple(forget_importance.shape)}")
    s_f = forget_importance.float()  # exact upcast (bf16 / fp16 importance), no copy when float32
    s_r = retain_importance.float()
    if power != 1:
        s_f = torch.pow(s_f, power, out=None if powered is None else powered[0])
        s_r = torch.pow(s_r, power, out=None if powered is None else powered[1])
    den = torch.add(s_f, s_r, alpha=beta, out=out)
    if eps:
        den.add_(eps)
    return torch.div(s_f, den, out=den)


def rank_contrast(forget_importance: Tensor, retain_importance: Tensor, eps: float = DEFAULT_EPS
                  ) -> tuple[Tensor, Tensor]:
    """Importances ``(q, 1 − q)`` whose PerTA weight (β = p = 1) is the rank quantile ``q`` of the ratio.

    ``q`` is the mean rank, within the tensor, of ``log(s_f + ε) − log(s_r + ε)``, less one half, over the
    tensor's size: it lies in (0, 1), ties share one value, and its distribution is uniform whatever the
    scale of the two importances or their correlation. Where forget and retain importance are strongly
    rank-correlated, ``w = s_f / (s_f + β s_r)`` is nearly one number (PerTA ≈ TV with α / (1 + β)); this
    weight keeps their *ordering* and spreads it over [0, 1]. Shapes: any ``S``, float32 out.
    """
    if forget_importance.shape != retain_importance.shape:
        raise ValueError(f"rank_contrast: shape {tuple(forget_importance.shape)} != {tuple(retain_importance.shape)}")
    ratio = torch.log(forget_importance.double() + eps) - torch.log(retain_importance.double() + eps)
    q = ((average_ranks(ratio.flatten()) - 0.5) / ratio.numel()).reshape(ratio.shape).float()
    return q, 1.0 - q


def excess_importance(forget_importance: Tensor, retain_importance: Tensor) -> Tensor:
    """Forget importance beyond what the retain importance predicts: ``max(s_f − m · s_r, 0)``.

    ``m`` is the tensor's median of ``s_f / s_r`` over the entries with ``s_r > 0`` (0 when there are none):
    the typical share of forget importance an entry has per unit of retain importance. What is left is
    the importance specific to the forget set; about half of each tensor's entries get none, so their
    weight ``w = s_f' / (s_f' + β s_r)`` is 0. Shape ``S`` in, float32 ``S`` out.
    """
    if forget_importance.shape != retain_importance.shape:
        raise ValueError(f"excess_importance: shape {tuple(forget_importance.shape)} != "
                         f"{tuple(retain_importance.shape)}")
    s_f, s_r = forget_importance.float(), retain_importance.float()
    positive = s_r > 0
    m = torch.median(s_f[positive] / s_r[positive]) if positive.any() else s_f.new_zeros(())
    return torch.clamp(s_f - m * s_r, min=0.0)
