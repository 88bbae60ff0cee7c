"""``perta study``: the PerTA study over many seeds, with PerTA's settings chosen on held-out seeds, on any benchmark.

1. **Check** every option before any stage starts (:func:`check_study`).
2. **Validation seeds** run TV and every candidate PerTA variant (``candidates``: β, p, importance at θ0
   or θ_full, Fisher by example or by batch, how many importance examples), each with its α search. For each
   statistic (grad, Fisher) the candidate with the best **validation score** is chosen: the mean, over
   validation seeds and forget splits, of the area under the matched-utility profile between the lowest and
   the highest level (``validation_score: area``, :func:`~perta_lightning.functional.tradeoff.utility_area`),
   which moves by a sliver when one search falls just short of a level; ``validation_score: levels`` is the
   earlier rule, the mean utility at the levels with a level not reached counting 0. This project's variants
   (``proposed``) run beside the candidates; one goes to the test seeds only when its validation score beats
   that of the candidate chosen for its statistic (:func:`choose_settings`).
3. **Test seeds**, disjoint from the validation seeds, run TV, the chosen variants (with ``importance_at_base``
   also each at the other model, θ0 instead of θ_full: the pair of claim 2) and the training-based baselines, each
   at its chosen setting and evaluated along its training, its curve (:func:`run_test_seeds`). With ``attacks``, each
   test seed's selected models, target and θ_retain are then quantized and relearned
   (:mod:`perta_lightning.study.attacks`); the validation seeds run no attacks.
4. **Write**: only the test seeds are aggregated: the utility at each level as mean ± std over the seeds that
   reach it, and the per-seed paired difference against TV with a bootstrap interval and a sign test.
   ``study.json``, ``study.md`` and ``study.png`` say which seeds chose and which were reported; ``study.json``
   also records the machine and its float kernels, the wall time and peak memory of this invocation, the digest
   of every evaluated model, and each method's unlearning cost per seed; ``REPLICATION.md`` and
   ``replication.json`` (:mod:`perta_lightning.study.replication`) give the paper's claims their verdicts from the
   test seeds (:func:`write_study`).

The chosen settings travel as typed values from the validation step to the test step, and each seed's results as
the :class:`~perta_lightning.study.split_report.SplitReport` its run returns. Each seed is an ordinary resumable
pipeline run under ``<output>/<validation|test>/seed_<s>/``.

**In parts** (:mod:`perta_lightning.study.parts`): with ``parts``, each seed that finishes writes
``<parts>/<phase>_seed_<s>.json``, and a seed whose file is there is read, not run; ``run_seeds`` says which seeds
this invocation may run. The aggregate is written once every seed is in (the test seeds run once every validation
seed is); until then the invocation says which seeds are missing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from perta_lightning.benchmarks.base import Axes
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.replication import ReplicationRules
from perta_lightning.functional.tradeoff import (
    method_curves,
    paired_differences,
    spread,
    summarize_differences,
    utility_area,
)
from perta_lightning.io import atomic_write_text
from perta_lightning.study.attacks import mean_recovery
from perta_lightning.study.options import (
    BaselineVariant,
    PertaVariant,
    Run,
    RunOptions,
    check_not_empty,
    check_seeds,
)
from perta_lightning.study.parts import (
    SeedPart,
    part_path,
    read_part,
    seed_part,
    study_settings,
    test_phase_settings,
    write_part,
)
from perta_lightning.study.split_report import SplitReport

#: The label every merge method has in a seed's report, by the family it is aggregated as.
TV = "tv"

DEFAULT_CANDIDATES = [PertaVariant("grad", beta=1.0), PertaVariant("grad", beta=16.0),
                      PertaVariant("fisher", beta=1.0), PertaVariant("fisher", beta=16.0)]


@dataclass(frozen=True)
class StudyPlan:
    """A study's options, checked: the run every seed makes, the seeds of each phase, the variants, how many
    seeds run at once, and the replication table's rules."""

    options: RunOptions
    run: Run
    validation_seeds: list[int]
    test_seeds: list[int]
    candidates: list[PertaVariant]
    proposed: list[PertaVariant]
    importance_at_base: bool
    jobs: int
    rules: ReplicationRules
    baseline_candidates: list[BaselineVariant]
    run_seeds: list[int] | None = None
    parts: Path | None = None
    validation_score: str = "area"

    @property
    def statistics(self) -> list[str]:
        return sorted({c.statistic for c in self.candidates})

    @property
    def baseline_methods(self) -> list[str]:
        return [b.method for b in self.run.baselines]

    def baseline_pool(self, method: str) -> list[BaselineVariant]:
        return [b for b in self.baseline_candidates if b.method == method]

    def may_run(self, seed: int) -> bool:
        return self.run_seeds is None or seed in self.run_seeds


