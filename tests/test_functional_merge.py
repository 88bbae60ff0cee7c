"""Hand-computed cases and invariants of the pure merge maths."""

import pytest
import torch

from perta_lightning.functional.task_vectors import (
    negate_task_vector,
    negate_task_vector_into,
    negate_task_vector_many,
    task_vector,
    unlearn,
    weight_task_vector_,
)
from perta_lightning.functional.weights import perta_weights

T = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # θ_t
R = torch.tensor([[2.0, 2.0, 1.0], [4.0, 7.0, 5.0]])  # θ_r
B = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # θ_base
S_F = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 1.0]])
S_R = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 3.0]])


def test_task_vector_by_hand():
    assert torch.equal(task_vector(R, T), torch.tensor([[1.0, 0.0, -2.0], [0.0, 2.0, -1.0]]))
    assert torch.equal(task_vector(R, B), torch.tensor([[1.0, 1.0, 0.0], [3.0, 6.0, 4.0]]))


def test_tv_by_hand():
    # τ = R − T = [[1,0,-2],[0,2,-1]]; θ_u = T − 0.5 τ
    expected = torch.tensor([[0.5, 2.0, 4.0], [4.0, 4.0, 6.5]])
    assert torch.equal(unlearn(T, R, alpha=0.5), expected)
    # with a base: τ = R − B = [[1,1,0],[3,6,4]]; θ_u = T − 2 τ
    assert torch.equal(unlearn(T, R, alpha=2.0, base=B), torch.tensor([[-1.0, 0.0, 3.0], [-2.0, -7.0, -2.0]]))


def test_perta_weights_by_hand():
    # p=1, β=1, ε=0: s_f / (s_f + s_r), 0/0 excluded by making that entry non-zero
    s_r = S_R.clone()
    s_r[1, 0] = 1.0
    w = perta_weights(S_F, s_r, eps=0.0)
    assert torch.allclose(w, torch.tensor([[0.5, 0.5, 0.75], [0.0, 1.0, 0.25]]), rtol=0, atol=1e-7)
    # p=2, β=0.5: s_f² / (s_f² + 0.5 s_r²): 1/1.5, 4/6, 9/9.5, 0/0.5, 16/16, 1/5.5
    w = perta_weights(S_F, s_r, power=2.0, beta=0.5, eps=0.0)
    expected = torch.tensor([[2 / 3, 2 / 3, 18 / 19], [0.0, 1.0, 2 / 11]])
    assert torch.allclose(w, expected, rtol=0, atol=1e-7)


def test_eps_guards_zero_over_zero_and_biases_small_importance():
    w = perta_weights(S_F, S_R)  # entry [1,0] has s_f = s_r = 0
    assert w[1, 0] == 0.0 and torch.isfinite(w).all()
    assert torch.isnan(perta_weights(S_F, S_R, eps=0.0)[1, 0])
    # ε = 1 on s_f = s_r = 1: 1 / (1 + 1 + 1) = 1/3 instead of 1/2
    assert torch.allclose(perta_weights(torch.ones(2, 3), torch.ones(2, 3), eps=1.0), torch.full((2, 3), 1 / 3))


def test_perta_update_by_hand():
    # w (p=1, β=1, ε=0, [1,0] set to 0/1) = [[.5,.5,.75],[0,1,.25]]; τ = [[1,0,-2],[0,2,-1]]
    # w τ = [[.5,0,-1.5],[0,2,-.25]]; θ_u = T − 2 w τ = [[0,2,6],[4,1,6.5]]
    s_r = S_R.clone()
    s_r[1, 0] = 1.0
    w = perta_weights(S_F, s_r, eps=0.0)
    assert torch.equal(unlearn(T, R, alpha=2.0, weight=w), torch.tensor([[0.0, 2.0, 6.0], [4.0, 1.0, 6.5]]))


def test_beta_lowers_and_power_sharpens_weights():
    w1 = perta_weights(S_F + 1, S_R + 1, beta=1.0)
    w2 = perta_weights(S_F + 1, S_R + 1, beta=2.0)
    assert (w2 < w1).all()
    w_sharp = perta_weights(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 3.0]), power=3.0)
    assert w_sharp[0] > 0.75 and w_sharp[1] < 0.25  # p=1 would give exactly 0.75 and 0.25


def test_alpha_zero_is_bitwise_identity():
    target = torch.tensor([[-0.0, 1e-30, 3.0], [float(2**-140), -5.5, 1e30]]).bfloat16()
    tau = torch.tensor([[-1.0, 2.0, -3.0], [4.0, 5.0, -6.0]])
    out = negate_task_vector(target, tau, 0.0, weight=torch.rand(2, 3))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), target.view(torch.int16))


