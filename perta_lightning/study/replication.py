"""``replication.json`` and ``REPLICATION.md``: the paper's claims, each with its measurement and verdict.

Read from a finished study's result (the ``study.json`` data) alone; the rules and their numbers are those
of :mod:`perta_lightning.functional.replication`, taken from the study's ``rules`` (fixed in its config
before it ran). The claims of arXiv 2601.22030, as tested here on the test seeds:

1. PerTA-grad and PerTA-fisher improve on TV in the balance of forgetting and retention (Model Utility at
   matched Forget Quality, pooled over the forget splits), and often on the training-based methods;
2. importance estimated at θ0 or at θ_full makes a negligible difference (same variant, both models);
3. task arithmetic saves runtime against training-based unlearning (PerTA's whole cost, its α search's
   evaluations included, against each baseline's training and its one evaluation);
4. all of claim 1's improvement on TV holds in each forget proportion (forget01, forget05, forget10);
5. (this project's, not the paper's) at matched forgetting, PerTA's forgetting is at least as robust as TV's and as
   the training-based methods': each attack (quantization, relearning) undoes no more of it, by the robustness rule.

This project's own variants (the study's ``proposed``) get rows of their own: rejected on the validation
seeds, or compared on the test seeds with TV and with the paper's variant of their statistic (kept only if
they beat it there).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from perta_lightning.benchmarks.base import Axes
from perta_lightning.benchmarks.registry import benchmark_of
from perta_lightning.functional.replication import (
    FAILS,
    HOLDS,
    UNRESOLVED,
    ReplicationRules,
    all_of,
    cost_evidence,
    cost_verdict,
    equivalence_verdict,
    evidence,
    improvement_verdict,
    robustness_verdict,
    share_of,
)
from perta_lightning.functional.tofu_metrics import forget_quality_ladder

FORMAT = "perta-replication/1"
POOLED = "pooled"
NAMES = {"tv": "TV", "perta_grad": "PerTA-grad", "perta_fisher": "PerTA-fisher", "grad_ascent": "GradAscent",
         "grad_diff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO", "rmu": "RMU", "perta_grad_at_base": "PerTA-grad at θ0",
         "perta_fisher_at_base": "PerTA-fisher at θ0", "perta_grad_at_full": "PerTA-grad at θ_full",
         "perta_fisher_at_full": "PerTA-fisher at θ_full"}


def _name(family: str) -> str:
    return NAMES.get(family, family.removeprefix("proposed_"))


def _differences(splits: dict[str, Any], a: str, b: str, which: list[str]) -> dict[int, list[float | None]]:
    """Per seed, MU(a) − MU(b) at every level of every split in ``which`` (``None`` where one misses it)."""
    out: dict[int, list[float | None]] = {}
    for split in which:
        per_a, per_b = splits[split][a]["per_seed"], splits[split][b]["per_seed"]
        for seed in sorted(per_a, key=int):
            out.setdefault(int(seed), []).extend(
                None if x is None or y is None else x - y for x, y in zip(per_a[seed], per_b[seed]))
    return out


def _row(claim: str, a: str, b: str, split: str, rule: str, verdict: str, e: Any, labels: dict[str, str],
         quantity: str) -> dict[str, Any]:
    data = asdict(e)
    data["per_seed"] = {str(k): v for k, v in data["per_seed"].items()}
    return {"claim": claim, "comparison": f"{_name(a)} vs {_name(b)}", "a": a, "b": b,
            "labels": [labels.get(a, a), labels.get(b, b)], "split": split, "rule": rule, "quantity": quantity,
            "n_seeds": e.n, **data, "verdict": verdict}


def _utility_row(claim: str, splits: dict[str, Any], a: str, b: str, which: list[str], rules: ReplicationRules,
                 labels: dict[str, str], axes: Axes, rule: str = "improvement") -> dict[str, Any]:
    e = evidence(_differences(splits, a, b, which), tie=rules.tie)
    if rule == "improvement":
        verdict = improvement_verdict(e, margin=rules.improvement_margin, min_seeds=rules.min_seeds,
                                      significance=rules.significance)
    else:
        verdict = equivalence_verdict(e, bound=rules.negligible_mean, interval_bound=rules.negligible_interval,
                                      min_seeds=rules.min_seeds)
    where = POOLED if len(which) > 1 else which[0]
    return _row(claim, a, b, where, rule, verdict, e, labels, axes.quantity)


def _recovery_differences(splits: dict[str, Any], a: str, b: str, attack: str,
                          which: list[str]) -> dict[int, list[float | None]]:
    """Per seed, recovery(a) − recovery(b) under ``attack`` at every level of every split in ``which`` (``None``
    where either is undefined: a level not reached, or nothing forgotten)."""
    out: dict[int, list[float | None]] = {}
    for split in which:
        per_a = splits[split][a].get("recovery", {}).get(attack, {})
        per_b = splits[split][b].get("recovery", {}).get(attack, {})
        for seed in sorted(per_a, key=int):
            if per_a[seed] is None or per_b.get(seed) is None:
                continue
            out.setdefault(int(seed), []).extend(
                None if x is None or y is None else x - y for x, y in zip(per_a[seed], per_b[seed]))
    return out


def _robustness_row(splits: dict[str, Any], a: str, b: str, attack: str, which: list[str], rules: ReplicationRules,
                    labels: dict[str, str], axes: Axes) -> dict[str, Any]:
    e = evidence(_recovery_differences(splits, a, b, attack, which), tie=rules.tie)
    verdict = robustness_verdict(e, margin=rules.robustness_margin, min_seeds=rules.min_seeds)
    row = _row("5", a, b, POOLED if len(which) > 1 else which[0], "robustness", verdict, e, labels,
               f"Δ recovery under {attack} at matched {axes.forget_short}")
    row["attack"] = attack
    return row


def recovery_summary(splits: dict[str, Any], labels: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per attack and method family, its recovery over the test seeds: per seed the mean over the levels and splits
    where it is defined, then the mean of those with a 95 % bootstrap interval (:func:`evidence` of the values)."""
    out: dict[str, dict[str, Any]] = {}
    families = list(next(iter(splits.values())))
    for split in splits.values():
        for family in families:
            for attack, per_seed in split[family].get("recovery", {}).items():
                by_seed = out.setdefault(attack, {}).setdefault(family, {})
                for seed, values in per_seed.items():
                    by_seed.setdefault(int(seed), []).extend(values or [])
    for attack, by_family in out.items():
        for family, by_seed in by_family.items():
            e = evidence(by_seed)
            by_family[family] = {"label": labels.get(family, family), "estimate": e.estimate, "interval": e.interval,
                                 "n_seeds": e.n, "pairs": e.pairs}
    return out