@dataclass(frozen=True)
class Choice:
    """What the validation seeds decided: the variant per statistic, each candidate's score, whether each proposed
    variant goes on to the test seeds, and each baseline's setting (its own knob, chosen by the same score)."""

    chosen: dict[str, PertaVariant]
    scores: dict[str, dict[str, float]]
    decisions: dict[str, dict[str, Any]]
    baselines: dict[str, BaselineVariant]
    stability: dict[str, dict[str, float]] = field(default_factory=dict)


#: One phase's results: per seed, its reports (one per forget split).
Reports = dict[int, list[SplitReport]]

#: What a seed's job hands back: its reports, its wall seconds, and the machine and kernels it ran on.
SeedRun = tuple[list[SplitReport], float, dict[str, Any]]


@dataclass
class Phase:
    """One phase's seeds (in the study's order): the part of each seed that is in, run here or read from
    ``parts``, and the seeds left for another invocation."""

    name: str
    seeds: list[int]
    parts: dict[int, SeedPart]
    missing: list[int]

    @property
    def reports(self) -> Reports:
        return {seed: self.parts[seed].reports for seed in self.seeds if seed in self.parts}


def _seed_job(job: dict[str, Any]) -> SeedRun:
    """One seed's pipeline in a worker process (``jobs`` > 1) or in this one."""
    import torch

    from perta_lightning.provenance import machine_info
    from perta_lightning.study.pipeline import run_seed

    threads = job.pop("threads", None)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("high")
    started = time.perf_counter()
    reports = run_seed(**job)
    return reports, time.perf_counter() - started, machine_info()


def _run_seeds(jobs: list[dict[str, Any]], workers: int, finished: Callable[[int, SeedRun], None]) -> None:
    """Run the jobs, ``workers`` at once; hand each seed to ``finished`` as soon as it is done."""
    if workers <= 1:
        for job in jobs:
            finished(job["seed"], _seed_job(dict(job)))
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_seed_job, dict(job, threads=threads)): job["seed"] for job in jobs}
        for future in as_completed(futures):
            finished(futures[future], future.result())


def gather_phase(plan: StudyPlan, out: Path, phase: str, seeds: list[int], variants: list[PertaVariant],
                 baselines: list[BaselineVariant], settings: dict[str, Any]) -> Phase:
    """Each seed of a phase: read from its part file when ``parts`` holds one (refused when made under other
    settings), else run when ``run_seeds`` allows (its part then written as soon as it finishes), else missing."""
    folder = out / phase
    found: dict[int, SeedPart] = {}
    if plan.parts is not None:
        for seed in seeds:
            path = part_path(plan.parts, phase, seed)
            if path.exists():
                found[seed] = read_part(path, phase, seed, settings, folder / f"seed_{seed}")

    def finished(seed: int, result: SeedRun) -> None:
        reports, wall_seconds, machine = result
        part = seed_part(phase, seed, reports, folder / f"seed_{seed}", wall_seconds, machine, settings)
        if plan.parts is not None:
            path = write_part(plan.parts, part, folder / f"seed_{seed}")
            print(f"[perta study] {phase} seed {seed}: part written to {path}", flush=True)
        found[seed] = part

    to_run = [seed for seed in seeds if seed not in found and plan.may_run(seed)]
    _run_seeds(_jobs(plan, folder, to_run, variants, baselines, phase), plan.jobs, finished)
    return Phase(phase, list(seeds), {seed: found[seed] for seed in seeds if seed in found},
                 [seed for seed in seeds if seed not in found])


def _of_split(reports: Reports, split: str) -> dict[int, SplitReport]:
    return {seed: next(r for r in per_split if r.forget_split == split) for seed, per_split in reports.items()}


#: The validation scores a study can choose by: the area under the matched-utility profile, or the mean at the levels.
VALIDATION_SCORES = ("area", "levels")


