"""Reading TOFU evaluation files and summarising them: Forget Quality, Model Utility and the 12 sub-scores.

Three layouts are read, recognised by their top-level keys:

* ours (``"format": "perta-tofu-eval/1"``), written by :class:`perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator`;
* the original TOFU ``eval_log_aggregated.json`` (keys ``eval_log.json``, ``eval_log_forget.json``,
  ``eval_real_author_wo_options.json``, ``eval_real_world_wo_options.json``), from per-example values;
* open-unlearning's ``TOFU_EVAL.json`` (``forget_truth_ratio`` with per-example ``score = 1/R``, other
  sub-scores from ``agg_value``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perta_lightning.benchmarks.tofu.sets import EVAL_SETS, SCORE_KEYS, UTILITY_KEYS
from perta_lightning.errors import PertaFileNotFoundError, PertaValueError
from perta_lightning.functional import tofu_metrics as F

FORMAT = "perta-tofu-eval/1"

#: TOFU log key of each scored set: ``{"eval_log_forget.json": spec, ...}``.
_TOFU_LOGS = {spec.tofu_log_key: spec for spec in EVAL_SETS if spec.tofu_log_key is not None}
#: open-unlearning's name of each of our sub-scores: ``{"forget_probability": "forget_Q_A_Prob", ...}``.
_OPEN_UNLEARNING_KEYS = {ours: theirs for spec in EVAL_SETS if spec.open_unlearning_keys
                         for ours, theirs in zip(spec.score_keys, spec.open_unlearning_keys)}


@dataclass
class EvaluationRecord:
    """What a summary needs from one evaluation file.

    Attributes:
        path: the file.
        sub_scores: ``{"<set>_<probability|rouge|truth_ratio>": value}`` for the sets the file has.
        forget_truth_ratios: per-example ``R`` on the forget set (TOFU convention), in example order.
        forget_questions: the forget questions (or prompts containing them) when the file has them.
        mia_auc: Min-K% MIA AUC on forget vs holdout, when the file has it.
    """

    path: str
    sub_scores: dict[str, float]
    forget_truth_ratios: torch.Tensor
    forget_questions: list[str] | None = None
    mia_auc: float | None = None


def _require(mapping: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise PertaValueError(f"{where}: missing key {key!r}")
    return mapping[key]


def _values(mapping: dict[str, Any], key: str, where: str) -> list[Any]:
    """Per-example values of a TOFU log column, ordered by the integer example index."""
    column = _require(mapping, key, where)
    if isinstance(column, list):
        return column
    return [column[k] for k in sorted(column, key=int)]


def _tofu_record(data: dict[str, Any], path: str) -> EvaluationRecord:
    scores: dict[str, float] = {}
    ratios = None
    questions = None
    for file_key, spec in _TOFU_LOGS.items():
        log = _require(data, file_key, path)
        where = f"{path}[{file_key!r}]"
        answer_nll = torch.tensor(_values(log, "avg_gt_loss", where), dtype=torch.float64)
        perturbed = torch.tensor(_values(log, "average_perturb_loss", where), dtype=torch.float64)
        # TOFU logs the truth ratio's correct answer as "paraphrased" on every set (the answer itself on
        # real authors / world facts)
        correct = torch.tensor(_values(log, "avg_paraphrased_loss", where), dtype=torch.float64)
        ratio = F.truth_ratio(correct, perturbed)
        if spec.normalised_probability:
            scores[f"{spec.name}_probability"] = F.probability_with_options(answer_nll, perturbed).mean().item()
        else:
            scores[f"{spec.name}_probability"] = F.answer_probability(answer_nll).mean().item()
        scores[f"{spec.name}_rouge"] = sum(_values(log, "rougeL_recall", where)) / answer_nll.numel()
        scores[f"{spec.name}_truth_ratio"] = F.truth_ratio_score(ratio, spec.truth_ratio_closer_to_one)
        if spec.name == "forget":
            ratios = ratio
            if "generated_text" in log:
                questions = [str(entry[0]) for entry in _values(log, "generated_text", where)]
    return EvaluationRecord(path, scores, ratios, questions)


def _open_unlearning_record(data: dict[str, Any], path: str) -> EvaluationRecord:
    scores = {}
    for ours, theirs in _OPEN_UNLEARNING_KEYS.items():
        if theirs in data:
            scores[ours] = float(_require(data[theirs], "agg_value", f"{path}[{theirs!r}]"))
    by_index = _require(data["forget_truth_ratio"], "value_by_index", f"{path}['forget_truth_ratio']")
    inverse = [float(by_index[k]["score"]) for k in sorted(by_index, key=int)]
    ratios = 1.0 / torch.tensor(inverse, dtype=torch.float64)  # open-unlearning stores 1/R
    questions = None
    rouge = data.get("forget_Q_A_ROUGE", {}).get("value_by_index")
    if rouge and all("input" in rouge[k] for k in rouge):
        questions = [str(rouge[k]["input"]) for k in sorted(rouge, key=int)]
    mia = data.get("mia_min_k", {}).get("agg_value")
    return EvaluationRecord(path, scores, ratios, questions, None if mia is None else float(mia))


def _our_record(data: dict[str, Any], path: str) -> EvaluationRecord:
    aggregates = _require(data, "aggregates", path)
    forget = _require(_require(data, "examples", path), "forget", f"{path}['examples']")
    where = f"{path}['examples']['forget']"
    scores = {key: float(aggregates[key]) for key in SCORE_KEYS if aggregates.get(key) is not None}
    # a truth ratio that was NaN is written as null
    ratios = torch.tensor([math.nan if r is None else r for r in _require(forget, "truth_ratio", where)],
                          dtype=torch.float64)
    return EvaluationRecord(path, scores, ratios, list(_require(forget, "question", where)), aggregates.get("mia_min_k_auc"))


def load_evaluation(path: str | Path) -> EvaluationRecord:
    """Read one evaluation file in any of the three layouts (see the module docstring)."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PertaFileNotFoundError(f"evaluation file not found: {path}") from None
    except IsADirectoryError:
        raise PertaValueError(f"{path}: is a folder, not an evaluation file") from None
    except UnicodeDecodeError as error:
        raise PertaValueError(f"{path}: not a UTF-8 text file ({error})") from None
    if not text.strip():
        raise PertaValueError(f"{path}: the evaluation file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PertaValueError(f"{path}: not valid JSON, truncated or damaged? ({error})") from None
    if not isinstance(data, dict):
        raise PertaValueError(f"{path}: expected a JSON object at the top level")
    try:
        return _record(data, path)
    except (TypeError, ValueError, AttributeError) as error:
        if isinstance(error, PertaValueError):
            raise
        raise PertaValueError(f"{path}: malformed evaluation file ({type(error).__name__}: {error})") from None


def _record(data: dict[str, Any], path: str) -> EvaluationRecord:
    if data.get("format") == FORMAT:
        return _our_record(data, path)
    if "eval_log_forget.json" in data:
        return _tofu_record(data, path)
    if "forget_truth_ratio" in data:
        return _open_unlearning_record(data, path)
    raise PertaValueError(
        f"{path}: unknown evaluation layout; expected 'format': {FORMAT!r}, a TOFU eval_log_aggregated.json "
        f"(key 'eval_log_forget.json') or an open-unlearning TOFU_EVAL.json (key 'forget_truth_ratio')"
    )


def check_same_forget_set(
    questions: list[str] | None, count: int, reference: EvaluationRecord, where: str = "the evaluated model"
) -> None:
    """Raise when the retain reference was evaluated on another forget set (count or questions differ).

    Questions are compared by containment, so a bare question matches a templated prompt holding it.
    """
    if reference.forget_truth_ratios.numel() != count:
        raise PertaValueError(
            f"retain reference {reference.path}: its forget set has {reference.forget_truth_ratios.numel()} "
            f"examples but {where} has {count}; evaluate both on the same forget split"
        )
    if questions is None or reference.forget_questions is None:
        return
    for index, (ours, theirs) in enumerate(zip(questions, reference.forget_questions)):
        if ours not in theirs and theirs not in ours:
            raise PertaValueError(
                f"retain reference {reference.path}: forget example {index} is {theirs!r} there but {ours!r} in "
                f"{where}; evaluate both on the same forget split"
            )


def forget_quality_or_note(
    ratios: torch.Tensor, where: str, retain_ratios: torch.Tensor, retain_where: str
) -> tuple[float | None, float | None, str | None]:
    """``(Forget Quality, KS statistic, None)``, or ``(None, None, why)`` when a truth ratio is NaN.

    The KS test of samples holding NaN has no meaning (scipy returns NaN), and NaN is not valid JSON.
    """
    for values, name in ((ratios, where), (retain_ratios, retain_where)):
        bad = torch.isnan(values.double()).nonzero().flatten().tolist()
        if bad:
            return None, None, (f"forget_quality is null: {len(bad)} forget truth ratios of {name} are NaN "
                                f"(examples {bad[:10]}{' ...' if len(bad) > 10 else ''})")
    quality, statistic = F.forget_quality(ratios, retain_ratios)
    return quality, statistic, None


def summarize(ckpt_result: str | Path, retain_result: str | Path) -> dict[str, Any]:
    """Forget Quality (KS p-value against the retain model), Model Utility and the 12 sub-scores.

    A score that cannot be computed (a sub-score missing from the file, NaN truth ratios or scores) is
    ``None`` and the list ``notes`` says why. (``perta summarize`` reads a MUSE file with MUSE's summary:
    :func:`perta_lightning.benchmarks.registry.summarize`.)
    """
    ckpt, retain = load_evaluation(ckpt_result), load_evaluation(retain_result)
    check_same_forget_set(ckpt.forget_questions, ckpt.forget_truth_ratios.numel(), retain, str(ckpt.path))
    quality, statistic, note = forget_quality_or_note(ckpt.forget_truth_ratios, ckpt.path,
                                                      retain.forget_truth_ratios, retain.path)
    notes = [note] if note else []
    utility = [ckpt.sub_scores.get(key) for key in UTILITY_KEYS]
    summary: dict[str, Any] = {"forget_quality": quality, "ks_statistic": statistic, "model_utility": None}
    if all(value is not None and value == value for value in utility):
        summary["model_utility"] = F.harmonic_mean(utility)
    else:
        notes.append("model_utility is null: " + ", ".join(
            f"{key} is {'missing' if value is None else 'NaN'}" for key, value in zip(UTILITY_KEYS, utility)
            if value is None or value != value))
    for key in SCORE_KEYS:
        summary[key] = ckpt.sub_scores.get(key)
    if ckpt.mia_auc is not None and retain.mia_auc is not None:
        summary["mia_min_k_auc"] = ckpt.mia_auc
        summary["privleak"] = F.privleak(ckpt.mia_auc, retain.mia_auc)
    for key, value in summary.items():
        if isinstance(value, float) and value != value:
            summary[key] = None
            notes.append(f"{key} is null: NaN in {ckpt.path}")
    summary["notes"] = notes
    return summary


#: The forget metrics an attack's recovery is measured on: Forget Quality, forget probability and forget ROUGE.
RECOVERY_KEYS = ("forget_quality", "forget_probability", "forget_rouge")


def _forget_examples_by_index(path: str | Path) -> dict[str, dict[int, Any]]:
    """Per column of our file's forget set, example index → value (``truth_ratio``, ``probability``, ...)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        forget = data["examples"]["forget"]
        return {column: dict(zip(forget["index"], values)) for column, values in forget.items() if column != "index"}
    except FileNotFoundError:
        raise PertaFileNotFoundError(f"evaluation file not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PertaValueError(f"{path}: not an evaluation file of ours with per-example forget values ({error})") \
            from None


def forget_metrics(eval_file: str | Path, reference_file: str | Path,
                   examples: list[int] | None = None) -> dict[str, float | None]:
    """Forget Quality, forget probability and forget ROUGE of ``eval_file`` (against ``reference_file``, the retain
    model's, for Forget Quality), on every forget example or on ``examples`` alone (indices of the forget set).

    On every example they are the :func:`summarize` values; on a subset, the same formulas over its per-example
    values: Forget Quality the KS test of the subset's truth ratios against the retain model's on the same examples,
    the others the subset's means. ``None`` where a value cannot be computed (no ROUGE in a screening's file)."""
    if examples is None:
        summary = summarize(eval_file, reference_file)
        return {key: summary.get(key) for key in RECOVERY_KEYS}
    ours, theirs = _forget_examples_by_index(eval_file), _forget_examples_by_index(reference_file)
    keep = sorted(set(examples))
    for path, columns in ((eval_file, ours), (reference_file, theirs)):
        absent = [i for i in keep if i not in columns["truth_ratio"]]
        if absent:
            raise PertaValueError(f"{path}: forget examples {absent[:10]} are not in the file")

    def column(values: dict[int, Any]) -> torch.Tensor:
        return torch.tensor([math.nan if values[i] is None else values[i] for i in keep], dtype=torch.float64)

    quality, _, _ = forget_quality_or_note(column(ours["truth_ratio"]), str(eval_file),
                                           column(theirs["truth_ratio"]), str(reference_file))
    out: dict[str, float | None] = {"forget_quality": quality}
    for key, name in (("forget_probability", "probability"), ("forget_rouge", "rouge_l_recall")):
        values = column(ours[name]) if name in ours else None
        out[key] = None if values is None or bool(values.isnan().any()) else values.mean().item()
    return out
