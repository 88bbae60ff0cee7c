"""Comparing unlearning methods at matched forgetting: pure functions over (α, FQ, MU) curves.

A method with a strength knob α (TV, PerTA) traces a curve of models, each with a Forget Quality (FQ) and a
Model Utility (MU). Comparing two methods at one α says little, since their α mean different things; they
are compared at the same FQ instead.

**The matched-FQ rule.** ``utility_at_level(points, level)`` is the highest MU among the curve's evaluated,
non-collapsed points whose FQ is at or above ``level``, or ``None`` when no such point exists (the level is
*not reached*, and is never filled in). Every reported MU is that of a model that was built and evaluated: no
interpolation between α, which on a KS-test p-value of a few dozen examples (it moves in jumps) would invent
models. A point is *collapsed* when its MU is below ``collapse_fraction`` (0.5) of the target model's MU; a
collapsed model forgets by losing everything, so it does not count as reaching any level.

Every curve starts at the target model itself (α = 0): a level the target already reaches is reached by
every method, at the target's utility.

**The α search.** ``next_alphas`` proposes the α to evaluate next so that every level is bracketed: for a
level ℓ that the target (α = 0, when given) does not reach, ``α_hi`` is the smallest evaluated α > 0 that
reaches ℓ or has collapsed, and ``α_lo`` the largest evaluated α > 0 below it. Until both exist the search
steps outwards by ``step`` (×4 up from the largest α, ÷4 down from the smallest); then it bisects in log α,
proposing √(α_lo·α_hi), until α_hi/α_lo ≤ ``ratio``.

**Screening.** Where the forgetting value of a model can be had cheaply (TOFU's Forget Quality from the forget
set's truth ratios alone), the search screens each α first and evaluates in full only the models that
``can_be_selected``: the matched rule picks a point at level ℓ only if its FQ ≥ ℓ, so a model whose FQ is below
every level is never in the table, whatever its MU. Such a screened-only point still brackets levels with its
FQ, but its collapse is unknown and it is taken as not collapsed: the one way the screened search can differ
from the full one is a model that collapses without reaching a level, which brackets that level in the full
search and not in the screened one (the search then steps on).

**Across seeds.** ``paired_differences`` gives, per seed, MU(method) − MU(reference) at each level where
both reach it; ``summarize_differences`` reports the mean, a seeded bootstrap interval of the mean, and a
two-sided sign test.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CurvePoint:
    """One evaluated model of a method's curve."""

    alpha: float | None
    forget_quality: float
    model_utility: float
    collapsed: bool = False


def method_curves(rows: Sequence[Mapping[str, Any]], forget_key: str, utility_key: str) -> dict[str, list[CurvePoint]]:
    """Each method's evaluated points in α order, every curve starting at the target model (α = 0).

    ``rows``: one seed's report rows (``method``, ``family``, ``alpha``, ``collapsed`` and the two axes under
    ``forget_key`` and ``utility_key``); the ``reference`` family (θ_retain, θ_full) is no method, and the row of
    ``method == "target"`` is every curve's start."""
    target = next(row for row in rows if row["method"] == "target")
    start = CurvePoint(0.0, target[forget_key], target[utility_key], False)
    out: dict[str, list[CurvePoint]] = {}
    for row in rows:
        if row["family"] != "reference":
            out.setdefault(row["method"], [start]).append(
                CurvePoint(row["alpha"], row[forget_key], row[utility_key], row["collapsed"]))
    for points in out.values():
        points.sort(key=lambda p: -1.0 if p.alpha is None else p.alpha)
    return out


def is_collapsed(model_utility: float, target_utility: float, collapse_fraction: float = 0.5) -> bool:
    """A model has collapsed when its Model Utility is below ``collapse_fraction`` × the target's."""
    return model_utility < collapse_fraction * target_utility


def utility_at_level(points: Iterable[CurvePoint], level: float) -> CurvePoint | None:
    """The non-collapsed point of highest MU with FQ ≥ ``level`` (ties: the smaller α); ``None`` if none.

    FQ values that are NaN never reach a level.
    """
    reaching = [p for p in points if not p.collapsed and p.forget_quality >= level]
    if not reaching:
        return None
    return max(reaching, key=lambda p: (p.model_utility, -(p.alpha if p.alpha is not None else 0.0)))


def utilities_at_levels(points: Sequence[CurvePoint], levels: Sequence[float]) -> list[float | None]:
    """``utility_at_level`` for each level, as MU values (``None`` where the level is not reached)."""
    out = []
    for level in levels:
        best = utility_at_level(points, level)
        out.append(None if best is None else best.model_utility)
    return out


def utility_area(points: Sequence[CurvePoint], low: float, high: float) -> float:
    """The mean of the matched utility ``U(ℓ)`` over ``log ℓ`` from ``low`` to ``high``: the area under the curve's
    matched-utility profile, ``∫ U(ℓ) d log ℓ / (log high − log low)``, with ``U(ℓ)`` the
    :func:`utility_at_level` MU and 0 where ``ℓ`` is not reached; ``U(low)`` when ``low == high``.

    Unlike the mean of ``U`` at a few levels, it moves little when one point's forgetting moves a little: a point
    just short of a level loses the sliver between its forgetting and the level, not the level's whole utility.
    ``U`` is a step function that only changes at the points' forgetting values, so the integral is exact: a sum
    over the segments between them (log scale, as forgetting levels are p-values spread over decades)."""
    if not 0.0 < low <= high:
        raise ValueError(f"utility_area needs 0 < low <= high, got low={low}, high={high}")

    def at(level: float) -> float:
        best = utility_at_level(points, level)
        return 0.0 if best is None else best.model_utility

    if low == high:
        return at(low)
    inside = sorted({p.forget_quality for p in points if not p.collapsed and low < p.forget_quality < high})
    edges = [low, *inside, high]
    total = sum(at(math.sqrt(a * b)) * math.log(b / a) for a, b in zip(edges, edges[1:]))
    return total / math.log(high / low)


