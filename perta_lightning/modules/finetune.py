"""``CausalLMModule``: fine-tune any ``AutoModelForCausalLM`` on question/answer batches.

The loss is the mean token negative log-likelihood over answer tokens (labels != -100) of the batch:

    L = (1 / #answer tokens) * sum_{t : labels_t != -100} -log p(labels_t | tokens_<t)

At the end of ``fit`` the model is written as a Hugging Face directory (safetensors, config, tokenizer)
together with ``perta_hparams.json``, the hyper-parameters that made it.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from perta_lightning.checkpoints import load_causal_lm, save_hf_directory
from perta_lightning.functional.losses import answer_nll


class CausalLMModule(LightningModule):
    """A causal LM trained on answer tokens only.

    Args:
        model: path or hub id of a pretrained model directory (``from_pretrained``).
        model_config: a transformers config as a dict (``model_type`` plus fields) for a model trained from
            scratch; used when ``model`` is not given.
        tokenizer: tokenizer path; defaults to ``model``. Saved beside the fine-tuned model.
        output_dir: where the Hugging Face directory is written at the end of ``fit`` (``None``: not saved).
        torch_dtype: dtype the weights are loaded in (``float32``, ``bfloat16``, ...).
        seed: seed for the initialisation of a model trained from scratch.
        gradient_checkpointing: trade compute for memory on large models.
        optimizer: a callable taking the parameters (LightningCLI builds it from ``class_path`` and
            ``init_args``, e.g. ``torch.optim.AdamW`` with ``lr``); only trainable parameters are passed.
        lr_scheduler: optional callable taking the optimizer; stepped every optimizer step.
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        output_dir: str | None = None,
        torch_dtype: str = "float32",
        seed: int = 0,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if (model is None) == (model_config is None):
            raise ValueError("CausalLMModule needs exactly one of model= (a pretrained path) or model_config=")
        if model_config is not None and tokenizer is None:
            raise ValueError("a model trained from scratch (model_config=) needs tokenizer=")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.model = load_causal_lm(model, model_config, torch_dtype, seed)
        self.model.train()  # from_pretrained returns the model in eval mode
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.tokenizer_path = tokenizer or model

    def configure_model(self) -> None:
        from perta_lightning import distributed

        if isinstance(self.trainer.strategy, distributed.ModelParallelStrategy):  # FSDP2
            distributed.apply_fully_shard(self.model, self.device_mesh)

    def configure_optimizers(self) -> Any:
        # trainer.model: the parameters as the strategy wrapped them (FSDP's flat parameters, for one)
        parameters = self.trainer.model.parameters() if self._trainer is not None else self.parameters()
        optimizer = self.optimizer_factory([p for p in parameters if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def answer_loss(self, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        logits = self(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])
        return answer_nll(logits, batch[f"{prefix}labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.answer_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.answer_loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def on_train_end(self) -> None:
        # on_train_end, not on_fit_end: the strategy is still set up here (Lightning tears it down, and FSDP
        # frees its flat parameters, before on_fit_end).
        if self.hparams.output_dir is not None:
            self.save_to(self.hparams.output_dir)

    def save_to(self, output_dir: str) -> None:
        """Write the model as it is now as a Hugging Face directory. Every rank calls it: under FSDP and ZeRO-3
        gathering the weights is a collective; the full state lands on rank zero, which writes."""
        from perta_lightning.distributed import full_state_dict

        state_dict = full_state_dict(self.trainer.strategy, self)
        save_hf_directory(
            self.model,
            self.tokenizer_path,
            output_dir,
            hparams=self.describe_run(),
            is_global_zero=self.trainer.is_global_zero,
            state_dict=state_dict,
        )
        self.trainer.strategy.barrier("perta_save_hf")

    def describe_run(self) -> dict[str, Any]:
        """Everything that made this model: module and data hyper-parameters and the trainer's settings."""
        info: dict[str, Any] = {
            "module": type(self).__name__,
            "hparams": dict(self.hparams),
            "optimizer": repr(self.optimizer_factory),
            "lr_scheduler": repr(self.scheduler_factory),
        }
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "hparams"):
            info["data"] = {key: _jsonable(value) for key, value in dict(datamodule.hparams).items()}
        info["trainer"] = {
            "max_epochs": self.trainer.max_epochs,
            "max_steps": self.trainer.max_steps,
            "global_step": self.trainer.global_step,
            "world_size": self.trainer.world_size,
            "precision": str(self.trainer.precision),
        }
        return info


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value) if not hasattr(value, "__dict__") else {k: _jsonable(v) for k, v in vars(value).items()}
