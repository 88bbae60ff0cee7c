"""``perta pipeline``: one seed of the PerTA study, end to end, resumable, on any benchmark.

For each forget split the seed's graph (:mod:`perta_lightning.study.graph`) is run, then each merge method (TV
and each PerTA variant) searches α: rounds of ``<split>/models/<method>/round_<k>`` merges,
``<split>/screen/<method>/alpha_<α>`` screenings where the benchmark has one (``search.screen``), and
``<split>/eval/<method>/alpha_<α>`` evaluations of the models that can enter the matched table, until each
level of the forgetting axis is bracketed (:func:`perta_lightning.functional.tradeoff.next_alphas`). Then ``<split>/report.json``, ``report.md``,
``tradeoff.png``, ``weights.png`` and ``diagnostic.json`` are written. With ``attacks``, the models the matched
comparison selects are attacked first (:mod:`perta_lightning.study.attacks`), and the reports say how much of their
forgetting each attack undid.

Stages are skipped when their record in ``stages/`` still holds (see :mod:`perta_lightning.stages`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from perta_lightning.functional.tradeoff import CurvePoint, can_be_selected, is_collapsed, next_alphas
from perta_lightning.stages import Product, Progress, StageRunner
from perta_lightning.study.attacks import robustness
from perta_lightning.study.graph import SeedGraph, seed_graph
from perta_lightning.study.options import (
    AlphaSearch,
    BaselineVariant,
    PertaVariant,
    ResultRow,
    Run,
    RunOptions,
    SplitResult,
    check_not_empty,
    check_seeds,
)
from perta_lightning.study.split_report import SplitReport, write_report
from perta_lightning.study.stages import Merge, TransformImportance, alpha_key

DEFAULT_VARIANTS = [PertaVariant("grad"), PertaVariant("fisher")]


def _curve_point(run: Run, eval_file: Path, reference_file: Path, alpha: float, target: CurvePoint) -> CurvePoint:
    summary = run.benchmark.summarize(eval_file, reference_file)
    forget, utility = summary[run.benchmark.axes.forget_key], summary[run.benchmark.axes.utility_key]
    return CurvePoint(alpha, forget, utility, is_collapsed(utility, target.model_utility))


@dataclass
class SearchResult:
    """One method's α search: its rows (the models evaluated in full), how many α were screened, and the names
    of its merge and screening stages (what its cost charges beside its rows' evaluations)."""

    rows: list[ResultRow]
    screens: int
    stages: list[str]
    products: dict[str, Product]


def _search(runner: StageRunner, run: Run, graph: SeedGraph, method: str, family: str, variant: PertaVariant | None,
            target: CurvePoint) -> SearchResult:
    """Rounds of merge + screen + evaluate for one method until each level is bracketed.

    With ``search.screen`` and a benchmark that screens, each α is screened first and evaluated in full only when
    its forgetting value can put it in the matched table (:func:`can_be_selected`); a screened-only point
    brackets levels with that value, as not collapsed (:mod:`perta_lightning.functional.tradeoff`)."""
    search, split, axes = run.search, graph.plan.name, run.benchmark.axes
    screening = search.screen and graph.screening is not None
    importance = None if variant is None else graph.importance_of(variant, run.preset.importance_examples)
    reinforce_seconds = runner.records[graph.reinforced.name].seconds
    importance_stages = [] if importance is None else [importance]
    if isinstance(importance, TransformImportance):  # and the raw importance it transforms
        importance_stages.append(importance.source)
    importance_seconds = sum(runner.records[stage.name].seconds for stage in importance_stages)
    reference_file = runner.path(Product(graph.reference, "eval"))
    points: list[CurvePoint] = [target]
    rows: list[ResultRow] = []
    stages: list[str] = []
    products: dict[str, Product] = {}
    screens = 0
    alphas = sorted(set(search.initial))
    for round_index in range(search.rounds + 1):
        if not alphas:
            break
        merge = Merge(f"{split}/models/{method}/round_{round_index}", graph.full, graph.reinforced, alphas, importance,
                      variant.beta if variant else 1.0, variant.power if variant else 1.0)
        models = [Product(merge, alpha_key(alpha)) for alpha in alphas]
        first = [graph.screen(f"{split}/screen/{method}/alpha_{alpha:g}", model) if screening else
                 graph.evaluate(f"{split}/eval/{method}/alpha_{alpha:g}", model) for alpha, model in zip(alphas, models)]
        runner.progress.plan([merge, *first])
        merge_seconds = runner.run(merge).seconds
        stages.append(merge.name)
        for alpha, model, stage in zip(alphas, models, first):
            runner.run(stage)
            if screening:
                screens += 1
                stages.append(stage.name)
                forget = run.benchmark.summarize(runner.path(Product(stage, "eval")), reference_file)[axes.forget_key]
                if not can_be_selected(forget, search.levels):
                    points.append(CurvePoint(alpha, forget, math.nan, collapsed=False))  # its utility is unknown
                    continue
                stage = graph.evaluate(f"{split}/eval/{method}/alpha_{alpha:g}", model)
                runner.progress.plan([stage])
                runner.run(stage)
            eval_file = runner.path(Product(stage, "eval"))
            points.append(_curve_point(run, eval_file, reference_file, alpha, target))
            rows.append(ResultRow(method, family, alpha, runner.path(model), eval_file, reference_file,
                                  reinforce_seconds + importance_seconds + merge_seconds / len(alphas)))
            products[str(runner.path(model))] = model
        evaluated = {p.alpha for p in points}
        alphas = [a for a in next_alphas(points, search.levels, ratio=search.ratio, alpha_max=search.alpha_max)
                  if a not in evaluated]
    return SearchResult(rows, screens, stages, products)


def _split(runner: StageRunner, run: Run, seed: int, forget_split: str, variants: list[PertaVariant],
           baselines: list[BaselineVariant], include_tv: bool, output: Path) -> SplitReport:
    """One forget split of a seed: its graph, every method's search, and its report."""
    graph = seed_graph(run, seed, forget_split, variants, baselines)
    stages = [s for s in graph.stages if s.name not in runner.records]
    runner.progress.plan(stages)
    runner.run_all(stages)
    reference_file = runner.path(Product(graph.reference, "eval"))
    target_file = runner.path(Product(graph.target, "eval"))
    rows = [ResultRow("retain", "reference", None, runner.path(Product(graph.reference.model.stage)), reference_file,
                      reference_file),
            ResultRow("target", "reference", None, runner.path(Product(graph.full)), target_file, reference_file)]
    products = {str(runner.path(Product(graph.reference.model.stage))): Product(graph.reference.model.stage),
                str(runner.path(Product(graph.full))): Product(graph.full)}
    counts: dict[str, int] = {}
    screens: dict[str, int] = {}
    search_stages: dict[str, list[str]] = {}
    for label, unlearn, curve in graph.baselines:  # the points of each baseline's curve, by the epochs trained
        seconds = runner.records[unlearn.name].seconds
        for epoch, evaluation in curve:
            rows.append(ResultRow(label, "baseline", float(epoch), runner.path(Product(unlearn, f"epoch_{epoch}")),
                                  runner.path(Product(evaluation, "eval")), reference_file,
                                  seconds * epoch / unlearn.epochs))
            products[str(rows[-1].model)] = Product(unlearn, f"epoch_{epoch}")
        counts[label] = len(curve)
    summary = run.benchmark.summarize(target_file, reference_file)
    target = CurvePoint(0.0, summary[run.benchmark.axes.forget_key], summary[run.benchmark.axes.utility_key])
    methods = ([("tv", "tv", None)] if include_tv else []) + [(v.label, f"perta_{v.statistic}", v) for v in variants]
    per_method = len(run.search.initial) + run.search.rounds
    runner.progress.expect(len(methods) * (2 * per_method), len(methods) * per_method * 0.4)
    for method, family, variant in methods:
        searched = _search(runner, run, graph, method, family, variant, target)
        rows += searched.rows
        counts[method], screens[method], search_stages[method] = len(searched.rows), searched.screens, searched.stages
        products |= searched.products
    runner.progress.settle()
    result = SplitResult(graph.plan.name, output / graph.plan.name, rows, counts, screens, search_stages)
    attacked = {} if run.attacks is None else robustness(runner, run, graph, rows, products)
    used = {v.label: graph.importance_of(v, run.preset.importance_examples) for v in variants}
    return write_report(result, run.benchmark, variants, run.search, used, runner, graph.reinforced, attacked)


def run_seed(output: Path, seed: int, run: Run, variants: list[PertaVariant], baselines: list[BaselineVariant],
             include_tv: bool = True, prefix: str = "") -> list[SplitReport]:
    """Run one seed's graph under ``output`` for each forget split; write each split's report and return them."""
    from perta_lightning.callbacks.progress import quiet_dependencies

    runner = StageRunner(output, seed, Progress(prefix=prefix))
    with quiet_dependencies():
        return [_split(runner, run, seed, split, variants, baselines, include_tv, Path(output))
                for split in run.forget_splits]


def pipeline(
    options: RunOptions,
    output: str = "runs/pipeline",
    seed: int = 0,
    variants: list[PertaVariant] | None = None,
    include_tv: bool = True,
) -> Path:
    """Run one seed of the PerTA study end to end and write its report; return the output folder.

    Args:
        options: the benchmark, its data, the preset, the baselines, the α search and the runtime
            (:class:`~perta_lightning.study.options.RunOptions`; top-level keys of the config).
        output: folder for every artifact; an interrupted run resumes from it.
        seed: drives the data, the training and the importance subsampling (each stage gets its own seed
            derived from it and the stage's name).
        variants: PerTA settings merged and evaluated (default: grad and Fisher with the paper's β = p = 1).
        include_tv: also search plain task arithmetic.
    """
    check_seeds("seed", [seed])
    check_not_empty("variants", variants)
    for variant in variants or []:
        variant.check()
    run = options.resolve()
    run_seed(Path(output), seed, run, list(variants or DEFAULT_VARIANTS), run.baselines, include_tv)
    return Path(output)


def build_parser() -> object:
    from perta_lightning.arguments import function_parser

    return function_parser(pipeline, "perta pipeline", RunOptions)


def cli_main(argv: list[str]) -> None:
    import torch

    from perta_lightning.arguments import call_with_arguments

    torch.set_float32_matmul_precision("high")
    out = call_with_arguments(build_parser(), pipeline, argv, RunOptions)
    print(f"[perta pipeline] reports: {', '.join(str(p) for p in sorted(out.glob('*/report.md')))}")


__all__ = ["AlphaSearch", "DEFAULT_VARIANTS", "pipeline", "run_seed"]