def _reaches(point: CurvePoint, level: float) -> bool:
    return point.collapsed or point.forget_quality >= level


def bracket(points: Sequence[CurvePoint], level: float) -> tuple[float | None, float | None]:
    """``(α_lo, α_hi)`` for ``level``: α_hi is the smallest α that reaches it (or collapsed), α_lo the
    largest evaluated α below α_hi. Either is ``None`` when it does not exist yet."""
    curve = sorted((p for p in points if p.alpha is not None and p.alpha > 0), key=lambda p: p.alpha)
    hi = next((p.alpha for p in curve if _reaches(p, level)), None)
    below = [p.alpha for p in curve if hi is None or p.alpha < hi]
    return (below[-1] if below else None), hi


def can_be_selected(forget_quality: float | None, levels: Sequence[float]) -> bool:
    """Whether a model of forgetting value ``forget_quality`` can be picked by ``utility_at_level`` at one of
    ``levels`` (FQ ≥ min(levels)), so that its full evaluation can change the matched table. Unknown (``None``
    or NaN) counts as yes. A level the target model reaches still counts: a merge reaching it with a higher MU
    than the target's is picked there."""
    if forget_quality is None or math.isnan(forget_quality):
        return True
    return forget_quality >= min(levels)


def next_alphas(points: Sequence[CurvePoint], levels: Sequence[float], *, ratio: float = 1.2,
                step: float = 4.0, alpha_min: float = 1e-3, alpha_max: float = 1e3) -> list[float]:
    """The α to evaluate next so that each of ``levels`` is bracketed to within ``ratio`` (sorted, unique).

    A point at α = 0 is the target model. An empty list means every level is bracketed tightly enough, or cannot be (never reached below
    ``alpha_max``, or already reached at ``alpha_min``). ``points`` must hold at least one α.
    """
    if ratio <= 1.0 or step <= 1.0:
        raise ValueError(f"ratio and step must be > 1, got ratio={ratio}, step={step}")
    alphas = sorted(p.alpha for p in points if p.alpha is not None and p.alpha > 0)
    if not alphas:
        raise ValueError("next_alphas needs at least one evaluated α > 0")
    targets = [p for p in points if p.alpha == 0]
    proposals: set[float] = set()
    for level in levels:
        if any(not p.collapsed and p.forget_quality >= level for p in targets):
            continue  # the target model itself reaches the level
        lo, hi = bracket(points, level)
        if hi is None:
            candidate = min(alphas[-1] * step, alpha_max)
            if candidate > alphas[-1]:
                proposals.add(candidate)
        elif lo is None:
            candidate = max(alphas[0] / step, alpha_min)
            if candidate < alphas[0]:
                proposals.add(candidate)
        elif hi / lo > ratio:
            proposals.add(math.sqrt(lo * hi))
    return sorted(_round_alpha(a) for a in proposals)


def _round_alpha(alpha: float) -> float:
    """Four significant digits, so that α print, name folders and compare reproducibly."""
    return float(f"{alpha:.4g}")


def paired_differences(method: Mapping[int, Sequence[float | None]], reference: Mapping[int, Sequence[float | None]]
                       ) -> list[list[float]]:
    """Per level, the list of MU(method) − MU(reference) over the seeds where both reach that level.

    ``method`` and ``reference`` map a seed to its MU per level (``utilities_at_levels``).
    """
    seeds = sorted(method.keys() & reference.keys())
    n_levels = len(next(iter(method.values()))) if method else 0
    out: list[list[float]] = [[] for _ in range(n_levels)]
    for seed in seeds:
        for index, (a, b) in enumerate(zip(method[seed], reference[seed])):
            if a is not None and b is not None:
                out[index].append(a - b)
    return out


def sign_test(differences: Sequence[float]) -> float:
    """Two-sided exact sign test p-value of ``differences`` (zeros dropped); 1.0 when nothing is left."""
    positive = sum(d > 0 for d in differences)
    n = sum(d != 0 for d in differences)
    if n == 0:
        return 1.0
    k = min(positive, n - positive)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (seeded); ``None`` for fewer than 2 values."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(resamples))
    low = means[int(math.floor((1 - confidence) / 2 * (resamples - 1)))]
    high = means[int(math.ceil((1 + confidence) / 2 * (resamples - 1)))]
    return low, high


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation and count of the values that exist (``None`` entries are not reached)."""

    mean: float | None
    std: float | None
    n: int
    n_total: int


def spread(values: Sequence[float | None]) -> Spread:
    """Mean ± sample std over the values that are not ``None``; ``n`` counts them, ``n_total`` all."""
    present = [v for v in values if v is not None]
    if not present:
        return Spread(None, None, 0, len(values))
    mean = sum(present) / len(present)
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1)) if len(present) > 1 else None
    return Spread(mean, std, len(present), len(values))


@dataclass(frozen=True)
class DifferenceSummary:
    """Paired differences against a reference at one level."""

    mean: float | None
    interval: tuple[float, float] | None
    sign_test_p: float
    wins: int
    losses: int
    n: int


def summarize_differences(differences: Sequence[float], seed: int = 0) -> DifferenceSummary:
    """Mean paired difference, its 95 % bootstrap interval, and the sign test over ``differences``."""
    n = len(differences)
    return DifferenceSummary(
        mean=sum(differences) / n if n else None,
        interval=bootstrap_interval(differences, seed=seed),
        sign_test_p=sign_test(differences),
        wins=sum(d > 0 for d in differences),
        losses=sum(d < 0 for d in differences),
        n=n,
    )
