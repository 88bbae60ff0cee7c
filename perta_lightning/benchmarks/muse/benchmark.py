"""MUSE (Shi et al. 2024) as a :class:`~perta_lightning.benchmarks.base.Benchmark`: the unlearning of a text corpus,
judged by verbatim and knowledge memorisation, privacy leakage and the knowledge kept.

One seed's corpora: θ_full is trained on the forget corpus and both retain corpora, θ_retain on the retain
corpora only; unlearning (the baselines' retain term, the retain importance) sees ``raw/retain1``, MUSE's
calibration corpus, and KnowMem on D_r asks about ``raw/retain2``. MUSE has one forget corpus, reported under
``forget/``. The comparison axes are the forget score and KnowMem on D_r
(:mod:`perta_lightning.benchmarks.muse.summary`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from perta_lightning.benchmarks.base import Axes, Benchmark, Evaluation, SplitPlan
from perta_lightning.benchmarks.muse.source import MuseSource
from perta_lightning.benchmarks.muse.splits import PRETRAIN_BACKGROUND
from perta_lightning.errors import PertaValueError

FORGET, RETAIN, RETAINED = "raw/forget", "raw/retain1", ("raw/retain1", "raw/retain2")
#: The key of MUSE's table of its four metrics in a study's ``test`` result (``study.json``).
TABLE = "muse"


@dataclass(frozen=True)
class MuseEvaluation(Evaluation):
    """MUSE's evaluation of the models of a run (:class:`~perta_lightning.benchmarks.muse.evaluator.MuseEvaluator`)."""

    verbmem_max_new_tokens: int
    knowmem_max_new_tokens: int
    text_max_length: int
    use_icl: bool
    answer_cue: str
    batch_size: int = 32

    verb = "MUSE-evaluate"

    def settings(self) -> dict[str, Any]:
        from perta_lightning.benchmarks.muse.evaluator import KNOWMEM_STOP, TEXT_FORMAT

        return {"benchmark": "muse", "verbmem_max_new_tokens": self.verbmem_max_new_tokens,
                "knowmem_max_new_tokens": self.knowmem_max_new_tokens, "batch_size": self.batch_size,
                "text_max_length": self.text_max_length, "use_icl": self.use_icl, "knowmem_stop": list(KNOWMEM_STOP),
                "answer_cue": self.answer_cue, "text": TEXT_FORMAT}

    def run(self, model_dir: str, source: Any, output_json: str, retain_result: str | None, accelerator: str,
            devices: int, torch_dtype: str) -> dict[str, Any]:
        from perta_lightning.benchmarks.muse.evaluator import evaluate_muse_model

        return evaluate_muse_model(model_dir, source, output_json=output_json, retain_result=retain_result,
                                   batch_size=self.batch_size, verbmem_max_new_tokens=self.verbmem_max_new_tokens,
                                   knowmem_max_new_tokens=self.knowmem_max_new_tokens, torch_dtype=torch_dtype,
                                   accelerator=accelerator, devices=devices, text_max_length=self.text_max_length,
                                   use_icl=self.use_icl, answer_cue=self.answer_cue)

    def command(self, model_dir: str, source: Any, output_json: str, retain_result: str | None,
                torch_dtype: str) -> dict[str, Any]:
        return {
            "model": {"class_path": "perta_lightning.benchmarks.muse.evaluator.MuseEvaluator",
                      "init_args": {"model": model_dir, "output_json": output_json, "retain_result": retain_result,
                                    "verbmem_max_new_tokens": self.verbmem_max_new_tokens,
                                    "knowmem_max_new_tokens": self.knowmem_max_new_tokens, "torch_dtype": torch_dtype}},
            "data": {"class_path": "perta_lightning.benchmarks.muse.evaluation.MuseEvalDataModule",
                     "init_args": {"source": asdict(source), "batch_size": self.batch_size,
                                   "text_max_length": self.text_max_length, "use_icl": self.use_icl,
                                   "answer_cue": self.answer_cue}},
        }


