"""``MuseEvaluator``: MUSE evaluation of a Hugging Face model directory, under any Lightning strategy.

Use with :class:`perta_lightning.benchmarks.muse.evaluation.MuseEvalDataModule`. Per set:

* ``verbmem``: greedy continuation of each forget-excerpt prompt (``verbmem_max_new_tokens``), scored against
  the true continuation (:func:`perta_lightning.functional.muse_metrics.verbmem_scores`);
* ``knowmem_forget`` / ``knowmem_retain``: greedy answer (``knowmem_max_new_tokens``, cut at the first of
  open-unlearning's stop strings, :data:`KNOWMEM_STOP`) scored against the true answer
  (:func:`~perta_lightning.functional.muse_metrics.knowmem_scores`);
* ``privleak_forget`` / ``privleak_holdout``: a membership-inference score per text (``attack``); their ROC AUC
  (forget labelled 0) and, against the retain model's evaluation, PrivLeak
  (:func:`perta_lightning.functional.tofu_metrics.privleak`: about −100 for a model that memorised the forget set,
  0 for one that never saw it, MUSE's convention).

The aggregates are computed by the torchmetrics classes of :mod:`perta_lightning.benchmarks.muse.metrics` (``VerbMem``,
``KnowMem``, ``MiaAUC``) and the per-example values kept in :class:`~perta_lightning.benchmarks.tofu.metrics.IndexedValues` ("cat"
states keyed by example index), so the result is the same on one process and on many. Rank zero writes one JSON file (atomically)::

    {"format": "perta-muse-eval/1", "model": ..., "retain_result": ..., "splits": {...}, "settings": {...},
     "aggregates": {"verbmem_forget", "knowmem_forget", "knowmem_retain", "mia_auc", "privleak"},
     "notes": [...], "examples": {"<set>": {"index": [...], <per-example column>: [...]}}}
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from perta_lightning.benchmarks.evaluator import (
    Evaluator,
    check_every_example_seen,
    reference_generation_text,
    run_evaluation,
)
from perta_lightning.benchmarks.metrics import IndexedValues
from perta_lightning.benchmarks.muse.evaluation import MUSE_EVAL_SETS, MuseEvalDataModule
from perta_lightning.benchmarks.muse.metrics import KnowMem, MiaAUC, VerbMem
from perta_lightning.benchmarks.muse.source import MuseSource
from perta_lightning.benchmarks.muse.summary import MUSE_FORMAT, load_muse_evaluation, privleak_or_none
from perta_lightning.errors import PertaValueError
from perta_lightning.functional import muse_metrics as M

#: MUSE's generation lengths (its ``eval.py``): 128 new tokens for VerbMem, 32 for KnowMem.
VERBMEM_MAX_NEW_TOKENS, KNOWMEM_MAX_NEW_TOKENS = 128, 32
#: Where a KnowMem answer ends: open-unlearning's stop strings (``configs/eval/muse_metrics/*_knowmem_ROUGE.yaml``
#: at d3d7cf9), the prompt's answers being followed by a blank line and the next question.
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")
#: How a generation becomes the scored text (:func:`~perta_lightning.benchmarks.evaluator.reference_generation_text`),
#: recorded in each file and in the study's stage keys, so an evaluation made the earlier way (stripped before the
#: cut, no clean-up of spaces) is recomputed rather than mixed in.
TEXT_FORMAT = "decode, clean up spaces, cut at the stops, strip"


def attack_scores(attack: str, logits: torch.Tensor, labels: torch.Tensor, k: float) -> torch.Tensor:
    """The membership score of each text of a batch under ``attack`` (``min_k`` or ``min_k_plus_plus``)."""
    if attack == "min_k":
        return M.min_k_text_score(logits, labels, k)
    return M.min_k_plus_plus_score(logits, labels, k)


class MuseEvaluator(Evaluator):
    """Evaluate a causal LM on MUSE (VerbMem, KnowMem on forget and retain, MIA AUC and PrivLeak).

    Args:
        model: Hugging Face model directory (with its tokenizer) or hub id.
        output_json: where rank zero writes the evaluation (``None``: kept in ``self.result`` only).
        retain_result: the retain model's MUSE evaluation on the same sets, for PrivLeak.
        verbmem_max_new_tokens: greedy continuation length for VerbMem (MUSE: 128).
        knowmem_max_new_tokens: greedy answer length for KnowMem (MUSE: 32).
        attack: the membership-inference score behind the AUC and PrivLeak.
        mink_k: fraction of lowest-scoring tokens the attack averages.
        torch_dtype: dtype the weights are loaded in.
    """

    def __init__(self, model: str, output_json: str | None = None, retain_result: str | None = None,
                 verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
                 knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
                 attack: Literal["min_k", "min_k_plus_plus"] = "min_k", mink_k: float = 0.4,
                 torch_dtype: str = "float32") -> None:
        super().__init__()
        for key, value in (("verbmem_max_new_tokens", verbmem_max_new_tokens),
                           ("knowmem_max_new_tokens", knowmem_max_new_tokens)):
            if value <= 0:
                raise PertaValueError(f"{key} must be positive, got {value}")
        if not 0.0 < mink_k <= 1.0:
            raise PertaValueError(f"mink_k must be in (0, 1], got {mink_k}")
        self.save_hyperparameters()
        self.examples = torch.nn.ModuleDict({
            name: IndexedValues(("score",) if kind == "text" else ("score", "generated_ids"))
            for name, (_, kind) in MUSE_EVAL_SETS.items()})
        # the aggregates, by the torchmetrics classes users log from their own modules
        self.means = torch.nn.ModuleDict({"verbmem": VerbMem(), "knowmem_forget": KnowMem(),
                                          "knowmem_retain": KnowMem()})
        self.mia = MiaAUC()
        self.retain_record: dict[str, Any] | None = None
        self.waiting: dict[int, torch.Tensor] = {}  # the example indices of batches being decoded

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, MuseEvalDataModule):
            raise TypeError(f"MuseEvaluator needs a MuseEvalDataModule, got {type(datamodule).__name__}")
        self.load_model()
        datamodule.setup(stage)
        self.tokenizer = datamodule.tokenizer
        if self.hparams.retain_result is not None:
            self.retain_record = load_muse_evaluation(self.hparams.retain_result)

    def _text(self, name: str, ids: torch.Tensor) -> str:
        stops = KNOWMEM_STOP if MUSE_EVAL_SETS[name][1] == "knowledge" else ()
        return reference_generation_text(self.tokenizer, ids.tolist(), stops)

    @torch.no_grad()
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        name, index = batch["eval_set"], batch["index"]
        kind = MUSE_EVAL_SETS[name][1]
        if kind == "text":
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            score = attack_scores(self.hparams.attack, logits.float(), batch["labels"], self.hparams.mink_k)
            score = score.to(self.device)
            self.mia.update(index, score, holdout=name == "privleak_holdout")
            self.examples[name].update(index, score=score)
            return
        hp = self.hparams
        width = hp.verbmem_max_new_tokens if kind == "verbatim" else hp.knowmem_max_new_tokens
        self.waiting[batch_idx] = index
        for key, ids in self.generate_pooled(batch_idx, batch["prompt_ids"], batch["prompt_mask"], width,
                                             self.last_batch(batch_idx, dataloader_idx)):
            self.finish_batch(name, self.waiting.pop(key), ids)

    def finish_batch(self, name: str, index: torch.Tensor, ids: torch.Tensor) -> None:
        """Score one batch's generations ``ids`` and record them."""
        kind = MUSE_EVAL_SETS[name][1]
        rows = self.trainer.datamodule.sets[name].rows
        texts = [self._text(name, row) for row in ids]
        truth = [rows[i]["gt" if kind == "verbatim" else "answer"] for i in index.tolist()]
        score = M.verbmem_scores(texts, truth) if kind == "verbatim" else M.knowmem_scores(texts, truth)
        self.means[name].update(index, texts, truth)
        self.examples[name].update(index, score=score.to(self.device), generated_ids=ids)

    def on_test_epoch_end(self) -> None:
        # every rank computes every metric in the same order: each compute() is a collective
        examples = {name: record.compute() for name, record in self.examples.items()}
        check_every_example_seen(examples, self.trainer.datamodule.sets)
        means = {name: metric.compute().item() for name, metric in self.means.items()}
        self.result = self.build_result(examples, means, self.mia.compute().item())
        scalars = {k: v for k, v in self.result["aggregates"].items() if isinstance(v, float)}
        self.log_dict(scalars, rank_zero_only=True, add_dataloader_idx=False)
        self.write_result("perta_muse_eval_written")

    def build_result(self, examples: dict[str, dict[str, torch.Tensor]], means: dict[str, float],
                     auc: float) -> dict[str, Any]:
        """The evaluation file's content from the ordered per-example values, the means and the MIA AUC."""
        datamodule = self.trainer.datamodule
        out: dict[str, dict[str, Any]] = {}
        for name, values in examples.items():
            rows, kind = datamodule.sets[name].rows, MUSE_EVAL_SETS[name][1]
            index = values["index"].tolist()
            column: dict[str, Any] = {"index": index, "score": values["score"].tolist()}
            if kind == "verbatim":
                column.update(prompt=[rows[i]["prompt"] for i in index], gt=[rows[i]["gt"] for i in index])
            elif kind == "knowledge":
                column.update(question=[rows[i]["question"] for i in index], answer=[rows[i]["answer"] for i in index])
            if kind != "text":
                column["generation"] = [self._text(name, ids) for ids in values["generated_ids"]]
            out[name] = column
        aggregates: dict[str, float | None] = {
            "verbmem_forget": means["verbmem"], "knowmem_forget": means["knowmem_forget"],
            "knowmem_retain": means["knowmem_retain"], "mia_auc": auc, "privleak": None}
        notes: list[str] = []
        if self.retain_record is not None:
            aggregates["privleak"], note = privleak_or_none(auc, self.retain_record)
            notes += [note] if note else []
        hp = self.hparams
        return {
            "format": MUSE_FORMAT, "model": hp.model, "retain_result": hp.retain_result,
            "splits": dict(datamodule.splits),
            "settings": {"verbmem_max_new_tokens": hp.verbmem_max_new_tokens,
                         "knowmem_max_new_tokens": hp.knowmem_max_new_tokens, "knowmem_stop": list(KNOWMEM_STOP),
                         "answer_cue": datamodule.hparams.answer_cue, "text": TEXT_FORMAT,
                         "attack": hp.attack,
                         "mink_k": hp.mink_k, "torch_dtype": hp.torch_dtype, "world_size": self.trainer.world_size,
                         "max_examples": datamodule.hparams.max_examples,
                         "batch_size": datamodule.hparams.batch_size,
                         "prompt_tokens": datamodule.hparams.prompt_tokens,
                         "text_max_length": datamodule.hparams.text_max_length,
                         "use_icl": datamodule.hparams.use_icl},
            "aggregates": aggregates, "notes": notes, "examples": out,
        }


def evaluate_muse_model(model_dir: str, source: MuseSource, output_json: str | None = None,
                        retain_result: str | None = None, max_examples: int | None = None, batch_size: int = 8,
                        verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
                        knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS, attack: str = "min_k",
                        mink_k: float = 0.4, torch_dtype: str = "float32", accelerator: str = "auto",
                        devices: int | str = 1, strategy: str = "auto", **data_options: Any) -> dict[str, Any]:
    """Evaluate ``model_dir`` on MUSE in-process with a Lightning ``Trainer``; return (and optionally write) the
    result. ``data_options`` go to :class:`MuseEvalDataModule` (``prompt_tokens``, ``text_max_length``, ...)."""
    datamodule = MuseEvalDataModule(source, max_examples=max_examples, batch_size=batch_size, **data_options)
    module = MuseEvaluator(model_dir, output_json, retain_result, verbmem_max_new_tokens, knowmem_max_new_tokens,
                           attack, mink_k, torch_dtype)
    return run_evaluation(module, datamodule, accelerator, devices, strategy)
