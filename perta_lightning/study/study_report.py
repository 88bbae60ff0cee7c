"""The multi-seed study's ``study.md`` and ``study.png``, from the ``study.json`` data (and, for the figure, the test
seeds' rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perta_lightning.benchmarks.registry import benchmark_of
from perta_lightning.io import atomic_save_figure


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return f"not reached (0/{stat['n_total']})"
    std = f" ± {stat['std']:.3f}" if stat["std"] is not None else ""
    return f"{stat['mean']:.3f}{std} ({stat['n']}/{stat['n_total']})"


def _difference(d: dict[str, Any]) -> str:
    if d["n"] == 0:
        return "–"
    interval = "" if d["interval"] is None else f" [{_signed(d['interval'][0])}, {_signed(d['interval'][1])}]"
    return f"{_signed(d['mean'])}{interval}, {d['wins']}–{d['losses']}, p = {d['sign_test_p']:.2g}"


def _signed(value: float) -> str:
    """``+0.123``; a value that rounds to zero prints as ``+0.000``, never ``-0.000``."""
    return f"{round(value, 3) + 0.0:+.3f}"


def study_markdown(result: dict[str, Any]) -> str:
    """The study's tables: Model Utility at matched Forget Quality on the test seeds, paired differences
    against TV, and the validation seeds' choice."""
    levels = result["settings"]["levels"]
    validation, test = result["validation"], result["test"]
    bench = benchmark_of(result["settings"])
    ax = bench.axes
    lines = ["# PerTA multi-seed study" + bench.title_note, "",
             f"Preset `{result['settings']['preset']}`. Test seeds {test['seeds']} (reported below); validation seeds "
             f"{validation['seeds']} chose PerTA's settings and appear in no table but the last.", "",
             f"{ax.utility_name} at matched {ax.forget_name}: for each seed, the best non-collapsed model whose {ax.forget_name} "
             "reaches the level (every curve starts at the target model); mean ± std over the seeds that "
             "reach it, (seeds reaching / seeds).", ""]
    header = "| method | " + " | ".join(f"{ax.forget_short} ≥ {level:g}" for level in levels) + " | evaluations per seed |"
    rule = "|---|" + "---|" * (len(levels) + 1)
    for split, families in test["splits"].items():
        lines += [f"## {split}: test seeds", "", header, rule]
        for family, data in families.items():
            evaluations = sorted(data["evaluations"].values())
            name = family if data["label"] == family else f"{family} ({data['label']})"
            lines.append(f"| {name} | " + " | ".join(_cell(s) for s in data["at_levels"])
                         + f" | {'–'.join(str(e) for e in sorted({evaluations[0], evaluations[-1]}))} |")
        lines += ["", f"### {split}: paired difference in {ax.utility_name} against TV", "",
                  "Mean over the seeds where both reach the level, 95 % bootstrap interval, wins–losses, two-sided "
                  "sign-test p-value.", "", "| method | " + " | ".join(f"{ax.forget_short} ≥ {level:g}" for level in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for family, data in families.items():
            if family != "tv":
                lines.append(f"| {family} | " + " | ".join(_difference(d) for d in data["vs_tv"]) + " |")
        lines.append("")
        lines += _robustness_lines(test, split, levels, ax)
        lines += bench.study_markdown(test, split, levels, len(test["seeds"]))
    if validation["seeds"]:
        lines += ["## Validation seeds: the choice of PerTA's settings", "",
                  _score_rule(validation.get("score_rule", "levels"), ax.utility_name, levels) + " Chosen: "
                  + ", ".join(f"{s}: `{label}`" for s, label in validation["chosen"].items()) + ".", "",
                  "| candidate | score |", "|---|---|"]
        for label, score in sorted(validation["scores"].items(), key=lambda item: -item[1]["mean"]):
            lines.append(f"| {label} | {score['mean']:.3f} |")
        lines.append("")
        if validation.get("stability"):
            lines += [f"How stable the choice is: the share of {validation['stability_resamples']} resamples of the "
                      "validation seeds (with replacement) in which each setting scores highest.", ""]
            lines += [f"- {group}: " + ", ".join(f"`{label}` {share:.0%}" for label, share in
                                                 sorted(shares.items(), key=lambda item: -item[1]))
                      for group, shares in validation["stability"].items()]
            lines.append("")
    return "\n".join(lines)


def _robustness_lines(test: dict[str, Any], split: str, levels: list[float], ax: Any) -> list[str]:
    """The split's recovery under each attack: per method and level, mean ± std over the test seeds."""
    attacks = test.get("attacks", {}).get(split)
    if not attacks:
        return []
    families = test["splits"][split]
    lines = [f"### {split}: does the forgetting last?", "",
             "The share of its forgetting each method's selected model recovered under each attack (mean over the "
             "forget metrics; 0: none, 1: back at the target), mean ± std over the test seeds where the level is "
             "reached and something was forgotten. θ_retain's row: the attack alone (quantization), or 0 by "
             "construction (relearning, whose reference it is); the attacks' stage seconds per seed are their cost, "
             "apart from the unlearning's.", ""]
    for attack, summary in attacks.items():
        seconds = summary["seconds"]["mean"]
        lines += [f"**{attack}** ({_num(seconds, 1)} s of attack stages per seed)", "",
                  "| method | " + " | ".join(f"{ax.forget_short} ≥ {level:g}" for level in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for family, data in families.items():
            if attack in data.get("recovery_at_levels", {}):
                lines.append(f"| {family} | " + " | ".join(_cell(c) for c in data["recovery_at_levels"][attack]) + " |")
        lines += [f"| θ_retain | {_cell(summary['retain'])} |" + " |" * (len(levels) - 1), ""]
    return lines


def plot_study(result: dict[str, Any], rows: dict[int, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    """Left: every test seed's trade-off curve of every method (``rows``: per test seed and forget split, its
    report's rows); right: MU at each level, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = next(iter(result["test"]["splits"]))
    families = result["test"]["splits"][split]
    levels = result["settings"]["levels"]
    ax = benchmark_of(result["settings"]).axes
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(zip(families, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for seed in result["test"]["seeds"]:
        for family, data in families.items():
            points = sorted((row["alpha"] or 0.0, row[ax.forget_key], row[ax.utility_key])
                             for row in rows[seed][split] if row["method"] == data["label"])
            if points:
                left.plot([max(p[1], 1e-12) for p in points], [p[2] for p in points],
                          marker="o" if len(points) == 1 else ".", color=colors[family], alpha=0.6,
                          label=family if seed == result["test"]["seeds"][0] else None)
    left.set_xscale("log")
    left.set_xlabel(f"{ax.forget_name} (log)")
    left.set_ylabel(ax.utility_name)
    left.set_title(f"{split}: every test seed's models")
    left.legend(fontsize=8)
    width = 0.8 / max(1, len(families))
    for index, (family, data) in enumerate(families.items()):
        xs = [i + index * width for i in range(len(levels))]
        means = [s["mean"] if s["mean"] is not None else 0.0 for s in data["at_levels"]]
        stds = [s["std"] or 0.0 for s in data["at_levels"]]
        right.bar(xs, means, width, yerr=stds, color=colors[family], label=family, capsize=2)
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(levels))], [f"{ax.forget_short} ≥ {level:g}" for level in levels])
    right.set_ylabel(f"{ax.utility_name} at the level (mean ± std; 0: not reached)")
    right.set_title(f"Matched {ax.forget_name}, test seeds")
    right.legend(fontsize=8)
    figure.tight_layout()
    atomic_save_figure(figure, path, dpi=110)
    plt.close(figure)


def _score_rule(rule: str, utility: str, levels: list[float]) -> str:
    """How the validation score was computed, in words (``score_rule`` of ``study.json``; older files: ``levels``)."""
    if rule == "area":
        return (f"Score: the mean over the validation seeds and splits of the area under the matched {utility} "
                f"profile from level {min(levels):g} to {max(levels):g} (log scale; {utility} 0 where a level is "
                "not reached), so a search that falls just short of a level loses a sliver, not the level's share.")
    return (f"Score: mean {utility} at the levels over the validation seeds and splits, a level not reached "
            "counting 0.")