def test_uniform_importance_equals_tv_with_rescaled_alpha():
    torch.manual_seed(0)
    t, r = torch.randn(2, 3), torch.randn(2, 3)
    uniform = torch.full((2, 3), 0.37)
    for beta in (0.0, 1.0, 3.0):
        w = perta_weights(uniform, uniform, beta=beta)
        torch.testing.assert_close(unlearn(t, r, 0.8, weight=w), unlearn(t, r, 0.8 / (1 + beta)))


def test_tv_equals_formula_and_result_in_target_dtype():
    torch.manual_seed(0)
    t, r, b = torch.randn(2, 3).bfloat16(), torch.randn(2, 3), torch.randn(2, 3).half()
    out = unlearn(t, r, 0.3, base=b)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (t.float() - 0.3 * (r.float() - b.float())).bfloat16())


def test_many_alphas_match_single_calls():
    tau = task_vector(R, T)
    w = perta_weights(S_F, S_R)
    outs = negate_task_vector_many(T, tau, [0.0, 0.5, 2.0], w)
    for alpha, out in zip([0.0, 0.5, 2.0], outs):
        assert torch.equal(out, negate_task_vector(T, tau, alpha, w))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="shape"):
        perta_weights(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="power > 0"):
        perta_weights(S_F, S_R, power=0.0)
    with pytest.raises(ValueError, match="shape"):
        task_vector(torch.ones(2, 3), torch.ones(3))


# ---------------------------------------------------------------- in-place forms against the plain ones


@pytest.mark.parametrize("power,beta,eps", [(1.0, 1.0, 1e-20), (2.0, 0.5, 1e-20), (0.5, 3.0, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perta_weights_out_equals_plain_bit_for_bit(power, beta, eps, dtype):
    torch.manual_seed(1)
    s_f, s_r = (torch.rand(40, 7).to(dtype) + 0.01 for _ in range(2))
    plain = perta_weights(s_f, s_r, power, beta, eps)
    out = torch.full((40, 7), float("nan"))
    powered = (s_f.float(), s_r.float())  # copies, overwritten by s^p
    got = perta_weights(powered[0], powered[1], power, beta, eps, out=out, powered=powered)
    assert got is out and torch.equal(out, plain)


def test_perta_weights_out_must_be_float32_of_the_shape():
    with pytest.raises(ValueError, match=r"out must be float32 of shape \(2, 3\)"):
        perta_weights(S_F, S_R, out=torch.empty(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out must be float32 of shape \(2, 3\)"):
        perta_weights(S_F, S_R, out=torch.empty(6))


def test_bf16_importance_is_upcast_exactly():
    s_f, s_r = S_F.bfloat16(), S_R.bfloat16() + 1  # small integers: exact in bf16
    assert torch.equal(perta_weights(s_f, s_r), perta_weights(s_f.float(), s_r.float()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_task_vector_out_equals_plain_bit_for_bit(dtype):
    torch.manual_seed(2)
    r, b = torch.randn(50, 3).to(dtype), torch.randn(50, 3).to(dtype)
    out = torch.empty(50, 3)
    assert task_vector(r, b.float(), out=out) is out
    assert torch.equal(out, task_vector(r, b))
    with pytest.raises(ValueError, match="out must be float32"):
        task_vector(r, b, out=torch.empty(50, 3, dtype=torch.float64))


def test_weight_task_vector_in_place_by_hand():
    tau = task_vector(R, T)  # [[1,0,-2],[0,2,-1]]
    w = torch.tensor([[0.5, 1.0, 0.25], [1.0, 0.5, 0.0]])
    assert weight_task_vector_(tau, w) is tau
    assert torch.equal(tau, torch.tensor([[0.5, 0.0, -0.5], [0.0, 1.0, -0.0]]))
    assert weight_task_vector_(tau, None) is tau


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_negate_into_equals_plain_bit_for_bit(dtype):
    torch.manual_seed(3)
    t, tau, w = torch.randn(30, 4).to(dtype), torch.randn(30, 4), torch.rand(30, 4)
    for alpha in (0.0, 0.7, -1.5):
        out = torch.empty(30, 4, dtype=dtype)
        v = weight_task_vector_(tau.clone(), w)
        assert negate_task_vector_into(t.float(), v, alpha, out=out) is out
        assert torch.equal(out, negate_task_vector(t, tau, alpha, w)), alpha
    zero = torch.tensor([-0.0, 1.0], dtype=dtype)
    out = negate_task_vector_into(zero, torch.tensor([0.0, 5.0]), 0.0, out=torch.empty(2, dtype=dtype))
    assert torch.equal(out.view(torch.uint8), zero.view(torch.uint8))  # -0.0 kept bit for bit