def _seed_costs(splits: dict[str, Any], family: str, key: str, without_search: bool) -> dict[int, float]:
    """Per seed, ``key`` of the family's cost summed over the splits (seeds missing a split left out)."""
    totals: dict[int, float] = {}
    missing = set()
    for split, families in splits.items():
        for seed, cost in families[family]["costs"].items():
            if cost is None:
                missing.add(int(seed))
                continue
            value = cost[key]
            if without_search and key == "seconds":
                value -= cost["seconds_by_kind"].get("evaluation", 0.0) + cost["seconds_by_kind"].get("screening", 0.0)
            totals[int(seed)] = totals.get(int(seed), 0.0) + value
    return {seed: value for seed, value in totals.items() if seed not in missing}


def _cost_row(splits: dict[str, Any], a: str, b: str, rules: ReplicationRules, labels: dict[str, str],
              key: str = "seconds", without_search: bool = False) -> dict[str, Any]:
    e = cost_evidence(_seed_costs(splits, a, key, without_search), _seed_costs(splits, b, key, without_search))
    verdict = cost_verdict(e, min_seeds=rules.min_seeds, significance=rules.significance)
    quantity = {"seconds": "cost ratio, wall seconds", "forward": "cost ratio, forward example passes",
                "backward": "cost ratio, backward example passes"}[key]
    if without_search:
        quantity += ", α search's evaluations left out"
    row = _row("3", a, b, POOLED, "cost", verdict, e, labels, quantity)
    row["informative_only"] = without_search or key != "seconds"
    return row


def _steps(levels: list[float], forget_examples: dict[str, int | None]) -> dict[str, Any]:
    """Per split, the Forget Quality values just below and at or above each level."""
    out = {}
    for split, n in forget_examples.items():
        if not n:
            continue
        ladder = forget_quality_ladder(n)
        out[split] = {"forget_examples": n, "levels": [
            {"level": level, "below": max((v for v in ladder if v < level), default=None),
             "reached_at": min((v for v in ladder if v >= level), default=None)} for level in levels]}
    return out


