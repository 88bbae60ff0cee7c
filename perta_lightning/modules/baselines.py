"""Training-based unlearning baselines as losses of the fine-tuning module: GradAscent, GradDiff, NPO.

Batches come from ``TofuDataModule(train_split=<forget>, paired_split=<retain>)``: the forget examples under
the usual keys and retain examples under ``paired_*`` keys. The formulas are in
``perta_lightning.functional.unlearning_losses``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from perta_lightning.functional.losses import answer_nll, example_nll
from perta_lightning.functional.unlearning_losses import grad_ascent_loss, grad_diff_loss, npo_loss
from perta_lightning.modules.finetune import CausalLMModule

Method = Literal["grad_ascent", "grad_diff", "npo"]


class UnlearningModule(CausalLMModule):
    """Unlearn a forget split by a training loss.

    Args:
        model: path of the target model (a Hugging Face directory).
        method: ``grad_ascent`` (−NLL on forget), ``grad_diff`` (−NLL_f + NLL_r) or ``npo``
            (negative preference optimisation against a frozen copy of the target, plus the retain NLL).
        npo_beta: β of NPO.
        output_dir: where the unlearned model is written at the end of ``fit``.
        tokenizer: tokenizer path; defaults to ``model``.
        torch_dtype: dtype the weights are loaded in.
        optimizer: optimizer factory, as for ``CausalLMModule``.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        model: str,
        method: Method = "grad_diff",
        npo_beta: float = 0.1,
        output_dir: str | None = None,
        tokenizer: str | None = None,
        torch_dtype: str = "float32",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if method not in ("grad_ascent", "grad_diff", "npo"):
            raise ValueError(f"method must be grad_ascent, grad_diff or npo, got {method!r}")
        super().__init__(model=model, tokenizer=tokenizer, output_dir=output_dir, torch_dtype=torch_dtype,
                         optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.reference: Any = None
        if method == "npo":
            # A frozen copy kept out of the module's parameters (and so out of the optimizer and checkpoints).
            self.reference = [copy.deepcopy(self.model).eval().requires_grad_(False)]

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference[0].to(self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        method = self.hparams.method
        if method != "grad_ascent" and "paired_input_ids" not in batch:
            raise ValueError(f"{method} needs retain batches: set the data module's paired_split")
        if method == "grad_ascent":
            loss = grad_ascent_loss(self.answer_loss(batch))
        elif method == "grad_diff":
            loss = grad_diff_loss(self.answer_loss(batch), self.answer_loss(batch, prefix="paired_"))
        else:
            logits = self(batch["input_ids"], batch["attention_mask"])
            nll_f, _ = example_nll(logits, batch["labels"])
            with torch.no_grad():
                reference_logits = self.reference[0](
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits
                nll_ref, _ = example_nll(reference_logits, batch["labels"])
            nll_r = answer_nll(
                self(batch["paired_input_ids"], batch["paired_attention_mask"]), batch["paired_labels"]
            )
            loss = npo_loss(nll_f, nll_ref, nll_r, beta=self.hparams.npo_beta)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss
