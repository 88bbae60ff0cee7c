"""``ImportanceCollector``: per-parameter gradient or diagonal-Fisher statistics, written as safetensors.

Statistics (accumulated in fp32; the maths is in :mod:`perta_lightning.functional.importance`):

* ``grad``:   ``s = |∇θ L(D)|``, ``L(D)`` the mean NLL over all answer tokens of the split;
* ``fisher``: ``s = (1/N) Σ_i (∇θ ℓ_i)²``, ``ℓ_i`` example ``i``'s mean answer-token NLL.
  ``granularity="example"`` is exact: by hooks (one batched backward, per-example gradients formed layer by
  layer, :mod:`perta_lightning.per_example`) or by a loop (one backward per example); both give the same
  numbers. ``granularity="batch"`` uses squared
  batch gradients, ``(1/N) Σ_B |B| g_B²`` with ``g_B`` the gradient of the global batch's mean loss:
  cheaper, but an *approximation that depends on the batch size* (it adds ``(|B|-1)·mean(g)²``).

How a backward's gradient enters the sum depends on how the LightningModule built the loss, which it
declares in an ``importance_loss`` attribute (see :data:`LOSS_CONVENTIONS`). :class:`ImportanceModule`
uses the exact conventions; an ordinary training module (no attribute) is ``token_mean``, the mean
over the answer tokens of the local batch. Then ``grad`` weights each rank's batch equally, as
training does, which equals the token mean only when ranks hold equally many answer tokens.

Batches may carry ``split`` (a label; ``train`` when absent), ``source`` (recorded in the metadata)
and ``valid`` (0 for padding examples). One file per split label is written by rank zero at the end
of ``fit``: ``<output_dir>/<split>.safetensors`` (or shards with an index), keyed by Hugging Face
parameter names, with metadata. Accumulators are not checkpointed: a resumed run is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from perta_lightning import distributed
from perta_lightning.checkpoints import safetensors_files_for, write_safetensors_sharded
from perta_lightning.errors import PertaFileExistsError, PertaValueError
from perta_lightning.functional import importance as F
from perta_lightning.functional.losses import answer_token_mask
from perta_lightning.io import atomic_write_text
from perta_lightning.per_example import ExampleGradientSquares

#: How the module's loss was built, per backward: ``token_mean`` mean answer-token NLL of the local
#: batch (training); ``token_sum`` summed answer-token NLL of the local valid examples; ``example_sum``
#: ``Σ ℓ_i`` over the local valid examples; ``one_example`` ``ℓ_i`` of one example on one rank (the
#: others backpropagate ``0 · loss``); ``example_losses``: the module does no backward but has a method
#: ``example_losses(batch)`` returning ``(B,)`` ``ℓ_i · valid_i`` from a forward of ``<attribute>`` outside
#: any strategy wrapper; the collector runs it under per-example hooks and backpropagates itself.
LOSS_CONVENTIONS = ("token_mean", "token_sum", "example_sum", "one_example", "example_losses")
_ALLOWED = {
    ("grad", None): ("token_sum", "token_mean"),
    ("fisher", "batch"): ("example_sum", "token_mean"),
    ("fisher", "example"): ("one_example", "example_losses"),
}


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ImportanceCollector(Callback):
    """Collect ``grad`` or ``fisher`` importance over the training batches of a ``fit`` run.

    Args:
        output_dir: folder receiving ``<split>.safetensors`` per split label.
        statistic: ``grad`` or ``fisher``.
        granularity: for ``fisher``: ``example`` (exact) or ``batch`` (approximation); ignored by ``grad``.
        model_dir: recorded in the metadata (the model the statistics were taken at).
        overwrite: replace existing outputs; otherwise an existing output is an error before any work.
        max_shard_bytes: largest shard; bigger statistics get an index file.
        attribute: the LightningModule attribute holding the Hugging Face model.
        save_dtype: dtype of the written statistics: ``float32`` (exact, the default) or ``bfloat16`` (half the
            bytes for a merge to read; the fp32 statistic rounded once to nearest, about 0.4 % relative at worst).
            Statistics are accumulated in fp32 either way.
    """

    def __init__(
        self,
        output_dir: str,
        statistic: Literal["grad", "fisher"] = "grad",
        granularity: Literal["example", "batch"] = "example",
        model_dir: str | None = None,
        overwrite: bool = False,
        max_shard_bytes: int = 5 * 2**30,
        attribute: str = "model",
        save_dtype: Literal["float32", "bfloat16"] = "float32",
    ) -> None:
        if save_dtype not in SAVE_DTYPES:
            # float16 would flush Fisher entries (often below 1e-8) to zero and change the weights
            raise PertaValueError(f"save_dtype must be one of {sorted(SAVE_DTYPES)}, got {save_dtype!r}")
        if statistic not in ("grad", "fisher"):
            raise ValueError(f"statistic must be 'grad' or 'fisher', got {statistic!r}")
        if granularity not in ("example", "batch"):
            raise ValueError(f"granularity must be 'example' or 'batch', got {granularity!r}")
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.output_dir = Path(output_dir)
        self.statistic = statistic
        self.granularity = granularity if statistic == "fisher" else None
        self.model_dir = model_dir
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.attribute = attribute
        self.save_dtype = SAVE_DTYPES[save_dtype]
        self._sums: dict[str, dict[str, tuple[distributed.GradSlice, torch.Tensor]]] = {}
        self._counts: dict[str, list[float]] = {}  # split -> [tokens, examples] on this rank
        self._sources: dict[str, str] = {}
        self._split = "train"
        self._step_global = (0.0, 0.0)
        self._per_example: ExampleGradientSquares | None = None
        self.written: dict[str, Path] = {}

    # ------------------------------------------------------------------------------------ checks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            raise ValueError(f"ImportanceCollector needs backward passes: use trainer.fit, not {stage!r}")
        distributed.check_supported(trainer.strategy)
        self.convention = getattr(pl_module, "importance_loss", "token_mean")
        allowed = _ALLOWED[(self.statistic, self.granularity)]
        if self.convention not in allowed:
            raise ValueError(
                f"statistic={self.statistic!r} granularity={self.granularity!r} needs a module whose "
                f"importance_loss is one of {allowed}, but {type(pl_module).__name__} has {self.convention!r}"
                + (" (use ImportanceModule for per-example Fisher)" if self.granularity == "example" else "")
            )
        if self.convention == "example_losses":
            distributed.resolve_fisher_mode("hooks", trainer.strategy)  # raises under sharded parameters
            if not callable(getattr(pl_module, "example_losses", None)):
                raise ValueError(f"importance_loss='example_losses' but {type(pl_module).__name__} has no example_losses")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"accumulate_grad_batches={trainer.accumulate_grad_batches}: only 1 is supported")
        self._check_outputs_free()
        self._sums.clear()
        self._counts.clear()

    def _check_outputs_free(self) -> None:
        stale = sorted(self.output_dir.glob(".*.tmp-*")) if self.output_dir.is_dir() else []
        if stale:
            raise PertaFileExistsError(
                f"{stale[0]}: temporary output of an interrupted importance run; estimation does not resume, "
                "delete it and run again"
            )
        if not self.overwrite and self.output_dir.is_dir():
            existing = [p for p in self.output_dir.iterdir() if p.name.endswith((".safetensors", ".index.json"))]
            if existing:
                raise PertaFileExistsError(f"{existing[0]} already exists; pass overwrite=True to replace it")

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        raise RuntimeError(
            "ImportanceCollector does not checkpoint its sums: resuming would miss the batches already seen. "
            "Run the estimation again from the start."
        )

    # ------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.convention == "example_losses":
            self._per_example = ExampleGradientSquares(getattr(pl_module, self.attribute))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._per_example = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._split = str(batch.get("split", "train"))
        if "source" in batch:
            self._sources.setdefault(self._split, str(batch["source"]))
        mask = answer_token_mask(batch["labels"])
        valid = batch.get("valid", torch.ones(mask.shape[0], device=mask.device)).to(torch.float64)
        tokens = float((mask.sum(dim=1).to(torch.float64) * valid).sum())
        examples = float(valid.sum())
        counts = self._counts.setdefault(self._split, [0.0, 0.0])
        counts[0] += tokens
        counts[1] += examples
        if self.convention in ("token_mean", "example_sum"):  # these scale by the global batch (collective)
            self._step_global = tuple(distributed.all_reduce_sum([tokens, examples], pl_module.device))
        if self._per_example is not None:  # per-example Fisher by hooks: this rank's Σ_i (∇ℓ_i)², no collective
            self._accumulate_example_squares(pl_module, batch)

    def _accumulate_example_squares(self, pl_module: LightningModule, batch: Any) -> None:
        sums = self._sums.setdefault(self._split, {})
        slices = distributed.whole_parameter_slices(pl_module, self.attribute)
        for where in slices.values():
            if where.name not in sums:
                sums[where.name] = (where, F.new_accumulator(where.numel, pl_module.device))
        accumulators = {raw: sums[where.name][1] for raw, where in slices.items()}
        self._per_example.accumulate(lambda: pl_module.example_losses(batch), accumulators)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        world = distributed.data_parallel_size(trainer.strategy)
        global_tokens, global_examples = self._step_global
        if self.statistic == "grad":  # contribution = Σ token-NLL gradient of the step
            scale = world * (global_tokens if self.convention == "token_mean" else 1.0)
        elif self.convention == "one_example":  # (W g)² = (∇ℓ_i)²
            scale = float(world) ** 2
        elif self.convention == "example_sum":  # |B| (W g / |B|)²
            scale = world**2 / global_examples if global_examples else 0.0
        else:  # token_mean: g approximates g_B; |B| g²
            scale = global_examples
        sums = self._sums.setdefault(self._split, {})
        for where, grad in distributed.local_gradients(trainer.strategy, pl_module, self.attribute):
            if where.name not in sums:
                sums[where.name] = (where, F.new_accumulator(where.numel, pl_module.device))
            if grad is None or where.numel == 0 or scale == 0.0:
                continue
            accumulator = sums[where.name][1]
            if self.statistic == "grad":
                F.accumulate_gradient(accumulator, grad, scale)
            else:
                F.accumulate_squared(accumulator, grad, scale)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for split in sorted(self._counts):
            self._write_split(trainer, pl_module, split)
        trainer.strategy.barrier("perta_importance_written")

    # ------------------------------------------------------------------------------------ output
    def _write_split(self, trainer: Trainer, pl_module: LightningModule, split: str) -> None:
        sums = self._sums.get(split, {})
        bad = sum(int((~torch.isfinite(acc)).sum()) for _, acc in sums.values())
        tokens, examples, bad, nonempty = distributed.all_reduce_sum(
            [*self._counts[split], float(bad), float(bool(sums))], pl_module.device
        )
        where = self._sources.get(split, split)
        if tokens == 0:
            raise ValueError(f"{where}: split {split!r} has no answer tokens; refusing to write a file of zeros")
        if nonempty < trainer.world_size:
            raise RuntimeError(f"split {split!r}: no gradient was read on some rank (was backward called?)")
        if bad:
            raise FloatingPointError(f"split {split!r}: {int(bad)} non-finite values in the {self.statistic} sums")
        metadata = {
            "format": "pt",
            "statistic": self.statistic,
            "granularity": str(self.granularity or "none"),
            "num_examples": str(int(examples)),
            "num_tokens": str(int(tokens)),
            "model_dir": str(self.model_dir),
            "split": split,
            "source": where,
            "world_size": str(trainer.world_size),
            "loss_convention": self.convention,
            "dtype": str(self.save_dtype).removeprefix("torch."),
        }
        full = distributed.gather_to_rank_zero(sums, trainer.is_global_zero, pl_module.device)
        finalized = ((name, F.finalize(self.statistic, acc, tokens, examples).to(self.save_dtype)) for name, acc in full)
        if trainer.is_global_zero:
            for stale in safetensors_files_for(self.output_dir, split):
                stale.unlink()
            path = write_safetensors_sharded(finalized, self.output_dir, split, metadata, self.max_shard_bytes)
            self.written[split] = path
            atomic_write_text(self.output_dir / f"{split}.json", json.dumps({**metadata, "path": path.name}, indent=2))
        else:
            for _ in finalized:  # take part in every gather
                pass