def replication(result: dict[str, Any]) -> dict[str, Any]:
    """The replication table of a study's result (see the module docstring)."""
    settings, test = result["settings"], result["test"]
    bench = benchmark_of(settings)
    ax = bench.axes
    rules = ReplicationRules(**settings.get("rules", {}))
    splits = test["splits"]
    which = list(splits)
    families = next(iter(splits.values()))
    labels = {family: data["label"] for family, data in families.items()}
    statistics = [f for f in ("perta_grad", "perta_fisher") if f in families]
    baselines = [b for b in settings.get("baselines", ["grad_ascent", "grad_diff", "npo"]) if b in families]
    rows: list[dict[str, Any]] = []
    claims: list[dict[str, Any]] = []

    # 1: against TV, pooled over splits; against each training-based baseline ("often")
    tv_rows = [_utility_row("1", splits, s, "tv", which, rules, labels, ax) for s in statistics]
    baseline_rows = [_utility_row("1", splits, s, b, which, rules, labels, ax) for s in statistics for b in baselines]
    often = share_of([r["verdict"] for r in baseline_rows])
    rows += tv_rows + baseline_rows
    claims.append({"claim": "1", "statement": "PerTA-grad and PerTA-fisher improve on TV in the balance of "
                   "forgetting and retention, and often on training-based methods",
                   "parts": {"improve on TV": all_of([r["verdict"] for r in tv_rows]),
                             "often improve on the training-based methods": often},
                   "verdict": all_of([all_of([r["verdict"] for r in tv_rows]), often])})

    # 2: θ0 against θ_full importance, the same variant
    pair_rows = []
    for s in statistics:
        if f"{s}_at_base" in families:
            pair_rows.append(_utility_row("2", splits, f"{s}_at_base", s, which, rules, labels, ax, "equivalence"))
        elif f"{s}_at_full" in families:
            pair_rows.append(_utility_row("2", splits, s, f"{s}_at_full", which, rules, labels, ax, "equivalence"))
    rows += pair_rows
    claims.append({"claim": "2", "statement": "importance estimated at θ0 or at θ_full makes a negligible difference",
                   "parts": {r["comparison"]: r["verdict"] for r in pair_rows},
                   "verdict": all_of([r["verdict"] for r in pair_rows]) if pair_rows else UNRESOLVED})

    # 3: cost against each training-based baseline
    cost_rows = [_cost_row(splits, s, b, rules, labels) for s in statistics for b in baselines]
    info_rows = ([_cost_row(splits, s, b, rules, labels, without_search=True) for s in statistics for b in baselines]
                 + [_cost_row(splits, s, b, rules, labels, key="backward") for s in statistics for b in baselines])
    if "tv" in families:
        info_rows += [_cost_row(splits, "tv", b, rules, labels) for b in baselines]
        for row in info_rows[-len(baselines):]:
            row["informative_only"] = True
    rows += cost_rows + info_rows
    claims.append({"claim": "3", "statement": "task arithmetic saves runtime against training-based unlearning",
                   "parts": {r["comparison"]: r["verdict"] for r in cost_rows},
                   "verdict": all_of([r["verdict"] for r in cost_rows]) if cost_rows else UNRESOLVED})

    # 4: claim 1's improvement on TV in each forget proportion
    split_rows = [_utility_row("4", splits, s, "tv", [split], rules, labels, ax) for split in which for s in statistics]
    rows += split_rows
    verdict4 = all_of([r["verdict"] for r in split_rows]) if len(which) == 3 else UNRESOLVED
    claims.append({"claim": "4", "statement": "the improvement on TV holds across the forget proportions 1 %, 5 % "
                   "and 10 %", "parts": {f"{r['comparison']}, {r['split']}": r["verdict"] for r in split_rows},
                   "verdict": verdict4,
                   **({} if len(which) == 3 else {"note": f"the study ran {which}, not all three proportions"})})

    # 5: robustness of the forgetting, per attack, against TV and each training-based baseline
    attacks = list(dict.fromkeys(attack for by_family in splits.values()  # forget01 has no relearning: a union
                                 for attack in next(iter(by_family.values())).get("recovery", {})))
    robust_rows = [_robustness_row(splits, s, b, attack, which, rules, labels, ax)
                   for attack in attacks for s in statistics for b in ["tv", *baselines]]
    rows += robust_rows
    claims.append({"claim": "5", "statement": "at matched forgetting, PerTA's forgetting is at least as robust to "
                   "quantization and relearning as TV's and as the training-based methods'",
                   "parts": {f"{r['comparison']}, {r['attack']}": r["verdict"] for r in robust_rows},
                   "verdict": all_of([r["verdict"] for r in robust_rows]) if robust_rows else UNRESOLVED,
                   **({} if robust_rows else {"note": "the study ran no attacks (its config has no attacks block)"})})

    # this project's variants
    own = []
    for variant in result["validation"].get("proposed", []):
        family = f"proposed_{variant['label']}"
        entry = {"label": variant["label"], "validation_score": variant["score"],
                 "against": variant["against"], "against_score": variant["against_score"],
                 "accepted_on_validation": variant["accepted"]}
        if family in families:
            paper = f"perta_{variant['statistic']}"
            versus_tv = _utility_row("ours", splits, family, "tv", which, rules, labels, ax)
            versus_paper = _utility_row("ours", splits, family, paper, which, rules, labels, ax)
            rows += [versus_tv, versus_paper]
            entry |= {"vs_tv": versus_tv["verdict"], "vs_paper": versus_paper["verdict"],
                      "kept": versus_paper["verdict"] == HOLDS}
        else:
            entry["kept"] = False
        own.append(entry)

    if bench.claim4_note is not None:
        next(c for c in claims if c["claim"] == "4")["note"] = bench.claim4_note
    return {"format": FORMAT, "benchmark": bench.name, "rules": asdict(rules), "levels": settings["levels"], "splits": which,
            "test_seeds": test["seeds"], "validation_seeds": result["validation"]["seeds"],
            "chosen": result["validation"]["chosen"], "labels": labels, "claims": claims, "rows": rows,
            "own_variants": own, "recovery": recovery_summary(splits, labels),
            "forget_quality_steps": _steps(settings["levels"], test.get("forget_examples", {})),
            "machine": result.get("machine", {}), "invocation": result.get("invocation", {}),
            "preset": settings["preset"], "preset_overrides": settings.get("preset_overrides", {})}


