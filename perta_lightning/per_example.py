"""``Σ_i (∇θ ℓ_i)²`` for every trainable parameter of a model, from one batched forward and backward.

The per-example Fisher of :mod:`perta_lightning.functional.importance` needs each example's gradient
``∇θ ℓ_i`` squared before the sum over examples; a plain backward only gives ``Σ_i ∇θ ℓ_i``. Forward
hooks on every module that owns parameters keep its inputs, tensor hooks on its output receive
``δ = ∂(Σ_j ℓ_j)/∂output``, and as soon as every use of a parameter has its ``δ``, that parameter's
per-example gradients are formed, squared and summed over the batch, then dropped:

* ``nn.Linear``: ``Σ_t δ_{i,t} x_{i,t}ᵀ`` and ``Σ_t δ_{i,t}`` (closed form); a weight with one use is
  formed example by example in one ``(out, in)`` buffer and squared into the sum at once;
* ``nn.Embedding``: ``δ`` summed per (example, token id), squared row by row (never a dense table per
  example, unless the table is also used elsewhere);
* any other module with parameters of its own (RMSNorm, LayerNorm, ...): ``torch.func`` replays the
  module per example, ``vmap(grad(θ ↦ Σ_t ⟨δ_{i,t}, f(x_i; θ)⟩))``, as Opacus's functorch fallback does.

A parameter used by several calls (tied input and output embeddings) gets the sum of the calls'
per-example gradients before squaring. At most one parameter's per-example gradients exist at a time:
one example's for a Linear weight used once, else ``chunk_bytes`` of them (at least one example's
worth; bigger batches are done in chunks).

The backward differentiates the loss with respect to the outputs of the calls whose inputs need no
gradient (the token embedding), not with respect to the parameters, so no parameter gradient is
computed or reduced: under DDP each rank forms its own examples' squares without communicating.

Assumptions, checked where possible: the batch is the first dimension of every hooked module's first
input, examples do not interact in the forward (causal LMs with padding masks; no batch norm in
training mode), every trainable parameter is used through the forward of a module that owns it (a
parameter whose owner's forward never runs is an error; one read directly by another module's forward
*as well as* through its owner cannot be detected, and would be missed: Hugging Face causal LMs do not
do this), and no activation checkpointing (which would replay forwards).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perta_lightning.functional import importance as F


@dataclass
class _Call:
    """One forward call of a hooked module: its inputs, and later the gradient of its output."""

    module: nn.Module
    args: tuple[Any, ...]
    uses_left: int
    output_grad: torch.Tensor | None = field(default=None, repr=False)

    def done_with_one_parameter(self) -> None:
        """Release the inputs and output gradient once every parameter of the call has used them, so that
        they are freed during the backward, as autograd frees its own saved tensors."""
        self.uses_left -= 1
        if self.uses_left == 0:
            self.args, self.output_grad = (), None


class ExampleGradientSquares:
    """Add ``Σ_i (∇θ ℓ_i)²`` over a batch into per-parameter accumulators, from one backward.

    Args:
        model: the module whose trainable parameters are measured (whole, not sharded, parameters).
        chunk_bytes: budget for one parameter's per-example gradients; larger batches are chunked.
    """

    def __init__(self, model: nn.Module, chunk_bytes: int = 2**28) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            raise NotImplementedError("per-example gradients by hooks do not support activation checkpointing")
        self.model = model
        self.chunk_bytes = chunk_bytes
        self.names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.params = {id(p): p for p in model.parameters() if id(p) in self.names}
        self.shapes = {key: p.shape for key, p in self.params.items()}
        self.owners = [m for m in model.modules() if any(id(p) in self.names for p in m.parameters(recurse=False))]
        self._capturing = False
        self._pending: dict[int, list[_Call]] = defaultdict(list)
        self._sources: list[torch.Tensor] = []
        self._accumulators: dict[str, torch.Tensor] = {}
        self._batch = 0

    def _own(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in self.names]

    # ------------------------------------------------------------------------------------ entry point
    def accumulate(self, example_losses: Callable[[], torch.Tensor], accumulators: dict[str, torch.Tensor]) -> None:
        """Run ``example_losses()`` (a ``(B,)`` tensor of ``ℓ_i``, zero for padding examples) under the
        hooks, backpropagate ``Σ_i ℓ_i`` once and add ``Σ_i (∇θ ℓ_i)²`` into ``accumulators[name]``
        (flat fp32, one per name of ``model.named_parameters()``)."""
        missing = sorted(set(self.names.values()) - accumulators.keys())
        if missing:
            raise KeyError(f"no accumulator for {missing[0]}")
        handles = [m.register_forward_hook(self._on_forward) for m in self.owners]
        try:
            self._accumulators, self._capturing = accumulators, True
            try:
                losses = example_losses()
            finally:
                self._capturing = False
            if losses.dim() != 1 or not losses.requires_grad:
                raise ValueError(f"example_losses() must return a (B,) tensor that requires grad, got {tuple(losses.shape)}")
            self._batch = losses.shape[0]
            unseen = [self.names[i] for i in self.names if i not in self._pending]
            if unseen:
                raise NotImplementedError(
                    f"parameter {unseen[0]} was not used through its own module's forward, so hooks cannot see its "
                    "per-example gradient; use the per-example loop (fisher_mode='loop')"
                )
            if not self._sources:
                raise NotImplementedError("no hooked module was called on inputs without gradient (token ids)")
            torch.autograd.grad(losses.sum(), self._sources, allow_unused=True)
            for key in list(self._pending):  # uses whose output got no gradient contribute zero
                self._flush(key)
        finally:
            for handle in handles:
                handle.remove()
            self._pending.clear()
            self._sources.clear()
            self._accumulators = {}

    # ------------------------------------------------------------------------------------ hooks
    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._capturing:
            return
        if not torch.is_tensor(output):
            raise NotImplementedError(f"{type(module).__name__} returns {type(output).__name__}, not one tensor")
        if not output.requires_grad:
            return
        own = self._own(module)
        call = _Call(module, tuple(a.detach() if torch.is_tensor(a) else a for a in args), len(own))
        for _, param in own:
            self._pending[id(param)].append(call)
        if not any(torch.is_tensor(a) and a.requires_grad for a in args):
            self._sources.append(output)
        output.register_hook(lambda grad, call=call: self._on_output_grad(call, grad))

    def _on_output_grad(self, call: _Call, grad: torch.Tensor) -> None:
        call.output_grad = grad.detach()
        for _, param in self._own(call.module):
            key = id(param)
            if key in self._pending and all(c.output_grad is not None for c in self._pending[key]):
                self._flush(key)

    # ------------------------------------------------------------------------------------ maths
    def _flush(self, key: int) -> None:
        uses = self._pending.pop(key)
        try:
            self._square_and_add(key, [c for c in uses if c.output_grad is not None])
        finally:
            for call in uses:
                call.done_with_one_parameter()

    def _square_and_add(self, key: int, calls: list[_Call]) -> None:
        name = self.names[key]
        accumulator = self._accumulators[name]
        for call in calls:
            if call.args[0].shape[0] != self._batch:
                raise ValueError(
                    f"{type(call.module).__name__} using {name} sees a batch of {call.args[0].shape[0]} in its first "
                    f"input's first dimension, the loss has {self._batch} examples"
                )
        if len(calls) == 1 and isinstance(calls[0].module, nn.Linear) and calls[0].module.weight is self.params[key]:
            F.accumulate_linear_weight_example_squares(accumulator, calls[0].args[0], calls[0].output_grad)
            return
        if len(calls) == 1 and isinstance(calls[0].module, nn.Embedding):
            ids, grad = calls[0].args[0], calls[0].output_grad
            _, rows, values = F.embedding_example_gradients(ids, grad, _padding_idx(calls[0].module))
            F.accumulate_sparse_example_squares(accumulator, rows, values)
            return
        per_chunk = max(1, self.chunk_bytes // (4 * max(1, accumulator.numel())))
        for start in range(0, self._batch, per_chunk):
            stop = min(start + per_chunk, self._batch)
            total = self._example_gradients(calls[0], key, start, stop)
            for call in calls[1:]:  # a parameter with several uses: sum the uses' gradients, then square
                total += self._example_gradients(call, key, start, stop)
            F.accumulate_example_squares(accumulator, total)

    def _example_gradients(self, call: _Call, key: int, start: int, stop: int) -> torch.Tensor:
        """``(stop - start, *shape)`` fp32, a new tensor: examples ``start..stop``'s gradients of parameter
        ``key`` through ``call``."""
        module, grad = call.module, call.output_grad[start:stop]
        x = call.args[0][start:stop]
        which = next(n for n, p in self._own(module) if id(p) == key)
        if isinstance(module, nn.Linear):
            if which == "weight":
                return F.linear_weight_example_gradients(x, grad)
            return F.linear_bias_example_gradients(grad)
        if isinstance(module, nn.Embedding):
            examples, rows, values = F.embedding_example_gradients(x, grad, _padding_idx(module))
            total = torch.zeros(stop - start, *self.shapes[key], dtype=torch.float32, device=grad.device)
            return total.index_put_((examples, rows), values, accumulate=True)
        return self._replayed_example_gradients(module, call.args, grad, which, start, stop)

    def _replayed_example_gradients(
        self, module: nn.Module, args: tuple[Any, ...], grad: torch.Tensor, which: str, start: int, stop: int
    ) -> torch.Tensor:
        """``torch.func`` fallback: ``vmap`` over examples of ``grad_θ Σ ⟨δ_i, f(x_i; θ)⟩``."""
        if len(args) != 1 or not torch.is_tensor(args[0]):
            raise NotImplementedError(
                f"{type(module).__name__}: per-example gradients by replay need a module called with one tensor"
            )
        params = {n: p.detach() for n, p in self._own(module) if n == which}

        def contracted(theta: dict[str, torch.Tensor], x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            output = torch.func.functional_call(module, theta, (x.unsqueeze(0),))
            return (output.to(torch.float32) * delta.unsqueeze(0).to(torch.float32)).sum()

        per_example = torch.func.vmap(torch.func.grad(contracted), in_dims=(None, 0, 0))
        return per_example(params, args[0][start:stop], grad)[which].to(torch.float32)


def _padding_idx(module: nn.Embedding) -> int | None:
    if module.max_norm is not None or module.scale_grad_by_freq:
        raise NotImplementedError("nn.Embedding with max_norm or scale_grad_by_freq: use the per-example loop")
    return module.padding_idx