def validation_scores(reports: dict[int, SplitReport], labels: list[str], rule: str = "levels",
                      levels: list[float] | None = None, axes: Axes | None = None) -> dict[str, float]:
    """Per variant label, its mean over seeds of: with ``rule == "levels"``, the utility at each level (a level
    not reached counting 0); with ``"area"``, :func:`~perta_lightning.functional.tradeoff.utility_area` of its
    curve (the report's rows) between the lowest and the highest of ``levels``."""
    if rule == "area":
        curves = [method_curves(report.rows, axes.forget_key, axes.utility_key) for report in reports.values()]
    scores = {}
    for label in labels:
        if rule == "area":
            values = [utility_area(by_method[label], min(levels), max(levels)) for by_method in curves]
        else:
            values = [value or 0.0 for report in reports.values() for value in report.matched[label]]
        scores[label] = sum(values) / len(values)
    return scores


#: How many resamples of the validation seeds :func:`choice_stability` draws.
STABILITY_RESAMPLES = 1000


def seed_scores(reports: dict[int, SplitReport], labels: list[str], rule: str = "levels",
                levels: list[float] | None = None, axes: Axes | None = None) -> dict[int, dict[str, float]]:
    """Per seed, :func:`validation_scores` of that seed alone, by the same ``rule``: every seed has a value (0 for
    a level not reached), so the mean over seeds is :func:`validation_scores`."""
    return {seed: validation_scores({seed: report}, labels, rule, levels, axes) for seed, report in reports.items()}


def choice_stability(per_split: dict[str, dict[int, dict[str, float]]], groups: dict[str, list[str]],
                     resamples: int = STABILITY_RESAMPLES, seed: int = 0) -> dict[str, dict[str, float]]:
    """How often each label of each group would have been chosen had the validation seeds been others like them:
    the share of bootstrap resamples of the seeds (with replacement; the same resample for every split) in which
    the label's score (mean over splits of the mean over the resampled seeds) is the group's highest, ties going
    to the first listed as in :func:`choose`. ``per_split`` is split → :func:`seed_scores`."""
    import random

    seeds = sorted(next(iter(per_split.values())))
    rng = random.Random(seed)
    wins = {group: dict.fromkeys(labels, 0) for group, labels in groups.items()}
    for _ in range(resamples):
        drawn = [rng.choice(seeds) for _ in seeds]
        for group, labels in groups.items():
            score = {label: sum(sum(by_seed[s][label] for s in drawn) / len(drawn) for by_seed in per_split.values())
                     for label in labels}
            wins[group][max(labels, key=score.__getitem__)] += 1
    return {group: {label: count / resamples for label, count in counts.items()} for group, counts in wins.items()}


def aggregate(reports: dict[int, SplitReport], families: dict[str, str], levels: list[float]) -> dict[str, Any]:
    """Test-seed aggregate of each method family: spread at each level and paired differences against TV.

    ``families`` maps a family name (``tv``, ``perta_grad``, ``perta_fisher``, baselines) to the method
    label it has in the seeds' reports.
    """
    per_seed = {family: {seed: report.matched[label] for seed, report in reports.items()}
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
            "evaluations": {str(seed): report.search_evaluations.get(label, 1) for seed, report in reports.items()},
            "screens": {str(seed): report.search_screens.get(label, 0) for seed, report in reports.items()},
            "costs": {str(seed): report.costs.get(label) for seed, report in reports.items()},
        }
        recovery = {attack: {str(seed): mean_recovery(report.robustness, attack, label)
                             for seed, report in reports.items()} for attack in _attacks(reports)}
        if recovery:  # each attack's mean recovery at each level, per seed, and its spread over the seeds
            out[family]["recovery"] = recovery
            out[family]["recovery_at_levels"] = {
                attack: [asdict(spread([None if per_seed[str(seed)] is None else per_seed[str(seed)][index]
                                        for seed in sorted(reports)])) for index in range(len(levels))]
                for attack, per_seed in recovery.items()}
    return out


def _attacks(reports: dict[int, SplitReport]) -> list[str]:
    """The attacks every seed's report of a split ran (none when one seed ran none)."""
    runs = [report.robustness.get("attacks", []) for report in reports.values()]
    return [attack for attack in runs[0] if all(attack in r for r in runs)] if runs else []


