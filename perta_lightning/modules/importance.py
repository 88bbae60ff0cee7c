"""Importance estimation at a fixed model: one pass over a forget and a retain split, no optimizer step.

``perta importance --config configs/demo/importance.yaml`` runs ``trainer.fit`` for one epoch of
:class:`ImportanceModule` on :class:`ImportanceDataModule` batches (forget first, then retain). The
module uses manual optimization: it backpropagates the loss :class:`ImportanceCollector` expects,
lets the collector read the reduced gradient, and drops it; parameters never change, and no
optimizer is built unless the strategy insists (DeepSpeed: SGD with ``lr=0``, which keeps no state
and is never stepped).

``fisher`` by ``example`` has two exact implementations (``fisher_mode``). ``hooks``: one batched forward
and backward per batch; :class:`ImportanceCollector` forms each example's gradient layer by layer from
the activations and output gradients (:mod:`perta_lightning.per_example`), about the cost of a training
step. It needs whole parameters on every rank: one process, DDP, DeepSpeed ZeRO 0-2. ``loop``: one
backward per example, under any strategy. ``auto`` (the default) picks ``hooks`` where it works.

The ``loop`` under ``W`` data-parallel ranks: sharded strategies reduce gradients inside
backward, so per-example gradients cannot be kept apart by ``no_sync``. Each micro-step therefore
runs ``W`` backward passes in which one rank in turn backpropagates its example and the others
``0 · loss``; the reduced gradient is then that example's gradient over ``W``. This costs ``W``
backward passes per rank per example slot (the same work per rank as one process) and is exact.

:func:`estimate_importance` is the in-process entry point; ``cli_main`` the command line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader, IterableDataset

from perta_lightning import distributed
from perta_lightning.callbacks.importance import ImportanceCollector
from perta_lightning.data.datamodule import EncodedQA, subsample
from perta_lightning.data.tofu import (
    DEFAULT_DATE_STRING,
    DEFAULT_SYSTEM_PROMPT,
    QAFormatter,
    TofuSource,
    collate_examples,
    load_split,
    load_tokenizer,
)
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.losses import example_nll
from perta_lightning.modules.finetune import load_causal_lm


class _RankBatches(IterableDataset):
    """Pre-collated batches of this rank (Lightning injects no sampler into an IterableDataset)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _unwrap(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


def rank_batches(
    examples: Sequence[dict[str, Any]], label: str, source: str, batch_size: int, rank: int, world: int, pad_id: int
) -> list[dict[str, Any]]:
    """This rank's batches of one split. Examples are padded to a multiple of ``world`` with copies
    marked ``valid = 0``, dealt round-robin, then cut into batches: every rank gets the same number of
    batches of the same sizes, and no batch mixes splits."""
    padded = [(example, 1.0) for example in examples]
    padded += [(examples[0], 0.0)] * (-len(padded) % world)
    mine = padded[rank::world]
    batches = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        batch = collate_examples([example for example, _ in chunk], pad_id)
        batch["valid"] = torch.tensor([weight for _, weight in chunk])
        batch["split"], batch["source"] = label, source
        batches.append(batch)
    return batches


class ImportanceDataModule(LightningDataModule):
    """The forget and retain splits of a TOFU source, each on a seeded subsample of equal size.

    Args:
        source: where the splits come from.
        tokenizer: tokenizer path (usually the model directory).
        forget_split: split whose statistics are written as ``forget``.
        retain_split: split whose statistics are written as ``retain``.
        num_examples: use a seeded subsample of this many rows of each split (all when ``None``).
        subsample_seed: seed of the subsamples.
        batch_size: examples per batch and per process.
        max_length: longest prompt + answer in tokens.
        system_prompt: system message for chat templates.
        date_string: pinned date for chat templates that print one.
        use_chat_template: ``None`` uses the tokenizer's template when it has one.
    """

    def __init__(
        self,
        source: TofuSource,
        tokenizer: str,
        forget_split: str = "forget10",
        retain_split: str = "retain90",
        num_examples: int | None = None,
        subsample_seed: int = 0,
        batch_size: int = 8,
        max_length: int = 256,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        date_string: str = DEFAULT_DATE_STRING,
        use_chat_template: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.save_hyperparameters()
        self.source = source
        self.batches: list[dict[str, Any]] = []

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        tokenizer = load_tokenizer(hp.tokenizer)
        formatter = QAFormatter(tokenizer, hp.system_prompt, hp.date_string, hp.max_length, hp.use_chat_template)
        strategy = self.trainer.strategy if self.trainer else None
        world = distributed.data_parallel_size(strategy) if strategy else 1
        rank = distributed.data_parallel_rank(strategy) if strategy else 0
        self.batches = []
        for label, split in (("forget", hp.forget_split), ("retain", hp.retain_split)):
            where = self.source.describe(split)
            rows = subsample(load_split(self.source, split), hp.num_examples, hp.subsample_seed)
            examples = EncodedQA(rows, formatter, where).examples
            self.batches += rank_batches(examples, label, where, hp.batch_size, rank, world, tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        # batch_size=1 over pre-collated batches (rather than batch_size=None) gives the loader a
        # batch_sampler, which DeepSpeedStrategy reads to fill its logging batch size.
        return DataLoader(_RankBatches(self.batches), batch_size=1, collate_fn=_unwrap)


class ImportanceModule(LightningModule):
    """A causal LM held fixed while :class:`ImportanceCollector` gathers statistics of its gradients.

    Args:
        model: Hugging Face model directory the statistics are taken at.
        output_dir: folder for ``forget.safetensors`` and ``retain.safetensors`` (with ``.json`` metadata).
        statistic: ``grad`` (|mean-token gradient|) or ``fisher`` (diagonal empirical Fisher).
        granularity: ``fisher`` only: ``example`` (exact) or ``batch`` (approximation, batch-size dependent).
        fisher_mode: ``fisher`` by ``example`` only: ``hooks`` (one backward per batch; whole parameters on
            every rank), ``loop`` (one backward per example; any strategy) or ``auto`` (``hooks`` unless the
            strategy shards parameters: FSDP, FSDP2, ZeRO-3). Both are exact.
        torch_dtype: dtype the weights are loaded in; statistics are accumulated in fp32 regardless.
        overwrite: replace existing statistics in ``output_dir``.
        max_shard_bytes: largest output shard.
    """

    def __init__(
        self,
        model: str,
        output_dir: str,
        statistic: Literal["grad", "fisher"] = "grad",
        granularity: Literal["example", "batch"] = "example",
        fisher_mode: Literal["auto", "hooks", "loop"] = "auto",
        torch_dtype: str = "float32",
        overwrite: bool = False,
        max_shard_bytes: int = 5 * 2**30,
    ) -> None:
        super().__init__()
        if fisher_mode not in ("auto", "hooks", "loop"):
            raise PertaValueError(f"fisher_mode must be 'auto', 'hooks' or 'loop', got {fisher_mode!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.collector = ImportanceCollector(
            output_dir, statistic, granularity, model_dir=model, overwrite=overwrite, max_shard_bytes=max_shard_bytes
        )
        self.model = load_causal_lm(model, None, torch_dtype)

    @property
    def importance_loss(self) -> str:
        """The loss convention the collector reads (``fisher_mode`` resolved against the trainer's strategy)."""
        if self.hparams.statistic == "grad":
            return "token_sum"
        if self.hparams.granularity == "batch":
            return "example_sum"
        mode = distributed.resolve_fisher_mode(self.hparams.fisher_mode, self.trainer.strategy)
        return "example_losses" if mode == "hooks" else "one_example"

    def configure_callbacks(self) -> list[ImportanceCollector]:
        return [self.collector]

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, distributed.ModelParallelStrategy):
            distributed.apply_fully_shard(self.model, self.device_mesh)

    def on_train_start(self) -> None:
        self.model.eval()  # no dropout: the statistics are those of the deterministic model

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        if distributed.needs_optimizer(self.trainer.strategy):
            return torch.optim.SGD(self.trainer.model.parameters(), lr=0.0)
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def example_losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """``(B,)`` ``ℓ_i · valid_i`` (mean answer NLL) from a forward of the bare Hugging Face model, outside
        the strategy's wrapper: the ``example_losses`` convention, whose backward the collector runs."""
        return self._example_losses(batch, self.model(input_ids=batch["input_ids"],
                                                      attention_mask=batch["attention_mask"], use_cache=False).logits)

    def _example_losses(self, batch: dict[str, Any], logits: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)``: summed answer NLL (``token_sum``) or mean answer NLL ``ℓ_i``, times ``valid``.

        Unless ``logits`` are given, the forward goes through the strategy's wrapper (DDP, FSDP root,
        DeepSpeed engine) so that its hooks run and the backward comes after the wrapper's forward has returned.
        """
        if logits is None:
            logits = self.trainer.strategy.model(batch["input_ids"], batch["attention_mask"])
        summed, count = example_nll(logits, batch["labels"])
        if bool((count == 0).any()):
            row = int(batch["index"][count == 0][0])
            raise ValueError(f"{batch['source']}: example {row} has no answer tokens")
        losses = summed if self.importance_loss == "token_sum" else summed / count
        return losses * batch["valid"].to(losses.dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        self.manual_backward(loss)  # the collector reads the gradient in on_after_backward
        distributed.clear_gradients(self.trainer.strategy)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The estimation step. It runs here, not in ``training_step``, because Lightning calls
        ``training_step`` *inside* the wrapper's forward (FSDP, DeepSpeed), where a backward pass is not
        allowed. Callbacks' ``on_train_batch_start`` (the collector's counting, and with ``fisher_mode``
        ``hooks`` the whole step) has already run."""
        convention = self.importance_loss
        if convention == "example_losses":
            return
        if convention != "one_example":
            self._backward(self._example_losses(batch).sum())
            return
        world = distributed.data_parallel_size(self.trainer.strategy)
        rank = distributed.data_parallel_rank(self.trainer.strategy)
        for row in range(batch["input_ids"].shape[0]):  # every rank has the same batch sizes
            example = {key: value[row : row + 1] if torch.is_tensor(value) else value for key, value in batch.items()}
            for turn in range(world):
                loss = self._example_losses(example).sum()
                self._backward(loss if turn == rank else loss * 0.0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        return None  # the work is done in on_train_batch_start; no optimizer step


def estimate_importance(
    model: str,
    source: TofuSource,
    output_dir: str,
    statistic: Literal["grad", "fisher"] = "grad",
    granularity: Literal["example", "batch"] = "example",
    fisher_mode: Literal["auto", "hooks", "loop"] = "auto",
    forget_split: str = "forget10",
    retain_split: str = "retain90",
    num_examples: int | None = None,
    subsample_seed: int = 0,
    batch_size: int = 8,
    overwrite: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
    **data_kwargs: Any,
) -> dict[str, Path]:
    """Estimate forget and retain importance at ``model`` in this process (or under the strategy in
    ``trainer_kwargs``). Returns ``{"forget": path, "retain": path}`` of the written statistics (a
    ``.safetensors`` file, or a ``.safetensors.index.json`` when sharded) on rank zero, ``{}`` elsewhere.
    ``fisher_mode`` chooses how exact per-example Fisher is computed (see :class:`ImportanceModule`)."""
    module = ImportanceModule(model, output_dir, statistic, granularity, fisher_mode, overwrite=overwrite)
    data = ImportanceDataModule(
        source, model, forget_split, retain_split, num_examples, subsample_seed, batch_size, **data_kwargs
    )
    trainer = Trainer(**{**importance_trainer_defaults(), **(trainer_kwargs or {})})
    trainer.fit(module, data)
    return dict(module.collector.written)


def importance_trainer_defaults() -> dict[str, Any]:
    """One epoch, no checkpoints, no logger, no validation: estimation, not training."""
    return {
        "max_epochs": 1,
        "enable_checkpointing": False,
        "logger": False,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
        "limit_val_batches": 0,
    }


def cli_main(argv: Sequence[str] | None = None) -> None:
    """``perta importance --config X.yaml``: LightningCLI over :class:`ImportanceModule` and its data."""
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        ImportanceModule,
        ImportanceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(argv) if argv is not None else None,
        run=False,
        trainer_defaults=importance_trainer_defaults(),
        save_config_callback=None,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
