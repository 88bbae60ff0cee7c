"""Everything that depends on how a strategy lays out parameters and gradients, in one place.

Supported: a single process, DDP, FSDP (Lightning ``FSDPStrategy``; flat parameters or
``use_orig_params=True``), FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` on a 1-D data-parallel
mesh, DTensor gradients) and DeepSpeed ZeRO stages 0-3. Anything else raises ``NotImplementedError``
naming the strategy.

Gradients are read *after* the strategy has reduced them over data-parallel ranks (every supported
strategy averages: ``g = (1/W) Σ_r g_r``). A gradient is returned as :class:`GradSlice` pieces: the
contiguous slice ``[start, start + numel)`` of the flattened parameter that this rank holds, so that
statistics can be accumulated on the local shard and gathered only when they are written. Names are
Hugging Face parameter names (the keys of ``model.safetensors``): wrapper segments and the
LightningModule attribute holding the HF model (``model.``) are removed.

Every function that communicates says so, and must be called by every rank in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    Strategy,
)

from perta_lightning.errors import PertaValueError

#: Module-name segments inserted by wrappers (FSDP1, activation checkpointing, torch.compile).
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


@dataclass(frozen=True)
class GradSlice:
    """Where a local gradient piece lies in its parameter.

    Args:
        name: Hugging Face parameter name.
        shape: shape of the full parameter.
        start: offset of the slice in the flattened full parameter.
        numel: length of the slice (0 when this rank holds none of the parameter).
        replicated: every rank holds the same full tensor, so nothing is gathered.
    """

    name: str
    shape: tuple[int, ...]
    start: int
    numel: int
    replicated: bool


def hf_parameter_name(raw_name: str, attribute: str = "model") -> str:
    """``_fsdp_wrapped_module.model.model.layers.0.x`` -> ``model.layers.0.x`` (wrapper segments and the
    LightningModule ``attribute`` removed). Raises when the name does not live under ``attribute``."""
    parts = [part for part in raw_name.split(".") if part not in WRAPPER_SEGMENTS]
    if not parts or parts[0] != attribute:
        raise ValueError(f"parameter {raw_name!r} is not under the LightningModule attribute {attribute!r}")
    return ".".join(parts[1:])


def _kind(strategy: Strategy) -> str:
    if isinstance(strategy, DeepSpeedStrategy):  # before DDP: DeepSpeedStrategy subclasses it
        return "deepspeed"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, DDPStrategy) or strategy.world_size == 1:
        return "replicated"
    raise NotImplementedError(f"gradient access is not implemented for strategy {type(strategy).__name__}")


def check_supported(strategy: Strategy) -> None:
    """Raise early, naming the offending value, for layouts this module cannot read."""
    kind = _kind(strategy)
    if kind == "fsdp2" and strategy.device_mesh["tensor_parallel"].size() != 1:
        raise NotImplementedError(
            f"ModelParallelStrategy with tensor_parallel_size={strategy.device_mesh['tensor_parallel'].size()}: "
            "only data parallelism (tensor_parallel_size=1) is supported"
        )
    if kind == "deepspeed" and _deepspeed_stage(strategy) not in (0, 1, 2, 3):
        raise NotImplementedError(f"DeepSpeed ZeRO stage {_deepspeed_stage(strategy)}")


def sharded_parameters(strategy: Strategy) -> str | None:
    """How the strategy splits parameters across ranks (``"FSDPStrategy"``, ``"ModelParallelStrategy (FSDP2)"``,
    ``"DeepSpeedStrategy (ZeRO stage 3)"``), or ``None`` when every rank holds whole parameters (one
    process, DDP, ZeRO stages 0-2). No communication."""
    kind = _kind(strategy)
    if kind == "fsdp":
        return type(strategy).__name__
    if kind == "fsdp2":
        return f"{type(strategy).__name__} (FSDP2)"
    if kind == "deepspeed" and _deepspeed_stage(strategy) == 3:
        return f"{type(strategy).__name__} (ZeRO stage 3)"
    return None


def check_modules_visible(strategy: Strategy, who: str) -> None:
    """Refuse, naming the way out, a strategy under which the model's own modules hold no parameters while it
    runs: FSDP with flat parameters (``use_orig_params=False``) moves every parameter of the modules it wraps
    into its flat parameter, so code that calls the Hugging Face model directly (generation reads
    ``model.device`` from its parameters) finds none. No communication."""
    if _kind(strategy) == "fsdp" and not strategy.kwargs.get("use_orig_params", False):
        raise PertaValueError(
            f"{who} calls the model's own modules, which {type(strategy).__name__} with flat parameters leaves "
            "without parameters; set --trainer.strategy.use_orig_params true (or use ddp or DeepSpeed)"
        )


def resolve_fisher_mode(requested: str, strategy: Strategy) -> str:
    """``hooks`` or ``loop`` for per-example Fisher under ``strategy``.

    ``hooks`` forms per-example gradients from the inputs and output gradients of whole parameters on each
    rank, so it needs every rank to hold whole parameters; ``auto`` chooses it where they do and the
    per-example ``loop`` elsewhere. Asking for ``hooks`` under a sharding strategy raises, naming it."""
    if requested not in ("auto", "hooks", "loop"):
        raise PertaValueError(f"fisher_mode must be 'auto', 'hooks' or 'loop', got {requested!r}")
    sharded = sharded_parameters(strategy)
    if requested == "hooks" and sharded:
        raise PertaValueError(
            f"fisher_mode='hooks' needs whole parameters on every rank, but {sharded} shards them; "
            "use fisher_mode='loop' (or 'auto', which picks it) with this strategy"
        )
    if requested == "auto":
        return "loop" if sharded else "hooks"
    return requested


def data_parallel_size(strategy: Strategy) -> int:
    """The number of ranks over which the strategy averages gradients."""
    kwargs = getattr(strategy, "distributed_sampler_kwargs", None)
    return int(kwargs["num_replicas"]) if kwargs else 1


def data_parallel_rank(strategy: Strategy) -> int:
    """This process's index among the data-parallel ranks (0 in one process)."""
    kwargs = getattr(strategy, "distributed_sampler_kwargs", None)
    return int(kwargs["rank"]) if kwargs else 0