def attack_summary(reports: dict[int, SplitReport]) -> dict[str, Any]:
    """Per attack, over the test seeds: θ_retain's own mean recovery (the attack alone, on a model that never knew
    the forget set) and the attack stages' seconds per seed (the attacks' cost, apart from the unlearning's)."""
    out = {}
    for attack in _attacks(reports):
        out[attack] = {"retain": asdict(spread([r.robustness["retain"][attack]["mean"] for r in reports.values()])),
                       "seconds": asdict(spread([r.robustness["seconds"].get(attack) for r in reports.values()]))}
    return out


def _forget_examples(parts: dict[int, SeedPart], split: str) -> int | None:
    """How many forget examples the forgetting axis compares (from a θ_retain evaluation of these seeds)."""
    for seed in sorted(parts):
        if parts[seed].forget_examples.get(split) is not None:
            return parts[seed].forget_examples[split]
    return None


def _models(reports: Reports) -> dict[str, Any]:
    """Per seed and split, every evaluated model: method, α, weights digest and evaluation checksum."""
    return {str(seed): {report.forget_split: [
        {"method": r["method"], "alpha": r["alpha"], "model_digest": r.get("model_digest"),
         "eval_checksum": r.get("eval_checksum")} for r in report.rows] for report in per_split}
        for seed, per_split in reports.items()}


def _parts_record(plan: StudyPlan, *phases: Phase) -> dict[str, Any]:
    """``study.json``'s ``parts``: per phase and seed, the machine, kernels, versions and commit it ran on."""
    record: dict[str, Any] = {"folder": None if plan.parts is None else str(plan.parts)}
    for phase in phases:
        record[phase.name] = {str(seed): part.provenance() for seed, part in phase.parts.items()}
    return record


def missing_message(plan: StudyPlan, phase: Phase) -> str:
    """What an invocation that leaves seeds of ``phase`` missing says: which, and how to go on."""
    where = f"in {plan.parts}" if plan.parts is not None else "done in this invocation"
    line = (f"{len(phase.parts)} of {len(phase.seeds)} {phase.name} seeds are {where}; run seeds {phase.missing} "
            f"(run_seeds{', here or elsewhere into the same parts folder' if plan.parts is not None else ''}) and "
            "run again to aggregate")
    if phase.name == "validation":
        line += "; the test seeds need the validation choice, so no test seed ran"
    return line + ". No study.json written."


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


def check_study(options: RunOptions, validation_seeds: list[int] | None, test_seeds: list[int] | None,
                candidates: list[PertaVariant] | None, proposed: list[PertaVariant] | None, importance_at_base: bool,
                jobs: int, rules: ReplicationRules | None,
                baseline_candidates: list[BaselineVariant] | None = None, run_seeds: list[int] | None = None,
                parts: str | None = None, validation_score: str = "area") -> StudyPlan:
    """Step 1: every option checked (and the run's options resolved) before any stage starts."""
    if validation_score not in VALIDATION_SCORES:
        raise PertaValueError(f"validation_score must be one of {list(VALIDATION_SCORES)}, got {validation_score!r}")
    validation_seeds = list(validation_seeds if validation_seeds is not None else [100, 101])
    test_seeds = list(test_seeds if test_seeds is not None else [0, 1, 2])
    check_seeds("validation_seeds", validation_seeds)
    check_seeds("test_seeds", test_seeds)
    if run_seeds is not None:
        check_seeds("run_seeds", run_seeds)
        stray = [seed for seed in run_seeds if seed not in validation_seeds + test_seeds]
        if stray:
            raise PertaValueError(f"run_seeds: {stray} are not seeds of this study (validation_seeds "
                                  f"{validation_seeds}, test_seeds {test_seeds})")
    if parts is not None and Path(parts).exists() and not Path(parts).is_dir():
        raise PertaValueError(f"parts: {parts} is a file, not a folder of study parts")
    check_not_empty("candidates", candidates)
    if set(validation_seeds) & set(test_seeds):
        raise PertaValueError(f"validation_seeds {validation_seeds} and test_seeds {test_seeds} overlap: a "
                              "setting must be reported on seeds other than those that chose it")
    if not test_seeds:
        raise PertaValueError("test_seeds is empty")
    if jobs < 1:
        raise PertaValueError(f"jobs must be at least 1, got {jobs}")
    candidates = [c.check() for c in candidates or DEFAULT_CANDIDATES]
    proposed = [v.check() for v in proposed or []]
    clash = {v.label for v in proposed} & {c.label for c in candidates}
    if clash:
        raise PertaValueError(f"proposed variants {sorted(clash)} are also candidates")
    run = options.resolve()
    methods = [b.method for b in run.baselines]
    if len(set(methods)) != len(methods):
        raise PertaValueError(f"baselines: a method is given twice ({methods}); compare settings with baseline_candidates")
    given = [b.check() for b in baseline_candidates or []]
    stray = sorted({b.method for b in given} - set(methods))
    if stray:
        raise PertaValueError(f"baseline_candidates: methods {stray} are not among baselines {methods}")
    labels = [b.label for b in given]
    if len(set(labels)) != len(labels):
        raise PertaValueError(f"baseline_candidates: a setting is given twice ({labels})")
    pool = given + [b for b in run.baselines if b.method not in {g.method for g in given}]
    if any(len([b for b in pool if b.method == m]) > 1 for m in methods) and not validation_seeds:
        raise PertaValueError("baseline_candidates: choosing a baseline's setting needs validation_seeds")
    return StudyPlan(options, run, validation_seeds, test_seeds, candidates, proposed, importance_at_base, jobs,
                     rules or ReplicationRules(), pool, None if run_seeds is None else list(run_seeds),
                     None if parts is None else Path(parts), validation_score)


