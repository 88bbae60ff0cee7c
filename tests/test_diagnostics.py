"""The diagnostic maths and the importance transforms against scipy, hand-computed cases and naive loops."""

import random

import pytest
import torch
from scipy.stats import ks_2samp, rankdata, spearmanr

from perta_lightning.functional.diagnostics import (
    average_ranks,
    kept_energy,
    rank_correlation,
    weight_histogram,
)
from perta_lightning.functional.tofu_metrics import forget_quality_ladder
from perta_lightning.functional.weights import excess_importance, perta_weights, rank_contrast


def test_average_ranks_share_ties_like_scipy():
    values = torch.tensor([0.0, 3.0, 0.0, 1.0, 3.0, 3.0, -2.0])
    assert average_ranks(values).tolist() == [2.5, 6.0, 2.5, 4.0, 6.0, 6.0, 1.0]
    generator = torch.Generator().manual_seed(0)
    many = torch.randint(0, 20, (500,), generator=generator).float()  # many ties
    assert torch.allclose(average_ranks(many), torch.from_numpy(rankdata(many.numpy())))


def test_rank_correlation_is_spearman():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(300, generator=generator)
    y = x + 0.3 * torch.rand(300, generator=generator)
    y[:40] = 0.0  # ties
    assert rank_correlation(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    assert rank_correlation(x, -x) == pytest.approx(-1.0)
    assert rank_correlation(x, torch.ones(300)) != rank_correlation(x, torch.ones(300))  # NaN: no spread


def test_kept_energy_by_hand():
    w = torch.tensor([[1.0, 0.5], [0.0, 0.25]])
    tau = torch.tensor([[2.0, -2.0], [3.0, 4.0]])
    # (w τ)² = 4 + 1 + 0 + 1 = 6, τ² = 4 + 4 + 9 + 16 = 33
    assert kept_energy(w, tau) == (6.0, 33.0)
    uniform = torch.full((4,), 0.5)
    num, den = kept_energy(uniform, torch.randn(4))
    assert num / den == pytest.approx(0.25)  # uniform importance, β = 1: (1/(1+β))²


def test_weight_histogram_counts_each_bin_and_refuses_values_outside():
    assert weight_histogram(torch.tensor([0.0, 0.05, 0.1, 0.55, 0.99, 1.0]), bins=10) == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    with pytest.raises(ValueError, match="outside"):
        weight_histogram(torch.tensor([1.5]))


def test_rank_contrast_weight_is_the_rank_quantile_of_the_ratio():
    s_f = torch.tensor([1.0, 4.0, 2.0, 4.0])
    s_r = torch.tensor([1.0, 1.0, 4.0, 1.0])  # ratios 1, 4, 0.5, 4: ranks 2, 3.5, 1, 3.5
    q, rest = rank_contrast(s_f, s_r)
    assert q.tolist() == pytest.approx([(2 - 0.5) / 4, (3.5 - 0.5) / 4, (1 - 0.5) / 4, (3.5 - 0.5) / 4])
    assert torch.allclose(q + rest, torch.ones(4))
    # through the merge's own rule with β = p = 1 the weight is q
    assert torch.allclose(perta_weights(q, rest), q)
    # uniform in (0, 1) however correlated the importances are
    generator = torch.Generator().manual_seed(2)
    base = torch.rand(1000, generator=generator)
    q, _ = rank_contrast(base * 1.01, base)
    assert 0 < q.min() and q.max() < 1


def test_excess_importance_by_hand_and_against_a_loop():
    s_f = torch.tensor([2.0, 1.0, 6.0, 0.5, 3.0])
    s_r = torch.tensor([1.0, 1.0, 2.0, 0.0, 1.0])  # ratios on s_r > 0: 2, 1, 3, 3 -> median (lower) 2
    assert excess_importance(s_f, s_r).tolist() == [0.0, 0.0, 2.0, 0.5, 1.0]
    generator = torch.Generator().manual_seed(3)
    f, r = torch.rand(101, generator=generator), torch.rand(101, generator=generator)
    ratios = sorted(a / b for a, b in zip(f.tolist(), r.tolist()))
    m = ratios[len(ratios) // 2]
    naive = [max(a - m * b, 0.0) for a, b in zip(f.tolist(), r.tolist())]
    assert excess_importance(f, r).tolist() == pytest.approx(naive, abs=1e-6)


def test_forget_quality_ladder_holds_every_value_the_test_can_give():
    ladder = forget_quality_ladder(10)
    assert len(ladder) == 10 and ladder[-1] == 1.0
    assert ladder[-6:-3] == pytest.approx([0.0524475, 0.1678213, 0.4175237], rel=1e-5)
    rng = random.Random(0)
    for _ in range(200):  # random truth ratios of two samples of 10: each p-value is a step of the ladder
        a = [rng.gauss(0, 1) for _ in range(10)]
        b = [rng.gauss(rng.choice([0, 1, 2]), 1) for _ in range(10)]
        p = ks_2samp(a, b).pvalue
        assert min(abs(p - step) for step in ladder) < 1e-9
