"""One seed's report per forget split: ``report.json``, ``report.md``, ``tradeoff.png``, ``weights.png`` and
``diagnostic.json``, on any benchmark.

The report reads typed :class:`~perta_lightning.study.options.ResultRow` records; every number of a row is read
back from that row's evaluation file and the θ_retain evaluation, through the benchmark's summary. Rows carry
the benchmark's own axis keys (``forget_quality`` and ``model_utility`` on TOFU, ``forget_score`` and
``knowmem_retain`` on MUSE) beside its other columns.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from perta_lightning.benchmarks.base import Axes, Benchmark
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.tradeoff import CurvePoint, is_collapsed, method_curves, utilities_at_levels
from perta_lightning.io import atomic_save_figure, atomic_write_text
from perta_lightning.provenance import evaluation_digest, model_digest
from perta_lightning.stages import Product, Stage, StageRunner, relative_to_run
from perta_lightning.study.costs import method_costs
from perta_lightning.study.options import AlphaSearch, PertaVariant, ResultRow, SplitResult
from perta_lightning.study.weights import WeightFiles, weights_by_layer_type


@dataclass
class SplitReport:
    """What one forget split of one seed found, as its ``report.json`` holds it: every evaluated model's row, the
    utility each method keeps at each level (``None``: not reached), the full evaluations of each search (and
    baseline curve), the cost of each method, the weight files of each PerTA variant, and the screenings of each
    search (α whose forgetting alone was measured; only those that can enter the matched table are also
    evaluated in full and are rows), and, with attacks, how much of the selected models' forgetting each attack undid
    (:func:`perta_lightning.study.attacks.robustness`)."""

    forget_split: str
    rows: list[dict[str, Any]]
    matched: dict[str, list[float | None]]
    search_evaluations: dict[str, int]
    costs: dict[str, dict[str, Any]]
    weights: dict[str, WeightFiles]
    search_screens: dict[str, int] = field(default_factory=dict)
    robustness: dict[str, Any] = field(default_factory=dict)


def build_rows(rows: list[ResultRow], root: Path, benchmark: Benchmark) -> list[dict[str, Any]]:
    """One table row per evaluated model, every number read back from its evaluation file."""
    ax = benchmark.axes
    table = []
    for row in rows:
        summary = benchmark.summarize(row.eval_file, row.reference_file)
        table.append({
            "method": row.method, "family": row.family, "alpha": row.alpha,
            ax.forget_key: summary[ax.forget_key], ax.utility_key: summary[ax.utility_key],
            **benchmark.report_row(summary, Path(row.eval_file)), "unlearn_seconds": row.unlearn_seconds,
            "model_dir": relative_to_run(root, row.model), "eval_file": relative_to_run(root, row.eval_file),
            "model_digest": model_digest(row.model), "eval_checksum": evaluation_digest(row.eval_file),
        })
    target_utility = next(r[ax.utility_key] for r in table if r["method"] == "target")
    for row in table:
        row["collapsed"] = is_collapsed(row[ax.utility_key], target_utility)
    return table


def curves(table: list[dict[str, Any]], axes: Axes) -> dict[str, list[CurvePoint]]:
    """Each method's evaluated points in α order, each curve starting at the target model (α = 0)."""
    return method_curves(table, axes.forget_key, axes.utility_key)


def matched(table: list[dict[str, Any]], levels: list[float], axes: Axes) -> dict[str, list[float | None]]:
    """The utility each method keeps at each level of forgetting (the matched rule of
    :mod:`perta_lightning.functional.tradeoff`); ``None``: not reached."""
    return {method: utilities_at_levels(points, levels) for method, points in curves(table, axes).items()}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
    return str(value)


def markdown(table: list[dict[str, Any]], levels: list[float], at_levels: dict[str, list[float | None]],
             settings: dict[str, Any], search_evaluations: dict[str, int], benchmark: Benchmark,
             search_screens: dict[str, int] | None = None, robustness: dict[str, Any] | None = None) -> str:
    """``report.md``: the utility each method keeps at each level, then every evaluated model."""
    ax = benchmark.axes
    screens = {method: count for method, count in (search_screens or {}).items() if count}
    extra = benchmark.markdown_columns if benchmark.markdown_columns is not None else benchmark.report_columns
    columns = tuple(dict.fromkeys(("method", "alpha", ax.forget_key, ax.utility_key, *extra, "unlearn_seconds",
                                   "collapsed")))
    lines = [f"# PerTA study report{benchmark.title_note}", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"{platform.processor() or platform.system()}; torch {torch.__version__}.", "",
             f"Settings: `{json.dumps(settings)}`", "", benchmark.report_intro, "",
             f"## {ax.utility_name} at matched {ax.forget_name}", "",
             f"The best non-collapsed model whose {ax.forget_name} reaches the level; – where none does. A "
             "method's evaluations: the α search's probes (TV, PerTA), or the points along a baseline's training "
             "(its α column: the epochs it trained)."
             + (f" Screenings: the α whose {ax.forget_name} alone was measured first; only those reaching the lowest "
                "level were evaluated in full." if screens else ""), "",
             "| method | " + " | ".join(f"{ax.forget_short} ≥ {level:g}" for level in levels) + " | evaluations |"
             + (" screenings |" if screens else ""),
             "|---|" + "---|" * (len(levels) + 1 + bool(screens))]
    for method, values in at_levels.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(v) for v in values)
                     + f" | {search_evaluations.get(method, 1)} |"
                     + (f" {screens.get(method, 0)} |" if screens else ""))
    names = benchmark.column_names
    lines += ["", "## Every evaluated model", "",
              "| " + " | ".join(names.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(column)) for column in columns) + " |" for row in table]
    lines += robustness_markdown(robustness or {}, levels, ax)
    return "\n".join(lines) + "\n"


