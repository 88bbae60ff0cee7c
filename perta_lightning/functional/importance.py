"""Per-parameter importance statistics: pure accumulation maths over (shards of) gradients.

Notation: the split ``D`` has examples ``i = 1..N``; example ``i`` has answer tokens ``t ∈ A_i`` with
token negative log-likelihood ``nll_{i,t}``; ``T = Σ_i |A_i|`` is the number of answer tokens.

* ``grad``:   ``s = |∇θ L(D)|`` with ``L(D) = (1/T) Σ_i Σ_{t∈A_i} nll_{i,t}``, the mean over *all* answer
  tokens of the split. Gradients of the *summed* token NLL are accumulated and divided by ``T`` once
  at the end, so the result does not depend on batch size or on the number of processes.
* ``fisher``: ``s = (1/N) Σ_i (∇θ ℓ_i)²`` with ``ℓ_i = (1/|A_i|) Σ_{t∈A_i} nll_{i,t}`` the example's
  mean answer-token NLL: the diagonal of the empirical Fisher over examples.
  Computed exactly either by one backward per example, or from one batched backward: for a linear map
  ``y = W x + b`` applied to example ``i``'s positions ``t``, ``∇_W ℓ_i = Σ_t δ_{i,t} x_{i,t}ᵀ`` and
  ``∇_b ℓ_i = Σ_t δ_{i,t}`` with ``δ_{i,t} = ∂(Σ_j ℓ_j)/∂y_{i,t}`` (examples do not interact, so the
  batched backward's ``δ`` restricted to example ``i`` is that of ``ℓ_i`` alone); for an embedding
  ``y_{i,t} = E[id_{i,t}]``, ``∇_E ℓ_i`` has row ``v`` equal to ``Σ_{t: id_{i,t} = v} δ_{i,t}``. A
  parameter used in several places (tied embeddings) gets the *sum* of its uses' per-example
  gradients, squared afterwards.
* ``fisher`` by batch (an approximation): ``s ≈ (1/N) Σ_B |B| · g_B²`` with ``g_B = (1/|B|) Σ_{i∈B} ∇θ ℓ_i``.
  When the per-example gradients in a batch are uncorrelated with mean zero this equals the exact
  Fisher in expectation; in general ``E[|B| g_B²] = E[g²] + (|B| - 1) E[g]²``, so it depends on the
  batch size (with ``|B| = 1`` it is exact).

The per-example rules below take the batch in the first dimension. Every accumulating function works on a flat fp32 tensor that may be a shard (any contiguous slice) of a
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


# ---------------------------------------------------------------------------------------------- per example


def linear_weight_example_gradients(inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """``(B, out, in)`` fp32: ``G_i = Σ_t δ_{i,t} x_{i,t}ᵀ`` for ``y = x Wᵀ (+ b)``.

    ``inputs``: ``(B, ..., in)``; ``output_grads``: ``(B, ..., out)`` (any positions between)."""
    batch = inputs.shape[0]
    x = inputs.reshape(batch, -1, inputs.shape[-1]).to(torch.float32)
    delta = output_grads.reshape(batch, -1, output_grads.shape[-1]).to(torch.float32)
    return torch.bmm(delta.transpose(1, 2), x)


def accumulate_linear_weight_example_squares(
    accumulator: torch.Tensor, inputs: torch.Tensor, output_grads: torch.Tensor
) -> None:
    """``accumulator += Σ_i (Σ_t δ_{i,t} x_{i,t}ᵀ)²`` one example at a time through one ``(out, in)`` buffer:
    the same numbers as :func:`linear_weight_example_gradients` then :func:`accumulate_example_squares`,
    without a ``(B, out, in)`` tensor (on a CPU, also faster: the buffer stays in cache)."""
    batch = inputs.shape[0]
    x = inputs.reshape(batch, -1, inputs.shape[-1]).to(torch.float32)
    delta = output_grads.reshape(batch, -1, output_grads.shape[-1]).to(torch.float32)
    table = accumulator.view(delta.shape[-1], x.shape[-1])
    buffer = torch.empty_like(table)
    for example in range(batch):
        torch.mm(delta[example].T, x[example], out=buffer)
        table.addcmul_(buffer, buffer)


def linear_bias_example_gradients(output_grads: torch.Tensor) -> torch.Tensor:
    """``(B, out)`` fp32: ``Σ_t δ_{i,t}``."""
    batch = output_grads.shape[0]
    return output_grads.reshape(batch, -1, output_grads.shape[-1]).to(torch.float32).sum(dim=1)


def embedding_example_gradients(
    ids: torch.Tensor, output_grads: torch.Tensor, padding_idx: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse per-example gradients of an embedding table ``E``: ``(examples, rows, values)`` with one entry
    per distinct (example, row) pair, ``values[k] = Σ_{t: id_{e,t} = r} δ_{e,t}`` (fp32, ``(U, dim)``).

    ``ids``: ``(B, ...)`` integer; ``output_grads``: ``(B, ..., dim)``. Rows equal to ``padding_idx`` get
    no gradient, as in ``torch.nn.functional.embedding``."""
    batch, dim = ids.shape[0], output_grads.shape[-1]
    flat_ids = ids.reshape(batch, -1)
    example = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(flat_ids).reshape(-1)
    rows = flat_ids.reshape(-1)
    delta = output_grads.reshape(-1, dim).to(torch.float32)
    if padding_idx is not None:
        keep = rows != padding_idx
        example, rows, delta = example[keep], rows[keep], delta[keep]
    span = int(rows.max()) + 1 if rows.numel() else 1
    keys, inverse = torch.unique(example * span + rows, return_inverse=True)
    values = torch.zeros(keys.numel(), dim, dtype=torch.float32, device=delta.device)
    values.index_add_(0, inverse, delta)
    return keys // span, keys % span, values


def accumulate_example_squares(accumulator: torch.Tensor, example_gradients: torch.Tensor) -> None:
    """``accumulator += Σ_i G_i²`` (elementwise) for per-example gradients ``(B, *shape)``; flat fp32 accumulator.

    One fused multiply-add per example: on a CPU, ``square().sum(dim=0)`` over a large batch of gradients
    was 15-70x slower than the gradients' own matrix products."""
    rows = example_gradients.to(torch.float32).reshape(example_gradients.shape[0], -1)
    for row in rows:
        accumulator.addcmul_(row, row)


def accumulate_sparse_example_squares(accumulator: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``accumulator[r] += Σ_k values[k]²`` over the entries ``k`` of row ``r``: the squares of sparse per-example
    gradients whose (example, row) pairs are distinct. ``accumulator`` is the flat ``(num_rows · dim)`` table."""
    accumulator.view(-1, values.shape[-1]).index_add_(0, rows, values.square())
