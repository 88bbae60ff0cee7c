"""One seed's report per forget split: ``report.json``, ``report.md``, ``tradeoff.png`` and ``weights.png``.

The report reads typed :class:`~perta_lightning.pipeline.ResultRow` records; every number of a row is read
back from that row's evaluation file and the θ_retain evaluation, through ``perta_lightning.summary.summarize``.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from perta_lightning.costs import method_costs
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.tradeoff import CurvePoint, is_collapsed, utilities_at_levels
from perta_lightning.io import atomic_save_figure, atomic_write_text
from perta_lightning.provenance import evaluation_digest, model_digest
from perta_lightning.stages import Product, Stage, StageRunner, relative_to_run
from perta_lightning.study_types import AlphaSearch, PertaVariant, ResultRow, SplitResult

COLUMNS = ("method", "alpha", "forget_quality", "model_utility", "forget_rouge", "forget_truth_ratio",
           "extraction_strength", "retain_rouge", "unlearn_seconds", "collapsed")


def build_rows(rows: list[ResultRow], root: Path) -> list[dict[str, Any]]:
    """One table row per evaluated model, every number read back from its evaluation file."""
    from perta_lightning.summary import summarize

    table = []
    for row in rows:
        summary = summarize(row.eval_file, row.reference_file)
        if summary.get("benchmark") == "muse":
            table.append(_muse_row(row, root, summary))
            continue
        aggregates = json.loads(Path(row.eval_file).read_text())["aggregates"]
        table.append({
            "method": row.method, "family": row.family, "alpha": row.alpha,
            "forget_quality": summary["forget_quality"], "model_utility": summary["model_utility"],
            "forget_rouge": summary["forget_rouge"], "forget_truth_ratio": summary["forget_truth_ratio"],
            "extraction_strength": aggregates.get("forget_extraction_strength"),
            "retain_rouge": summary["retain_rouge"], "unlearn_seconds": row.unlearn_seconds,
            "model_dir": relative_to_run(root, row.model), "eval_file": relative_to_run(root, row.eval_file),
            "model_digest": model_digest(row.model), "eval_checksum": evaluation_digest(row.eval_file),
        })
    target_utility = next(r["model_utility"] for r in table if r["method"] == "target")
    for row in table:
        row["collapsed"] = is_collapsed(row["model_utility"], target_utility)
    return table


def _muse_row(row: ResultRow, root: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A MUSE run's table row: the curve axes under the keys every report reader uses (``forget_quality`` holds
    the forget score, ``model_utility`` KnowMem on D_r; :mod:`perta_lightning.muse_summary`), and MUSE's metrics."""
    return {"method": row.method, "family": row.family, "alpha": row.alpha,
            "forget_quality": summary["forget_score"], "model_utility": summary["knowmem_retain"],
            **{key: summary[key] for key in MUSE_COLUMNS if key in summary},
            "unlearn_seconds": row.unlearn_seconds,
            "model_dir": relative_to_run(root, row.model), "eval_file": relative_to_run(root, row.eval_file),
            "model_digest": model_digest(row.model), "eval_checksum": evaluation_digest(row.eval_file)}


#: MUSE's metrics in a MUSE run's table.
MUSE_COLUMNS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "mia_auc")


def curves(table: list[dict[str, Any]]) -> dict[str, list[CurvePoint]]:
    """Each method's evaluated points in α order, each curve starting at the target model (α = 0)."""
    target = next(row for row in table if row["method"] == "target")
    start = CurvePoint(0.0, target["forget_quality"], target["model_utility"], False)
    out: dict[str, list[CurvePoint]] = {}
    for row in table:
        if row["family"] != "reference":
            out.setdefault(row["method"], [start]).append(
                CurvePoint(row["alpha"], row["forget_quality"], row["model_utility"], row["collapsed"]))
    for points in out.values():
        points.sort(key=lambda p: -1.0 if p.alpha is None else p.alpha)
    return out


def matched(table: list[dict[str, Any]], levels: list[float]) -> dict[str, list[float | None]]:
    """Model Utility of each method at each Forget Quality level (the matched-FQ rule of
    :mod:`perta_lightning.functional.tradeoff`); ``None``: not reached."""
    return {method: utilities_at_levels(points, levels) for method, points in curves(table).items()}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
    return str(value)


def markdown(table: list[dict[str, Any]], levels: list[float], at_levels: dict[str, list[float | None]],
             settings: dict[str, Any], search_evaluations: dict[str, int]) -> str:
    if table and "verbmem_forget" in table[0]:
        return muse_markdown(table, levels, at_levels, settings, search_evaluations)
    lines = ["# PerTA study report", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"{platform.processor() or platform.system()}; torch {torch.__version__}.", "",
             f"Settings: `{json.dumps(settings)}`", "",
             "Forget Quality is the KS-test p-value of forget truth ratios against θ_retain (higher: closer to a "
             "model that never saw the forget set). Model Utility is the harmonic mean of 9 retain / real-authors "
             "/ world-facts scores. *collapsed*: Model Utility below half of the target's.", "",
             "## Model Utility at matched Forget Quality", "",
             "The best non-collapsed model whose Forget Quality reaches the level; – where none does.", "",
             "| method | " + " | ".join(f"FQ ≥ {level:g}" for level in levels) + " | evaluations |",
             "|---|" + "---|" * (len(levels) + 1)]
    for method, values in at_levels.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(v) for v in values)
                     + f" | {search_evaluations.get(method, 1)} |")
    lines += ["", "## Every evaluated model", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row[column]) for column in COLUMNS) + " |" for row in table]
    return "\n".join(lines) + "\n"


