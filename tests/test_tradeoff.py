"""The matched-FQ comparison and the α search, on hand-made curves with known answers."""

import math

import pytest

from perta_lightning.functional.tradeoff import (
    CurvePoint,
    bootstrap_interval,
    bracket,
    next_alphas,
    paired_differences,
    sign_test,
    spread,
    summarize_differences,
    utilities_at_levels,
    utility_at_level,
)


def curve(*triples, collapsed=()):
    return [CurvePoint(a, fq, mu, a in collapsed) for a, fq, mu in triples]


def test_monotone_curve_reads_the_first_point_at_or_above_each_level():
    points = curve((0.5, 1e-4, 0.80), (1.0, 0.02, 0.75), (2.0, 0.2, 0.60), (4.0, 0.9, 0.52))
    assert utilities_at_levels(points, [0.01, 0.05, 0.1, 0.3]) == [0.75, 0.60, 0.60, 0.52]
    assert utility_at_level(points, 0.05).alpha == 2.0


def test_non_monotone_curve_takes_the_best_point_that_reaches_the_level():
    # FQ dips at α = 2 (KS noise) and MU recovers a little at α = 4: the best reaching point wins.
    points = curve((1.0, 0.2, 0.70), (2.0, 0.04, 0.60), (4.0, 0.3, 0.65))
    assert utilities_at_levels(points, [0.05, 0.25]) == [0.70, 0.65]


def test_a_level_never_reached_is_none_not_filled_in():
    points = curve((1.0, 1e-3, 0.8), (2.0, 0.02, 0.7))
    assert utilities_at_levels(points, [0.01, 0.1]) == [0.7, None]


def test_collapsed_points_are_excluded():
    points = curve((1.0, 0.01, 0.7), (2.0, 0.5, 0.2), collapsed=(2.0,))
    assert utilities_at_levels(points, [0.01, 0.1]) == [0.7, None]


def test_nan_forget_quality_never_reaches():
    assert utility_at_level(curve((1.0, math.nan, 0.9)), 0.01) is None


def test_bracket_treats_collapse_as_reaching():
    points = curve((1.0, 0.001, 0.7), (4.0, 0.001, 0.1), collapsed=(4.0,))
    assert bracket(points, 0.1) == (1.0, 4.0)


def test_search_brackets_a_known_crossing():
    # FQ(α) = min(1, (α/3)²): level ℓ is first reached at α* = 3·√ℓ.
    def evaluate(alpha):
        return CurvePoint(alpha, min(1.0, (alpha / 3) ** 2), 1.0 - alpha / 100)

    levels = [0.01, 0.1, 0.5]
    points = [evaluate(1.0)]
    rounds = 0
    while proposals := next_alphas(points, levels, ratio=1.1):
        points += [evaluate(a) for a in proposals]
        rounds += 1
        assert rounds < 30
    for level in levels:
        lo, hi = bracket(points, level)
        star = 3 * math.sqrt(level)
        assert lo < star <= hi and hi / lo <= 1.1 * 1.001  # α are rounded to 4 significant digits
    assert rounds <= 8


def test_search_stops_at_alpha_max_when_a_level_is_never_reached():
    points = [CurvePoint(1.0, 0.0, 0.9)]
    proposals = next_alphas(points, [0.5], alpha_max=8.0)
    assert proposals == [4.0]
    points += [CurvePoint(4.0, 0.0, 0.9)]
    assert next_alphas(points, [0.5], alpha_max=8.0) == [8.0]
    points += [CurvePoint(8.0, 0.0, 0.9)]
    assert next_alphas(points, [0.5], alpha_max=8.0) == []


def test_search_goes_down_when_the_smallest_alpha_already_reaches():
    assert next_alphas([CurvePoint(1.0, 0.9, 0.9)], [0.1]) == [0.25]


def test_sign_test_matches_the_binomial_by_hand():
    # 5 positive of 6: p = 2 · (C(6,0) + C(6,1)) / 2⁶ = 14/64
    assert sign_test([1, 2, 3, 4, 5, -1]) == pytest.approx(14 / 64)
    assert sign_test([0.0, 0.0]) == 1.0
    assert sign_test([1.0]) == 1.0


def test_paired_differences_use_only_seeds_where_both_reach():
    method = {0: [0.7, 0.6], 1: [0.8, None], 2: [0.5, 0.4]}
    reference = {0: [0.6, 0.5], 1: [0.7, 0.6], 2: [None, 0.5]}
    diffs = paired_differences(method, reference)
    assert [pytest.approx(d) for d in diffs[0]] == [0.1, 0.1]
    assert [pytest.approx(d) for d in diffs[1]] == [0.1, -0.1]


def test_spread_and_summary():
    s = spread([0.5, None, 0.7])
    assert (s.mean, s.n, s.n_total) == (pytest.approx(0.6), 2, 3)
    assert s.std == pytest.approx(math.sqrt(0.02))
    assert spread([None]).mean is None
    summary = summarize_differences([0.1, 0.2, 0.3])
    assert summary.mean == pytest.approx(0.2) and summary.wins == 3 and summary.n == 3
    low, high = summary.interval
    assert 0.1 <= low <= 0.2 <= high <= 0.3
    assert bootstrap_interval([1.0]) is None


def test_search_skips_levels_the_target_already_reaches():
    target = CurvePoint(0.0, 0.2, 0.8)
    assert next_alphas([target, CurvePoint(1.0, 0.5, 0.7)], [0.1]) == []
    # the target does not reach 0.3, α = 1 does: search down from α = 1, never into α = 0
    assert next_alphas([target, CurvePoint(1.0, 0.5, 0.7)], [0.3]) == [0.25]


