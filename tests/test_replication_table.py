"""The replication table on a hand-made study result: each claim's verdict follows its rule."""

import pytest

from perta_lightning.provenance import compare_studies
from perta_lightning.study.replication import replication, replication_markdown

LEVELS = [0.01, 0.1]
SEEDS = list(range(10))


def family(label, per_seed, seconds):
    return {"label": label, "per_seed": {str(s): v for s, v in per_seed.items()},
            "costs": {str(s): {"seconds": seconds(s), "seconds_by_kind": {"evaluation": seconds(s) / 2},
                               "forward": 10.0, "backward": 10.0} for s in per_seed}}


def study_result(splits=("forget01", "forget05", "forget10"), seeds=SEEDS):
    """TV at 0.5; PerTA-fisher 0.05 above it on every seed; PerTA-grad at 0.5 ± 0.002 (a tie); PerTA-fisher
    at θ0 equal to it within 0.003; GradDiff far above; PerTA ten times cheaper than GradDiff."""
    def constant(value, jitter=0.0):
        return {s: [value + jitter * (-1) ** s] * len(LEVELS) for s in seeds}

    families = {
        "tv": family("tv", constant(0.5), lambda s: 10.0),
        "perta_grad": family("perta_grad", constant(0.5, 0.002), lambda s: 10.0),
        "perta_fisher": family("perta_fisher_b16", {s: [0.55 + 0.001 * s, None] for s in seeds}, lambda s: 1.0),
        "perta_fisher_at_base": family("perta_fisher_b16_at_base", {s: [0.55 + 0.001 * s + 0.003 * (-1) ** s, None]
                                                                    for s in seeds}, lambda s: 1.0),
        "grad_diff": family("grad_diff", constant(0.8), lambda s: 10.0 + s),
    }
    return {"settings": {"preset": "demo", "levels": LEVELS, "baselines": ["grad_diff"], "rules": {}},
            "validation": {"seeds": [100], "chosen": {"fisher": "perta_fisher_b16", "grad": "perta_grad"},
                           "proposed": [{"label": "perta_fisher_rank", "statistic": "fisher", "score": 0.3,
                                         "against": "perta_fisher_b16", "against_score": 0.4, "accepted": False}]},
            "test": {"seeds": list(seeds), "splits": {split: families for split in splits},
                     "forget_examples": {split: 10 for split in splits}}}


def claim(table, number):
    return next(c for c in table["claims"] if c["claim"] == number)


def test_each_claim_gets_the_verdict_its_rule_gives():
    table = replication(study_result())
    rows = {(r["claim"], r["comparison"], r["split"]): r for r in table["rows"] if not r.get("informative_only")}
    fisher_tv = rows[("1", "PerTA-fisher vs TV", "pooled")]
    assert fisher_tv["estimate"] == pytest.approx(0.05 + 0.001 * 4.5)  # the one level both reach, per seed
    assert (fisher_tv["wins"], fisher_tv["losses"], fisher_tv["n_seeds"]) == (10, 0, 10)
    assert fisher_tv["verdict"] == "holds"
    assert rows[("1", "PerTA-grad vs TV", "pooled")]["verdict"] == "does not hold"  # a tie
    assert rows[("1", "PerTA-fisher vs GradDiff", "pooled")]["verdict"] == "does not hold"
    assert claim(table, "1")["verdict"] == "does not hold"
    assert rows[("2", "PerTA-fisher at θ0 vs PerTA-fisher", "pooled")]["verdict"] == "holds"
    cost = rows[("3", "PerTA-fisher vs GradDiff", "pooled")]
    assert cost["per_seed"]["3"] == pytest.approx(3 * 1.0 / (3 * 13.0))  # summed over the three splits
    assert cost["verdict"] == "holds"
    assert rows[("3", "PerTA-grad vs GradDiff", "pooled")]["verdict"] == "holds"  # 10 s against 10 + s
    assert claim(table, "4")["verdict"] == "does not hold"  # PerTA-grad ties TV in every split
    assert claim(table, "4")["parts"]["PerTA-fisher vs TV, forget01"] == "holds"
    assert table["own_variants"][0]["kept"] is False
    assert table["forget_quality_steps"]["forget01"]["levels"][0]["reached_at"] == pytest.approx(0.0123406, rel=1e-4)
    markdown = replication_markdown(table)
    assert "**rejected on the validation seeds**" in markdown and "| **2. importance estimated" in markdown


def test_too_few_seeds_and_a_missing_proportion_resolve_nothing():
    table = replication(study_result(splits=("forget10",), seeds=range(3)))
    assert {c["claim"]: c["verdict"] for c in table["claims"]} == {
        "1": "not resolved", "2": "not resolved", "3": "not resolved", "4": "not resolved", "5": "not resolved"}
    assert "not all three" in claim(table, "4")["note"]
    assert "ran no attacks" in claim(table, "5")["note"]


