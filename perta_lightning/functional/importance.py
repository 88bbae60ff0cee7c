"""Per-parameter importance statistics: pure accumulation maths over (shards of) gradients.

Notation: the split ``D`` has examples ``i = 1..N``; example ``i`` has answer tokens ``t ∈ A_i`` with
token negative log-likelihood ``nll_{i,t}``; ``T = Σ_i |A_i|`` is the number of answer tokens.

* ``grad``:   ``s = |∇θ L(D)|`` with ``L(D) = (1/T) Σ_i Σ_{t∈A_i} nll_{i,t}``, the mean over *all* answer
  tokens of the split. Gradients of the *summed* token NLL are accumulated and divided by ``T`` once
  at the end, so the result does not depend on batch size or on the number of processes.
* ``fisher``: ``s = (1/N) Σ_i (∇θ ℓ_i)²`` with ``ℓ_i = (1/|A_i|) Σ_{t∈A_i} nll_{i,t}`` the example's
  mean answer-token NLL: the diagonal of the empirical Fisher over examples.
* ``fisher`` by batch (an approximation): ``s ≈ (1/N) Σ_B |B| · g_B²`` with ``g_B = (1/|B|) Σ_{i∈B} ∇θ ℓ_i``.
  When the per-example gradients in a batch are uncorrelated with mean zero this equals the exact
  Fisher in expectation; in general ``E[|B| g_B²] = E[g²] + (|B| - 1) E[g]²``, so it depends on the
  batch size (with ``|B| = 1`` it is exact).

Every function works on a flat fp32 tensor that may be a shard (any contiguous slice) of a
parameter, because the maths is elementwise; no Lightning, no I/O, no ``torch.distributed``.
"""

from __future__ import annotations

import torch


def new_accumulator(numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero fp32 accumulator of ``numel`` elements."""
    return torch.zeros(numel, dtype=torch.float32, device=device)


def accumulate_gradient(accumulator: torch.Tensor, gradient: torch.Tensor, scale: float = 1.0) -> None:
    """``accumulator += scale · gradient`` in fp32 (``gradient`` any float dtype, same numel)."""
    accumulator.add_(gradient.reshape(-1).to(torch.float32), alpha=scale)


def accumulate_squared(accumulator: torch.Tensor, gradient: torch.Tensor, scale: float = 1.0) -> None:
    """``accumulator += scale · gradient²`` (elementwise) in fp32."""
    gradient = gradient.reshape(-1).to(torch.float32)
    accumulator.addcmul_(gradient, gradient, value=scale)


def finalize_gradient(summed_gradient: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """``|Σ ∇ nll / T|``: absolute mean-token gradient from the summed-NLL gradient and ``T``."""
    if num_tokens <= 0:
        raise ValueError(f"no answer tokens to average over (num_tokens={num_tokens})")
    return (summed_gradient / num_tokens).abs_()


def finalize_fisher(summed_squares: torch.Tensor, num_examples: float) -> torch.Tensor:
    """``(1/N) Σ (∇ℓ)²`` from the summed squares and ``N``."""
    if num_examples <= 0:
        raise ValueError(f"no examples to average over (num_examples={num_examples})")
    return summed_squares / num_examples


def finalize(statistic: str, accumulator: torch.Tensor, num_tokens: float, num_examples: float) -> torch.Tensor:
    """The statistic from its accumulator: ``grad`` divides by tokens (then ``|·|``), ``fisher`` by examples."""
    if statistic == "grad":
        return finalize_gradient(accumulator, num_tokens)
    if statistic == "fisher":
        return finalize_fisher(accumulator, num_examples)
    raise ValueError(f"unknown statistic {statistic!r}; expected 'grad' or 'fisher'")