def test_the_target_point_counts_for_the_matched_rule():
    points = curve((0.0, 0.2, 0.8), (1.0, 0.5, 0.6))
    assert utilities_at_levels(points, [0.1, 0.3]) == [0.8, 0.6]


def test_a_curve_of_one_point_is_the_single_model_comparison():
    """A baseline evaluated once (α None, as before curves) or at its last epoch: the same matched values."""
    from perta_lightning.functional.tradeoff import method_curves

    rows = [{"method": "target", "family": "reference", "alpha": None, "f": 0.02, "u": 0.8, "collapsed": False},
            {"method": "grad_diff", "family": "baseline", "alpha": None, "f": 0.2, "u": 0.6, "collapsed": False}]
    single = utilities_at_levels(method_curves(rows, "f", "u")["grad_diff"], [0.01, 0.1, 0.5])
    rows[1]["alpha"] = 5.0
    curve = utilities_at_levels(method_curves(rows, "f", "u")["grad_diff"], [0.01, 0.1, 0.5])
    assert single == curve == [0.8, 0.6, None]


def test_can_be_selected_is_reaching_the_lowest_level():
    from perta_lightning.functional.tradeoff import can_be_selected

    levels = [0.05, 0.01, 0.3]
    assert can_be_selected(0.01, levels) and can_be_selected(0.5, levels)
    assert not can_be_selected(0.0099, levels)
    assert can_be_selected(None, levels) and can_be_selected(math.nan, levels)  # unknown: evaluate in full
    # a point below every level is never picked by the matched rule, whatever its utility
    target = CurvePoint(0.0, 0.001, 0.5)
    below = CurvePoint(1.0, 0.009, 0.99)
    assert utilities_at_levels([target, below], levels) == [None, None, None]


def test_a_screened_only_point_brackets_as_not_collapsed():
    """The one way the screened search differs from the full one: a model that collapsed without reaching a level
    brackets it when evaluated in full; screened only (collapse unknown), the search steps on past it."""
    target = CurvePoint(0.0, 0.001, 0.5)
    reached = CurvePoint(1.0, 0.02, 0.4)
    collapsed = CurvePoint(4.0, 0.001, 0.1, collapsed=True)
    screened = CurvePoint(4.0, 0.001, math.nan, collapsed=False)
    assert next_alphas([target, reached, collapsed], [0.1], ratio=1.5) == [2.0]  # bisect below the collapse
    assert next_alphas([target, reached, screened], [0.1], ratio=1.5) == [16.0]  # step on


def _area_naive(points, low, high, steps=20000):
    """The mean of the matched utility over a fine log grid (midpoints)."""
    import math

    from perta_lightning.functional.tradeoff import utility_at_level

    total = 0.0
    for i in range(steps):
        level = math.exp(math.log(low) + (i + 0.5) / steps * math.log(high / low))
        best = utility_at_level(points, level)
        total += 0.0 if best is None else best.model_utility
    return total / steps


def test_utility_area_by_hand_and_against_a_fine_grid():
    """U is 0.5 up to 0.02, 0.4 up to 0.1, 0.3 up to 0.5 and 0 above: over two decades of ℓ the mean is
    (0.5 log 2 + 0.4 log 5 + 0.3 log 5) / log 100; a collapsed point and a NaN forgetting never count."""
    import math

    from perta_lightning.functional.tradeoff import CurvePoint, utility_area

    points = [CurvePoint(0.0, 0.02, 0.5), CurvePoint(1.0, 0.1, 0.4), CurvePoint(2.0, 0.5, 0.3),
              CurvePoint(4.0, 0.9, 0.01, collapsed=True), CurvePoint(8.0, math.nan, 0.9)]
    expected = (0.5 * math.log(2) + 0.4 * math.log(5) + 0.3 * math.log(5)) / math.log(100)
    assert utility_area(points, 0.01, 1.0) == pytest.approx(expected, rel=1e-12)
    assert utility_area(points, 0.01, 1.0) == pytest.approx(_area_naive(points, 0.01, 1.0), abs=1e-3)
    assert utility_area(points, 0.05, 0.3) == pytest.approx(_area_naive(points, 0.05, 0.3), abs=1e-3)
    assert utility_area(points, 0.2, 0.2) == 0.3  # one level: the matched utility there
    assert utility_area([CurvePoint(0.0, 0.001, 0.5)], 0.01, 0.3) == 0.0  # no level reached
    with pytest.raises(ValueError, match="low <= high"):
        utility_area(points, 0.3, 0.1)


def test_utility_area_moves_little_when_a_point_just_misses_a_level():
    """A point whose forgetting slips from just above the top level to just below it: the mean at the levels drops
    by that level's whole utility share, the area by a sliver."""
    from perta_lightning.functional.tradeoff import CurvePoint, utilities_at_levels, utility_area

    levels = [0.05, 0.1, 0.3]

    def curve(top):
        return [CurvePoint(0.0, 0.01, 0.6), CurvePoint(1.0, 0.12, 0.5), CurvePoint(2.0, top, 0.45)]

    def at_levels(points):
        return sum(u or 0.0 for u in utilities_at_levels(points, levels)) / len(levels)

    above, below = curve(0.31), curve(0.29)
    assert at_levels(above) - at_levels(below) == pytest.approx(0.45 / 3)
    assert 0 < utility_area(above, 0.05, 0.3) - utility_area(below, 0.05, 0.3) < 0.02
