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
them touches files, devices or global state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def task_vector(reinforced: Tensor, base: Tensor) -> Tensor:
    """Forget task vector ``τ = θ_r − θ_base`` in float32.

    Args:
        reinforced: ``θ_r``, shape ``S``, any float dtype.
        base: ``θ_base``, shape ``S``, any float dtype.

    Returns:
        ``τ``, shape ``S``, float32.
    """
    if reinforced.shape != base.shape:
        raise ValueError(f"task_vector: shape {tuple(reinforced.shape)} != {tuple(base.shape)}")
    return reinforced.float() - base.float()  # same-dtype ops: mixed-dtype kernels are slower on CPU


def negate_task_vector(target: Tensor, tau: Tensor, alpha: float, weight: Tensor | None = None) -> Tensor:
    """Unlearned parameter ``θ_u = θ_t − α · (w ⊙ τ)``, cast to ``θ_t.dtype``.

    ``weight=None`` means ``w = 1`` (plain TV). ``α = 0`` returns a copy of ``θ_t`` bit for bit
    (the float32 round trip would otherwise turn ``−0.0`` into ``+0.0`` in rare cases).

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
    dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """``[θ_t − α_k · (w ⊙ τ) for α_k in alphas]`` in float32, each cast to ``dtype``.

    Each result is one fused ``addcmul`` (or ``add`` when ``w = 1``) over float32 operands.

    Args:
        target: ``θ_t``, shape ``S``, any float dtype (pass it already in float32 to share the
            conversion with :func:`task_vector`, together with ``dtype``).
        tau: ``τ``, shape ``S``.
        alphas: the values ``α_k``.
        weight: ``w``, shape ``S``, or ``None`` for ``w = 1``.
        dtype: dtype of the results; defaults to ``target.dtype``. ``α_k = 0`` gives
            ``target.to(dtype)``, which is ``θ_t`` bit for bit when ``target`` holds values of ``dtype``.

    Returns:
        One tensor per ``α_k``, each of shape ``S`` and dtype ``dtype``.
    """
    if tau.shape != target.shape or (weight is not None and weight.shape != target.shape):
        raise ValueError("negate_task_vector: target, tau and weight must have the same shape")
    dtype = target.dtype if dtype is None else dtype
    target32, tau32 = target.float(), tau.float()
    results = []
    for alpha in alphas:
        if alpha == 0:
            results.append(target.to(dtype, copy=True))
        elif weight is None:
            results.append(torch.add(target32, tau32, alpha=-float(alpha)).to(dtype))
        else:
            results.append(torch.addcmul(target32, tau32, weight.float(), value=-float(alpha)).to(dtype))
    return results


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
