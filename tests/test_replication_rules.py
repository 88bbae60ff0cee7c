"""The verdict rules of the replication table, on hand-made per-seed inputs with known answers."""

import math

import pytest

from perta_lightning.functional.replication import (
    FAILS,
    HOLDS,
    UNRESOLVED,
    all_of,
    cost_evidence,
    cost_verdict,
    equivalence_verdict,
    evidence,
    improvement_verdict,
    per_seed_means,
    share_of,
)


def seeds(values):
    """One level per seed: {seed: [difference]}."""
    return {seed: [value] for seed, value in enumerate(values)}


def test_per_seed_means_average_the_levels_both_reach_and_drop_empty_seeds():
    means, pairs = per_seed_means({0: [0.1, None, 0.3], 1: [None, None], 2: [-0.2]})
    assert means == pytest.approx({0: 0.2, 2: -0.2})
    assert pairs == [0.1, 0.3, -0.2]


def test_a_clear_win_holds():
    e = evidence(seeds([0.05, 0.07, 0.04, 0.06, 0.08, 0.05, 0.06, 0.03, 0.07, 0.05]))
    assert (e.wins, e.losses, e.n) == (10, 0, 10)
    assert e.sign_test_p == pytest.approx(2 / 2**10)  # 10-0: p = 0.002
    assert e.interval[0] > 0
    assert improvement_verdict(e) == HOLDS


def test_a_clear_loss_does_not_hold():
    e = evidence(seeds([-0.05, -0.07, -0.04, -0.06, -0.08, -0.05, -0.06, -0.03, -0.07, -0.05]))
    assert e.interval[1] < 0
    assert improvement_verdict(e) == FAILS


def test_a_tie_does_not_hold_since_it_rules_out_an_improvement():
    e = evidence(seeds([0.002, -0.003, 0.0005, -0.001, 0.004, -0.002, 0.001, -0.004, 0.003, 0.0]))
    assert e.interval[1] < 0.01
    assert improvement_verdict(e) == FAILS
    # ties (|d| <= 0.001) count for neither side of the sign test
    assert e.wins + e.losses == 6


def test_too_few_seeds_is_not_resolved_whatever_the_values():
    e = evidence(seeds([0.2, 0.3, 0.25]))
    assert improvement_verdict(e) == UNRESOLVED
    assert equivalence_verdict(e) == UNRESOLVED
    # five seeds 5-0 cannot reach p < 0.05 two-sided
    e5 = evidence(seeds([0.2, 0.3, 0.25, 0.2, 0.3]))
    assert e5.sign_test_p == pytest.approx(0.0625)
    assert improvement_verdict(e5) == UNRESOLVED


def test_a_wide_spread_around_zero_is_not_resolved():
    e = evidence(seeds([0.15, -0.12, 0.2, -0.1, 0.18, -0.05, 0.1, -0.15, 0.12, 0.02]))
    assert improvement_verdict(e) == UNRESOLVED


def test_a_mean_above_zero_with_a_split_sign_test_does_not_hold_as_a_win():
    # one large win carries the mean; the seeds split 5-5
    e = evidence(seeds([0.6, 0.6, 0.6, -0.01, -0.01, -0.01, -0.01, -0.01, 0.02, 0.02]))
    assert e.sign_test_p > 0.05
    assert improvement_verdict(e) == UNRESOLVED


def test_equivalence_holds_inside_the_bounds_and_fails_outside():
    small = evidence(seeds([0.005, -0.004, 0.01, -0.008, 0.0, 0.006, -0.002, 0.003, -0.006, 0.001]))
    assert equivalence_verdict(small) == HOLDS
    large = evidence(seeds([0.05, 0.06, 0.04, 0.05, 0.07, 0.06, 0.05, 0.04, 0.06, 0.05]))
    assert equivalence_verdict(large) == FAILS
    wide = evidence(seeds([0.06, -0.05, 0.04, -0.06, 0.05, -0.04, 0.06, -0.05, 0.04, -0.06]))
    assert equivalence_verdict(wide) == UNRESOLVED


def test_cost_rule_reads_the_geometric_mean_ratio():
    cheap = cost_evidence({s: 1.0 for s in range(8)}, {s: 2.0 + 0.1 * s for s in range(8)})
    assert cheap.estimate == pytest.approx(math.exp(sum(math.log(1 / (2 + 0.1 * s)) for s in range(8)) / 8))
    assert (cheap.wins, cheap.losses) == (8, 0)
    assert cost_verdict(cheap) == HOLDS
    dear = cost_evidence({s: 3.0 for s in range(8)}, {s: 1.0 for s in range(8)})
    assert cost_verdict(dear) == FAILS
    assert cost_verdict(cost_evidence({0: 1.0, 1: 1.0}, {0: 2.0, 1: 2.0})) == UNRESOLVED


def test_conjunction_and_share():
    assert all_of([HOLDS, HOLDS]) == HOLDS
    assert all_of([HOLDS, FAILS]) == FAILS
    assert all_of([HOLDS, UNRESOLVED]) == UNRESOLVED
    assert all_of([]) == UNRESOLVED
    assert share_of([HOLDS, FAILS, UNRESOLVED, HOLDS]) == HOLDS
    assert share_of([FAILS, FAILS, FAILS, HOLDS]) == FAILS
    assert share_of([FAILS, UNRESOLVED, UNRESOLVED, HOLDS]) == UNRESOLVED