def _jobs(plan: StudyPlan, folder: Path, seeds: list[int], variants: list[PertaVariant], baselines: list[str],
          phase: str) -> list[dict[str, Any]]:
    """Each seed's pipeline; the attacks run on the test seeds only (the validation seeds choose by utility)."""
    run = plan.run if phase == "test" else replace(plan.run, attacks=None)
    return [dict(output=folder / f"seed_{seed}", seed=seed, run=run, variants=variants, baselines=baselines,
                 prefix=f"[{phase} seed {seed}] ") for seed in seeds]


def choose_settings(plan: StudyPlan, out: Path) -> tuple[Choice | None, Phase]:
    """Step 2: run the validation seeds and choose PerTA's settings, and each baseline's where it has several
    candidates, on them (by the same score: :func:`validation_scores`); no choice while a validation seed is
    missing."""
    single = {m: plan.baseline_pool(m)[0] for m in plan.baseline_methods if len(plan.baseline_pool(m)) == 1}
    if not plan.validation_seeds:
        chosen = {s: next(c for c in plan.candidates if c.statistic == s) for s in plan.statistics}
        decisions = {v.label: {"score": None, "against": None, "against_score": None, "accepted": True}
                     for v in plan.proposed}
        return Choice(chosen, {}, decisions, single), Phase("validation", [], {}, [])
    pool = plan.candidates + plan.proposed
    contested = [b for m in plan.baseline_methods if m not in single for b in plan.baseline_pool(m)]
    phase = gather_phase(plan, out, "validation", plan.validation_seeds, pool, contested, study_settings(plan))
    if phase.missing:
        return None, phase
    reports = phase.reports
    labels = [c.label for c in pool] + [b.label for b in contested]
    rule = (plan.validation_score, list(plan.run.search.levels), plan.run.benchmark.axes)
    per_split = {split: validation_scores(_of_split(reports, split), labels, *rule) for split in plan.run.forget_splits}
    scores = {label: {"mean": sum(s[label] for s in per_split.values()) / len(per_split),
                      **{split: s[label] for split, s in per_split.items()}} for label in labels}
    chosen, decisions = choose(plan.candidates, plan.proposed, scores)
    baselines = dict(single)
    for method in plan.baseline_methods:
        if method not in single:  # ties: the first listed
            baselines[method] = max(plan.baseline_pool(method), key=lambda b: scores[b.label]["mean"])
    groups = {statistic: [c.label for c in plan.candidates if c.statistic == statistic] for statistic in chosen}
    groups |= {method: [b.label for b in plan.baseline_pool(method)]
               for method in plan.baseline_methods if method not in single}
    by_seed = {split: seed_scores(_of_split(reports, split), labels, *rule) for split in plan.run.forget_splits}
    return Choice(chosen, scores, decisions, baselines, choice_stability(by_seed, groups)), phase