def needs_optimizer(strategy: Strategy) -> bool:
    """Whether the strategy insists on an optimizer: DeepSpeed builds its gradient partitioning inside
    its (ZeRO) optimizer; Lightning's FSDP with flat parameters checks that one references them."""
    kind = _kind(strategy)
    return kind == "deepspeed" or (kind == "fsdp" and not strategy.kwargs.get("use_orig_params", False))


def _deepspeed_stage(strategy: Strategy) -> int:
    return int((strategy.config or {}).get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------------------------------------- reading


def local_gradients(strategy: Strategy, pl_module: torch.nn.Module, attribute: str = "model") -> Iterator[
    tuple[GradSlice, torch.Tensor | None]
]:
    """The reduced gradient pieces this rank holds, as ``(slice, flat tensor or None)``.

    ``None`` means the parameter got no gradient. The same names come out on every rank, in the same
    order. ZeRO-3 reads do not communicate; ``safe_get_full_grad`` is not used, so nothing here does.
    """
    kind = _kind(strategy)
    if kind == "replicated":
        yield from _replicated(pl_module, attribute)
    elif kind == "fsdp":
        yield from _fsdp1(strategy.model, attribute)
    elif kind == "fsdp2":
        yield from _fsdp2(pl_module, attribute)
    else:
        yield from _deepspeed(strategy, attribute)


def _replicated(module: torch.nn.Module, attribute: str) -> Iterator[tuple[GradSlice, torch.Tensor | None]]:
    for raw, param in module.named_parameters():
        if param.requires_grad:
            grad = None if param.grad is None else param.grad.reshape(-1)
            yield GradSlice(hf_parameter_name(raw, attribute), tuple(param.shape), 0, param.numel(), True), grad


def _fsdp1(root: torch.nn.Module, attribute: str) -> Iterator[tuple[GradSlice, torch.Tensor | None]]:
    # FSDP1 keeps one FlatParameter per wrapped module; after backward its ``.grad`` is this rank's
    # shard of the reduced flat gradient. ``_shard_param_infos`` say which part of each original
    # parameter the shard covers. This holds for flat and original parameters alike.
    from torch.distributed.fsdp import FullyShardedDataParallel

    for module_name, module in root.named_modules():
        if not isinstance(module, FullyShardedDataParallel) or module._handle is None:
            continue
        flat = module._handle.flat_param
        grad = flat.grad
        if grad is None and module._handle._use_orig_params:
            grad = _fsdp1_grad_from_views(module._handle)
        prefix = f"{module_name}." if module_name else ""
        for fqn, shape, info in zip(flat._fqns, flat._shapes, flat._shard_param_infos):
            name = hf_parameter_name(prefix + fqn, attribute)
            if not info.in_shard:
                yield GradSlice(name, tuple(shape), 0, 0, False), None
                continue
            piece = None if grad is None else grad[info.offset_in_shard : info.offset_in_shard + info.numel_in_shard]
            yield GradSlice(name, tuple(shape), info.intra_param_start_idx, info.numel_in_shard, False), piece


def _fsdp1_grad_from_views(handle: Any) -> torch.Tensor | None:
    # With use_orig_params=True FSDP may hand the sharded gradient to the original parameters as 1-D
    # views and drop ``flat_param.grad``; rebuild the local flat shard from them.
    flat = handle.flat_param
    grads = [param.grad for param in flat._params]
    if all(grad is None for grad in grads):
        return None
    out = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    for param, grad, info in zip(flat._params, grads, flat._shard_param_infos):
        if info.in_shard and grad is not None:
            out[info.offset_in_shard : info.offset_in_shard + info.numel_in_shard] = grad.reshape(-1)
    return out


def _fsdp2(module: torch.nn.Module, attribute: str) -> Iterator[tuple[GradSlice, torch.Tensor | None]]:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for raw, param in module.named_parameters():
        if not param.requires_grad:
            continue
        name = hf_parameter_name(raw, attribute)
        if not isinstance(param, DTensor):
            grad = None if param.grad is None else param.grad.reshape(-1)
            yield GradSlice(name, tuple(param.shape), 0, param.numel(), True), grad
            continue
        if any(not isinstance(p, Shard) or p.dim != 0 for p in param.placements):
            raise NotImplementedError(f"{name}: FSDP2 placement {param.placements}; only Shard(0) is supported")
        local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        row = prod(param.shape[1:])
        numel = prod(local_shape)
        grad = None if param.grad is None else param.grad.to_local().reshape(-1)[:numel]
        yield GradSlice(name, tuple(param.shape), offset[0] * row if numel else 0, numel, False), grad


def _deepspeed(strategy: Strategy, attribute: str) -> Iterator[tuple[GradSlice, torch.Tensor | None]]:
    stage = _deepspeed_stage(strategy)
    engine = strategy.deepspeed_engine
    for raw, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        name = hf_parameter_name(raw, attribute)
        if stage == 3:
            from deepspeed.utils import safe_get_local_grad

            shape = tuple(param.ds_shape)
            partition = param.ds_tensor.ds_numel
            rank = dist.get_rank(group=param.ds_process_group)
            start = min(rank * partition, param.ds_numel)
            numel = max(0, min(partition, param.ds_numel - start))
            grad = safe_get_local_grad(param)
            yield GradSlice(name, shape, start if numel else 0, numel, False), (
                None if grad is None else grad.reshape(-1)[:numel]
            )
        elif stage in (1, 2):
            shape = tuple(param.shape)
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                yield GradSlice(name, shape, 0, 0, False), None
                continue
            address = mapping.lp_fragment_address
            fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
            if fragment.numel() == param.numel() and address.numel != param.numel():
                fragment = fragment.narrow(0, address.start, address.numel)
            yield GradSlice(name, shape, address.start, address.numel, False), fragment
        else:
            grad = None if param.grad is None else param.grad.reshape(-1)
            yield GradSlice(name, tuple(param.shape), 0, param.numel(), True), grad


def whole_parameter_slices(pl_module: torch.nn.Module, attribute: str = "model") -> dict[str, GradSlice]:
    """``{raw name: slice}`` for statistics each rank accumulates over its own examples on whole parameters
    (per-example Fisher by hooks): each slice covers the whole parameter and is marked not replicated,
    so :func:`gather_to_rank_zero` sums the ranks' tensors. Raw names are those of
    ``pl_module.<attribute>.named_parameters()``; slices carry Hugging Face names."""
    model = getattr(pl_module, attribute)
    return {
        raw: GradSlice(hf_parameter_name(f"{attribute}.{raw}", attribute), tuple(p.shape), 0, p.numel(), False)
        for raw, p in model.named_parameters()
        if p.requires_grad
    }


def clear_gradients(strategy: Strategy) -> None:
    """Drop every gradient so that the next backward starts from zero (no communication)."""
    kind = _kind(strategy)
    if kind == "deepspeed":
        engine = strategy.deepspeed_engine
        if engine.optimizer is not None:
            engine.optimizer.zero_grad(set_to_none=True)
        engine.module.zero_grad(set_to_none=True)
        return
    strategy.model.zero_grad(set_to_none=True)
    if kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        for module in strategy.model.modules():
            if isinstance(module, FullyShardedDataParallel) and module._handle is not None:
                module._handle.flat_param.grad = None


# ---------------------------------------------------------------------------------------------- gathering


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum float64 scalars over all ranks (collective; identity in one process)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_to_rank_zero(
    slices: dict[str, tuple[GradSlice, torch.Tensor]], is_global_zero: bool, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full fp32 tensors on rank zero, one parameter at a time, in sorted name order (collective).

    ``slices`` maps each name to this rank's slice and its flat fp32 tensor; every rank must hold the
    same names. Slices of sharded parameters are disjoint across ranks and are summed into a zero
    buffer on rank zero. Other ranks iterate too (they must, to take part) and get nothing.
    """
    for name in sorted(slices):
        where, tensor = slices[name]
        if where.replicated:
            if is_global_zero:
                yield name, tensor.detach().to("cpu", torch.float32).view(where.shape)
            continue
        buffer = torch.zeros(prod(where.shape), dtype=torch.float32, device=device)
        if where.numel:
            buffer[where.start : where.start + where.numel] = tensor.to(device)
        if _initialized():
            dist.reduce(buffer, dst=0, op=dist.ReduceOp.SUM)
        if is_global_zero:
            yield name, buffer.cpu().view(where.shape)


def full_state_dict(strategy: Strategy, pl_module: torch.nn.Module, attribute: str = "model") -> dict[str, torch.Tensor] | None:
    """The full, HF-keyed CPU state dict of ``pl_module.<attribute>`` on rank zero, ``None`` elsewhere
    (collective under sharded strategies)."""
    kind = _kind(strategy)
    if kind == "fsdp":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # offload_to_cpu on a CPU run makes FSDP free the unsharded flat parameter it is reading from.
        config = FullStateDictConfig(offload_to_cpu=strategy.root_device.type != "cpu", rank0_only=True)
        with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, config):
            state = strategy.model.state_dict()
    elif kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif kind == "deepspeed" and _deepspeed_stage(strategy) == 3:
        import deepspeed

        state = {}
        for raw, tensor in list(pl_module.named_parameters()) + list(pl_module.named_buffers()):
            with deepspeed.zero.GatheredParameters([tensor] if hasattr(tensor, "ds_id") else [], modifier_rank=None):
                if strategy.is_global_zero:
                    state[raw] = tensor.detach().to("cpu").clone()
        persistent = set(pl_module.state_dict().keys())
        state = {key: value for key, value in state.items() if key in persistent}
    else:
        state = pl_module.state_dict()
    if not strategy.is_global_zero:
        return None
    return {hf_parameter_name(key, attribute): value.detach().to("cpu") for key, value in state.items()}


# ---------------------------------------------------------------------------------------------- FSDP2 setup


def apply_fully_shard(model: torch.nn.Module, device_mesh: Any, layer_types: tuple[type, ...] = ()) -> None:
    """FSDP2: ``fully_shard`` each decoder layer (HF ``_no_split_modules`` when ``layer_types`` is empty),
    then the whole model, over the ``data_parallel`` dimension of ``device_mesh``."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    if device_mesh["tensor_parallel"].size() != 1:
        raise NotImplementedError(
            f"tensor_parallel_size={device_mesh['tensor_parallel'].size()}: only data parallelism is supported"
        )
    names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if (layer_types and isinstance(module, layer_types)) or type(module).__name__ in names:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


# ---------------------------------------------------------------------------------------------- CPU test shims


class CPUFSDPStrategy(FSDPStrategy):
    """FOR TESTS ONLY: FSDP1 on CPU processes over gloo.

    Lightning refuses ``FSDPStrategy`` without a GPU by checking the exact type of the strategy, and
    passes ``device_id=None`` on CPU, which FSDP1 refuses; this subclass wraps with an explicit CPU
    ``device_id`` and changes nothing else, so CPU tests exercise the real FSDP code paths.
    """

    def __init__(self, use_orig_params: bool = False, process_group_backend: str = "gloo", **kwargs: Any) -> None:
        # use_orig_params is FSDP's own keyword (FSDPStrategy passes it through **kwargs); named here so that
        # LightningCLI accepts it: --trainer.strategy.use_orig_params true
        super().__init__(process_group_backend=process_group_backend, use_orig_params=use_orig_params, **kwargs)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            kwargs = dict(self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied here; Lightning would warn it is ignored
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **kwargs,
            )
        return super()._setup_model(model)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """FOR TESTS ONLY: DeepSpeed ZeRO on CPU processes over gloo (DeepSpeed's CPU accelerator).

    ``DeepSpeedStrategy`` refuses anything but CUDA and checks CUDA device indices; this skips both
    checks and otherwise sets processes up as ``DeepSpeedStrategy`` does.
    """

    def __init__(self, process_group_backend: str = "gloo", **kwargs: Any) -> None:
        super().__init__(process_group_backend=process_group_backend, **kwargs)

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed reads ``root_device.index`` as its device rank and refuses ``None``.
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips the CUDA-only check; calls setup_distributed

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
