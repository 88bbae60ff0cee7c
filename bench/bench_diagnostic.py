"""Why PerTA's edge over TV shrinks on the larger benchmark: the per-seed diagnostic of two finished studies.

    PYTHONPATH=. python bench/bench_diagnostic.py --study demo=runs/study --study large=runs/replication \
        [--plot bench/diagnostic.png] [--json bench/results/diagnostic.json]

Reads every ``diagnostic.json`` (written by each seed's pipeline beside its report; for a study run in parts,
the copy in each test seed's part file) of the test seeds of each study, for the variants the study chose, and
summarises per study and split:

- Spearman's ρ between forget and retain importance (all parameters, and by layer type);
- the mean weight and the share of ‖τ‖² the weights keep, beside what uniform importance would keep,
  (1 / (1 + β))²;
- the paired edge over TV per seed (mean over levels of ΔMU at matched Forget Quality), against ρ.

The plot: (a) ρ per seed, (b) the weight histogram, mean over seeds, (c) the edge against ρ, (d) Model
Utility against Forget Quality along α for TV and PerTA-fisher on every test seed of one split.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _beta(result: dict[str, Any], label: str) -> float:
    """β of a chosen variant, from the study's own list of candidates (and proposed variants)."""
    variants = result["validation"]["candidates"] + result["validation"].get("proposed", [])
    return next(v["beta"] for v in variants if v["label"] == label)


def _diagnostic(study: Path, result: dict[str, Any], seed: int, split: str) -> dict[str, Any]:
    """A test seed's ``diagnostic.json``: from its run folder, or from its part file when the study was run in
    parts elsewhere (``parts.folder`` of ``study.json``, relative to the working directory as the study took it)."""
    path = study / "test" / f"seed_{seed}" / split / "diagnostic.json"
    if path.is_file():
        return _load(path)
    folder = (result.get("parts") or {}).get("folder")
    if folder is None:
        raise FileNotFoundError(f"{path}: no such file, and {study / 'study.json'} names no parts folder")
    return _load(Path(folder) / f"test_seed_{seed}.json")["splits"][split]["diagnostic"]


def summarize(study: Path) -> dict[str, Any]:
    """Per split and chosen statistic: every test seed's ρ, kept share, mean weight and paired edge over TV."""
    result = _load(study / "study.json")
    out: dict[str, Any] = {"preset": result["settings"]["preset"], "splits": {}}
    for split, families in result["test"]["splits"].items():
        per_family: dict[str, Any] = {}
        for family in ("perta_grad", "perta_fisher"):
            if family not in families:
                continue
            label = families[family]["label"]
            seeds = []
            beta = _beta(result, label)
            for seed in result["test"]["seeds"]:
                diagnostic = _diagnostic(study, result, seed, split)
                variant = diagnostic["variants"][label]
                mine, tv = families[family]["per_seed"][str(seed)], families["tv"]["per_seed"][str(seed)]
                pairs = [a - b for a, b in zip(mine, tv) if a is not None and b is not None]
                seeds.append({"seed": seed, "rank_correlation": variant["rank_correlation"],
                              "rank_correlation_by_layer_type": variant["rank_correlation_by_layer_type"],
                              "kept_share": variant["kept_share"], "uniform_kept_share": (1 / (1 + beta)) ** 2,
                              "weight_mean": variant["weight_mean"], "weight_histogram": variant["weight_histogram"],
                              "edge_over_tv": sum(pairs) / len(pairs) if pairs else None,
                              "target_forget_rouge": diagnostic["target"]["forget_rouge"],
                              "curves": {k: diagnostic["curves"][k] for k in ("tv", label)}})
            per_family[family] = {"label": label, "seeds": seeds,
                                  "median_rank_correlation": statistics.median(s["rank_correlation"] for s in seeds),
                                  "median_kept_share": statistics.median(s["kept_share"] for s in seeds)}
        out["splits"][split] = per_family
    return out