class MuseBenchmark(Benchmark):
    """MUSE: see the module docstring."""

    name = "muse"
    axes = Axes("forget_score", "forget score", "F", "knowmem_retain", "KnowMem on D_r", "KnowMem_r",
                "the synthetic MUSE news corpus")
    #: 1 is the retain model's; the synthetic demo's θ_full starts near 0.5, and its unlearned models collapse
    #: before they come down to 1
    default_levels = (0.6, 0.7, 0.8, 0.9)
    source_option = "muse_source"
    data_command = "muse-synthetic"
    report_columns = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "mia_auc")
    markdown_columns = report_columns[:-1]
    column_names = {"forget_score": "forget score", "verbmem_forget": "VerbMem_f", "knowmem_forget": "KnowMem_f",
                    "knowmem_retain": "KnowMem_r", "privleak": "PrivLeak"}
    title_note = " (MUSE)"
    report_intro = (
        "VerbMem_f: ROUGE of greedy continuations of forget excerpts; KnowMem_f / KnowMem_r: ROUGE of answers to "
        "questions about the forget / retain corpus; PrivLeak: relative MIA AUC gap to θ_retain in percent "
        "(about −100: not unlearned, 0: as θ_retain). Forget score: 1 − the larger excess of VerbMem_f and "
        "KnowMem_f over θ_retain's (1: down to θ_retain on both). *collapsed*: KnowMem_r below half the target's.")
    diagnostic_columns = ("forget_score", "knowmem_retain", "verbmem_forget")
    claim4_note = "MUSE has one forget corpus; the three forget proportions are TOFU's"

    # ---- data

    def forget_splits(self, given: list[str] | None) -> list[str]:
        if given:
            raise PertaValueError("benchmark: muse takes no forget_splits= (MUSE has one forget corpus)")
        return ["forget"]

    def split_plan(self, forget_split: str, preset: Any) -> SplitPlan:
        # as MUSE's target and retain models, θ_full and θ_retain are fine-tuned on the MUSE corpora alone (no
        # replay: the background corpus θ0 learnt the articles' language from holds no fact evaluated)
        return SplitPlan(name=forget_split, pretrain=(PRETRAIN_BACKGROUND,), full=(FORGET, *RETAINED), retain=RETAINED,
                         replay=(), forget=FORGET, retain_for_unlearning=RETAIN, max_length=preset.context_length)

    def synthetic_data(self, preset: Any, seed: int) -> Any:
        """``num_articles`` forget articles, as many in each retain corpus and in the holdout corpus."""
        from perta_lightning.benchmarks.muse.synthetic import MuseSyntheticSpec

        return MuseSyntheticSpec(num_articles=preset.num_articles, num_retain_articles=preset.num_articles,
                                 num_holdout_articles=preset.num_articles,
                                 num_background_articles=preset.num_background_articles, seed=seed)

    def write_synthetic(self, spec: Any, output: Path, vocab_size: int) -> None:
        from perta_lightning.benchmarks.muse.synthetic import write_muse_benchmark

        write_muse_benchmark(spec, str(output), True, vocab_size)

    def synthetic_settings(self) -> dict[str, Any]:
        return {"benchmark": "muse"}

    def describe_data(self) -> str:
        return "write the synthetic MUSE corpus and train its tokenizer"

    def data_function(self) -> Callable[..., Any]:
        from perta_lightning.benchmarks.muse.synthetic import muse_synthetic

        return muse_synthetic

    def source_at(self, path: Path, files: dict[str, str] | None = None) -> MuseSource:
        return MuseSource(path=str(path), files=files or None)

    def check_run(self, source: Any, base_model: str | None) -> None:
        if source is not None and base_model is None:
            raise PertaValueError(
                "muse_source: a MUSE corpus other than the synthetic one needs base_model= (a pretrained θ0): only "
                "the synthetic corpus has the background articles to pre-train on")

    # ---- evaluation

    def evaluation(self, plan: SplitPlan, preset: Any, pretrained: bool) -> MuseEvaluation:
        # MUSE asks its questions after few-shot examples and a cue with a trailing space, for pretrained models (a
        # base_model θ0, on the synthetic corpus as on a real one: a SmolLM2 θ0 is asked as MUSE asks); a model
        # trained from scratch on the synthetic corpus learnt the question format from its fact boxes, where
        # the space is part of the answer's first token: shots about other articles and the bare space only derail
        # it (KnowMem on D_r of a synthetic demo θ_full, 40 questions: 0.56 as asked here, 0.20 with the shots,
        # 0.05 with MUSE's cue)
        from perta_lightning.benchmarks.muse.evaluation import ANSWER_CUE

        return MuseEvaluation(preset.eval_max_new_tokens, preset.knowmem_max_new_tokens, preset.context_length,
                              use_icl=pretrained, answer_cue=ANSWER_CUE if pretrained else ANSWER_CUE.rstrip())

    def is_evaluation(self, path: str | Path) -> bool:
        from perta_lightning.benchmarks.muse.summary import is_muse_evaluation

        return is_muse_evaluation(path)

    def summarize(self, eval_file: str | Path, reference_file: str | Path) -> dict[str, Any]:
        from perta_lightning.benchmarks.muse.summary import summarize_muse

        return summarize_muse(eval_file, reference_file)

    # ---- attacks on forgetting

    #: PrivLeak is near 0 for a model that forgot as well as θ_retain: its recovery reads the same as the others'.
    recovery_metrics = ("verbmem_forget", "knowmem_forget", "privleak")

    def forget_metrics(self, eval_file: str | Path, reference_file: str | Path,
                       examples: list[int] | None = None) -> dict[str, float | None]:
        """VerbMem and KnowMem on the forget corpus and PrivLeak, from the summary; on every example only (MUSE's
        relearning attack, which would measure on held-out articles, is not built: :meth:`relearn_split`)."""
        if examples is not None:
            raise NotImplementedError("MUSE's forget metrics on some articles alone are not built")
        summary = self.summarize(eval_file, reference_file)
        return {key: summary.get(key) for key in self.recovery_metrics}

    # ---- reports

    def report_row(self, summary: dict[str, Any], eval_file: Path) -> dict[str, Any]:
        return {key: summary[key] for key in self.report_columns if key in summary}

    def checked_columns(self) -> tuple[str, ...]:
        return ("forget_score", "knowmem_retain", "verbmem_forget", "knowmem_forget")

    def study_tables(self, rows: dict[int, list[dict[str, Any]]], families: dict[str, str],
                     levels: list[float]) -> dict[str, Any]:
        from perta_lightning.benchmarks.muse.summary import muse_table

        return {TABLE: muse_table(rows, families, levels, self.axes)}

    def study_markdown(self, test: dict[str, Any], split: str, levels: list[float], seeds: int) -> list[str]:
        from perta_lightning.benchmarks.muse.summary import muse_table_markdown

        if split not in test.get(TABLE, {}):
            return []
        return [f"### {split}: MUSE's metrics", "",
                "Means over the test seeds of each model's VerbMem and KnowMem (ROUGE-L F1) and PrivLeak (%); TV "
                "and PerTA by the model the matched comparison chose at each level.", ""] + \
            muse_table_markdown(test[TABLE][split], levels, seeds) + [""]
