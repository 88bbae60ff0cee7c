"""Training-based unlearning baselines as losses of the fine-tuning module: GradAscent, GradDiff, NPO, SimNPO, RMU.

Batches come from ``TofuDataModule(train_split=<forget>, paired_split=<retain>)``: the forget examples under
the usual keys and retain examples under ``paired_*`` keys. The formulas are in
``perta_lightning.functional.unlearning_losses``. With ``save_epochs`` the model is also written after each of
those epochs (``<epoch_dir>/epoch_<k>``): one training run gives the points of the method's trade-off curve.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from perta_lightning.errors import PertaValueError
from perta_lightning.functional.losses import IGNORE_INDEX, answer_nll, example_nll
from perta_lightning.functional.unlearning_losses import (
    control_vector,
    grad_ascent_loss,
    grad_diff_loss,
    npo_loss,
    rmu_loss,
    simnpo_loss,
)
from perta_lightning.modules.finetune import CausalLMModule

Method = Literal["grad_ascent", "grad_diff", "npo", "simnpo", "rmu"]
METHODS = ("grad_ascent", "grad_diff", "npo", "simnpo", "rmu")
#: The methods that need a frozen copy of the target.
WITH_REFERENCE = ("npo", "rmu")


def rmu_layer_for(num_layers: int) -> int:
    """RMU's layer for a model of ``num_layers`` decoder layers: open-unlearning steers layer 7 of the 16 of
    Llama-3.2-1B, 7/16 of the depth, which is layer ``round(7 · num_layers / 16)`` here (0-based)."""
    return min(num_layers - 1, round(7 * num_layers / 16))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers``, as Llama's and its kin)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise PertaValueError(f"RMU steers a decoder layer's output; {type(model).__name__} has no model.layers")
    return layers


def hidden_states(model: torch.nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
                  ) -> torch.Tensor:
    """``(B, T, D)``: what decoder layer ``layer`` of ``model`` outputs on a batch (the model runs through it)."""
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(model)[layer].register_forward_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


class UnlearningModule(CausalLMModule):
    """Unlearn a forget split by a training loss.

    Args:
        model: path of the target model (a Hugging Face directory).
        method: ``grad_ascent`` (−NLL on forget), ``grad_diff`` (−NLL_f + NLL_r), ``npo`` (negative preference
            optimisation against a frozen copy of the target, plus the retain NLL), ``simnpo`` (NPO without a
            reference, length-normalised) or ``rmu`` (representation misdirection of one layer's hidden states).
        npo_beta: β of NPO.
        simnpo_beta: β of SimNPO (open-unlearning's TOFU setting: 4.5).
        simnpo_delta: the margin δ of SimNPO (open-unlearning: 0).
        forget_weight: γ, the weight of SimNPO's and RMU's forget term (open-unlearning: 0.125 for SimNPO, 1 for RMU).
        retain_weight: α, the weight of their retain term (open-unlearning: 1).
        rmu_layer: the decoder layer RMU steers (``None``: :func:`rmu_layer_for` the model's depth).
        rmu_steering_coeff: the norm of RMU's random target for forget hidden states (open-unlearning's TOFU: 2).
        rmu_seed: the seed of RMU's random direction.
        output_dir: where the unlearned model is written at the end of ``fit``.
        save_epochs: epochs after which the model is also written, to ``<epoch_dir>/epoch_<k>``.
        epoch_dir: the folder of those models.
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
        simnpo_beta: float = 4.5,
        simnpo_delta: float = 0.0,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        rmu_layer: int | None = None,
        rmu_steering_coeff: float = 2.0,
        rmu_seed: int = 0,
        output_dir: str | None = None,
        save_epochs: list[int] | None = None,
        epoch_dir: str | None = None,
        tokenizer: str | None = None,
        torch_dtype: str = "float32",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if method not in METHODS:
            raise PertaValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        if save_epochs and epoch_dir is None:
            raise PertaValueError("save_epochs needs epoch_dir, the folder the models after those epochs go to")
        super().__init__(model=model, tokenizer=tokenizer, output_dir=output_dir, torch_dtype=torch_dtype,
                         optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.reference: Any = None
        if method in WITH_REFERENCE:
            # A frozen copy kept out of the module's parameters (and so out of the optimizer and checkpoints).
            self.reference = [copy.deepcopy(self.model).eval().requires_grad_(False)]
        self.control: torch.Tensor | None = None
        if method == "rmu":
            layers = len(decoder_layers(self.model))
            self.layer = rmu_layer_for(layers) if rmu_layer is None else rmu_layer
            if not 0 <= self.layer < layers:
                raise PertaValueError(f"rmu_layer must be in [0, {layers}), got {rmu_layer}")
            dim = self.model.config.hidden_size
            self.control = control_vector(dim, rmu_steering_coeff, torch.Generator().manual_seed(rmu_seed))

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference[0].to(self.device)

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch + 1
        if self.hparams.save_epochs and epoch in self.hparams.save_epochs:
            self.save_to(str(Path(self.hparams.epoch_dir) / f"epoch_{epoch}"))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        method, hp = self.hparams.method, self.hparams
        if method != "grad_ascent" and "paired_input_ids" not in batch:
            raise ValueError(f"{method} needs retain batches: set the data module's paired_split")
        if method == "grad_ascent":
            loss = grad_ascent_loss(self.answer_loss(batch))
        elif method == "grad_diff":
            loss = grad_diff_loss(self.answer_loss(batch), self.answer_loss(batch, prefix="paired_"))
        elif method == "rmu":
            loss = self._rmu_loss(batch)
        else:
            logits = self(batch["input_ids"], batch["attention_mask"])
            nll_f, tokens_f = example_nll(logits, batch["labels"])
            nll_r = answer_nll(
                self(batch["paired_input_ids"], batch["paired_attention_mask"]), batch["paired_labels"]
            )
            if method == "simnpo":
                loss = simnpo_loss(nll_f, tokens_f, nll_r, hp.simnpo_beta, hp.simnpo_delta, hp.forget_weight,
                                   hp.retain_weight)
            else:
                with torch.no_grad():
                    reference_logits = self.reference[0](
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                    ).logits
                    nll_ref, _ = example_nll(reference_logits, batch["labels"])
                loss = npo_loss(nll_f, nll_ref, nll_r, beta=hp.npo_beta)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _rmu_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """RMU on the hidden states of ``self.layer``: forget ones towards the control vector, retain ones at the
        frozen target's (:func:`~perta_lightning.functional.unlearning_losses.rmu_loss`)."""
        hp = self.hparams
        hidden_f = hidden_states(self.model, self.layer, batch["input_ids"], batch["attention_mask"])
        hidden_r = hidden_states(self.model, self.layer, batch["paired_input_ids"], batch["paired_attention_mask"])
        with torch.no_grad():
            reference_r = hidden_states(self.reference[0], self.layer, batch["paired_input_ids"],
                                        batch["paired_attention_mask"])
        control = self.control.to(device=hidden_f.device, dtype=hidden_f.dtype)
        return rmu_loss(hidden_f, control, batch["labels"] != IGNORE_INDEX, hidden_r, reference_r,
                        batch["paired_labels"] != IGNORE_INDEX, hp.forget_weight, hp.retain_weight)
