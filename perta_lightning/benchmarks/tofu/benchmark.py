"""TOFU (Maini et al. 2024) as a :class:`~perta_lightning.benchmarks.base.Benchmark`: fictitious authors, forget
splits of 1, 5 and 10 % of them, Forget Quality against the retain model and Model Utility.

A forget split ``forget01`` / ``forget05`` / ``forget10`` has its retain split ``retain99`` / ``retain95`` /
``retain90`` (:func:`retain_split_for`, the one place the naming rule lives), its perturbed evaluation set
``<forget>_perturbed`` and its holdout set ``holdout01`` / ``holdout05`` / ``holdout10``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from perta_lightning.benchmarks.base import Axes, Benchmark, Evaluation, RelearnSplit, SplitPlan
from perta_lightning.benchmarks.tofu.source import TofuSource
from perta_lightning.benchmarks.tofu.synthetic import SyntheticSpec
from perta_lightning.errors import PertaValueError

#: Authors in TOFU's own data; a forget split holds 1, 5 or 10 % of them.
TOFU_AUTHORS = 200

#: Each forget split and the retain split of the authors it leaves.
RETAIN_SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


def retain_split_for(forget_split: str) -> str:
    """TOFU's retain split of a forget split: forget01 → retain99, forget05 → retain95, forget10 → retain90."""
    if forget_split not in RETAIN_SPLITS:
        raise PertaValueError(f"forget_split must be one of {sorted(RETAIN_SPLITS)}, got {forget_split!r}")
    return RETAIN_SPLITS[forget_split]


def holdout_split_for(forget_split: str) -> str:
    """The holdout set of a forget split's membership-inference test: forget10 → holdout10."""
    return forget_split.replace("forget", "holdout")


