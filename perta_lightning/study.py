"""``perta study``: the PerTA study over many seeds, with PerTA's settings chosen on held-out seeds.

1. **Validation seeds** run TV and every candidate PerTA variant (``candidates``: β, p, importance at θ0
   or θ_full, Fisher by example or by batch, how many importance examples), each with its α search.
2. For each statistic (grad, Fisher) the candidate with the best **validation score** is chosen: the mean,
   over validation seeds, forget splits and Forget Quality levels, of the Model Utility at that level
   (the matched-FQ rule of :mod:`perta_lightning.functional.tradeoff`), counting a level not reached as 0.
3. **Test seeds**, disjoint from the validation seeds, run TV, the two chosen variants and the
   training-based baselines. Only they are aggregated: Model Utility at each level as mean ± std over the
   seeds that reach it, and the per-seed paired difference against TV with a bootstrap interval and a sign
   test. ``study.json``, ``study.md`` and ``study.png`` say which seeds chose and which were reported.

Each seed is an ordinary resumable pipeline run under ``<output>/<validation|test>/seed_<s>/``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

from perta_lightning.data.tofu import TofuSource
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.tradeoff import paired_differences, spread, summarize_differences
from perta_lightning.io import atomic_write_text
from perta_lightning.pipeline import resolve_eval_files
from perta_lightning.study_stages import Runtime
from perta_lightning.study_types import AlphaSearch, Baseline, PertaVariant, resolve_preset

DEFAULT_CANDIDATES = [PertaVariant("grad", beta=1.0), PertaVariant("grad", beta=16.0),
                      PertaVariant("fisher", beta=1.0), PertaVariant("fisher", beta=16.0)]


def _seed_job(job: dict[str, Any]) -> None:
    """One seed's pipeline in a worker process (``jobs`` > 1) or in this one."""
    import torch

    from perta_lightning.pipeline import run_seed

    threads = job.pop("threads", None)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("high")
    run_seed(**job)


def _run_seeds(jobs: list[dict[str, Any]], workers: int) -> None:
    if workers <= 1:
        for job in jobs:
            _seed_job(dict(job))
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for future in [pool.submit(_seed_job, dict(job, threads=threads)) for job in jobs]:
            future.result()


def _reports(folder: Path, seeds: list[int], forget_split: str) -> dict[int, dict[str, Any]]:
    out = {}
    for seed in seeds:
        path = folder / f"seed_{seed}" / forget_split / "report.json"
        try:
            out[seed] = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise PertaValueError(f"{path}: cannot read the seed's report ({error})") from error
    return out


def validation_scores(reports: dict[int, dict[str, Any]], labels: list[str]) -> dict[str, float]:
    """Mean Model Utility at the levels over seeds (a level not reached counts 0), per variant label."""
    scores = {}
    for label in labels:
        values = [value or 0.0 for report in reports.values() for value in report["matched"][label]]
        scores[label] = sum(values) / len(values)
    return scores


def aggregate(reports: dict[int, dict[str, Any]], families: dict[str, str], levels: list[float]) -> dict[str, Any]:
    """Test-seed aggregate of each method family: spread at each level and paired differences against TV.

    ``families`` maps a family name (``tv``, ``perta_grad``, ``perta_fisher``, baselines) to the method
    label it has in the seeds' reports.
    """
    per_seed = {family: {seed: report["matched"][label] for seed, report in reports.items()}
                for family, label in families.items()}
    out: dict[str, Any] = {}
    for family, label in families.items():
        at_levels = [asdict(spread([per_seed[family][seed][index] for seed in sorted(reports)]))
                     for index in range(len(levels))]
        differences = paired_differences(per_seed[family], per_seed["tv"]) if family != "tv" else []
        out[family] = {
            "label": label,
            "per_seed": {str(seed): values for seed, values in per_seed[family].items()},
            "at_levels": at_levels,
            "vs_tv": [asdict(summarize_differences(d, seed=index)) for index, d in enumerate(differences)],
            "evaluations": {str(seed): report["search_evaluations"].get(label, 1) for seed, report in reports.items()},
        }
    return out


