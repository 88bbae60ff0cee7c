"""``TofuEvaluator``: TOFU evaluation of a Hugging Face model directory, under any Lightning strategy.

Each test batch encodes its questions once (left padded) and scores every answer, paraphrase and perturbed
answer against that key/value cache in one more pass (:mod:`perta_lightning.prompt_cache`); the same cache
seeds batched greedy generation. Per-example values go into
``IndexedValues`` metrics ("cat" states keyed by example index), so the result is the same on one
process and on many. At the end rank zero writes one JSON file (atomically)::

    {"format": "perta-tofu-eval/1", "model": ..., "splits": {...}, "settings": {...},
     "aggregates": {"forget_quality", "ks_statistic", "model_utility", "privleak", "mia_min_k_auc",
                    "forget_extraction_strength", "<set>_<probability|rouge|truth_ratio>" x 12, ...},
     "examples": {"<set>": {"index": [...], "question": [...], <per-example column>: [...]}}}

The same file is the retain reference for Forget Quality and PrivLeak of other models.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from transformers import DynamicCache

from perta_lightning.checkpoints import load_causal_lm
from perta_lightning.data.evaluation import TofuEvalDataModule
from perta_lightning.data.tofu import TofuSource, load_tokenizer
from perta_lightning.functional import tofu_metrics as F
from perta_lightning.functional.losses import example_nll
from perta_lightning.io import atomic_write_text
from perta_lightning.metrics import IndexedValues
from perta_lightning.prompt_cache import block_labels, encode_prefix, score_answers
from perta_lightning.summary import (
    FORMAT,
    UTILITY_KEYS,
    check_same_forget_set,
    load_evaluation,
    summarize_main,
)

__all__ = ["TofuEvaluator", "evaluate_model", "summarize_main"]

_COLUMNS = {
    "forget": ("answer_nll", "paraphrased_nll", "perturbed_nll", "rouge_l_recall", "extraction_strength", "min_k_score", "generated_ids"),
    "retain": ("answer_nll", "paraphrased_nll", "perturbed_nll", "rouge_l_recall", "extraction_strength", "generated_ids"),
    "real_authors": ("answer_nll", "perturbed_nll", "rouge_l_recall", "generated_ids"),
    "world_facts": ("answer_nll", "perturbed_nll", "rouge_l_recall", "generated_ids"),
    "holdout": ("answer_nll", "min_k_score"),
}


class TofuEvaluator(LightningModule):
    """Evaluate a causal LM on TOFU; use with :class:`perta_lightning.data.evaluation.TofuEvalDataModule`.

    Args:
        model: Hugging Face model directory (with its tokenizer) or hub id.
        output_json: where rank zero writes the evaluation (``None``: kept in ``self.result`` only).
        retain_result: evaluation file of the retain model on the same forget set (ours, TOFU's
            ``eval_log_aggregated.json`` or open-unlearning's ``TOFU_EVAL.json``) for Forget Quality and PrivLeak.
        max_new_tokens: greedy generation length for ROUGE.
        mink_k: fraction of lowest-probability answer tokens in the Min-K% MIA score.
        torch_dtype: dtype the weights are loaded in.
    """

    def __init__(
        self,
        model: str,
        output_json: str | None = None,
        retain_result: str | None = None,
        max_new_tokens: int = 200,
        mink_k: float = 0.4,
        torch_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(model)
        self.model = load_causal_lm(model, None, torch_dtype)
        self.model.eval()
        self.records = torch.nn.ModuleDict()
        self.result: dict[str, Any] | None = None
        self.retain_record = None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, TofuEvalDataModule):
            raise TypeError(f"TofuEvaluator needs a TofuEvalDataModule, got {type(datamodule).__name__}")
        datamodule.setup(stage)
        for name in datamodule.sets:
            if name not in self.records:
                self.records[name] = IndexedValues(_COLUMNS[name])
        if self.hparams.retain_result is not None:
            forget_rows = datamodule.sets["forget"].rows
            self.retain_record = load_evaluation(self.hparams.retain_result)
            check_same_forget_set([row["question"] for row in forget_rows], len(forget_rows), self.retain_record,
                                  datamodule.source.describe(datamodule.splits["forget"]))

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix: DynamicCache | None = None) -> torch.Tensor:
        """Greedy continuations ``(B, max_new_tokens)``, cut before EOS and padded with -1.

        ``prefix``: the prompts' cache without their last token (:func:`encode_prefix`); it is extended in place.
        """
        width = self.hparams.max_new_tokens
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, cache=prefix, max_new_tokens=width,
            do_sample=False, use_cache=True, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )[:, prompt_ids.shape[1]:]
        after_eos = (out == self.tokenizer.eos_token_id).long().cumsum(dim=1) > 0
        ids = torch.full((out.shape[0], width), -1, dtype=torch.long, device=out.device)
        ids[:, : out.shape[1]] = out.masked_fill(after_eos, -1)
        return ids

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode([t for t in ids.tolist() if t >= 0], skip_special_tokens=True)

    @torch.no_grad()
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        name, index = batch["eval_set"], batch["index"]
        size, num_perturbed = index.numel(), batch["num_perturbed"]
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        prefix = encode_prefix(self.model, prompt_ids, prompt_mask)
        logits = score_answers(self.model, prefix, prompt_ids, prompt_mask, batch["answer_ids"], batch["answer_mask"],
                               batch["answer_example"])
        labels = block_labels(batch["answer_labels"])
        nll_sum, count = example_nll(logits, labels)
        mean_nll = nll_sum.double() / count
        values = {"answer_nll": mean_nll[:size]}
        offset = size
        if batch["has_paraphrase"]:
            values["paraphrased_nll"] = mean_nll[size : 2 * size]
            offset = 2 * size
        if num_perturbed:
            values["perturbed_nll"] = mean_nll[offset:].view(size, num_perturbed)
        columns = _COLUMNS[name]
        if "extraction_strength" in columns:
            values["extraction_strength"] = F.extraction_strength(logits[:size], labels[:size])
        if "min_k_score" in columns:
            values["min_k_score"] = F.min_k_score(logits[:size], labels[:size], self.hparams.mink_k)
        if "generated_ids" in columns:
            ids = self.generate(prompt_ids, prompt_mask, prefix)
            rows = self.trainer.datamodule.sets[name].rows
            references = [rows[i]["answer"] for i in index.tolist()]
            values["generated_ids"] = ids
            values["rouge_l_recall"] = torch.tensor(F.rouge_l_recall([self.decode(r) for r in ids], references))
        self.records[name].update(index, **{k: v.to(self.device) for k, v in values.items()})

    def on_test_epoch_end(self) -> None:
        examples = {name: record.compute() for name, record in self.records.items()}  # collective
        self.result = self.build_result(examples)
        scalars = {k: v for k, v in self.result["aggregates"].items() if isinstance(v, float)}
        self.log_dict(scalars, rank_zero_only=True)
        if self.hparams.output_json is not None and self.trainer.is_global_zero:
            atomic_write_text(self.hparams.output_json, json.dumps(self.result, indent=1))
        self.trainer.strategy.barrier("perta_eval_written")

    def build_result(self, examples: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        datamodule = self.trainer.datamodule
        aggregates: dict[str, Any] = {}
        out: dict[str, dict[str, Any]] = {}
        for name, values in examples.items():
            rows = datamodule.sets[name].rows
            index = values["index"].tolist()
            column: dict[str, Any] = {"index": index, "question": [rows[i]["question"] for i in index]}
            for key, tensor in values.items():
                if key not in ("index", "generated_ids"):
                    column[key] = tensor.tolist()
            if name != "holdout":
                column["answer"] = [rows[i]["answer"] for i in index]
                column["generation"] = [self.decode(ids) for ids in values["generated_ids"]]
                correct = values.get("paraphrased_nll", values["answer_nll"])
                ratio = F.truth_ratio(correct, values["perturbed_nll"])
                if name in ("forget", "retain"):
                    probability = F.answer_probability(values["answer_nll"])
                else:
                    probability = F.probability_with_options(values["answer_nll"], values["perturbed_nll"])
                column["probability"], column["truth_ratio"] = probability.tolist(), ratio.tolist()
                aggregates[f"{name}_probability"] = probability.mean().item()
                aggregates[f"{name}_rouge"] = values["rouge_l_recall"].mean().item()
                aggregates[f"{name}_truth_ratio"] = F.truth_ratio_score(ratio, forget=name == "forget")
            if "extraction_strength" in values:
                aggregates[f"{name}_extraction_strength"] = values["extraction_strength"].mean().item()
            out[name] = column
        have_utility = all(key in aggregates for key in UTILITY_KEYS)
        aggregates["model_utility"] = F.harmonic_mean([aggregates[k] for k in UTILITY_KEYS]) if have_utility else None
        aggregates["mia_min_k_auc"] = None
        if "holdout" in examples:
            aggregates["mia_min_k_auc"] = F.auc_forget_vs_holdout(
                examples["forget"]["min_k_score"], examples["holdout"]["min_k_score"])
        aggregates.update(forget_quality=None, ks_statistic=None, privleak=None)
        if self.retain_record is not None:
            ratios = torch.tensor(out["forget"]["truth_ratio"], dtype=torch.float64)
            aggregates["forget_quality"], aggregates["ks_statistic"] = F.forget_quality(
                ratios, self.retain_record.forget_truth_ratios)
            if aggregates["mia_min_k_auc"] is not None and self.retain_record.mia_auc is not None:
                aggregates["privleak"] = F.privleak(aggregates["mia_min_k_auc"], self.retain_record.mia_auc)
        return {
            "format": FORMAT,
            "model": self.hparams.model,
            "retain_result": self.hparams.retain_result,
            "splits": {name: split for name, split in datamodule.splits.items() if name in datamodule.sets},
            "settings": {
                "max_new_tokens": self.hparams.max_new_tokens, "mink_k": self.hparams.mink_k,
                "torch_dtype": self.hparams.torch_dtype, "world_size": self.trainer.world_size,
                "max_examples": datamodule.hparams.max_examples, "batch_size": datamodule.hparams.batch_size,
            },
            "aggregates": aggregates,
            "examples": out,
        }


def evaluate_model(
    model_dir: str,
    source: TofuSource,
    forget_split: str = "forget10_perturbed",
    output_json: str | None = None,
    retain_result: str | None = None,
    holdout_split: str | None = "holdout10",
    max_examples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 200,
    mink_k: float = 0.4,
    torch_dtype: str = "float32",
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    **data_options: Any,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` in-process with a Lightning ``Trainer``; return (and optionally write) the result.

    ``data_options`` go to :class:`TofuEvalDataModule` (``retain_split``, ``real_authors_split``, ...).
    """
    datamodule = TofuEvalDataModule(source, tokenizer=model_dir, forget_split=forget_split, holdout_split=holdout_split,
                                    max_examples=max_examples, batch_size=batch_size, **data_options)
    module = TofuEvaluator(model_dir, output_json, retain_result, max_new_tokens, mink_k, torch_dtype)
    trainer = Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    return module.result