@dataclass(frozen=True)
class TofuEvaluation(Evaluation):
    """TOFU's evaluation of the models of one forget split (:class:`~perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator`)."""

    forget_split: str
    max_new_tokens: int
    batch_size: int = 32

    def settings(self) -> dict[str, Any]:
        return {"forget": self.forget_split, "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size}

    def run(self, model_dir: str, source: Any, output_json: str, retain_result: str | None, accelerator: str,
            devices: int, torch_dtype: str) -> dict[str, Any]:
        from perta_lightning.benchmarks.tofu.evaluator import evaluate_model

        return evaluate_model(model_dir, source, forget_split=f"{self.forget_split}_perturbed",
                              holdout_split=holdout_split_for(self.forget_split), output_json=output_json,
                              retain_result=retain_result, max_new_tokens=self.max_new_tokens,
                              batch_size=self.batch_size, accelerator=accelerator, devices=devices,
                              torch_dtype=torch_dtype)

    def command(self, model_dir: str, source: Any, output_json: str, retain_result: str | None,
                torch_dtype: str) -> dict[str, Any]:
        return {
            "model": {"class_path": "perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator",
                      "init_args": {"model": model_dir, "output_json": output_json, "retain_result": retain_result,
                                    "max_new_tokens": self.max_new_tokens, "torch_dtype": torch_dtype}},
            "data": {"class_path": "perta_lightning.benchmarks.tofu.evaluation.TofuEvalDataModule",
                     "init_args": {"source": asdict(source), "forget_split": f"{self.forget_split}_perturbed",
                                   "holdout_split": holdout_split_for(self.forget_split),
                                   "batch_size": self.batch_size}},
        }


#: the data module's options of the sets a screening leaves out (each given as ``None``: the set is skipped).
SCREEN_LEFT_OUT = ("retain_split", "real_authors_split", "world_facts_split", "holdout_split")


@dataclass(frozen=True)
class TofuScreening(Evaluation):
    """TOFU's screening of one forget split's models: the forget set alone, every answer, paraphrase and perturbed
    answer scored, nothing generated. Forget Quality needs only the forget set's truth ratios, so its value is the
    full evaluation's (:class:`TofuEvaluation`, whose ``batch_size`` it must share so that the forget set's batches,
    and hence its NLLs, are the same); the file has no ROUGE, no other set and no Model Utility."""

    verb = "screen"
    work_key = "screens"
    forget_split: str
    batch_size: int = 32

    def settings(self) -> dict[str, Any]:
        return {"forget": self.forget_split, "sets": ["forget"], "generate": False, "batch_size": self.batch_size}

    def run(self, model_dir: str, source: Any, output_json: str, retain_result: str | None, accelerator: str,
            devices: int, torch_dtype: str) -> dict[str, Any]:
        from perta_lightning.benchmarks.tofu.evaluator import evaluate_model

        return evaluate_model(model_dir, source, forget_split=f"{self.forget_split}_perturbed", output_json=output_json,
                              retain_result=retain_result, batch_size=self.batch_size, generate=False,
                              accelerator=accelerator, devices=devices, torch_dtype=torch_dtype, **dict.fromkeys(SCREEN_LEFT_OUT))

    def command(self, model_dir: str, source: Any, output_json: str, retain_result: str | None,
                torch_dtype: str) -> dict[str, Any]:
        return {
            "model": {"class_path": "perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator",
                      "init_args": {"model": model_dir, "output_json": output_json, "retain_result": retain_result,
                                    "generate": False, "torch_dtype": torch_dtype}},
            "data": {"class_path": "perta_lightning.benchmarks.tofu.evaluation.TofuEvalDataModule",
                     "init_args": {"source": asdict(source), "forget_split": f"{self.forget_split}_perturbed",
                                   "batch_size": self.batch_size, **dict.fromkeys(SCREEN_LEFT_OUT)}},
        }


class TofuBenchmark(Benchmark):
    """TOFU: see the module docstring."""

    name = "tofu"
    axes = Axes("forget_quality", "Forget Quality", "FQ", "model_utility", "Model Utility", "MU",
                "the synthetic benchmark")
    default_levels = (0.01, 0.05, 0.1, 0.3)
    source_option = "source"
    launches_stages = True
    data_command = "synthetic"
    report_columns = ("forget_rouge", "forget_truth_ratio", "extraction_strength", "retain_rouge")
    report_intro = (
        "Forget Quality is the KS-test p-value of forget truth ratios against θ_retain (higher: closer to a model "
        "that never saw the forget set). Model Utility is the harmonic mean of 9 retain / real-authors / "
        "world-facts scores. *collapsed*: Model Utility below half of the target's.")
    diagnostic_columns = ("forget_quality", "model_utility", "forget_rouge")
    #: the sets that are not about the synthetic authors: a pretrained θ0 is scored on TOFU's own
    eval_file_splits = ("real_authors_perturbed", "world_facts_perturbed")

    # ---- data

    def forget_splits(self, given: list[str] | None) -> list[str]:
        splits = list(given or ["forget10"])
        for split in splits:
            retain_split_for(split)
        return splits

    def split_plan(self, forget_split: str, preset: Any) -> SplitPlan:
        retain = retain_split_for(forget_split)
        return SplitPlan(name=forget_split, pretrain=("world_corpus",), full=("full",), retain=(retain,),
                         replay=("world_corpus",), forget=forget_split, retain_for_unlearning=retain)

    def synthetic_data(self, preset: Any, seed: int) -> SyntheticSpec:
        return SyntheticSpec(preset.num_authors, seed, preset.num_background_authors, preset.num_world_items,
                             attribute_values=preset.attribute_values)

    def write_synthetic(self, spec: SyntheticSpec, output: Path, vocab_size: int) -> None:
        from perta_lightning.benchmarks.tofu.synthetic import write_benchmark

        write_benchmark(spec, str(output), True, vocab_size)

    def data_function(self) -> Callable[..., Any]:
        from perta_lightning.benchmarks.tofu.synthetic import synthetic

        return synthetic

    def source_at(self, path: Path, files: dict[str, str] | None = None) -> TofuSource:
        return TofuSource(path=str(path), files=files or None)

    # ---- evaluation

    def evaluation(self, plan: SplitPlan, preset: Any, pretrained: bool) -> TofuEvaluation:
        return TofuEvaluation(plan.name, preset.eval_max_new_tokens)

    def screening(self, plan: SplitPlan, preset: Any, pretrained: bool) -> TofuScreening:
        """Forget Quality from the forget set's truth ratios alone (:class:`TofuScreening`)."""
        return TofuScreening(plan.name, self.evaluation(plan, preset, pretrained).batch_size)

    def is_evaluation(self, path: str | Path) -> bool:
        from perta_lightning.benchmarks.tofu.summary import FORMAT

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and (data.get("format") == FORMAT or "eval_log_forget.json" in data
                                           or "forget_truth_ratio" in data)

    def summarize(self, eval_file: str | Path, reference_file: str | Path) -> dict[str, Any]:
        from perta_lightning.benchmarks.tofu.summary import summarize

        return summarize(eval_file, reference_file)

    # ---- attacks on forgetting

    recovery_metrics = ("forget_quality", "forget_probability", "forget_rouge")
    recovery_log_metrics = ("forget_quality",)  # a p-value, matched at levels decades apart

    def forget_metrics(self, eval_file: str | Path, reference_file: str | Path,
                       examples: list[int] | None = None) -> dict[str, float | None]:
        from perta_lightning.benchmarks.tofu.summary import forget_metrics

        return forget_metrics(eval_file, reference_file, examples)

    def forget_groups(self, plan: SplitPlan, preset: Any, synthetic: bool) -> int:
        """The forget split's authors: its share (1, 5 or 10 %) of the preset's authors, or of TOFU's 200."""
        share = int(plan.forget.removeprefix("forget"))
        return max(1, round((preset.num_authors if synthetic else TOFU_AUTHORS) * share / 100))

    def relearn_split(self, plan: SplitPlan, source: Any, groups: int) -> RelearnSplit | None:
        """The first half of the forget split's authors to relearn on, the rest held out. TOFU lists an author's
        questions together, each author with as many (20 in TOFU, 10 in the synthetic data), so author ``k`` is the
        ``k``-th block of rows; the held-out indices are those of the perturbed forget set whose question is not
        in the relearned half (the two sets hold the same questions in the same order)."""
        from perta_lightning.benchmarks.tofu.source import load_split

        if groups < 2:
            return None
        rows = load_split(source, plan.forget)
        evaluated = load_split(source, f"{plan.forget}_perturbed")
        if len(rows) % groups:
            raise PertaValueError(f"{source.describe(plan.forget)}: {len(rows)} rows do not split into {groups} "
                                  "authors of equally many questions")
        per_author, relearned = len(rows) // groups, groups // 2
        relearn_rows = rows[: relearned * per_author]
        questions = {row["question"] for row in relearn_rows}
        heldout = [index for index, row in enumerate(evaluated) if row["question"] not in questions]
        if len(heldout) != len(evaluated) - len(relearn_rows):
            raise PertaValueError(f"{source.describe(f'{plan.forget}_perturbed')}: its questions are not those of "
                                  f"{plan.forget}; the relearning attack cannot tell which are held out")
        return RelearnSplit([{"question": r["question"], "answer": r["answer"]} for r in relearn_rows], heldout,
                            (relearned, groups - relearned))

    # ---- reports

    def report_row(self, summary: dict[str, Any], eval_file: Path) -> dict[str, Any]:
        aggregates = json.loads(Path(eval_file).read_text())["aggregates"]
        return {"forget_rouge": summary["forget_rouge"], "forget_truth_ratio": summary["forget_truth_ratio"],
                "extraction_strength": aggregates.get("forget_extraction_strength"),
                "retain_rouge": summary["retain_rouge"]}

    def checked_columns(self) -> tuple[str, ...]:
        return ("forget_quality", "model_utility", "forget_rouge", "forget_truth_ratio")

    def replication_sections(self, table: dict[str, Any]) -> list[str]:
        """How fine Forget Quality is at the study's levels: the KS p-value's steps of each split."""
        def fmt(value: float | None) -> str:
            return "–" if value is None else f"{value:.3g}"

        lines = ["", "## How fine Forget Quality is", "",
                 "With n forget examples the KS p-value takes n + 1 values; a level is reached only at the value "
                 "above it.", "",
                 "| split | n | " + " | ".join(f"FQ ≥ {level:g}: below → at" for level in table["levels"]) + " |",
                 "|---|---|" + "---|" * len(table["levels"])]
        for split, steps in table["forget_quality_steps"].items():
            cells = [f"{fmt(s['below'])} → {fmt(s['reached_at'])}" for s in steps["levels"]]
            lines.append(f"| {split} | {steps['forget_examples']} | " + " | ".join(cells) + " |")
        return lines