def test_families(plan: StudyPlan, choice: Choice) -> tuple[dict[str, str], list[PertaVariant]]:
    """The families the test seeds report (family name → method label) and the variants they run."""
    families = {"tv": TV, **{f"perta_{s}": choice.chosen[s].label for s in plan.statistics}}
    variants = [choice.chosen[s] for s in plan.statistics]
    if plan.importance_at_base:
        for s in plan.statistics:
            other = "base" if choice.chosen[s].importance_at == "full" else "full"
            families[f"perta_{s}_at_{other}"] = choice.chosen[s].at(other).label
            variants.append(choice.chosen[s].at(other))
    for variant in plan.proposed:
        if choice.decisions[variant.label]["accepted"]:
            families[f"proposed_{variant.label}"] = variant.label
            variants.append(variant)
    families.update({m: choice.baselines[m].label for m in plan.baseline_methods})
    return families, variants


def run_test_seeds(plan: StudyPlan, choice: Choice, out: Path) -> tuple[dict[str, str], Phase]:
    """Step 3: run the test seeds with the chosen settings, TV and the baselines."""
    families, variants = test_families(plan, choice)
    baselines = [choice.baselines[m] for m in plan.baseline_methods]
    settings = test_phase_settings(study_settings(plan, attacks=True), families, variants, baselines)
    return families, gather_phase(plan, out, "test", plan.test_seeds, variants, baselines, settings)


