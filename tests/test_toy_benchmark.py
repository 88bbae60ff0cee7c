"""A third benchmark, defined here in a few lines, runs ``perta pipeline`` end to end through the protocol alone.

:class:`ToyBenchmark` is facts about made-up planets: θ_full learns all of them, θ_retain the retain planets
only, and the forgetting axis is how far a model's answer loss on the forget planets has come up to θ_retain's.
Its evaluation is a plain loop (no Lightning), its data a handful of rows; nothing of TOFU or MUSE is used. The
command names it by its import path (``--benchmark tests.test_toy_benchmark.ToyBenchmark``), as a user names a
benchmark of their own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_lightning.benchmarks.base import Axes, Benchmark, Evaluation, SplitPlan

ROOT = Path(__file__).resolve().parents[1]
FORGET = [("Which colour is Zorb?", "Zorb is green."), ("How many moons has Zorb?", "Zorb has three moons.")]
RETAIN = [("Which colour is Quil?", "Quil is blue."), ("How many moons has Quil?", "Quil has one moon."),
          ("Which colour is Brant?", "Brant is red."), ("How many moons has Brant?", "Brant has two moons.")]
FORMAT = "toy-eval/1"


def rows(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"question": q, "answer": a} for q, a in pairs]


@dataclass(frozen=True)
class ToyEvaluation(Evaluation):
    """Mean answer loss on the forget and on the retain planets."""

    def settings(self) -> dict[str, Any]:
        return {"toy": 1}

    def run(self, model_dir: str, source: Any, output_json: str, retain_result: str | None, accelerator: str,
            devices: int, torch_dtype: str) -> dict[str, Any]:
        import torch

        from perta_lightning.checkpoints import load_causal_lm
        from perta_lightning.data.formatting import PromptFormat, collate_examples
        from perta_lightning.functional.losses import answer_nll
        from perta_lightning.io import atomic_write_text

        model = load_causal_lm(model_dir, None, torch_dtype).eval()
        formatter = PromptFormat().formatter(model_dir)
        result = {"format": FORMAT}
        for split in ("forget", "retain"):
            batch = collate_examples([formatter.encode(r["question"], r["answer"]) for r in source.rows(split)],
                                     formatter.tokenizer.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            result[f"{split}_nll"] = float(answer_nll(logits, batch["labels"]))
        atomic_write_text(output_json, json.dumps(result))
        return result

    def command(self, model_dir: str, source: Any, output_json: str, retain_result: str | None,
                torch_dtype: str) -> dict[str, Any]:
        raise NotImplementedError("the toy evaluation runs in one process")


class ToyBenchmark(Benchmark):
    name = "toy"
    axes = Axes("forgetting", "forgetting", "Fg", "utility", "utility", "U", "made-up planets")
    default_levels = (0.5, 0.9)
    report_columns = ("forget_nll", "retain_nll")

    def forget_splits(self, given: list[str] | None) -> list[str]:
        return ["planets"]

    def split_plan(self, forget_split: str, preset: Any) -> SplitPlan:
        return SplitPlan(name=forget_split, pretrain=("full",), full=("full",), retain=("retain",), replay=(),
                         forget="forget", retain_for_unlearning="retain")

    def synthetic_data(self, preset: Any, seed: int) -> dict[str, int]:
        return {"seed": seed}

    def write_synthetic(self, spec: Any, output: Path, vocab_size: int) -> None:
        from perta_lightning.data.tokenizer import train_tokenizer

        output.mkdir(parents=True, exist_ok=True)
        splits = {"forget": rows(FORGET), "retain": rows(RETAIN), "full": rows(FORGET + RETAIN)}
        for split, content in splits.items():
            (output / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in content))
        texts = [text for content in splits.values() for r in content for text in (r["question"], r["answer"])]
        train_tokenizer(texts, str(output / "tokenizer"), vocab_size=300)

    def source_at(self, path: Path, files: dict[str, str] | None = None) -> Any:
        from perta_lightning.benchmarks.tofu.source import TofuSource

        return TofuSource(path=str(path))  # question/answer rows in <split>.json files

    def evaluation(self, plan: SplitPlan, preset: Any, pretrained: bool) -> Evaluation:
        return ToyEvaluation()

    def is_evaluation(self, path: str | Path) -> bool:
        return json.loads(Path(path).read_text()).get("format") == FORMAT

    def summarize(self, eval_file: str | Path, reference_file: str | Path) -> dict[str, Any]:
        model, retain = (json.loads(Path(f).read_text()) for f in (eval_file, reference_file))
        return {"forgetting": min(1.0, model["forget_nll"] / retain["forget_nll"]),
                "utility": math.exp(-model["retain_nll"]), "forget_nll": model["forget_nll"],
                "retain_nll": model["retain_nll"]}

    def report_row(self, summary: dict[str, Any], eval_file: Path) -> dict[str, Any]:
        return {key: summary[key] for key in self.report_columns}


def test_a_toy_benchmark_runs_the_pipeline_through_the_protocol(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "perta_lightning", "pipeline", "--benchmark",
               "tests.test_toy_benchmark.ToyBenchmark", "--preset", "tiny", "--preset_overrides",
               "{pretrain_epochs: 20, finetune_epochs: 10, reinforce_epochs: 3, importance_examples: 2}",
               "--variants", "[{statistic: fisher}]", "--baselines", "[grad_diff]",
               "--search", "{levels: [0.5, 0.9], initial: [1.0, 4.0], rounds: 1}", "--output", str(out)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "planets" / "report.json").read_text())
    methods = {row["method"] for row in report["rows"]}
    assert {"retain", "target", "grad_diff", "tv", "perta_fisher"} <= methods
    for row in report["rows"]:  # the toy's own axes and columns, read back from its evaluation files
        summary = ToyBenchmark().summarize(out / row["eval_file"], out / "planets" / "eval" / "retain.json")
        assert (row["forgetting"], row["utility"], row["forget_nll"]) == (
            summary["forgetting"], summary["utility"], summary["forget_nll"])
    retain = next(row for row in report["rows"] if row["method"] == "retain")
    assert retain["forgetting"] == 1.0  # the reference of forgetting is where forgetting is complete
    assert set(report["matched"]) >= {"tv", "perta_fisher", "grad_diff"}
    assert len(report["matched"]["tv"]) == 2
    assert (out / "planets" / "report.md").read_text().startswith("# PerTA study report")
    assert json.loads((out / "planets" / "diagnostic.json").read_text())["variants"].keys() == {"perta_fisher"}
