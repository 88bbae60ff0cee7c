"""The study's report: ``report.json``, ``report.md``, ``tradeoff.png`` and ``weights.png``.

Every number of a row is read back from that row's evaluation file (``eval/<name>.json``) and the θ_retain
evaluation, through ``perta_lightning.summary.summarize``; nothing is carried over in memory.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import torch

from perta_lightning.io import atomic_write_text

COLUMNS = ("method", "alpha", "forget_quality", "model_utility", "forget_rouge", "forget_truth_ratio",
           "extraction_strength", "retain_rouge", "unlearn_seconds", "collapsed")


def _unlearn_seconds(method: str, seconds: dict[str, float]) -> float | None:
    """Cost of one unlearning run: PerTA = reinforce + importance + merge; TV = reinforce + merge."""
    if method == "tv":
        return seconds["reinforce"] + seconds["merge_tv"]
    if method.startswith("perta_"):
        statistic = method.split("_")[1]
        where = "base" if method.endswith("_at_base") else "full"
        return seconds["reinforce"] + seconds[f"importance_{statistic}_{where}"] + seconds[f"merge_{method}"]
    return seconds.get(method)


def build_rows(rows: list[tuple[str, float | None, Path, Path]], seconds: dict[str, float]) -> list[dict[str, Any]]:
    from perta_lightning.summary import summarize

    reference = next(result for method, _, _, result in rows if method == "retain")
    table = []
    for method, alpha, model_dir, result in rows:
        summary = summarize(result, reference)
        aggregates = json.loads(Path(result).read_text())["aggregates"]
        table.append({
            "method": method, "alpha": alpha, "forget_quality": summary["forget_quality"],
            "model_utility": summary["model_utility"], "forget_rouge": summary["forget_rouge"],
            "forget_truth_ratio": summary["forget_truth_ratio"],
            "extraction_strength": aggregates.get("forget_extraction_strength"),
            "retain_rouge": summary["retain_rouge"], "unlearn_seconds": _unlearn_seconds(method, seconds),
            "model_dir": str(model_dir), "eval_file": str(result),
        })
    target_utility = next(row["model_utility"] for row in table if row["method"] == "target")
    for row in table:
        row["collapsed"] = row["model_utility"] < 0.5 * target_utility
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
    return str(value)


def markdown(table: list[dict[str, Any]], settings: Any, seconds: dict[str, float]) -> str:
    lines = ["# PerTA study report", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"{platform.processor() or platform.system()}; torch {torch.__version__}.", "",
             f"Settings: `{json.dumps(vars(settings))}`", "",
             "Forget Quality is the KS-test p-value of forget truth ratios against θ_retain (higher: closer to a "
             "model that never saw the forget set). Model Utility is the harmonic mean of 9 retain / real-authors "
             "/ world-facts scores. *collapsed*: Model Utility below half of the target's.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row[column]) for column in COLUMNS) + " |" for row in table]
    lines += importance_point_comparison(table)
    lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(seconds.items())), ""]
    return "\n".join(lines)


def importance_point_comparison(table: list[dict[str, Any]]) -> list[str]:
    """Markdown lines comparing PerTA with importance at θ_full and at θ0, α by α (empty when not run)."""
    lines = []
    for statistic in ("grad", "fisher"):
        at_full = {row["alpha"]: row for row in table if row["method"] == f"perta_{statistic}"}
        at_base = {row["alpha"]: row for row in table if row["method"] == f"perta_{statistic}_at_base"}
        if not at_base:
            continue
        if not lines:
            lines = ["", "## Importance at θ_full against importance at θ0", "",
                     "| statistic | alpha | FQ at θ_full | FQ at θ0 | MU at θ_full | MU at θ0 |",
                     "|---|---|---|---|---|---|"]
        for alpha in sorted(at_full.keys() & at_base.keys()):
            full, base = at_full[alpha], at_base[alpha]
            lines.append(f"| {statistic} | {_fmt(alpha)} | {_fmt(full['forget_quality'])} | "
                         f"{_fmt(base['forget_quality'])} | {_fmt(full['model_utility'])} | "
                         f"{_fmt(base['model_utility'])} |")
    return lines


def plot_tradeoff(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    methods = list(dict.fromkeys(row["method"] for row in table))
    markers = dict(zip(methods, "o*sD^v<>ph+x"))
    for method in methods:
        points = [row for row in table if row["method"] == method]
        axis.plot([row["model_utility"] for row in points], [max(row["forget_quality"], 1e-30) for row in points],
                  marker=markers[method], linestyle="-" if len(points) > 1 else "", label=method, markersize=8)
        for row in points:
            if row["alpha"] is not None:
                axis.annotate(f"α={row['alpha']:g}", (row["model_utility"], max(row["forget_quality"], 1e-30)),
                              fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_yscale("log")
    axis.set_xlabel("Model Utility")
    axis.set_ylabel("Forget Quality (log)")
    axis.set_title("Forgetting against utility")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def layer_type(name: str) -> str:
    """Group a Hugging Face parameter name by the kind of layer it belongs to."""
    for key in ("embed", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        if key in name:
            return key
    return "norm" if "norm" in name else "other"


def weights_by_layer_type(forget: Path, retain: Path, beta: float = 1.0, samples: int = 20000) -> dict[str, torch.Tensor]:
    """PerTA weights w = s_f / (s_f + β·s_r + ε) of every parameter, grouped by layer type (subsampled)."""
    from perta_lightning.checkpoints import TensorSource
    from perta_lightning.functional.weights import perta_weights

    groups: dict[str, list[torch.Tensor]] = {}
    with TensorSource.from_path(forget) as s_f, TensorSource.from_path(retain) as s_r:
        for name in sorted(s_f.infos):
            w = perta_weights(s_f.read(name), s_r.read(name), beta=beta).flatten()
            groups.setdefault(layer_type(name), []).append(w)
    generator = torch.Generator().manual_seed(0)
    out = {}
    for key, parts in groups.items():
        flat = torch.cat(parts)
        out[key] = flat[torch.randperm(flat.numel(), generator=generator)[:samples]]
    return out


def plot_weights(groups: dict[str, torch.Tensor], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(groups)
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.boxplot([groups[name].numpy() for name in names], showfliers=False)
    axis.set_xticks(range(1, len(names) + 1), names, rotation=30)
    axis.set_ylabel("PerTA weight w")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(out: Path, rows: list[tuple[str, float | None, Path, Path]], seconds: dict[str, float],
                 settings: Any, importance_at: list[str]) -> list[dict[str, Any]]:
    table = build_rows(rows, seconds)
    for row in table:
        for key in ("forget_quality", "model_utility", "forget_rouge", "forget_truth_ratio"):
            if row[key] is None or not math.isfinite(row[key]):
                raise ValueError(f"{row['eval_file']}: {key} is {row[key]!r}")
    atomic_write_text(out / "report.json", json.dumps({"rows": table, "seconds": seconds,
                                                       "settings": vars(settings)}, indent=2))
    atomic_write_text(out / "report.md", markdown(table, settings, seconds))
    plot_tradeoff(table, out / "tradeoff.png")
    imp = out / "importance" / f"at_{importance_at[0]}" / "grad"
    from perta_lightning.pipeline_stages import _importance_file

    beta = settings.perta_beta
    plot_weights(weights_by_layer_type(_importance_file(imp, "forget"), _importance_file(imp, "retain"), beta),
                 out / "weights.png", f"PerTA-grad weights by layer type (β = {beta:g}, importance at θ_{importance_at[0]})")
    return table


def weight_concentration(forget: Path, retain: Path, beta: float = 1.0) -> list[dict[str, Any]]:
    """Per parameter tensor: layer index, layer type, mean PerTA weight (with ``beta``) and share above 0.5."""
    import re

    from perta_lightning.checkpoints import TensorSource
    from perta_lightning.functional.weights import perta_weights

    rows = []
    with TensorSource.from_path(forget) as s_f, TensorSource.from_path(retain) as s_r:
        for name in sorted(s_f.infos):
            w = perta_weights(s_f.read(name), s_r.read(name), beta=beta)
            layer = re.search(r"layers\.(\d+)\.", name)
            rows.append({"name": name, "layer": int(layer.group(1)) if layer else None, "type": layer_type(name),
                         "mean_weight": w.mean().item(), "share_above_half": (w > 0.5).float().mean().item(),
                         "numel": w.numel()})
    return rows
