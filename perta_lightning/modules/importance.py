"""Importance estimation at a fixed model: one pass over a forget and a retain split, no optimizer step.

``perta importance --config configs/demo/importance.yaml`` runs ``trainer.fit`` for one epoch of
:class:`ImportanceModule` on :class:`~perta_lightning.data.importance.ImportanceDataModule` batches
(forget first, then retain). The module uses manual optimization: it backpropagates the loss
:class:`ImportanceCollector` expects, lets the collector read the reduced gradient, and drops it;
parameters never change, and no optimizer is built unless the strategy insists (DeepSpeed: SGD with
``lr=0``, which keeps no state and is never stepped).

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

import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer

from perta_lightning import distributed
from perta_lightning.benchmarks.tofu.source import TofuSource
from perta_lightning.callbacks.importance import ImportanceCollector
from perta_lightning.checkpoints import load_causal_lm
from perta_lightning.data.formatting import PromptFormat
from perta_lightning.data.importance import ImportanceDataModule
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.losses import example_nll


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
        save_dtype: ``float32`` (exact, the default) or ``bfloat16`` (half the bytes; see
            :class:`~perta_lightning.callbacks.importance.ImportanceCollector`).
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
        save_dtype: Literal["float32", "bfloat16"] = "float32",
    ) -> None:
        super().__init__()
        if fisher_mode not in ("auto", "hooks", "loop"):
            raise PertaValueError(f"fisher_mode must be 'auto', 'hooks' or 'loop', got {fisher_mode!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.collector = ImportanceCollector(
            output_dir, statistic, granularity, model_dir=model, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
            save_dtype=save_dtype,
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
    prompt: PromptFormat = PromptFormat(),
    save_dtype: Literal["float32", "bfloat16"] = "float32",
) -> dict[str, Path]:
    """Estimate forget and retain importance at ``model`` in this process (or under the strategy in
    ``trainer_kwargs``). ``prompt.tokenizer`` defaults to ``model``. Returns ``{"forget": path, "retain": path}``
    of the written statistics (a ``.safetensors`` file, or a ``.safetensors.index.json`` when sharded) on rank
    zero, ``{}`` elsewhere. ``fisher_mode`` chooses how exact per-example Fisher is computed (see
    :class:`ImportanceModule`)."""
    module = ImportanceModule(model, output_dir, statistic, granularity, fisher_mode, overwrite=overwrite,
                              save_dtype=save_dtype)
    data = ImportanceDataModule(
        source, prompt, forget_split, retain_split, num_examples, subsample_seed, batch_size
    )
    from perta_lightning.callbacks.progress import progress_bar

    options = {**importance_trainer_defaults(), **(trainer_kwargs or {})}
    if options.get("enable_progress_bar", True) and "callbacks" not in options:
        options["callbacks"] = [progress_bar()]
    trainer = Trainer(**options)
    with expected_fit_warnings():
        trainer.fit(module, data)
    return dict(module.collector.written)


@contextlib.contextmanager
def expected_fit_warnings() -> Iterator[None]:
    """Mute what Lightning says about an importance run that is intended: no optimizer (nothing is trained),
    the model in eval mode (no dropout while measuring), a sized iterable of rank-local batches."""
    with warnings.catch_warnings():
        for message in (r".*configure_optimizers` returned `None`", r".*module\(s\) in eval mode",
                        r".*`IterableDataset` has `__len__` defined"):
            warnings.filterwarnings("ignore", message=message)
        yield


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
    from perta_lightning.launch import PertaCLI, lightning_session

    with lightning_session(), expected_fit_warnings():
        cli = PertaCLI(
            ImportanceModule,
            ImportanceDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=list(argv) if argv is not None else sys.argv[1:],
            run=False,
            trainer_defaults=importance_trainer_defaults(),
            save_config_callback=None,
        )
        cli.trainer.fit(cli.model, cli.datamodule)
