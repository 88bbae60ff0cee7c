"""Task-vector arithmetic for unlearning by negation.

Notation (all tensors of one parameter, any shape ``S``):

* ``θ_t``    target model (the model to unlearn from),
* ``θ_r``    reinforced model (``θ_t`` fine-tuned further on the forget set),
* ``θ_base`` the model the task vector is measured from (usually ``θ_t`` itself),
* ``τ = θ_r − θ_base``                 the forget task vector,
* ``θ_u = θ_t − α · (w ⊙ τ)``          the unlearned model.

Plain task-vector negation (TV) is ``w = 1``; PerTA takes ``w`` from
:func:`perta_lightning.functional.weights.perta_weights`.

Every function computes in float32 and returns the update cast to the dtype of ``θ_t``; none of
them touches files, devices or global state. The ``out=`` / ``*_`` / ``*_into`` forms write into
buffers the caller reuses (the streaming merge) and compute the same bits as the plain forms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def task_vector(reinforced: Tensor, base: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Forget task vector ``τ = θ_r − θ_base`` in float32.

    One subtraction over float32 operands (the upcasts from bf16 / fp16 are exact, so ``τ`` is
    ``θ_r − θ_base`` rounded once to float32). With ``out`` nothing is allocated when ``base`` is
    already float32 (``θ_r`` is converted inside the kernel unless it is float64).

    Args:
        reinforced: ``θ_r``, shape ``S``, any float dtype.
        base: ``θ_base``, shape ``S``, any float dtype.
        out: float32 tensor of shape ``S`` to write ``τ`` into (may alias ``base``); new if ``None``.

    Returns:
        ``τ``, shape ``S``, float32 (``out`` when given).
    """
    if reinforced.shape != base.shape:
        raise ValueError(f"task_vector: shape {tuple(reinforced.shape)} != {tuple(base.shape)}")
    if out is not None and (out.dtype != torch.float32 or out.shape != base.shape):
        raise ValueError(f"task_vector: out must be float32 of shape {tuple(base.shape)}")
    # One float32 operand makes the kernel compute in float32; a float64 one would make it compute in float64.
    r = reinforced if reinforced.dtype in _EXACT_IN_FLOAT32 else reinforced.float()
    return torch.sub(r, base.float(), out=out)


def weight_task_vector_(tau: Tensor, weight: Tensor | None) -> Tensor:
    """``τ ← w ⊙ τ`` in place (the weighted task vector); ``weight=None`` (``w = 1``) leaves ``τ`` as is.

    Args:
        tau: ``τ``, shape ``S``, float32; overwritten.
        weight: ``w``, shape ``S``, float32, or ``None``.

    Returns:
        ``tau``.
    """
    if weight is not None:
        if weight.shape != tau.shape:
            raise ValueError(f"weight_task_vector_: shape {tuple(weight.shape)} != {tuple(tau.shape)}")
        tau.mul_(weight)
    return tau


def negate_task_vector_into(target: Tensor, tau: Tensor, alpha: float, out: Tensor) -> Tensor:
    """``out ← θ_t − α · τ``, computed in float32 and rounded once to ``out.dtype``.

    ``τ`` here is the task vector with its weights already applied (:func:`weight_task_vector_`).
    ``α = 0`` copies ``θ_t`` bit for bit (``θ_t − 0 · τ`` would turn ``−0.0 − 0.0`` into ``+0.0``).

    Args:
        target: ``θ_t``, shape ``S``, float32 or a narrower float (converted inside the kernel, exactly).
        tau: (weighted) ``τ``, shape ``S``, float32.
        alpha: ``α``.
        out: tensor of shape ``S``, any float dtype, not aliasing ``target`` or ``tau`` unless ``α = 0``.

    Returns:
        ``out``.
    """
    if tau.shape != target.shape or out.shape != target.shape:
        raise ValueError("negate_task_vector_into: target, tau and out must have the same shape")
    if alpha == 0:
        return out.copy_(target)
    t = target if target.dtype in _EXACT_IN_FLOAT32 else target.float()
    return torch.add(t, tau.float(), alpha=-float(alpha), out=out)


def negate_task_vector(target: Tensor, tau: Tensor, alpha: float, weight: Tensor | None = None) -> Tensor:
    """Unlearned parameter ``θ_u = θ_t − α · (w ⊙ τ)``, cast to ``θ_t.dtype``.

    ``weight=None`` means ``w = 1`` (plain TV). ``α = 0`` returns a copy of ``θ_t`` bit for bit.

    Args:
        target: ``θ_t``, shape ``S``, any float dtype; the result has this dtype.
        tau: ``τ``, shape ``S``.
        alpha: scaling ``α`` of the negated task vector.
        weight: per-parameter weight ``w``, shape ``S``, or ``None`` for ``w = 1``.

    Returns:
        ``θ_u``, shape ``S``, dtype of ``target``.
    """
    return negate_task_vector_many(target, tau, (alpha,), weight)[0]


def negate_task_vector_many(
    target: Tensor,
    tau: Tensor,
    alphas: Sequence[float],
    weight: Tensor | None = None,
) -> list[Tensor]:
    """``[θ_t − α_k · (w ⊙ τ) for α_k in alphas]`` in float32, each rounded once to ``θ_t.dtype``.

    ``v = w ⊙ τ`` is formed once (:func:`weight_task_vector_`), then each result is one ``add``
    (:func:`negate_task_vector_into`), so a merge from a stored ``v`` gives the same bits.

    Args:
        target: ``θ_t``, shape ``S``, any float dtype.
        tau: ``τ``, shape ``S``.
        alphas: the values ``α_k``.
        weight: ``w``, shape ``S``, or ``None`` for ``w = 1``.

    Returns:
        One tensor per ``α_k``, each of shape ``S`` and the dtype of ``target``.
    """
    if tau.shape != target.shape or (weight is not None and weight.shape != target.shape):
        raise ValueError("negate_task_vector: target, tau and weight must have the same shape")
    v = tau.float()
    if weight is not None:
        v = weight_task_vector_(v.clone() if v is tau else v, weight.float())
    return [negate_task_vector_into(target, v, alpha, torch.empty_like(target)) for alpha in alphas]


def unlearn(
    target: Tensor,
    reinforced: Tensor,
    alpha: float,
    base: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """``θ_u = θ_t − α · (w ⊙ (θ_r − θ_base))`` with ``θ_base = θ_t`` when ``base`` is ``None``.

    Args:
        target: ``θ_t``, shape ``S``.
        reinforced: ``θ_r``, shape ``S``.
        alpha: ``α``.
        base: ``θ_base``, shape ``S``; defaults to ``target``.
        weight: ``w``, shape ``S``; ``None`` gives plain TV (``w = 1``).

    Returns:
        ``θ_u``, shape ``S``, dtype of ``target``.
    """
    tau = task_vector(reinforced, target if base is None else base)
    return negate_task_vector(target, tau, alpha, weight)


#: Float dtypes whose values float32 holds exactly: a kernel mixing them with float32 computes in float32.
_EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)