def plot(summaries: dict[str, dict[str, Any]], path: Path, split: str = "forget10") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perta_lightning.io import atomic_save_figure

    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    (a, b), (c, d) = axes
    colors = dict(zip(summaries, ["tab:blue", "tab:red", "tab:green", "tab:purple"]))
    for index, (name, summary) in enumerate(summaries.items()):
        families = summary["splits"].get(split, {})
        for offset, family in enumerate(("perta_grad", "perta_fisher")):
            if family not in families:
                continue
            seeds = families[family]["seeds"]
            x = [offset * 3 + index + 0.1 * (i - len(seeds) / 2) / max(1, len(seeds)) for i in range(len(seeds))]
            a.scatter(x, [s["rank_correlation"] for s in seeds], color=colors[name],
                      label=name if offset == 1 else None, marker="o" if family == "perta_fisher" else "^")
            if family == "perta_fisher":
                bins = len(seeds[0]["weight_histogram"])
                mean = [statistics.mean(s["weight_histogram"][k] / sum(s["weight_histogram"]) for s in seeds)
                        for k in range(bins)]
                b.step([(k + 0.5) / bins for k in range(bins)], mean, where="mid", color=colors[name],
                       label=f"{name}: {families[family]['label']}")
            edges = [(s["rank_correlation"], s["edge_over_tv"]) for s in seeds if s["edge_over_tv"] is not None]
            c.scatter([e[0] for e in edges], [e[1] for e in edges], color=colors[name],
                      marker="o" if family == "perta_fisher" else "^", label=f"{name} {family}")
            if family == "perta_fisher":
                for i, s in enumerate(seeds):
                    for method, style in (("tv", ":"), (families[family]["label"], "-")):
                        points = [p for p in s["curves"][method] if p["forget_quality"] > 0]
                        d.plot([p["forget_quality"] for p in points], [p["model_utility"] for p in points],
                               linestyle=style, color=colors[name], alpha=0.5, marker=".",
                               label=f"{name} {'TV' if method == 'tv' else 'PerTA-fisher'}" if i == 0 else None)
    a.set_xticks([0.5, 3.5], ["PerTA-grad (▲)", "PerTA-fisher (●)"])
    a.set_ylabel("Spearman ρ(s_f, s_r), all parameters")
    a.set_title(f"(a) forget and retain importance rank together ({split}, each test seed)")
    a.legend(fontsize=8)
    b.set_xlabel("PerTA weight w")
    b.set_ylabel("share of parameters (mean over test seeds)")
    b.set_title("(b) where the weights sit")
    b.legend(fontsize=8)
    c.axhline(0, color="grey", linewidth=0.8)
    c.set_xlabel("Spearman ρ(s_f, s_r)")
    c.set_ylabel("edge over TV: mean ΔMU at matched FQ")
    c.set_title("(c) the edge over TV against ρ, per seed")
    c.legend(fontsize=7)
    d.set_xscale("log")
    d.set_xlabel("Forget Quality (log)")
    d.set_ylabel("Model Utility")
    d.set_title("(d) along α: TV dotted, PerTA-fisher solid")
    d.legend(fontsize=7)
    figure.tight_layout()
    atomic_save_figure(figure, path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", action="append", required=True, help="NAME=FOLDER of a finished study")
    parser.add_argument("--plot", default="bench/diagnostic.png")
    parser.add_argument("--json", default=None)
    parser.add_argument("--split", default="forget10")
    args = parser.parse_args()
    summaries = {}
    for item in args.study:
        name, _, folder = item.partition("=")
        summaries[name] = summarize(Path(folder))
    plot(summaries, Path(args.plot), args.split)
    for name, summary in summaries.items():
        for split, families in summary["splits"].items():
            for family, data in families.items():
                edges = [s["edge_over_tv"] for s in data["seeds"] if s["edge_over_tv"] is not None]
                print(f"{name} {split} {family} ({data['label']}): median ρ {data['median_rank_correlation']:.3f}, "
                      f"median kept share {data['median_kept_share']:.3f} (uniform "
                      f"{data['seeds'][0]['uniform_kept_share']:.3f}), mean edge over TV "
                      f"{statistics.mean(edges) if edges else float('nan'):+.3f} over {len(edges)} seeds")
    if args.json:
        from perta_lightning.io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
