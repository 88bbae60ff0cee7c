"""``TofuEvaluator``: TOFU evaluation of a Hugging Face model directory, under any Lightning strategy.

Each test batch encodes its questions once (left padded) and scores every answer, paraphrase and perturbed
answer against that key/value cache in one more pass (:mod:`perta_lightning.prompt_cache`); the same cache
seeds batched greedy generation. The aggregates are computed by the torchmetrics classes of
:mod:`perta_lightning.benchmarks.tofu.metrics` (one :class:`~perta_lightning.benchmarks.tofu.metrics.TofuSetMetrics` per set and a
:class:`~perta_lightning.benchmarks.metrics.MinKMiaAUC`), and the per-example values are kept in an
:class:`~perta_lightning.benchmarks.metrics.IndexedValues` per set ("cat" states keyed by example index), so the
result is the same on one process and on many. At the end rank zero writes one JSON file (atomically)::

    {"format": "perta-tofu-eval/1", "model": ..., "splits": {...}, "settings": {...},
     "aggregates": {"forget_quality", "ks_statistic", "model_utility", "privleak", "mia_min_k_auc",
                    "forget_extraction_strength", "retain_extraction_strength",
                    "<set>_<probability|rouge|truth_ratio>" x 12},
     "notes": [...], "examples": {"<set>": {"index": [...], "question": [...], <per-example column>: [...]}}}

A value that cannot be computed (no retain reference, NaN truth ratios) is ``null``, and ``notes`` says why.
The same file is the retain reference for Forget Quality and PrivLeak of other models. The sets, their
columns and their aggregation rules are those of :mod:`perta_lightning.benchmarks.tofu.sets`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from perta_lightning.benchmarks.evaluator import (
    Evaluator,
    check_every_example_seen,
    generation_text,
    run_evaluation,
)
from perta_lightning.benchmarks.metrics import IndexedValues, MinKMiaAUC
from perta_lightning.benchmarks.tofu.evaluation import TofuEvalDataModule, load_eval_tokenizer
from perta_lightning.benchmarks.tofu.metrics import TofuSetMetrics
from perta_lightning.benchmarks.tofu.sets import EVAL_SET_BY_NAME, UTILITY_KEYS
from perta_lightning.benchmarks.tofu.source import TofuSource
from perta_lightning.benchmarks.tofu.summary import (
    FORMAT,
    check_same_forget_set,
    forget_quality_or_note,
    load_evaluation,
)
from perta_lightning.errors import PertaValueError
from perta_lightning.functional import tofu_metrics as F
from perta_lightning.functional.losses import answer_token_mask
from perta_lightning.prompt_cache import block_labels, encode_prefix, score_answer_tokens

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "TofuEvaluator", "evaluate_model"]

#: Greedy generation length for ROUGE, as open-unlearning's TOFU generation settings (``max_new_tokens: 200``).
DEFAULT_MAX_NEW_TOKENS = 200


def load_generations(path: str) -> dict[str, dict[int, str]]:
    """Per set, example index → generation, of an evaluation file that has generations (ours)."""
    try:
        examples = json.loads(Path(path).read_text())["examples"]
        return {name: dict(zip(values["index"], values["generation"])) for name, values in examples.items()
                if "generation" in values}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PertaValueError(f"draft_result {path}: not an evaluation file with generations ({error})") from None


def _json_numbers(values: torch.Tensor) -> list[Any]:
    """``values.tolist()`` with NaN and infinities as ``None`` (``null``): JSON has no such numbers."""
    if bool(values.isfinite().all()):
        return values.tolist()
    return [_json_numbers(row) if row.dim() else (row.item() if bool(row.isfinite()) else None) for row in values]


def _example_columns(name: str, generate: bool = True) -> tuple[str, ...]:
    """The per-example columns the evaluator keeps for set ``name`` (the JSON's ``examples`` hold them); without
    ``generate``, no generation and no ROUGE."""
    spec = EVAL_SET_BY_NAME[name]
    columns = ["answer_nll"]
    if spec.has_paraphrase:
        columns.append("paraphrased_nll")
    if spec.scored:
        columns += ["perturbed_nll", "rouge_l_recall", "generated_ids"] if generate else ["perturbed_nll"]
    if spec.extraction_strength:
        columns.append("extraction_strength")
    if spec.min_k:
        columns.append("min_k_score")
    return tuple(columns)


class TofuEvaluator(Evaluator):
    """Evaluate a causal LM on TOFU; use with :class:`perta_lightning.benchmarks.tofu.evaluation.TofuEvalDataModule`.

    The model and its tokenizer are loaded in ``setup``, so that a bad path is reported as one error.

    Args:
        model: Hugging Face model directory (with its tokenizer) or hub id.
        output_json: where rank zero writes the evaluation (``None``: kept in ``self.result`` only).
        retain_result: evaluation file of the retain model on the same forget set (ours, TOFU's
            ``eval_log_aggregated.json`` or open-unlearning's ``TOFU_EVAL.json``) for Forget Quality and PrivLeak.
        max_new_tokens: greedy generation length for ROUGE; 200 by default, open-unlearning's TOFU setting.
        mink_k: fraction of lowest-probability answer tokens in the Min-K% MIA score.
        torch_dtype: dtype the weights are loaded in.
        generate: generate greedily and score ROUGE (``False``: every answer is scored, nothing is generated, and
            the file has no ROUGE or generations: a screening, whose Forget Quality is the full evaluation's).
        answer_drafts: before decoding, settle in one pass the tokens of a guessed continuation that greedy
            decoding would produce (:meth:`~perta_lightning.benchmarks.evaluator.Evaluator.generate`): the gold
            answer, or ``draft_result``'s generation. The same generations either way. Off by default: on a CPU
            a decode step of SmolLM2 costs little more per row than a block's token (5.3 against 3.2 ms at batch
            32), so it saved nothing there (``bench/RESULTS.md``), and the block holds ``B × draft × vocabulary``
            logits; it is meant for accelerators, where a decode step is latency-bound.
        draft_result: with ``answer_drafts``, an evaluation file of another model on the same sets (the target's,
            for a model unlearnt from it) whose generations are the guesses where it has one for the question.
    """

    def __init__(
        self,
        model: str,
        output_json: str | None = None,
        retain_result: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        mink_k: float = 0.4,
        torch_dtype: str = "float32",
        generate: bool = True,
        answer_drafts: bool = False,
        draft_result: str | None = None,
    ) -> None:
        super().__init__()
        if max_new_tokens <= 0:
            raise PertaValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if not 0.0 < mink_k <= 1.0:
            raise PertaValueError(f"mink_k must be in (0, 1], got {mink_k}")
        self.save_hyperparameters()
        self.examples = torch.nn.ModuleDict()
        self.set_metrics = torch.nn.ModuleDict()
        self.mia = MinKMiaAUC()
        self.retain_record = None
        self.draft_texts: dict[str, dict[int, str]] = {}
        self.waiting: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}  # batches being decoded

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, TofuEvalDataModule):
            raise TypeError(f"TofuEvaluator needs a TofuEvalDataModule, got {type(datamodule).__name__}")
        if self.tokenizer is None:
            self.tokenizer = load_eval_tokenizer(self.hparams.model)
        self.load_model()
        datamodule.setup(stage)
        for name in datamodule.sets:
            if name not in self.examples:
                self.examples[name] = IndexedValues(_example_columns(name, self.hparams.generate))
                if EVAL_SET_BY_NAME[name].scored:
                    self.set_metrics[name] = TofuSetMetrics(EVAL_SET_BY_NAME[name], rouge=self.hparams.generate)
        if self.hparams.draft_result is not None and not self.draft_texts:
            self.draft_texts = load_generations(self.hparams.draft_result)
        if self.hparams.retain_result is not None:
            forget_rows = datamodule.sets["forget"].rows
            self.retain_record = load_evaluation(self.hparams.retain_result)
            check_same_forget_set([row["question"] for row in forget_rows], len(forget_rows), self.retain_record,
                                  datamodule.source.describe(datamodule.splits["forget"]))

    @torch.no_grad()
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        name, index = batch["eval_set"], batch["index"]
        spec = EVAL_SET_BY_NAME[name]
        size, num_perturbed = index.numel(), batch["num_perturbed"]
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        prefix = encode_prefix(self.model, prompt_ids, prompt_mask)
        nll, hits = score_answer_tokens(self.model, prefix, prompt_ids, prompt_mask, batch["answer_ids"],
                                        batch["answer_labels"], batch["answer_mask"], batch["answer_example"])
        labels = block_labels(batch["answer_labels"])
        mask = answer_token_mask(labels)
        mean_nll = (nll * mask).sum(dim=1).double() / mask.sum(dim=1)
        values = {"answer_nll": mean_nll[:size]}
        offset = size
        if spec.has_paraphrase:
            values["paraphrased_nll"] = mean_nll[size : 2 * size]
            offset = 2 * size
        if spec.extraction_strength:
            values["extraction_strength"] = F.extraction_strength_from_hits(hits[:size], labels[:size]).to(self.device)
        if spec.min_k:
            values["min_k_score"] = F.min_k_score_from_nll(nll[:size], labels[:size], self.hparams.mink_k).to(self.device)
            self.mia.update(index, values["min_k_score"], holdout=not spec.scored)
        if spec.min_k and not spec.scored:
            self.log("mia_min_k_auc", self.mia)
        if spec.scored:
            values["perturbed_nll"] = mean_nll[offset:].view(size, num_perturbed)
        if not (spec.scored and self.hparams.generate):
            self.finish_batch(name, index, values)
            return
        if self.hparams.answer_drafts:  # decoded batch by batch
            ids = self.generate(prompt_ids, prompt_mask, self.hparams.max_new_tokens, prefix,
                                self.drafts(name, index, batch))
            self.finish_batch(name, index, values, ids)
            return
        self.waiting[batch_idx] = (index, values)
        for key, ids in self.generate_pooled(batch_idx, prompt_ids, prompt_mask, self.hparams.max_new_tokens,
                                             self.last_batch(batch_idx, dataloader_idx), prefix):
            self.finish_batch(name, *self.waiting.pop(key), ids)

    def finish_batch(self, name: str, index: torch.Tensor, values: dict[str, torch.Tensor],
                     ids: torch.Tensor | None = None) -> None:
        """Score one batch's generations ``ids`` (``None``: the set generates nothing) and record its values."""
        spec = EVAL_SET_BY_NAME[name]
        if ids is not None:
            rows = self.trainer.datamodule.sets[name].rows
            texts = [generation_text(self.tokenizer, row.tolist()) for row in ids]
            values["generated_ids"] = ids
            values["rouge_l_recall"] = F.rouge_l_recall(texts, [rows[i]["answer"] for i in index.tolist()]).to(self.device)
        if spec.scored:
            self.set_metrics[name].update(
                index, values["answer_nll"], values["perturbed_nll"], values.get("rouge_l_recall"),
                paraphrased_nll=values.get("paraphrased_nll"), extraction_strength=values.get("extraction_strength"))
            # Lightning computes (and syncs) logged metrics at the epoch's end. Logged here, each set's scores
            # belong to its own dataloader, so the results table's "DataLoader <i>" column holds only rows
            # named by that set ("forget_rouge", ...), not every score repeated in every column
            self.log_dict(self.set_metrics[name])
        self.examples[name].update(index, **values)

    def drafts(self, name: str, index: torch.Tensor, batch: dict[str, Any]) -> list[list[int]]:
        """A guessed continuation per row: ``draft_result``'s generation for the question (then EOS) where it has
        one, else the gold answer (EOS included), which a fine-tuned model often repeats."""
        other = self.draft_texts.get(name, {})
        out = []
        for row, example in enumerate(index.tolist()):
            if example in other:
                out.append(self.tokenizer(other[example], add_special_tokens=False)["input_ids"]
                           + [self.tokenizer.eos_token_id])
            else:
                out.append(batch["answer_ids"][row][batch["answer_mask"][row].bool()].tolist())
        return out

    def on_test_epoch_end(self) -> None:
        # every rank computes every metric in the same order: each compute() is a collective
        examples = {name: record.compute() for name, record in self.examples.items()}
        check_every_example_seen(examples, self.trainer.datamodule.sets)
        aggregates: dict[str, float | None] = {}
        for metrics in self.set_metrics.values():
            aggregates.update({key: value.item() for key, value in metrics.compute().items()})
        aggregates["mia_min_k_auc"] = self.mia.compute().item() if "holdout" in self.examples else None
        self.result = self.build_result(aggregates, examples)
        # the scores of more than one set (the per-set ones were logged as metrics in test_step)
        across = ("model_utility", "forget_quality", "ks_statistic", "privleak")
        scalars = {k: self.result["aggregates"][k] for k in across if isinstance(self.result["aggregates"][k], float)}
        self.log_dict(scalars, rank_zero_only=True, add_dataloader_idx=False)
        self.write_result("perta_eval_written")

    def build_result(self, aggregates: dict[str, float | None], examples: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        """The evaluation file's content from the metrics' aggregates and the ordered per-example values."""
        datamodule = self.trainer.datamodule
        out: dict[str, dict[str, Any]] = {}
        for name, values in examples.items():
            spec, rows = EVAL_SET_BY_NAME[name], datamodule.sets[name].rows
            index = values["index"].tolist()
            column: dict[str, Any] = {"index": index, "question": [rows[i]["question"] for i in index]}
            for key, tensor in values.items():
                if key not in ("index", "generated_ids"):
                    column[key] = _json_numbers(tensor)
            if spec.scored:
                column["answer"] = [rows[i]["answer"] for i in index]
                if "generated_ids" in values:
                    column["generation"] = [generation_text(self.tokenizer, ids.tolist())
                                            for ids in values["generated_ids"]]
                correct = values["paraphrased_nll" if spec.truth_ratio_correct == "paraphrased_answer" else "answer_nll"]
                if spec.normalised_probability:
                    probability = F.probability_with_options(values["answer_nll"], values["perturbed_nll"])
                else:
                    probability = F.answer_probability(values["answer_nll"])
                column["probability"] = _json_numbers(probability)
                column["truth_ratio"] = _json_numbers(F.truth_ratio(correct, values["perturbed_nll"]))
            out[name] = column
        notes: list[str] = []
        have_utility = all(key in aggregates for key in UTILITY_KEYS)
        aggregates["model_utility"] = F.harmonic_mean([aggregates[k] for k in UTILITY_KEYS]) if have_utility else None
        aggregates.update(forget_quality=None, ks_statistic=None, privleak=None)
        if self.retain_record is not None:
            ratios = torch.tensor(out["forget"]["truth_ratio"], dtype=torch.float64)
            quality, statistic, note = forget_quality_or_note(
                ratios, "the evaluated model", self.retain_record.forget_truth_ratios, self.retain_record.path)
            aggregates["forget_quality"], aggregates["ks_statistic"] = quality, statistic
            notes += [note] if note else []
            if aggregates["mia_min_k_auc"] is not None and self.retain_record.mia_auc is not None:
                aggregates["privleak"] = F.privleak(aggregates["mia_min_k_auc"], self.retain_record.mia_auc)
        for key, value in aggregates.items():
            if isinstance(value, float) and not math.isfinite(value):
                aggregates[key] = None
                notes.append(f"{key} is null: its value is {value}")
        return {
            "format": FORMAT,
            "model": self.hparams.model,
            "retain_result": self.hparams.retain_result,
            "splits": {name: split for name, split in datamodule.splits.items() if name in datamodule.sets},
            "settings": {
                "max_new_tokens": self.hparams.max_new_tokens, "generate": self.hparams.generate,
                "mink_k": self.hparams.mink_k,
                "torch_dtype": self.hparams.torch_dtype, "world_size": self.trainer.world_size,
                "max_examples": datamodule.hparams.max_examples, "batch_size": datamodule.hparams.batch_size,
            },
            "aggregates": aggregates,
            "notes": notes,
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
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    mink_k: float = 0.4,
    torch_dtype: str = "float32",
    generate: bool = True,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    answer_drafts: bool = False,
    draft_result: str | None = None,
    **data_options: Any,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` in-process with a Lightning ``Trainer``; return (and optionally write) the result.

    ``data_options`` go to :class:`TofuEvalDataModule` (``prompt``, ``retain_split``, ``real_authors_split``, ...);
    ``prompt.tokenizer`` defaults to ``model_dir``.
    """
    datamodule = TofuEvalDataModule(source, forget_split=forget_split, holdout_split=holdout_split,
                                    max_examples=max_examples, batch_size=batch_size, **data_options)
    module = TofuEvaluator(model_dir, output_json, retain_result, max_new_tokens, mink_k, torch_dtype, generate,
                           answer_drafts, draft_result)
    return run_evaluation(module, datamodule, accelerator, devices, strategy)
