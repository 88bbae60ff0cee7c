"""Attacks on forgetting: the recovery formula, the relearning split, quantization against a naive NF4 twin, and the
attacks in a study and through ``perta attack``, as users type them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perta_lightning.benchmarks.base import SplitPlan
from perta_lightning.benchmarks.tofu.benchmark import TofuBenchmark
from perta_lightning.benchmarks.tofu.source import TofuSource, load_split
from perta_lightning.benchmarks.tofu.synthetic import SyntheticSpec
from perta_lightning.functional.replication import FAILS, HOLDS, UNRESOLVED, evidence, robustness_verdict
from perta_lightning.functional.robustness import recoveries, recovery, relearn_recovery
from perta_lightning.stages import stage_seed
from perta_lightning.study.attacks import robustness_table

sys.path.insert(0, str(Path(__file__).parent))
from naive_eval import naive_evaluate  # noqa: E402

from tests.tiny import make_tiny_setup  # noqa: E402

TOFU = TofuBenchmark()


def _needs_quantization() -> None:
    """Skip where the attacks extra is not installed (the minimum-versions job installs the core only)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")


def test_a_quantization_without_its_libraries_is_refused_in_one_line(monkeypatch):
    import importlib.util

    from perta_lightning.errors import PertaValueError
    from perta_lightning.study.options import Attacks

    real = importlib.util.find_spec
    absent = {"bitsandbytes", "accelerate"}  # the two libraries as absent or present as said, whichever this env has

    def find_spec(name, *args):
        if name in ("bitsandbytes", "accelerate"):
            return None if name in absent else object()
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(PertaValueError, match=r"needs bitsandbytes and accelerate: pip install 'perta-lightning\[attacks\]'"):
        Attacks().check()
    absent.discard("bitsandbytes")
    with pytest.raises(PertaValueError, match=r"needs accelerate: pip install"):
        Attacks().check()
    Attacks(quantize=[]).check()  # relearning alone needs neither


# ---- the recovery formula