def study(
    output: str = "runs/study",
    preset: Literal["tiny", "demo", "large", "smollm2"] = "demo",
    preset_overrides: dict[str, int | float] | None = None,
    validation_seeds: list[int] | None = None,
    test_seeds: list[int] | None = None,
    candidates: list[PertaVariant] | None = None,
    forget_splits: list[Literal["forget01", "forget05", "forget10"]] | None = None,
    baselines: list[Baseline] | None = None,
    search: AlphaSearch | None = None,
    jobs: int = 1,
    source: TofuSource | None = None,
    eval_files: dict[str, str] | None = None,
    base_model: str | None = None,
    accelerator: str = "cpu",
    devices: int = 1,
) -> Path:
    """Run the multi-seed PerTA study with held-out choice of PerTA's settings; return the output folder.

    Args:
        output: folder of the study; each seed's run lives in ``<output>/<validation|test>/seed_<s>``.
        preset: sizes and schedules of each seed (``tiny``, ``demo``, ``large``).
        preset_overrides: preset fields to change, e.g. ``{finetune_epochs: 40}``.
        validation_seeds: seeds on which the candidates are compared (default ``[100, 101]``).
        test_seeds: seeds on which the chosen settings are reported (default ``[0, 1, 2]``); must not overlap
            the validation seeds.
        candidates: PerTA variants compared on the validation seeds; the best grad and the best Fisher
            variant go to the test seeds (default: grad and Fisher with β = 1 and β = 16).
        forget_splits: forget splits studied in every seed (default ``[forget10]``).
        baselines: training-based baselines on the test seeds (default: GradAscent, GradDiff, NPO).
        search: the α search and the Forget Quality levels.
        jobs: seeds run at once, in separate processes sharing the cores (float kernels then run with fewer
            threads, so figures can differ in the last digits from ``jobs: 1``; resume with the same value).
        source: TOFU source (default: each seed's synthetic benchmark).
        eval_files: with the synthetic benchmark, ``real_authors_perturbed`` / ``world_facts_perturbed`` read
            from these files instead (see ``perta pipeline``).
        base_model: a pretrained θ0 instead of one pre-trained from scratch.
        accelerator: Lightning accelerator of training and evaluation.
        devices: devices per stage.
    """
    validation_seeds = list(validation_seeds if validation_seeds is not None else [100, 101])
    test_seeds = list(test_seeds if test_seeds is not None else [0, 1, 2])
    if set(validation_seeds) & set(test_seeds):
        raise PertaValueError(f"validation_seeds {validation_seeds} and test_seeds {test_seeds} overlap: a "
                              "setting must be reported on seeds other than those that chose it")
    if not test_seeds:
        raise PertaValueError("test_seeds is empty")
    if jobs < 1:
        raise PertaValueError(f"jobs must be at least 1, got {jobs}")
    candidates = list(candidates or DEFAULT_CANDIDATES)
    forget_splits = list(forget_splits or ["forget10"])
    search = search or AlphaSearch()
    baselines = list(baselines if baselines is not None else ["grad_ascent", "grad_diff", "npo"])
    out = Path(output)
    common = dict(preset=resolve_preset(preset, preset_overrides), search=search, forget_splits=forget_splits, source=source,
                  base_model=base_model, runtime=Runtime(accelerator, devices),
                  eval_files=resolve_eval_files(eval_files))

    chosen: dict[str, PertaVariant] = {}
    scores: dict[str, dict[str, float]] = {}
    statistics = sorted({c.statistic for c in candidates})
    if validation_seeds:
        _run_seeds([dict(common, output=out / "validation" / f"seed_{seed}", seed=seed, variants=candidates,
                         baselines=[], prefix=f"[validation seed {seed}] ") for seed in validation_seeds], jobs)
        labels = [c.label for c in candidates]
        per_split = {split: validation_scores(_reports(out / "validation", validation_seeds, split), labels)
                     for split in forget_splits}
        for candidate in candidates:
            scores[candidate.label] = {"mean": sum(s[candidate.label] for s in per_split.values()) / len(per_split),
                                       **{split: s[candidate.label] for split, s in per_split.items()}}
        for statistic in statistics:
            pool = [c for c in candidates if c.statistic == statistic]
            chosen[statistic] = max(pool, key=lambda c: scores[c.label]["mean"])  # ties: the first listed
    else:
        for statistic in statistics:
            chosen[statistic] = next(c for c in candidates if c.statistic == statistic)

    variants = [chosen[s] for s in statistics]
    _run_seeds([dict(common, output=out / "test" / f"seed_{seed}", seed=seed, variants=variants,
                     baselines=baselines, prefix=f"[test seed {seed}] ") for seed in test_seeds], jobs)
    families = {"tv": "tv", **{f"perta_{s}": chosen[s].label for s in statistics}, **{b: b for b in baselines}}
    result = {
        "settings": {"preset": preset, "preset_overrides": preset_overrides or {}, "levels": list(search.levels), "search": asdict(search), "jobs": jobs,
                     "forget_splits": forget_splits},
        "validation": {"seeds": validation_seeds, "candidates": [asdict(c) | {"label": c.label} for c in candidates],
                       "scores": scores, "chosen": {s: chosen[s].label for s in statistics}},
        "test": {"seeds": test_seeds, "splits": {
            split: aggregate(_reports(out / "test", test_seeds, split), families, list(search.levels))
            for split in forget_splits}},
    }
    from perta_lightning.study_report import plot_study, study_markdown

    atomic_write_text(out / "study.json", json.dumps(result, indent=2))
    atomic_write_text(out / "study.md", study_markdown(result))
    plot_study(result, out, out / "study.png")
    return out


def build_parser() -> Any:
    from perta_lightning.arguments import function_parser

    return function_parser(study, "perta study")


def cli_main(argv: list[str]) -> None:
    from perta_lightning.arguments import call_with_arguments

    out = call_with_arguments(build_parser(), study, argv)
    print(f"[perta study] {out / 'study.md'}")
