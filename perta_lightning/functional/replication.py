"""Verdicts on the paper's claims from per-seed measurements: pure functions, the rules stated here.

The unit of evidence is the **seed**: each test seed builds its own benchmark, trains its own models and
runs every method, so seeds are independent and levels or splits within a seed are not. A comparison of
method A against method B therefore reduces each seed to one number first (:func:`per_seed_means`: the mean
over the Forget Quality levels, and over the forget splits when pooled, of MU(A) − MU(B) where both reach
the level), and every interval and test is over those per-seed numbers:

* **estimate**: their mean; **interval**: the 95 % percentile bootstrap of that mean, resampling seeds;
* **sign test**: two-sided exact sign test over seeds, a seed whose value is within ``tie`` (0.001 MU) of
  zero counting as a tie (dropped); with 10 seeds a 10–0 split gives p = 0.002;
* **wins–losses** are also counted over every (seed, split, level) pair, as a description.

**Improvement rule** (:func:`improvement_verdict`, "A improves on B"), with ``n`` seeds that have a value:

* *not resolved* when ``n < min_seeds`` (6: with 5 seeds even 5–0 gives p = 0.0625);
* *holds* when the interval lies above 0, the sign test gives p < 0.05, and wins exceed losses;
* *does not hold* when the interval's upper end is below ``margin`` (0.01 MU): the data rule out an
  improvement of that size, which covers a clear loss and a tie alike;
* *not resolved* otherwise (the interval reaches past ``margin`` without excluding 0).

**Equivalence rule** (:func:`equivalence_verdict`, "A and B differ negligibly"), fixed before any run:
*holds* when |estimate| < ``bound`` (0.02) and the interval lies inside ±``interval_bound`` (0.03);
*does not hold* when the interval lies wholly outside ±``bound``; *not resolved* otherwise, or with
fewer than ``min_seeds`` seeds.

**Cost rule** (:func:`cost_verdict`, "A is cheaper than B"): per seed the ratio cost(A) / cost(B); the
estimate is their geometric mean, the interval the bootstrap of the mean log ratio (exponentiated);
*holds* when the interval lies below 1, the sign test (ratio < 1 a win) gives p < 0.05 and wins exceed
losses; *does not hold* when the interval lies above 1; *not resolved* otherwise or with too few seeds.

**Robustness rule** (:func:`robustness_verdict`, "A's forgetting is at least as robust as B's"): the per-seed
values are differences in recovery under an attack (:mod:`perta_lightning.functional.robustness`), A − B, where
less is better; *holds* when the interval's upper end lies below ``margin`` (0.1: A recovers at most a tenth of
the forgetting more than B, ruled out beyond that); *does not hold* when the interval lies above 0 (A recovers
more, and the margin is not shown); *not resolved* otherwise or with fewer than ``min_seeds`` seeds.

**Conjunctions** (:func:`all_of`): a claim made of parts holds when every part holds, does not hold when
any part does not hold, and is not resolved otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from perta_lightning.functional.tradeoff import bootstrap_interval, sign_test

HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolved"


@dataclass(frozen=True)
class ReplicationRules:
    """The numbers of the verdict rules, fixed in a study's config before it runs (defaults as documented).

    Args:
        min_seeds: seeds with a value below which nothing is resolved.
        tie: a per-seed difference within this of zero is a tie.
        significance: sign-test level.
        improvement_margin: "does not improve" once the interval's upper end is below this (MU).
        negligible_mean: "negligible difference" needs |estimate| below this (MU) ...
        negligible_interval: ... and the interval inside ± this.
        robustness_margin: "at least as robust" once the interval of the recovery difference lies below this.
    """

    min_seeds: int = 6
    tie: float = 1e-3
    significance: float = 0.05
    improvement_margin: float = 0.01
    negligible_mean: float = 0.02
    negligible_interval: float = 0.03
    robustness_margin: float = 0.1

#: Seeds below which no verdict is given: a two-sided sign test over 5 seeds cannot go below 0.0625.
MIN_SEEDS = 6
#: A per-seed difference this close to zero is a tie (neither a win nor a loss).
TIE = 1e-3


@dataclass(frozen=True)
class Evidence:
    """One comparison over seeds: the per-seed values and what the rules read from them.

    ``pair_wins`` / ``pair_losses`` count (seed, split, level) pairs; ``wins`` / ``losses`` count seeds.
    """

    per_seed: dict[int, float]
    estimate: float | None
    interval: tuple[float, float] | None
    sign_test_p: float
    wins: int
    losses: int
    pair_wins: int
    pair_losses: int
    pairs: int

    @property
    def n(self) -> int:
        return len(self.per_seed)


def per_seed_means(differences: Mapping[int, Sequence[float | None]]) -> tuple[dict[int, float], list[float]]:
    """``({seed: mean of its present values}, every present value)``; seeds with none are left out.

    ``differences`` maps a seed to its paired differences (``None`` where a level was not reached by both),
    e.g. the levels of one split, or of every split one after the other when pooled.
    """
    means, pairs = {}, []
    for seed in sorted(differences):
        present = [d for d in differences[seed] if d is not None]
        pairs += present
        if present:
            means[seed] = sum(present) / len(present)
    return means, pairs


def _signs(values: Sequence[float], tie: float) -> list[float]:
    return [0.0 if abs(v) <= tie else v for v in values]


def evidence(differences: Mapping[int, Sequence[float | None]], *, tie: float = TIE, seed: int = 0) -> Evidence:
    """The per-seed summary of paired differences (see the module docstring)."""
    means, pairs = per_seed_means(differences)
    values = [means[s] for s in sorted(means)]
    signed = _signs(values, tie)
    pair_signs = _signs(pairs, tie)
    return Evidence(
        per_seed=means,
        estimate=sum(values) / len(values) if values else None,
        interval=bootstrap_interval(values, seed=seed),
        sign_test_p=sign_test(signed),
        wins=sum(v > 0 for v in signed), losses=sum(v < 0 for v in signed),
        pair_wins=sum(v > 0 for v in pair_signs), pair_losses=sum(v < 0 for v in pair_signs), pairs=len(pairs))


def improvement_verdict(e: Evidence, *, margin: float = 0.01, min_seeds: int = MIN_SEEDS,
                        significance: float = 0.05) -> str:
    """"A improves on B" by the improvement rule of the module docstring."""
    if e.n < min_seeds or e.interval is None:
        return UNRESOLVED
    low, high = e.interval
    if low > 0 and e.sign_test_p < significance and e.wins > e.losses:
        return HOLDS
    if high < margin:
        return FAILS
    return UNRESOLVED


def equivalence_verdict(e: Evidence, *, bound: float = 0.02, interval_bound: float = 0.03,
                        min_seeds: int = MIN_SEEDS) -> str:
    """"A and B differ negligibly" by the equivalence rule of the module docstring."""
    if e.n < min_seeds or e.interval is None or e.estimate is None:
        return UNRESOLVED
    low, high = e.interval
    if abs(e.estimate) < bound and -interval_bound < low and high < interval_bound:
        return HOLDS
    if low > bound or high < -bound:
        return FAILS
    return UNRESOLVED


def robustness_verdict(e: Evidence, *, margin: float = 0.1, min_seeds: int = MIN_SEEDS) -> str:
    """"A's forgetting is at least as robust as B's" by the robustness rule of the module docstring (``e``: the
    per-seed recovery differences A − B)."""
    if e.n < min_seeds or e.interval is None:
        return UNRESOLVED
    low, high = e.interval
    if high < margin:
        return HOLDS
    if low > 0:
        return FAILS
    return UNRESOLVED


@dataclass(frozen=True)
class CostEvidence:
    """Per-seed cost ratios cost(A) / cost(B) and what the cost rule reads from them."""

    per_seed: dict[int, float]
    estimate: float | None
    interval: tuple[float, float] | None
    sign_test_p: float
    wins: int
    losses: int

    @property
    def n(self) -> int:
        return len(self.per_seed)


def cost_evidence(cost: Mapping[int, float], reference: Mapping[int, float], *, seed: int = 0) -> CostEvidence:
    """Ratios of ``cost`` to ``reference`` on the seeds both have (positive costs only), summarised."""
    ratios = {s: cost[s] / reference[s] for s in sorted(cost.keys() & reference.keys())
              if cost[s] > 0 and reference[s] > 0}
    logs = [math.log(r) for r in ratios.values()]
    interval = bootstrap_interval(logs, seed=seed)
    # a win is a seed where A is cheaper: the sign test reads -log(ratio), positive when cheaper
    signed = _signs([-v for v in logs], 1e-3)
    return CostEvidence(
        per_seed=ratios,
        estimate=math.exp(sum(logs) / len(logs)) if logs else None,
        interval=None if interval is None else (math.exp(interval[0]), math.exp(interval[1])),
        sign_test_p=sign_test(signed), wins=sum(v > 0 for v in signed), losses=sum(v < 0 for v in signed))


def cost_verdict(e: CostEvidence, *, min_seeds: int = MIN_SEEDS, significance: float = 0.05) -> str:
    """"A is cheaper than B" by the cost rule of the module docstring."""
    if e.n < min_seeds or e.interval is None:
        return UNRESOLVED
    low, high = e.interval
    if high < 1 and e.sign_test_p < significance and e.wins > e.losses:
        return HOLDS
    if low > 1:
        return FAILS
    return UNRESOLVED


def all_of(verdicts: Sequence[str]) -> str:
    """A conjunction of parts: holds if all hold, does not hold if any does not, else not resolved."""
    if not verdicts:
        return UNRESOLVED
    if any(v == FAILS for v in verdicts):
        return FAILS
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return UNRESOLVED


def share_of(verdicts: Sequence[str], at_least: float = 0.5) -> str:
    """"Often": holds when at least ``at_least`` of the parts hold, does not hold when more than
    ``1 - at_least`` of them do not, not resolved otherwise."""
    if not verdicts:
        return UNRESOLVED
    n = len(verdicts)
    if sum(v == HOLDS for v in verdicts) >= at_least * n:
        return HOLDS
    if sum(v == FAILS for v in verdicts) > (1 - at_least) * n:
        return FAILS
    return UNRESOLVED