def write_study(plan: StudyPlan, choice: Choice, families: dict[str, str], validation: Phase, test: Phase,
                out: Path, started: float) -> dict[str, Any]:
    """Step 4: aggregate the test seeds and write ``study.json``, ``study.md``, ``study.png``, ``replication.json``
    and ``REPLICATION.md``."""
    import torch

    from perta_lightning.provenance import machine_info, peak_rss_gib
    from perta_lightning.study.replication import replication, replication_markdown
    from perta_lightning.study.study_report import plot_study, study_markdown

    run, options = plan.run, plan.options
    levels = list(run.search.levels)
    test_splits, tables, attacks = {}, {}, {}
    for split in run.forget_splits:
        reports = _of_split(test.reports, split)
        test_splits[split] = aggregate(reports, families, levels)
        if summary := attack_summary(reports):
            attacks[split] = summary
        for name, table in run.benchmark.study_tables({seed: r.rows for seed, r in reports.items()}, families,
                                                      levels).items():
            tables.setdefault(name, {})[split] = table
    result = {
        "settings": {"benchmark": run.benchmark.name, "preset": options.preset,
                     "preset_overrides": options.preset_overrides or {}, "levels": levels,
                     "search": asdict(run.search), "jobs": plan.jobs, "forget_splits": run.forget_splits,
                     "baselines": plan.baseline_methods, "importance_at_base": plan.importance_at_base,
                     "rules": asdict(plan.rules)},
        "validation": {"seeds": plan.validation_seeds,
                       "candidates": [asdict(c) | {"label": c.label} for c in plan.candidates],
                       "proposed": [asdict(v) | {"label": v.label} | choice.decisions[v.label] for v in plan.proposed],
                       "scores": choice.scores, "chosen": {s: choice.chosen[s].label for s in plan.statistics},
                       "baseline_candidates": [asdict(b) | {"label": b.label} for b in plan.baseline_candidates],
                       "baselines_chosen": {m: choice.baselines[m].label for m in plan.baseline_methods},
                       "stability": choice.stability, "stability_resamples": STABILITY_RESAMPLES,
                       "score_rule": plan.validation_score},
        "test": {"seeds": plan.test_seeds, "splits": test_splits, **tables, **({"attacks": attacks} if attacks else {}),
                 "forget_examples": {split: _forget_examples(test.parts, split) for split in run.forget_splits}},
        "machine": machine_info(),
        "models": {"validation": _models(validation.reports), "test": _models(test.reports)},
        "parts": _parts_record(plan, validation, test),
    }
    threads = torch.get_num_threads() if plan.jobs <= 1 else max(1, (os.cpu_count() or 1) // plan.jobs)
    result["invocation"] = {"wall_seconds": time.perf_counter() - started, "peak_rss_gib": peak_rss_gib(),
                            "stage_seconds": sum(part.stage_seconds for phase in (validation, test)
                                                 for part in phase.parts.values()),
                            "torch_threads_per_seed": threads}
    table = replication(result)
    atomic_write_text(out / "study.json", json.dumps(result, indent=2))
    atomic_write_text(out / "study.md", study_markdown(result))
    atomic_write_text(out / "replication.json", json.dumps(table, indent=2))
    atomic_write_text(out / "REPLICATION.md", replication_markdown(table))
    plot_study(result, {seed: {r.forget_split: r.rows for r in reports} for seed, reports in test.reports.items()},
               out / "study.png")
    return result


def study(
    options: RunOptions,
    output: str = "runs/study",
    validation_seeds: list[int] | None = None,
    test_seeds: list[int] | None = None,
    candidates: list[PertaVariant] | None = None,
    proposed: list[PertaVariant] | None = None,
    importance_at_base: bool = False,
    jobs: int = 1,
    rules: ReplicationRules | None = None,
    baseline_candidates: list[BaselineVariant] | None = None,
    parts: str | None = None,
    run_seeds: list[int] | None = None,
    validation_score: str = "area",
) -> Path:
    """Run the multi-seed PerTA study with held-out choice of PerTA's settings; return the output folder.

    Args:
        options: the benchmark, its data, the preset, the baselines, the α search and the runtime of every seed
            (:class:`~perta_lightning.study.options.RunOptions`; top-level keys of the config).
        output: folder of the study; each seed's run lives in ``<output>/<validation|test>/seed_<s>``.
        validation_seeds: seeds on which the candidates are compared (default ``[100, 101]``).
        test_seeds: seeds on which the chosen settings are reported (default ``[0, 1, 2]``); must not overlap
            the validation seeds.
        candidates: PerTA variants compared on the validation seeds; the best grad and the best Fisher
            variant go to the test seeds (default: grad and Fisher with β = 1 and β = 16).
        proposed: this project's own variants, run on the validation seeds beside the candidates; each goes
            to the test seeds only if its validation score beats the candidate chosen for its statistic.
        importance_at_base: the test seeds also run each chosen variant with importance at the other model
            (θ0 for θ_full), for the θ0-against-θ_full comparison of the replication table.
        jobs: seeds run at once, in separate processes sharing the cores (float kernels then run with fewer
            threads, so figures can differ in the last digits from ``jobs: 1``; resume with the same value).
        rules: the numbers of the replication table's verdict rules, fixed before the run.
        baseline_candidates: settings of the baselines (learning rate, NPO's or SimNPO's β) compared on the
            validation seeds by the same score as PerTA's; the best of each method goes to the test seeds. A
            method with none is run at the preset's settings.
        parts: a folder of part files, for a study run in several invocations or on several machines: each seed
            that finishes writes ``<parts>/<validation|test>_seed_<s>.json`` (its reports, machine, kernels,
            versions and the digest of the settings it ran under; small enough to commit), and a seed whose file
            is there is read instead of run. A part made under other settings is refused.
        run_seeds: the seeds (validation or test) this invocation may run (default: all). The others are read
            from ``parts`` or left for another invocation; the aggregate is written only when every seed is in,
            and the test seeds run only when every validation seed is.
        validation_score: how the validation seeds score a setting: ``area`` (default), the mean over seeds and
            splits of the area under its matched-utility profile between the lowest and highest level, which a
            search falling just short of a level moves by a sliver; ``levels``, the mean utility at the levels
            with a level not reached counting 0 (this project's rule before; one missed level is a whole share).
    """
    import torch

    started = time.perf_counter()
    torch.set_float32_matmul_precision("high")  # as every seed's process sets it (recorded in "machine")
    plan = check_study(options, validation_seeds, test_seeds, candidates, proposed, importance_at_base, jobs, rules,
                       baseline_candidates, run_seeds, parts, validation_score)
    out = Path(output)
    choice, validation = choose_settings(plan, out)
    if choice is None:
        print(f"[perta study] {missing_message(plan, validation)}", flush=True)
        return out
    families, test = run_test_seeds(plan, choice, out)
    if test.missing:
        print(f"[perta study] {missing_message(plan, test)}", flush=True)
        return out
    write_study(plan, choice, families, validation, test, out, started)
    print(f"[perta study] {out / 'study.md'}", flush=True)
    return out


def build_parser() -> Any:
    from perta_lightning.arguments import function_parser

    return function_parser(study, "perta study", RunOptions)


def cli_main(argv: list[str]) -> None:
    from perta_lightning.arguments import call_with_arguments

    call_with_arguments(build_parser(), study, argv, RunOptions)  # it says what it wrote or what is missing