def muse_markdown(table: list[dict[str, Any]], levels: list[float], at_levels: dict[str, list[float | None]],
                  settings: dict[str, Any], search_evaluations: dict[str, int]) -> str:
    """The report of a MUSE run: KnowMem on D_r at matched forget score, then MUSE's metrics of every model."""
    columns = ("method", "alpha", "forget_quality", *MUSE_COLUMNS[:-1], "unlearn_seconds", "collapsed")
    names = {"forget_quality": "forget score", "verbmem_forget": "VerbMem_f", "knowmem_forget": "KnowMem_f",
             "knowmem_retain": "KnowMem_r", "privleak": "PrivLeak"}
    lines = ["# PerTA study report (MUSE)", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"{platform.processor() or platform.system()}; torch {torch.__version__}.", "",
             f"Settings: `{json.dumps(settings)}`", "",
             "VerbMem_f: ROUGE of greedy continuations of forget excerpts; KnowMem_f / KnowMem_r: ROUGE of answers to "
             "questions about the forget / retain corpus; PrivLeak: relative MIA AUC gap to θ_retain in percent "
             "(about −100: not unlearned, 0: as θ_retain). Forget score: 1 − the larger excess of VerbMem_f and "
             "KnowMem_f over θ_retain's (1: down to θ_retain on both). *collapsed*: KnowMem_r below half the target's.",
             "", "## KnowMem on D_r at matched forget score", "",
             "The best non-collapsed model whose forget score reaches the level; – where none does.", "",
             "| method | " + " | ".join(f"F ≥ {level:g}" for level in levels) + " | evaluations |",
             "|---|" + "---|" * (len(levels) + 1)]
    for method, values in at_levels.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(v) for v in values)
                     + f" | {search_evaluations.get(method, 1)} |")
    lines += ["", "## Every evaluated model", "",
              "| " + " | ".join(names.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(column)) for column in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"


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
    atomic_save_figure(figure, path, dpi=120)
    plt.close(figure)


def layer_type(name: str) -> str:
    """Group a Hugging Face parameter name by the kind of layer it belongs to."""
    for key in ("embed", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        if key in name:
            return key
    return "norm" if "norm" in name else "other"


def weights_by_layer_type(forget: Path, retain: Path, beta: float = 1.0, power: float = 1.0,
                          samples: int = 20000) -> dict[str, torch.Tensor]:
    """PerTA weights w = s_f^p / (s_f^p + β·s_r^p + ε) of every parameter, by layer type (subsampled)."""
    from perta_lightning.checkpoints import TensorSource
    from perta_lightning.functional.weights import perta_weights

    groups: dict[str, list[torch.Tensor]] = {}
    with TensorSource.from_path(forget) as s_f, TensorSource.from_path(retain) as s_r:
        for name in sorted(s_f.infos):
            w = perta_weights(s_f.read(name), s_r.read(name), power=power, beta=beta).flatten()
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
    atomic_save_figure(figure, path, dpi=120)
    plt.close(figure)


def write_report(result: SplitResult, variants: list[PertaVariant], search: AlphaSearch,
                 importance: dict[str, Stage], runner: StageRunner) -> list[dict[str, Any]]:
    """Write ``report.json``, ``report.md``, ``tradeoff.png`` and ``weights.png`` of one forget split."""
    table = build_rows(result.rows, runner.root)
    checked = ("forget_quality", "model_utility", "verbmem_forget", "knowmem_forget") if "verbmem_forget" in table[0] \
        else ("forget_quality", "model_utility", "forget_rouge", "forget_truth_ratio")
    for row in table:
        for key in checked:
            if row[key] is None or not math.isfinite(row[key]):
                raise PertaValueError(f"{row['eval_file']}: {key} is {row[key]!r}")
    at_levels = matched(table, search.levels)
    settings = {"seed": runner.seed, "forget_split": result.forget_split, "levels": list(search.levels),
                "variants": [asdict(v) | {"label": v.label} for v in variants]}
    files = {}
    for variant in variants:
        stage = importance[variant.label]
        files[variant.label] = {"beta": variant.beta, "power": variant.power, "statistic": variant.statistic,
                                **{key: relative_to_run(runner.root, runner.path(Product(stage, key)))
                                   for key in ("forget", "retain")}}
    out = result.root
    data = {"settings": settings, "rows": table, "matched": at_levels, "importance": files,
            "search_evaluations": result.search_evaluations}
    data["costs"] = method_costs(runner.root, data)
    atomic_write_text(out / "report.json", json.dumps(data, indent=2))
    atomic_write_text(out / "report.md", markdown(table, list(search.levels), at_levels, settings,
                                                  result.search_evaluations))
    plot_tradeoff(table, out / "tradeoff.png")
    if variants:
        first = files[variants[0].label]
        plot_weights(weights_by_layer_type(runner.root / first["forget"], runner.root / first["retain"],
                                           first["beta"], first["power"]), out / "weights.png",
                     f"PerTA weights by layer type ({variants[0].label})")
    return table


def weight_concentration(forget: Path, retain: Path, beta: float = 1.0, power: float = 1.0) -> list[dict[str, Any]]:
    """Per parameter tensor: layer index, layer type, mean PerTA weight (β, p) and share above 0.5."""
    import re

    from perta_lightning.checkpoints import TensorSource
    from perta_lightning.functional.weights import perta_weights

    rows = []
    with TensorSource.from_path(forget) as s_f, TensorSource.from_path(retain) as s_r:
        for name in sorted(s_f.infos):
            w = perta_weights(s_f.read(name), s_r.read(name), power=power, beta=beta)
            layer = re.search(r"layers\.(\d+)\.", name)
            rows.append({"name": name, "layer": int(layer.group(1)) if layer else None, "type": layer_type(name),
                         "mean_weight": w.mean().item(), "share_above_half": (w > 0.5).float().mean().item(),
                         "numel": w.numel()})
    return rows