def test_recovery_hand_cases():
    # ROUGE: the target 0.8, unlearned to 0.2, quantized back to 0.5: half of the forgetting undone
    assert recovery(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert recovery(0.8, 0.2, 0.8) == pytest.approx(1.0)
    assert recovery(0.2, 0.2, 0.8) == 0.0
    assert recovery(0.1, 0.2, 0.8) == pytest.approx(-1 / 6)  # forgot more
    # Forget Quality rises with forgetting: 0.01 (target) → 0.9 (unlearned); an attack to 0.5 undoes 0.4 of 0.89
    assert recovery(0.5, 0.9, 0.01) == pytest.approx(0.4 / 0.89)
    # nothing forgotten: undefined, never a division by zero; missing or NaN values likewise
    assert recovery(0.5, 0.3, 0.3) is None
    assert recovery(0.5, 0.3, 0.3 + 1e-12) is None
    assert recovery(None, 0.2, 0.8) is None and recovery(math.nan, 0.2, 0.8) is None
    # relearning: 0.2 → 0.6 in the unlearned model, 0.1 → 0.3 in θ_retain: (0.4 − 0.2) / (1.0 − 0.2)
    assert relearn_recovery(0.6, 0.2, 1.0, 0.3, 0.1) == pytest.approx(0.25)
    # θ_retain attacked is its own reference: 0 whatever the attack
    assert relearn_recovery(0.37, 0.1, 1.0, 0.37, 0.1) == 0.0
    assert relearn_recovery(0.6, 0.2, 0.2, 0.3, 0.1) is None


def test_recoveries_mean_over_the_defined_metrics():
    out = recoveries({"a": 0.5, "b": 0.3, "c": 1.0}, {"a": 0.2, "b": 0.3, "c": 0.0}, {"a": 0.8, "b": 0.3, "c": 2.0})
    assert out == {"a": pytest.approx(0.5), "b": None, "c": pytest.approx(0.5), "mean": pytest.approx(0.5)}
    assert recoveries({"a": 1.0}, {"a": 0.0}, {"a": 0.0})["mean"] is None


def test_a_p_value_is_compared_in_decades():
    # Forget Quality 1e-5 (target) → 1e-3 (unlearned), attacked to 1e-4: one decade of two undone
    out = recoveries({"fq": 1e-4, "rouge": 0.5}, {"fq": 1e-3, "rouge": 0.2}, {"fq": 1e-5, "rouge": 0.8},
                     log_keys=("fq",))
    assert out["fq"] == pytest.approx(0.5) and out["rouge"] == pytest.approx(0.5)
    # linear, the same attack reads as a tenth: the step from 1e-5 to 1e-4 is small beside 1e-3
    assert recovery(1e-4, 1e-3, 1e-5) == pytest.approx(0.9e-3 / 0.99e-3)
    relearned = recoveries({"fq": 0.01}, {"fq": 0.1}, {"fq": 1e-4}, {"fq": 0.1}, {"fq": 1.0}, log_keys=("fq",))
    assert relearned["fq"] == pytest.approx(((-2 + 1) - (-1 - 0)) / (-4 + 1))
    assert recoveries({"fq": 0.0}, {"fq": 0.1}, {"fq": 1e-4}, log_keys=("fq",))["fq"] is None  # no logarithm


def test_robustness_table_equals_a_naive_loop():
    metrics = {
        "retain": {"before": {"m": 0.1}, "before_heldout": {"m": 0.2}, "quantize_nf4": {"m": 0.15},
                   "relearn_forget": {"m": 0.5}},
        "target": {"before": {"m": 0.9}, "before_heldout": {"m": 0.8}, "quantize_nf4": {"m": 0.85},
                   "relearn_forget": {"m": 0.95}},
        "tv/alpha_2": {"before": {"m": 0.3}, "before_heldout": {"m": 0.35}, "quantize_nf4": {"m": 0.6},
                       "relearn_forget": {"m": 0.7}},
    }
    selected = {"tv": ["target", "tv/alpha_2", None]}
    table = robustness_table(metrics, selected, ["quantize_nf4", "relearn_forget"], ["m"])
    naive_q = [(metrics[m]["quantize_nf4"]["m"] - metrics[m]["before"]["m"]) / (0.9 - metrics[m]["before"]["m"])
               if m not in (None, "target") else None for m in selected["tv"]]
    naive_r = [((0.7 - 0.35) - (0.5 - 0.2)) / (0.8 - 0.35), None]
    got_q = [None if e is None else e["mean"] for e in table["recovery"]["quantize_nf4"]["tv"]]
    got_r = [None if e is None else e["mean"] for e in table["recovery"]["relearn_forget"]["tv"]]
    assert got_q == [None, pytest.approx(naive_q[1]), None]  # the target itself forgot nothing: undefined
    assert got_r[1] == pytest.approx(naive_r[0]) and got_r[0] is None and got_r[2] is None
    assert table["retain"]["quantize_nf4"]["m"] == pytest.approx((0.15 - 0.1) / (0.9 - 0.1))
    assert table["retain"]["relearn_forget"]["m"] == 0.0


def test_robustness_verdicts():
    better = evidence({seed: [-0.2 + 0.01 * seed] for seed in range(10)})
    assert robustness_verdict(better, margin=0.1) == HOLDS
    worse = evidence({seed: [0.3 + 0.01 * seed] for seed in range(10)})
    assert robustness_verdict(worse, margin=0.1) == FAILS
    wide = evidence({seed: [(-1) ** seed * 0.5] for seed in range(10)})
    assert robustness_verdict(wide, margin=0.1) == UNRESOLVED
    assert robustness_verdict(evidence({seed: [-0.5] for seed in range(5)}), margin=0.1) == UNRESOLVED  # 5 seeds


# ---- the relearning split


def test_the_relearn_split_holds_whole_authors_out():
    source = TofuSource(synthetic=SyntheticSpec(num_authors=40, seed=3))
    plan = TOFU.split_plan("forget10", None)
    preset = type("P", (), {"num_authors": 40})()
    groups = TOFU.forget_groups(plan, preset, synthetic=True)
    assert groups == 4 and TOFU.forget_groups(plan, None, synthetic=False) == 20  # TOFU's own: 10 % of 200
    split = TOFU.relearn_split(plan, source, groups)
    forget = load_split(source, "forget10")
    evaluated = load_split(source, "forget10_perturbed")
    per_author = len(forget) // 4
    assert split.groups == (2, 2) and len(split.relearn_rows) == 2 * per_author
    relearned = {row["question"] for row in split.relearn_rows}
    heldout = {evaluated[i]["question"] for i in split.heldout}
    assert not relearned & heldout  # no held-out question is ever relearned
    assert relearned | heldout == {row["question"] for row in evaluated}
    # whole authors: every held-out question names an author no relearned question names
    names = [row["question"] for row in forget[2 * per_author:]]
    assert heldout == set(names)
    # one author cannot be split
    assert TOFU.relearn_split(TOFU.split_plan("forget01", None), source, 1) is None


def test_a_split_that_does_not_divide_into_authors_is_refused():
    source = TofuSource(synthetic=SyntheticSpec(num_authors=40, seed=3))
    with pytest.raises(ValueError, match="do not split into 3 authors"):
        TOFU.relearn_split(SplitPlan("forget10", (), (), (), (), "forget10", "retain90"), source, 3)


# ---- quantization against a naive NF4 twin

#: bitsandbytes' NF4 code book: the 16 values a weight is rounded to, times its block's absolute maximum.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def naive_nf4(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """NF4 round trip by hand: blocks of 64 consecutive weights, each scaled by its absolute maximum and rounded to
    the nearest code, then scaled back."""
    flat = weight.detach().float().flatten()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block):
        values = flat[start:start + block]
        scale = values.abs().max()
        nearest = (values[:, None] / scale - NF4[None, :]).abs().argmin(dim=1)
        out[start:start + block] = NF4[nearest] * scale
    return out.view_as(weight)


def test_a_quantized_model_evaluates_as_its_naive_dequantized_twin(tmp_path):
    _needs_quantization()
    from transformers import AutoModelForCausalLM

    from perta_lightning.attacks import quantize_model
    from perta_lightning.benchmarks.tofu.evaluator import evaluate_model
    from perta_lightning.checkpoints import load_tokenizer

    data, model = make_tiny_setup(tmp_path, hidden=64, intermediate=128)
    quantized = quantize_model(model, tmp_path / "nf4", "nf4")
    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # the twin: every linear layer of the decoder rounded to NF4 by hand, the rest (embeddings, lm_head) as it was
    twin = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    rounded = 0
    for name, module in twin.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = naive_nf4(module.weight.data)
            rounded += 1
    assert rounded == 2 * 7  # q, k, v, o, gate, up, down of each of the 2 layers
    twin.save_pretrained(tmp_path / "twin")
    load_tokenizer(str(model)).save_pretrained(tmp_path / "twin")
    ours = evaluate_model(str(quantized), TofuSource(path=str(data)), max_examples=4, batch_size=3, max_new_tokens=8,
                          accelerator="cpu")
    splits = {"forget": "forget10_perturbed", "retain": "retain_perturbed", "holdout": "holdout10"}
    naive = naive_evaluate(str(tmp_path / "twin"), TofuSource(path=str(data)), splits, max_new_tokens=8, max_examples=4)
    original = naive_evaluate(str(model), TofuSource(path=str(data)), splits, max_new_tokens=8, max_examples=4)
    # bitsandbytes multiplies by the 4-bit weights in float32 (dequantize, then matmul), except on a CPU with
    # AVX512-BF16, where its fused kernel casts the activations to bfloat16 (2^-8 relative): the tolerance is that
    # precision's, on per-example NLLs of about 10, and still far below what the quantization itself moves
    tolerance = 1e-5 if not _fused_bf16_kernel() else 5e-3
    moved = 0.0
    for name, columns in naive["examples"].items():
        for key in ("answer_nll", "paraphrased_nll", "probability", "truth_ratio"):
            if columns.get(key):
                assert ours["examples"][name][key] == pytest.approx(columns[key], abs=tolerance), (name, key)
        moved = max(moved, max(abs(a - b) for a, b in zip(naive["examples"][name]["answer_nll"],
                                                          original["examples"][name]["answer_nll"])))
    assert moved > 10 * tolerance  # the twin is the quantized model, not the original one


def _fused_bf16_kernel() -> bool:
    """Whether bitsandbytes computes 4-bit layers in bfloat16 on this machine (its CPU kernel for AVX512-BF16)."""
    import torch

    if torch.cuda.is_available():
        return False
    from bitsandbytes.backends.cpu import ops

    return bool(getattr(ops, "has_avx512bf16", lambda: False)())


# ---- the attacks in a study and through perta attack, as users type them


def _perta(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "perta_lightning", *args], capture_output=True, text=True,
                          timeout=1500, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def attacked_study(tmp_path_factory) -> Path:
    _needs_quantization()
    tmp = tmp_path_factory.mktemp("attacks")
    config = tmp / "study_attacks.yaml"
    # levels above the tiny target's Forget Quality, so that the selected models have forgotten something
    config.write_text(json.dumps({
        "output": str(tmp / "run"), "preset": "tiny", "validation_seeds": [], "test_seeds": [0],
        "candidates": [{"statistic": "fisher"}], "baselines": ["grad_diff"],
        "search": {"rounds": 2, "levels": [0.6, 0.9]},
        "attacks": {"quantize": ["nf4"], "relearn": True, "relearn_retain": True, "relearn_steps": 4}}))
    _perta("study", "--config", str(config), cwd=tmp)
    return tmp


def _records(run: Path) -> dict[str, float]:
    return {str(path.relative_to(run)): json.loads(path.read_text())["seconds"]
            for path in run.glob("test/seed_*/stages/**/*.json")}


def test_a_study_attacks_every_selected_model_and_reports_claim_5(attacked_study):
    run = attacked_study / "run"
    report = json.loads((run / "test" / "seed_0" / "forget10" / "report.json").read_text())
    robust = report["robustness"]
    assert robust["attacks"] == ["quantize_nf4", "relearn_forget", "relearn_retain"]
    # the models attacked: exactly the ones the matched table chose, the target and θ_retain
    for method, models in robust["selected"].items():
        for level_index, model in enumerate(models):
            utility = report["matched"][method][level_index]
            if model is None:
                assert utility is None
                continue
            if model == "target":
                row = next(r for r in report["rows"] if r["method"] == "target")
            else:  # tv/alpha_0.25, grad_diff/epoch_2
                value = float(model.rsplit("_", 1)[1])
                row = next(r for r in report["rows"] if r["method"] == method and r["alpha"] == value)
            assert row["model_utility"] == pytest.approx(utility)
    seed = run / "test" / "seed_0"
    for model in {m for models in robust["selected"].values() for m in models if m} | {"target", "retain"}:
        for attack in robust["attacks"]:
            assert (seed / "forget10" / "attacks" / attack / "eval" / f"{model}.json").is_file(), (attack, model)
    # θ_retain relearned is its own reference: it recovers nothing, on every metric
    for attack in ("relearn_forget", "relearn_retain"):
        assert all(value == 0.0 for value in robust["retain"][attack].values() if value is not None)
    # the recovery of a selected model, recomputed by hand from the evaluation files
    tofu = TofuBenchmark()
    model = next(m for m in robust["selected"]["tv"] if m not in (None, "target"))
    level = robust["selected"]["tv"].index(model)
    reference = seed / "forget10" / "eval" / "retain.json"
    before = tofu.forget_metrics(seed / "forget10" / "eval" / f"{model}.json", reference)
    target = tofu.forget_metrics(seed / "forget10" / "eval" / "target.json", reference)
    after = tofu.forget_metrics(seed / "forget10" / "attacks" / "quantize_nf4" / "eval" / f"{model}.json", reference)
    for values in (before, target, after):  # Forget Quality, a p-value, in decades
        values["forget_quality"] = math.log10(values["forget_quality"])
    expected = [(after[k] - before[k]) / (target[k] - before[k]) for k in before if abs(target[k] - before[k]) > 1e-9]
    assert robust["recovery"]["quantize_nf4"]["tv"][level]["mean"] == pytest.approx(sum(expected) / len(expected))
    assert "## Does the forgetting last?" in (seed / "forget10" / "report.md").read_text()
    # the study: its summary, study.md's section, claim 5 in the replication table (1 seed: not resolved)
    result = json.loads((run / "study.json").read_text())
    assert set(result["test"]["attacks"]["forget10"]) == set(robust["attacks"])
    assert result["test"]["splits"]["forget10"]["tv"]["recovery"]["quantize_nf4"]["0"][level] == pytest.approx(
        robust["recovery"]["quantize_nf4"]["tv"][level]["mean"])
    assert "does the forgetting last?" in (run / "study.md").read_text()
    table = json.loads((run / "replication.json").read_text())
    claim = next(c for c in table["claims"] if c["claim"] == "5")
    assert claim["verdict"] == UNRESOLVED
    rows = [r for r in table["rows"] if r["claim"] == "5"]
    assert {(r["a"], r["b"], r["attack"]) for r in rows} == {
        ("perta_fisher", b, attack) for b in ("tv", "grad_diff") for attack in robust["attacks"]}
    assert "5. at matched forgetting" in (run / "REPLICATION.md").read_text()


def test_a_resumed_study_skips_every_finished_attack(attacked_study):
    run = attacked_study / "run"
    before = _records(run)
    assert any("/attacks/" in name for name in before)
    _perta("study", "--config", str(attacked_study / "study_attacks.yaml"), cwd=attacked_study)
    assert _records(run) == before  # no stage ran again: every record is as it was


def test_perta_attack_on_a_model_directory_reproduces_the_study(attacked_study):
    seed_dir = attacked_study / "run" / "test" / "seed_0"
    data, retain_eval = seed_dir / "data", seed_dir / "forget10" / "eval" / "retain.json"
    report = json.loads((seed_dir / "forget10" / "report.json").read_text())
    # relearning θ_retain as the study did: the same rows, steps and shuffle give its reference again, so the
    # attack on θ_retain recovers nothing beyond its reference (to float noise)
    _perta("attack", "--model", str(seed_dir / "forget10" / "models" / "retain"), "--attack", "relearn",
           "--output", str(attacked_study / "relearned"), "--data", str(data), "--forget_split", "forget10",
           "--retain_result", str(retain_eval), "--forget_groups", "2", "--steps", "4", "--preset", "tiny",
           "--seed", str(stage_seed(0, "forget10/relearn_forget")), cwd=attacked_study)
    written = json.loads((attacked_study / "relearned" / "attack.json").read_text())
    reference = report["robustness"]["models"]["retain"]
    for key, value in written["forget_metrics"].items():
        assert value == pytest.approx(reference["relearn_forget"][key], abs=1e-6), key
        unlearned = reference["before_heldout"][key]
        assert relearn_recovery(value, unlearned, report["robustness"]["models"]["target"]["before_heldout"][key],
                                reference["relearn_forget"][key], unlearned) in (None, pytest.approx(0.0, abs=1e-6))
    assert sorted(written["heldout"]) == written["heldout"] and len(written["heldout"]) == 10
    # quantizing a model unlearned elsewhere: its evaluation file is perta test's, Forget Quality included
    model = next(m for m in report["robustness"]["selected"]["grad_diff"] if m not in (None, "target"))
    method, epoch = model.split("/")
    _perta("attack", "--model", str(seed_dir / "forget10" / "models" / method / epoch), "--attack", "quantize",
           "--output", str(attacked_study / "quantized"), "--data", str(data), "--forget_split", "forget10",
           "--retain_result", str(retain_eval), "--preset", "tiny", cwd=attacked_study)
    ours = json.loads((attacked_study / "quantized" / "eval.json").read_text())
    study_file = json.loads((seed_dir / "forget10" / "attacks" / "quantize_nf4" / "eval" / f"{model}.json").read_text())
    assert ours["examples"]["forget"]["truth_ratio"] == pytest.approx(study_file["examples"]["forget"]["truth_ratio"])
    assert ours["aggregates"]["forget_quality"] == pytest.approx(study_file["aggregates"]["forget_quality"])


def test_perta_attack_refuses_what_it_cannot_do(tmp_path):
    data, model = make_tiny_setup(tmp_path)
    done = subprocess.run([sys.executable, "-m", "perta_lightning", "attack", "--model", str(model), "--attack",
                           "relearn", "--output", str(tmp_path / "out"), "--data", str(data), "--forget_split",
                           "forget01", "--forget_groups", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "at least two authors" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out" / "eval.json").exists()


def test_int8_quantization_is_saved_quantized_and_close(tmp_path):
    _needs_quantization()
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from perta_lightning.attacks import quantize_model

    _, model = make_tiny_setup(tmp_path, hidden=64, intermediate=128)
    quantized = AutoModelForCausalLM.from_pretrained(str(quantize_model(model, tmp_path / "int8", "int8")))
    original = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 2 * 7  # every linear layer of the decoder, lm_head kept
    ids = torch.arange(1, 13)[None]
    with torch.no_grad():
        a, b = quantized(ids).logits, original(ids).logits
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.05 * b.abs().max()
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_model(model, tmp_path / "int4", "int4")