def test_claim_5_compares_recovery_under_each_attack_by_the_robustness_rule():
    """PerTA-fisher recovers 0.1 of its forgetting under quantization where TV recovers 0.4 and GradDiff 0.05 (more
    robust than TV, as robust as GradDiff within the margin); under relearning it recovers 0.6 where both recover
    0.2 (less robust: the claim does not hold)."""
    result = study_result()
    recovery = {"tv": (0.4, 0.2), "perta_grad": (0.4, 0.2), "perta_fisher": (0.1, 0.6), "grad_diff": (0.05, 0.2)}
    splits = {}
    for split, families in result["test"]["splits"].items():
        splits[split] = {}
        for name, data in families.items():
            q, r = recovery.get(name, (0.0, 0.0))
            data = dict(data, recovery={
                "quantize_nf4": {str(s): [q + 0.01 * (s % 3), None] for s in SEEDS},
                "relearn_forget": {str(s): [r - 0.01 * (s % 2), r] for s in SEEDS}})
            splits[split][name] = data
    result["test"]["splits"] = splits
    table = replication(result)
    rows = {(r["comparison"], r["attack"]): r for r in table["rows"] if r["claim"] == "5"}
    quantized = rows[("PerTA-fisher vs TV", "quantize_nf4")]
    # per seed: the mean over splits and reached levels of 0.1 + 0.01 (s % 3) − (0.4 + 0.01 (s % 3))
    assert quantized["per_seed"]["4"] == pytest.approx(-0.3) and quantized["verdict"] == "holds"
    assert rows[("PerTA-fisher vs GradDiff", "quantize_nf4")]["estimate"] == pytest.approx(0.05)
    assert rows[("PerTA-fisher vs GradDiff", "quantize_nf4")]["verdict"] == "holds"  # within the 0.1 margin
    assert rows[("PerTA-fisher vs TV", "relearn_forget")]["estimate"] == pytest.approx(0.4)
    assert rows[("PerTA-fisher vs TV", "relearn_forget")]["verdict"] == "does not hold"
    assert claim(table, "5")["verdict"] == "does not hold"
    markdown = replication_markdown(table)
    assert "5. at matched forgetting" in markdown
    # each method's own recovery over seeds: per seed the mean over splits and reached levels, then over seeds
    fisher = table["recovery"]["quantize_nf4"]["perta_fisher"]
    assert fisher["estimate"] == pytest.approx(0.1 + 0.01 * sum(s % 3 for s in SEEDS) / len(SEEDS))
    assert fisher["n_seeds"] == 10 and fisher["interval"][0] < fisher["estimate"] < fisher["interval"][1]
    assert table["recovery"]["relearn_forget"]["tv"]["estimate"] == pytest.approx(0.2 - 0.01 * 5 / 10 / 2)
    assert "| PerTA-fisher | +0.109" in markdown


def test_compare_names_the_kernels_and_the_first_model_that_differs():
    rows = [{"method": "retain", "alpha": None, "model_digest": "a"}, {"method": "tv", "alpha": 1.0, "model_digest": "b"}]
    first = {"machine": {"aten_cpu_capability": "AVX512"}, "models": {"test": {"0": {"forget10": rows}}}}
    second = {"machine": {"aten_cpu_capability": "AVX2"},
              "models": {"test": {"0": {"forget10": [rows[0], dict(rows[1], model_digest="c")]}}}}
    lines = compare_studies(first, second)
    assert lines[0] == "machine.aten_cpu_capability: 'AVX512' != 'AVX2'"
    assert lines[1].startswith("test seed 0 forget10: first differing model tv α = 1")
    assert compare_studies(first, first) == []


def test_an_evaluation_digest_ignores_where_the_files_lie_and_sees_every_number(tmp_path):
    import json

    from perta_lightning.provenance import evaluation_digest

    result = {"format": "perta-tofu-eval/1", "model": "/a/models/tv", "retain_result": "/a/eval/retain.json",
              "aggregates": {"forget_quality": 0.25}, "examples": {"forget": {"answer_nll": [1.0, 2.0]}}}
    moved = dict(result, model="/elsewhere/models/tv", retain_result="/elsewhere/eval/retain.json")
    changed = dict(result, examples={"forget": {"answer_nll": [1.0, 2.0000001]}})
    paths = []
    for name, data in (("first", result), ("moved", moved), ("changed", changed)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data, indent=1 if name == "moved" else None))
    first, moved_digest, changed_digest = (evaluation_digest(path) for path in paths)
    assert first == moved_digest
    assert first != changed_digest
