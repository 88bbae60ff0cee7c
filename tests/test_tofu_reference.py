"""Against the real TOFU logs (``../shared/tofu_reference`` or ``$PERTA_TOFU_REFERENCE``); skipped when absent.

The files are read in place and never copied into the repository.
"""

import json
import math
import os
from pathlib import Path

import pytest

from perta_lightning.benchmarks.registry import summarize_main
from perta_lightning.benchmarks.tofu.summary import summarize
from perta_lightning.functional.tofu_metrics import rouge_l_recall

REFERENCE = Path(os.environ.get("PERTA_TOFU_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "tofu_reference"))
FULL = REFERENCE / "llama2-7b_full.eval_log_aggregated.json"
RETAIN = REFERENCE / "llama2-7b_retain90.eval_log_aggregated.json"

pytestmark = pytest.mark.skipif(not FULL.is_file() or not RETAIN.is_file(), reason=f"no TOFU reference logs in {REFERENCE}")

TASKS = {"retain": "eval_log.json", "forget": "eval_log_forget.json",
         "real_authors": "eval_real_author_wo_options.json", "world_facts": "eval_real_world_wo_options.json"}


def _naive_aggregate(log: dict, name: str) -> dict:
    """aggregate_eval_stat.py re-derived with plain Python: prob, ROUGE, clipped truth ratio."""
    keys = list(log["avg_gt_loss"])
    if name in ("retain", "forget"):
        prob = sum(math.exp(-log["avg_gt_loss"][k]) for k in keys) / len(keys)
    else:
        prob = 0.0
        for k in keys:
            true = math.exp(-log["avg_gt_loss"][k])
            prob += true / (true + sum(math.exp(-x) for x in log["average_perturb_loss"][k]))
        prob /= len(keys)
    rouge = sum(log["rougeL_recall"][k] for k in keys) / len(keys)
    ratios = [math.exp(sum(log["average_perturb_loss"][k]) / len(log["average_perturb_loss"][k]) - log["avg_paraphrased_loss"][k])
              for k in keys]
    if name == "forget":
        tr = sum(min(r, 1 / r) for r in ratios) / len(ratios)
    else:
        tr = sum(max(0.0, 1 - 1 / r) for r in ratios) / len(ratios)
    return {"probability": prob, "rouge": rouge, "truth_ratio": tr, "ratios": ratios}


def _naive_ks_pvalue(a: list[float], b: list[float]) -> tuple[float, float]:
    """KS statistic by brute force; p-value from scipy's exact distribution for that statistic."""
    from scipy.stats import ks_2samp

    grid = sorted(a + b)
    stat = max(abs(sum(x <= t for x in a) / len(a) - sum(x <= t for x in b) / len(b)) for t in grid)
    result = ks_2samp(a, b)
    assert result.statistic == pytest.approx(stat)
    return float(result.pvalue), stat


def test_summarize_reproduces_tofu_aggregation(capsys):
    full, retain = json.loads(FULL.read_text()), json.loads(RETAIN.read_text())
    expected = {}
    for name, key in TASKS.items():
        agg = _naive_aggregate(full[key], name)
        for metric in ("probability", "rouge", "truth_ratio"):
            expected[f"{name}_{metric}"] = agg[metric]
    utility = [expected[f"{s}_{m}"] for s in ("retain", "real_authors", "world_facts") for m in ("probability", "rouge", "truth_ratio")]
    expected["model_utility"] = len(utility) / sum(1 / v for v in utility)
    expected["forget_quality"], expected["ks_statistic"] = _naive_ks_pvalue(
        _naive_aggregate(full["eval_log_forget.json"], "forget")["ratios"],
        _naive_aggregate(retain["eval_log_forget.json"], "forget")["ratios"])

    summary = summarize(FULL, RETAIN)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-9), key
    summarize_main(["--ckpt_result", str(FULL), "--retain_result", str(RETAIN)])
    printed = json.loads(capsys.readouterr().out)
    assert printed["forget_quality"] == pytest.approx(summary["forget_quality"], rel=1e-12)
    assert len([k for k in printed if k.endswith(("_probability", "_rouge", "_truth_ratio"))]) == 12


def test_published_leaderboard_values():
    """The TOFU leaderboard (huggingface.co/spaces/locuslab/tofu_leaderboard, row "Finetune Model (WD = 0.01)")
    lists these sub-scores; they are those of the retain90 log (the row's other columns are garbled there)."""
    published = {
        "real_authors_truth_ratio": 0.5706808914420933, "world_facts_rouge": 0.8974358974358975,
        "world_facts_truth_ratio": 0.5441982317366325, "world_facts_probability": 0.4143263304391235,
        "retain_rouge": 0.9758111850816836, "retain_truth_ratio": 0.4709771340245287,
        "forget_rouge": 0.4082436195223163, "forget_truth_ratio": 0.6740192657877031,
    }
    summary = summarize(RETAIN, RETAIN)
    assert summary["forget_quality"] == 1.0
    for key, value in published.items():
        assert summary[key] == pytest.approx(value, rel=1e-12), key


def _rouge_disagreements(log: dict, references: list[str] | None) -> tuple[int, dict[str, tuple[float, float]]]:
    """Number of examples, and ``{key: (ours, logged)}`` for those whose logged rougeL_recall our ROUGE-L
    recall misses by more than ``ROUGE_TOLERANCE``.

    TOFU stores ``generated_text = [prompt, generation, ground truth]`` (``zip(input_strings, gen_outputs,
    ground_truths)`` in its evaluate_util.py)."""
    keys = sorted(log["generated_text"], key=int)
    generations = [log["generated_text"][k][1] for k in keys]
    refs = [log["generated_text"][k][2] for k in keys] if references is None else [references[int(k)] for k in keys]
    ours = [float(a) for a in rouge_l_recall(generations, refs)]
    return len(keys), {k: (a, log["rougeL_recall"][k]) for a, k in zip(ours, keys)
                       if abs(a - log["rougeL_recall"][k]) > ROUGE_TOLERANCE}


def _answers(file: str) -> list[str]:
    return [json.loads(line)["answer"] for line in (REFERENCE / file).read_text().splitlines() if line.strip()]


#: Measured: every example agrees exactly (largest difference 0.0 on all 1,634). The margin allows float
#: rounding only; a tokenisation or LCS change moves a recall by at least 1/len(reference) > 1e-3.
ROUGE_TOLERANCE = 1e-9
#: Examples per evaluation set in both logs: forget10, retain, real authors, world facts.
ROUGE_SET_SIZES = {"forget": 300, "retain": 300, "real_authors": 100, "world_facts": 117}


def test_rouge_agrees_with_logged_values():
    """Our ROUGE-L recall reproduces every logged per-example value of both TOFU runs."""
    for path in (FULL, RETAIN):
        data = json.loads(path.read_text())
        per_set = {
            "forget": _rouge_disagreements(data["eval_log_forget.json"], None),
            "retain": _rouge_disagreements(data["eval_log.json"], None),
            "real_authors": _rouge_disagreements(data["eval_real_author_wo_options.json"],
                                                 _answers("real_authors_perturbed.json")),
            "world_facts": _rouge_disagreements(data["eval_real_world_wo_options.json"],
                                                _answers("world_facts_perturbed.json")),
        }
        assert {name: size for name, (size, _) in per_set.items()} == ROUGE_SET_SIZES, path.name
        assert {name: wrong for name, (_, wrong) in per_set.items() if wrong} == {}, path.name
