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

4. **This project's variants** (``proposed``) run on the validation seeds beside the candidates; one goes
   to the test seeds only when its validation score beats that of the candidate chosen for its statistic.
5. With ``importance_at_base``, the test seeds also run each chosen variant with importance estimated at
   the other model (θ0 instead of θ_full), the pair of claim 2.

``study.json`` also records the machine and its float kernels, the wall time and peak memory of this
invocation, the digest of every evaluated model, and each method's unlearning cost per seed;
``REPLICATION.md`` and ``replication.json`` (:mod:`perta_lightning.replication`) give the paper's claims
their verdicts from the test seeds.

Each seed is an ordinary resumable pipeline run under ``<output>/<validation|test>/seed_<s>/``.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

from perta_lightning.data.muse import MuseSource
from perta_lightning.data.tofu import TofuSource
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.replication import ReplicationRules
from perta_lightning.functional.tradeoff import paired_differences, spread, summarize_differences
from perta_lightning.io import atomic_write_text
from perta_lightning.pipeline import resolve_eval_files
from perta_lightning.study_stages import Runtime
from perta_lightning.study_types import (
    AlphaSearch,
    Baseline,
    PertaVariant,
    check_not_empty,
    check_seeds,
    resolve_preset,
)

#: The label every merge method has in a seed's report, by the family it is aggregated as.
TV = "tv"

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
            "costs": {str(seed): report.get("costs", {}).get(label) for seed, report in reports.items()},
        }
    return out