def _signed(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def _estimate(row: dict[str, Any]) -> str:
    if row["estimate"] is None:
        return "–"
    if row["rule"] == "cost":
        interval = "" if row["interval"] is None else f" [{row['interval'][0]:.2f}, {row['interval'][1]:.2f}]"
        return f"{row['estimate']:.2f}×{interval}"
    interval = "" if row["interval"] is None else f" [{_signed(row['interval'][0])}, {_signed(row['interval'][1])}]"
    return f"{_signed(row['estimate'])}{interval}"


def _pairs(row: dict[str, Any]) -> str:
    return f"{row['pair_wins']}–{row['pair_losses']} of {row['pairs']}" if "pairs" in row else "–"


def rules_text(rules: dict[str, Any], ax: Axes) -> list[str]:
    """The verdict rules in words, with the study's numbers."""
    r = ReplicationRules(**rules)
    return [
        f"Every figure is over **test seeds**, the independent unit: each seed's paired differences (method A − "
        f"method B in {ax.utility_name} at each {ax.forget_name} level both reach, over the forget splits when pooled) "
        f"are averaged to one number per seed. Estimate: the mean of those; interval: 95 % percentile bootstrap "
        f"over seeds (10,000 resamples, seeded); sign test: two-sided exact, over seeds, a seed within "
        f"{r.tie:g} of zero a tie; wins–losses are given over seeds and over every (seed, split, level) pair.",
        f"- **Improvement** (claims 1, 4): *holds* when the interval lies above 0, the sign test gives "
        f"p < {r.significance:g} and wins exceed losses; *does not hold* when the interval's upper end is below "
        f"+{r.improvement_margin:g} (an improvement of that size is ruled out, a tie as well as a loss); "
        f"otherwise *not resolved*.",
        f"- **Negligible difference** (claim 2, fixed before the run): *holds* when |estimate| < "
        f"{r.negligible_mean:g} and the interval lies inside ±{r.negligible_interval:g}; *does not hold* when the "
        f"interval lies wholly outside ±{r.negligible_mean:g}; otherwise *not resolved*.",
        f"- **Cost** (claim 3): per seed the ratio of wall seconds (summed over the splits); estimate the geometric "
        f"mean ratio, interval the bootstrap of the mean log ratio; *holds* when the interval lies below 1 and "
        f"the sign test (cheaper a win) gives p < {r.significance:g}; *does not hold* when it lies above 1.",
        f"- **Robustness** (claim 5): per seed the mean over levels (and splits) of PerTA's recovery minus the "
        f"other method's under one attack, the recovery being the share of the forgetting the attack undid (less "
        f"is better); *holds* when the interval's upper end is below +{r.robustness_margin:g}; *does not hold* "
        f"when the interval lies above 0; otherwise *not resolved*.",
        f"- Fewer than {r.min_seeds} seeds with a value: *not resolved* (a two-sided sign test over 5 seeds "
        f"cannot go below 0.0625). A claim of several parts holds when every part holds and does not hold when "
        f"any part does not; \"often\" holds when at least half of its parts hold.",
    ]


def machine_line(table: dict[str, Any]) -> str:
    """Where and how long: CPU, torch and kernels, wall time and peak memory of the study's invocation."""
    m, run = table.get("machine", {}), table.get("invocation", {})
    parts = [f"{m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} cores)", f"torch {m.get('torch', '?')}",
             f"BLAS {m.get('blas', '?')}", f"ATen CPU capability {m.get('aten_cpu_capability', '?')}"]
    line = "Produced on " + ", ".join(parts)
    if run:
        line += (f"; this invocation took {_duration(run['wall_seconds'])} wall, peak memory "
                 f"{run['peak_rss_gib']:.1f} GiB (largest process)")
        if run.get("stage_seconds"):  # a resumed study's invocation skipped the stages done before it
            line += f"; its stages took {_duration(run['stage_seconds'])} in all (every invocation, summed over processes)"
    return line + "."


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else f"{seconds // 60} min {seconds % 60:02d} s"


def claims_table(table: dict[str, Any], informative: bool = False) -> list[str]:
    """The claims with each part's measurement: markdown lines."""
    lines = ["| claim | comparison | quantity | split | estimate [95 % CI] | seeds W–L (n) | pairs W–L | "
             "sign-test p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for claim in table["claims"]:
        lines.append(f"| **{claim['claim']}. {claim['statement']}** | | | | | | | | **{claim['verdict']}** |")
        for row in table["rows"]:
            if row["claim"] != claim["claim"] or (row.get("informative_only") and not informative):
                continue
            lines.append(f"| | {row['comparison']} | {row['quantity']} | {row['split']} | {_estimate(row)} | "
                         f"{row['wins']}–{row['losses']} ({row['n_seeds']}) | {_pairs(row)} | "
                         f"{row['sign_test_p']:.2g} | {row['verdict']} |")
    return lines


def replication_markdown(table: dict[str, Any]) -> str:
    """``REPLICATION.md``: the claims table, this project's variants, the rules and what the numbers rest on."""
    bench = benchmark_of(table)
    ax = bench.axes
    lines = [f"# Replication of arXiv 2601.22030 (PerTA) on {ax.data_name}", "",
             f"Preset `{table['preset']}`"
             + (f" with `{table['preset_overrides']}`" if table.get("preset_overrides") else "")
             + f"; test seeds {table['test_seeds']} (every figure), validation seeds {table['validation_seeds']} "
               f"(chose PerTA's settings: {', '.join(f'{k}: `{v}`' for k, v in table['chosen'].items())}); forget "
               f"splits {table['splits']}; {ax.forget_name} levels {table['levels']}.", "",
             machine_line(table), "", "## The claims", ""]
    lines += claims_table(table)
    lines += ["", "Method labels: " + ", ".join(f"{_name(f)} = `{label}`" for f, label in table["labels"].items()), ""]
    lines += ["## This project's variants", ""]
    if not table["own_variants"]:
        lines += ["None were proposed.", ""]
    for own in table["own_variants"]:
        if own["validation_score"] is not None and not own["accepted_on_validation"]:
            lines.append(f"- `{own['label']}`: **rejected on the validation seeds** (score {own['validation_score']:.3f} "
                         f"against {own['against_score']:.3f} for `{own['against']}`); not run on the test seeds.")
        elif "vs_paper" in own:
            lines.append(f"- `{own['label']}`: chosen on the validation seeds (score "
                         f"{own['validation_score'] if own['validation_score'] is None else round(own['validation_score'], 3)} "
                         f"against {own['against_score'] if own['against_score'] is None else round(own['against_score'], 3)}); "
                         f"on the test seeds, improvement on TV: {own['vs_tv']}, on `{own['against']}`: "
                         f"{own['vs_paper']}; **{'kept' if own['kept'] else 'not kept'}**.")
    ours = [r for r in table["rows"] if r["claim"] == "ours"]
    if ours:
        lines += ["", "| comparison | estimate [95 % CI] | seeds W–L (n) | pairs W–L | sign-test p | verdict |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['comparison']} | {_estimate(r)} | {r['wins']}–{r['losses']} ({r['n_seeds']}) | {_pairs(r)} | "
                  f"{r['sign_test_p']:.2g} | {r['verdict']} |" for r in ours]
    if table.get("recovery"):
        lines += ["", "## How much of the forgetting each attack undid (claim 5)", ""] + recovery_table(table)
    lines += ["", "## Costs, in more detail (claim 3)", "",
              "Wall seconds come from the stage records (each stage timed on the threads it had); example passes "
              "do not depend on the machine.", ""]
    lines += ["| comparison | quantity | estimate [95 % CI] | seeds W–L (n) | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r['comparison']} | {r['quantity']} | {_estimate(r)} | {r['wins']}–{r['losses']} ({r['n_seeds']}) | "
              f"{r['verdict']} |" for r in table["rows"] if r["rule"] == "cost"]
    lines += bench.replication_sections(table)
    lines += ["", "## The rules", ""] + rules_text(table["rules"], ax) + [""]
    return "\n".join(lines)


def recovery_table(table: dict[str, Any]) -> list[str]:
    """Each method's recovery under each attack over the test seeds (``table["recovery"]``): markdown lines."""
    recovery = table.get("recovery") or {}
    if not recovery:
        return []
    lines = ["Each method's recovery (0: nothing, 1: back at the target; Forget Quality in decades): per test seed the "
             "mean over the levels and splits where its selected model forgot something, then the mean over seeds "
             "with its 95 % bootstrap interval (seeds with a value).", "",
             "| method | " + " | ".join(recovery) + " |", "|---|" + "---|" * len(recovery)]
    for family in dict.fromkeys(f for by_family in recovery.values() for f in by_family):
        cells = []
        for by_family in recovery.values():
            entry = by_family.get(family)
            if entry is None or entry["estimate"] is None:
                cells.append("–")
                continue
            interval = "" if entry["interval"] is None else \
                f" [{_signed(entry['interval'][0])}, {_signed(entry['interval'][1])}]"
            cells.append(f"{_signed(entry['estimate'])}{interval} ({entry['n_seeds']})")
        lines.append(f"| {_name(family)} | " + " | ".join(cells) + " |")
    return lines


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


__all__ = ["FAILS", "HOLDS", "UNRESOLVED", "claims_table", "machine_line", "recovery_table", "replication",
           "replication_markdown", "rewrite", "rules_text"]


def rewrite(study_dir: str) -> None:
    """Write ``replication.json`` and ``REPLICATION.md`` of a finished study anew from its ``study.json``."""
    import json
    from pathlib import Path

    from perta_lightning.io import atomic_write_text
    from perta_lightning.provenance import load_study_result

    folder = Path(study_dir)
    table = replication(load_study_result(folder / "study.json"))
    atomic_write_text(folder / "replication.json", json.dumps(table, indent=2))
    atomic_write_text(folder / "REPLICATION.md", replication_markdown(table))
    print(f"[replication] {folder / 'REPLICATION.md'}")


def main(argv: list[str]) -> None:
    """``python -m perta_lightning.study.replication STUDY_DIR``: rewrite a finished study's replication table."""
    from perta_lightning.errors import PertaValueError

    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        raise PertaValueError("usage: python -m perta_lightning.study.replication STUDY_DIR (a folder perta study wrote)")
    rewrite(argv[0])


if __name__ == "__main__":
    import sys

    from perta_lightning.cli import run_command

    run_command("replication", lambda: main(sys.argv[1:]))