def robustness_markdown(robustness: dict[str, Any], levels: list[float], axes: Axes) -> list[str]:
    """``report.md``'s section on the attacks: each selected model's recovery, the mean over the forget metrics."""
    if not robustness:
        return []
    lines = ["", "## Does the forgetting last?", "",
             f"Each method's model at each {axes.forget_name} level (the one the matched table chose), the target and "
             "θ_retain were attacked. Recovery: the share of the forgetting the attack undid, (m_attacked − "
             "m_unlearned) / (m_target − m_unlearned), the mean over the forget metrics "
             f"({', '.join(robustness['metrics'])}"
             + (f"; {', '.join(robustness['log_metrics'])} in decades, log10" if robustness.get("log_metrics") else "")
             + "); quantization on every forget example; relearning on the forget "
             "examples it did not see, less what the same relearning moves in θ_retain. 0: nothing recovered; 1: "
             "back at the target; – where the level is not reached or nothing was forgotten.", ""]
    lines += [f"- {note}" for note in robustness.get("notes", [])]
    for label in robustness["attacks"]:
        retain = robustness["retain"][label]
        lines += ["", f"### {label} ({_fmt(robustness['seconds'].get(label))} s of attack stages)", "",
                  "| method | " + " | ".join(f"{axes.forget_short} ≥ {level:g}" for level in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for method, per_level in robustness["recovery"][label].items():
            lines.append(f"| {method} | " + " | ".join(_fmt(None if e is None else e["mean"]) for e in per_level) + " |")
        lines.append(f"| θ_retain (the attack alone) | {_fmt(retain['mean'])} |" + " |" * (len(levels) - 1))
    return lines


def plot_tradeoff(table: list[dict[str, Any]], path: Path, axes: Axes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    methods = list(dict.fromkeys(row["method"] for row in table))
    shapes = "o*sD^v<>ph+xd"
    markers = {method: shapes[index % len(shapes)] for index, method in enumerate(methods)}  # as many as methods
    for method in methods:
        points = [row for row in table if row["method"] == method]
        axis.plot([row[axes.utility_key] for row in points], [max(row[axes.forget_key], 1e-30) for row in points],
                  marker=markers[method], linestyle="-" if len(points) > 1 else "", label=method, markersize=8)
        for row in points:
            if row["alpha"] is not None:
                axis.annotate(f"α={row['alpha']:g}", (row[axes.utility_key], max(row[axes.forget_key], 1e-30)),
                              fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_yscale("log")
    axis.set_xlabel(axes.utility_name)
    axis.set_ylabel(f"{axes.forget_name} (log)")
    axis.set_title("Forgetting against utility")
    axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_save_figure(figure, path, dpi=120)
    plt.close(figure)


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


def write_report(result: SplitResult, benchmark: Benchmark, variants: list[PertaVariant], search: AlphaSearch,
                 importance: dict[str, Stage], runner: StageRunner, reinforced: Stage,
                 robustness: dict[str, Any] | None = None) -> SplitReport:
    """Write ``report.json``, ``report.md``, ``tradeoff.png``, ``weights.png`` and ``diagnostic.json`` of one
    forget split; return what it found."""
    from perta_lightning.study.diagnostics import diagnose_split

    table = build_rows(result.rows, runner.root, benchmark)
    for row in table:
        for key in benchmark.checked_columns():
            if row[key] is None or not math.isfinite(row[key]):
                raise PertaValueError(f"{row['eval_file']}: {key} is {row[key]!r}")
    at_levels = matched(table, search.levels, benchmark.axes)
    settings = {"seed": runner.seed, "forget_split": result.forget_split, "levels": list(search.levels),
                "variants": [asdict(v) | {"label": v.label} for v in variants]}
    weights = {v.label: WeightFiles(runner.path(Product(importance[v.label], "forget")),
                                    runner.path(Product(importance[v.label], "retain")), v.beta, v.power)
               for v in variants}
    files = {label: {"beta": w.beta, "power": w.power, "statistic": v.statistic,
                     "forget": relative_to_run(runner.root, w.forget), "retain": relative_to_run(runner.root, w.retain)}
             for (label, w), v in zip(weights.items(), variants)}
    out = result.root
    data = {"settings": settings, "rows": table, "matched": at_levels, "importance": files,
            "search_evaluations": result.search_evaluations, "search_screens": result.search_screens,
            "search_stages": result.search_stages, **({"robustness": robustness} if robustness else {})}
    data["costs"] = method_costs(runner.root, data)
    atomic_write_text(out / "report.json", json.dumps(data, indent=2))
    atomic_write_text(out / "report.md", markdown(table, list(search.levels), at_levels, settings,
                                                  result.search_evaluations, benchmark, result.search_screens,
                                                  robustness))
    plot_tradeoff(table, out / "tradeoff.png", benchmark.axes)
    if variants:
        first = weights[variants[0].label]
        plot_weights(weights_by_layer_type(first), out / "weights.png",
                     f"PerTA weights by layer type ({variants[0].label})")
        diagnose_split(out, runner.seed, table, benchmark, weights, runner.path(Product(reinforced)))
    return SplitReport(result.forget_split, table, at_levels, result.search_evaluations, data["costs"], weights,
                       result.search_screens, robustness or {})