def _forget_examples(reports: dict[int, dict[str, Any]], folder: Path) -> int | None:
    """How many forget examples Forget Quality compares (from a θ_retain evaluation of these seeds)."""
    for seed, report in sorted(reports.items()):
        row = next(r for r in report["rows"] if r["method"] == "retain")
        try:
            return len(json.loads((folder / f"seed_{seed}" / row["eval_file"]).read_text())["examples"]["forget"]["index"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def _models(folder: Path, seeds: list[int], forget_splits: list[str]) -> dict[str, Any]:
    """Per seed and split, every evaluated model: method, α, weights digest and evaluation checksum."""
    out: dict[str, Any] = {}
    for seed in seeds:
        for split, report in ((s, _reports(folder, [seed], s)[seed]) for s in forget_splits):
            out.setdefault(str(seed), {})[split] = [
                {"method": r["method"], "alpha": r["alpha"], "model_digest": r.get("model_digest"),
                 "eval_checksum": r.get("eval_checksum")} for r in report["rows"]]
    return out


def _stage_seconds(folder: Path) -> float:
    """Seconds of every stage record under ``folder`` (what the study's work cost, however often resumed)."""
    total = 0.0
    for path in folder.glob("*/seed_*/stages/**/*.json"):
        try:
            total += json.loads(path.read_text())["seconds"]
        except (OSError, ValueError, KeyError):
            continue
    return total


def choose(candidates: list[PertaVariant], proposed: list[PertaVariant], scores: dict[str, dict[str, float]]
           ) -> tuple[dict[str, PertaVariant], dict[str, dict[str, Any]]]:
    """The best candidate per statistic (ties: the first listed), and per proposed variant whether its
    validation score beats the candidate chosen for its statistic (then it goes to the test seeds)."""
    chosen = {}
    for statistic in sorted({c.statistic for c in candidates}):
        pool = [c for c in candidates if c.statistic == statistic]
        chosen[statistic] = max(pool, key=lambda c: scores[c.label]["mean"])
    decisions = {}
    for variant in proposed:
        rival = chosen.get(variant.statistic)
        rival_score = scores[rival.label]["mean"] if rival is not None else None
        score = scores[variant.label]["mean"]
        decisions[variant.label] = {"score": score, "against": rival.label if rival else None,
                                    "against_score": rival_score,
                                    "accepted": rival_score is None or score > rival_score}
    return chosen, decisions


def study(
    output: str = "runs/study",
    preset: Literal["tiny", "demo", "large", "smollm2", "muse_tiny", "muse_demo"] = "demo",
    preset_overrides: dict[str, int | float] | None = None,
    validation_seeds: list[int] | None = None,
    test_seeds: list[int] | None = None,
    candidates: list[PertaVariant] | None = None,
    proposed: list[PertaVariant] | None = None,
    importance_at_base: bool = False,
    forget_splits: list[Literal["forget01", "forget05", "forget10"]] | None = None,
    baselines: list[Baseline] | None = None,
    search: AlphaSearch | None = None,
    jobs: int = 1,
    source: TofuSource | None = None,
    eval_files: dict[str, str] | None = None,
    base_model: str | None = None,
    accelerator: str = "cpu",
    devices: int = 1,
    rules: ReplicationRules | None = None,
    benchmark: Literal["tofu", "muse"] = "tofu",
    muse_source: MuseSource | None = None,
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
        proposed: this project's own variants, run on the validation seeds beside the candidates; each goes
            to the test seeds only if its validation score beats the candidate chosen for its statistic.
        importance_at_base: the test seeds also run each chosen variant with importance at the other model
            (θ0 for θ_full), for the θ0-against-θ_full comparison of the replication table.
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
        rules: the numbers of the replication table's verdict rules, fixed before the run.
        benchmark: ``tofu`` or ``muse`` (see ``perta pipeline``): on MUSE the settings are chosen and the methods
            compared by KnowMem on D_r at matched forget-score levels, beside VerbMem, KnowMem on D_f and PrivLeak.
        muse_source: the MUSE source with ``benchmark: muse`` (default: each seed's synthetic news corpus).
    """
    import torch

    started = time.perf_counter()
    torch.set_float32_matmul_precision("high")  # as every seed's process sets it (recorded in "machine")
    validation_seeds = list(validation_seeds if validation_seeds is not None else [100, 101])
    test_seeds = list(test_seeds if test_seeds is not None else [0, 1, 2])
    check_seeds("validation_seeds", validation_seeds)
    check_seeds("test_seeds", test_seeds)
    check_not_empty("candidates", candidates)
    if set(validation_seeds) & set(test_seeds):
        raise PertaValueError(f"validation_seeds {validation_seeds} and test_seeds {test_seeds} overlap: a "
                              "setting must be reported on seeds other than those that chose it")
    if not test_seeds:
        raise PertaValueError("test_seeds is empty")
    if jobs < 1:
        raise PertaValueError(f"jobs must be at least 1, got {jobs}")
    candidates = list(candidates or DEFAULT_CANDIDATES)
    proposed = list(proposed or [])
    clash = {v.label for v in proposed} & {c.label for c in candidates}
    if clash:
        raise PertaValueError(f"proposed variants {sorted(clash)} are also candidates")
    from perta_lightning.pipeline import check_benchmark

    forget_splits, source, search = check_benchmark(benchmark, forget_splits, source, muse_source, search)
    rules = rules or ReplicationRules()
    baselines = list(baselines if baselines is not None else ["grad_ascent", "grad_diff", "npo"])
    out = Path(output)
    common = dict(preset=resolve_preset(preset, preset_overrides), search=search, forget_splits=forget_splits, source=source,
                  base_model=base_model, runtime=Runtime(accelerator, devices),
                  eval_files=resolve_eval_files(eval_files), benchmark=benchmark)

    scores: dict[str, dict[str, float]] = {}
    decisions: dict[str, dict[str, Any]] = {}
    statistics = sorted({c.statistic for c in candidates})
    if validation_seeds:
        pool = candidates + proposed
        _run_seeds([dict(common, output=out / "validation" / f"seed_{seed}", seed=seed, variants=pool,
                         baselines=[], prefix=f"[validation seed {seed}] ") for seed in validation_seeds], jobs)
        labels = [c.label for c in pool]
        per_split = {split: validation_scores(_reports(out / "validation", validation_seeds, split), labels)
                     for split in forget_splits}
        for variant in pool:
            scores[variant.label] = {"mean": sum(s[variant.label] for s in per_split.values()) / len(per_split),
                                     **{split: s[variant.label] for split, s in per_split.items()}}
        chosen, decisions = choose(candidates, proposed, scores)
    else:
        chosen = {s: next(c for c in candidates if c.statistic == s) for s in statistics}
        decisions = {v.label: {"score": None, "against": None, "against_score": None, "accepted": True}
                     for v in proposed}

    families = {"tv": TV, **{f"perta_{s}": chosen[s].label for s in statistics}}
    variants = [chosen[s] for s in statistics]
    if importance_at_base:
        for s in statistics:
            other = "base" if chosen[s].importance_at == "full" else "full"
            families[f"perta_{s}_at_{other}"] = chosen[s].at(other).label
            variants.append(chosen[s].at(other))
    for variant in proposed:
        if decisions[variant.label]["accepted"]:
            families[f"proposed_{variant.label}"] = variant.label
            variants.append(variant)
    families.update({b: b for b in baselines})
    _run_seeds([dict(common, output=out / "test" / f"seed_{seed}", seed=seed, variants=variants,
                     baselines=baselines, prefix=f"[test seed {seed}] ") for seed in test_seeds], jobs)

    from perta_lightning.provenance import machine_info, peak_rss_gib

    test_splits, muse = {}, {}
    for split in forget_splits:
        reports = _reports(out / "test", test_seeds, split)
        test_splits[split] = aggregate(reports, families, list(search.levels))
        if benchmark == "muse":
            from perta_lightning.muse_summary import muse_table

            muse[split] = muse_table(reports, families, list(search.levels))
    result = {
        "settings": {"benchmark": benchmark, "preset": preset, "preset_overrides": preset_overrides or {},
                     "levels": list(search.levels),
                     "search": asdict(search), "jobs": jobs, "forget_splits": forget_splits,
                     "baselines": baselines, "importance_at_base": importance_at_base, "rules": asdict(rules)},
        "validation": {"seeds": validation_seeds, "candidates": [asdict(c) | {"label": c.label} for c in candidates],
                       "proposed": [asdict(v) | {"label": v.label} | decisions[v.label] for v in proposed],
                       "scores": scores, "chosen": {s: chosen[s].label for s in statistics}},
        "test": {"seeds": test_seeds, "splits": test_splits, **({"muse": muse} if muse else {}),
                 "forget_examples": {split: _forget_examples(_reports(out / "test", test_seeds, split), out / "test")
                                     for split in forget_splits}},
        "machine": machine_info(),
        "models": {"validation": _models(out / "validation", validation_seeds, forget_splits),
                   "test": _models(out / "test", test_seeds, forget_splits)},
    }
    threads = torch.get_num_threads() if jobs <= 1 else max(1, (os.cpu_count() or 1) // jobs)
    result["invocation"] = {"wall_seconds": time.perf_counter() - started, "peak_rss_gib": peak_rss_gib(),
                            "stage_seconds": _stage_seconds(out), "torch_threads_per_seed": threads}
    from perta_lightning.replication import replication, replication_markdown
    from perta_lightning.study_report import plot_study, study_markdown

    table = replication(result)
    atomic_write_text(out / "study.json", json.dumps(result, indent=2))
    atomic_write_text(out / "study.md", study_markdown(result))
    atomic_write_text(out / "replication.json", json.dumps(table, indent=2))
    atomic_write_text(out / "REPLICATION.md", replication_markdown(table))
    plot_study(result, out, out / "study.png")
    return out


def build_parser() -> Any:
    from perta_lightning.arguments import function_parser

    return function_parser(study, "perta study")


def cli_main(argv: list[str]) -> None:
    from perta_lightning.arguments import call_with_arguments

    out = call_with_arguments(build_parser(), study, argv)
    print(f"[perta study] {out / 'study.md'}")
