"""How much of the forgetting an attack undoes: pure functions over a forget metric's values.

An unlearned model ``u`` moved a forget metric ``m`` (forget ROUGE, forget probability, Forget Quality; MUSE's
VerbMem, KnowMem on the forget set, PrivLeak) away from the target model ``t`` it was unlearned from. An attack
(4-bit quantization, a few steps of fine-tuning) turns ``u`` into ``a``. The **recovery** is the share of the
forgetting the attack undoes::

    recovery = (m(a) − m(u)) / (m(t) − m(u))

0: the attack changed nothing; 1: the attacked model is back at the target's value; below 0: the attack forgot
more; above 1: past the target. It is the same for a metric that forgetting lowers (ROUGE) and one it raises (Forget
Quality), since numerator and denominator change sign together. When ``|m(t) − m(u)|`` is at most ``tolerance``
the model forgot nothing on that metric and there is nothing to recover: the recovery is ``None`` (undefined),
never a division by (nearly) zero.

**Relearning** teaches too: fine-tuning on half of the forget set's authors moves the metric on the other half even
in a model that never saw the forget set (θ_retain), by what the attack teaches from scratch. That move of the
reference, ``m(r_a) − m(r)`` (θ_retain attacked minus θ_retain), is subtracted, so the figure counts knowledge that
was hidden, not learning speed::

    relearn recovery = ((m(a) − m(u)) − (m(r_a) − m(r))) / (m(t) − m(u))

On θ_retain itself (``u = r``, ``a = r_a``) it is 0 by construction, whatever the attack.

**p-values on a log scale.** Forget Quality is a KS-test p-value, and the levels it is matched at are decades apart
(0.001, 0.01, 0.1): a model selected at 0.001 from a target at 0.0005 has moved it by 0.0005, and an attack that
moves it by 0.01 would read as a recovery of −20 on a linear scale. A metric named in ``log_keys`` is compared as
``log10 m``, in decades, as the levels are (a value of 0 or below has no logarithm and gives ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

#: Below this |m(t) − m(u)| nothing was forgotten on the metric, and its recovery is undefined.
TOLERANCE = 1e-9


def recovery(attacked: float | None, unlearned: float | None, target: float | None,
             tolerance: float = TOLERANCE) -> float | None:
    """``(attacked − unlearned) / (target − unlearned)``; ``None`` when a value is missing or not finite, or when
    ``|target − unlearned| ≤ tolerance`` (nothing was forgotten)."""
    return relearn_recovery(attacked, unlearned, target, 0.0, 0.0, tolerance)


def relearn_recovery(attacked: float | None, unlearned: float | None, target: float | None,
                     reference_attacked: float | None, reference: float | None,
                     tolerance: float = TOLERANCE) -> float | None:
    """``((attacked − unlearned) − (reference_attacked − reference)) / (target − unlearned)``: the recovery less
    what the same attack moves in the reference model (θ_retain); ``None`` as in :func:`recovery`."""
    values = (attacked, unlearned, target, reference_attacked, reference)
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    forgotten = target - unlearned
    if abs(forgotten) <= tolerance:
        return None
    return ((attacked - unlearned) - (reference_attacked - reference)) / forgotten


def decades(value: float | None) -> float | None:
    """``log10(value)``; ``None`` for a missing, non-finite, zero or negative value."""
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return math.log10(value)


def recoveries(attacked: Mapping[str, float | None], unlearned: Mapping[str, float | None],
               target: Mapping[str, float | None], reference_attacked: Mapping[str, float | None] | None = None,
               reference: Mapping[str, float | None] | None = None,
               log_keys: tuple[str, ...] = ()) -> dict[str, float | None]:
    """:func:`relearn_recovery` (or :func:`recovery` without a reference) of every metric of ``unlearned``, those
    of ``log_keys`` in decades (:func:`decades`), and their ``mean`` over the metrics where it is defined (``None``
    where none is)."""
    out: dict[str, float | None] = {}
    for key in unlearned:
        scale = decades if key in log_keys else (lambda value: value)
        values = [scale(m.get(key)) for m in (attacked, unlearned, target)]
        if reference_attacked is None or reference is None:
            out[key] = recovery(*values)
        else:
            out[key] = relearn_recovery(*values, scale(reference_attacked.get(key)), scale(reference.get(key)))
    defined = [v for v in out.values() if v is not None]
    out["mean"] = sum(defined) / len(defined) if defined else None
    return out
