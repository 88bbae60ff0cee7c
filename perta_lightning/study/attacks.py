"""The attacks on forgetting in a seed's run, their recovery figures, and ``perta attack`` on any model directory.

With ``attacks`` (:class:`~perta_lightning.study.options.Attacks`), once a forget split's searches are done, the
models its matched comparison selects (each method's model at each level), the target and θ_retain are attacked,
each attack a stage and each attacked model's evaluation another (a resumed run skips the finished ones):

* ``<split>/attacks/quantize_<scheme>/models/<model>``: the model quantized by bitsandbytes
  (:func:`perta_lightning.attacks.quantize_model`); measured on every forget example;
* ``<split>/attacks/relearn_<forget|retain>/models/<model>``: the model fine-tuned for a fixed number of steps on
  half of the forget set's authors (``forget``) or on as many retain examples (``retain``, the weaker attack), with
  the same shuffle for every model of the split (:func:`perta_lightning.attacks.relearn_model`); measured on the
  held-out half's examples alone (:meth:`~perta_lightning.benchmarks.base.Benchmark.relearn_split`), less what the
  same relearning moves in θ_retain;
* ``<split>/attacks/<attack>/eval/<model>``: the attacked model's evaluation, the benchmark's own.

``<model>`` is ``target``, ``retain``, ``<method>/alpha_<α>`` or ``<baseline>/epoch_<k>``. The recovery of each
selected model at each level, per forget metric and their mean, is
:func:`~perta_lightning.functional.robustness.recoveries` (:func:`robustness`). ``perta attack`` attacks one model
directory by the same means (:mod:`perta_lightning.study.attack_command`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from perta_lightning.benchmarks.base import Benchmark, RelearnSplit, SplitPlan
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.robustness import recoveries
from perta_lightning.functional.tradeoff import CurvePoint, is_collapsed, utility_at_level
from perta_lightning.stages import Product, Stage, StageRunner, stage_seed
from perta_lightning.study.options import Attacks, ResultRow, Run, Runtime
from perta_lightning.study.stages import Data


@dataclass(eq=False)
class Quantize(Stage):
    """A model quantized by bitsandbytes (``scheme``: ``nf4`` or ``int8``), saved quantized."""

    name: str
    model: Product
    scheme: str
    cost: float = 0.1

    @property
    def description(self) -> str:
        return f"quantize {model_id_of(self.model)} to {self.scheme}"

    @property
    def inputs(self) -> list[Stage]:
        return [self.model.stage]

    def settings(self) -> dict[str, Any]:
        return {"attack": "quantize", "scheme": self.scheme, "model": self.model.key}

    def outputs(self) -> list[Path]:
        return [Path(self.name)]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        from perta_lightning.attacks import quantize_model

        return {"model": quantize_model(runner.path(self.model), runner.root / self.name, self.scheme, overwrite=True)}


@dataclass(eq=False)
class Relearn(Stage):
    """A model fine-tuned for ``steps`` on the relearn set: half of the forget set's ``groups`` authors (``on:
    forget``), or as many examples of the retain split (``on: retain``). Every model of a split gets the same
    rows in the same order (the shuffle's seed is the split's, not the stage's)."""

    name: str
    model: Product
    data: Data
    benchmark: Benchmark
    plan: SplitPlan
    on: Literal["forget", "retain"]
    groups: int
    steps: int
    lr: float
    batch_size: int
    runtime: Runtime = field(default_factory=Runtime)
    cost: float = 0.3

    @property
    def description(self) -> str:
        return f"relearn {model_id_of(self.model)} on the {self.on} relearn set for {self.steps} steps"

    @property
    def inputs(self) -> list[Stage]:
        return [self.model.stage, *self.data.stages]

    def settings(self) -> dict[str, Any]:
        return {"attack": "relearn", "data": self.data.settings(), "model": self.model.key, "on": self.on,
                "groups": self.groups, "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size,
                **self.runtime.settings()}

    def outputs(self) -> list[Path]:
        return [Path(self.name)]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        from perta_lightning.attacks import relearn_model

        _, rows = relearn_set(self.benchmark, self.plan, self.data.source(runner), self.groups, self.on)
        seed = stage_seed(runner.seed, f"{self.plan.name}/relearn_{self.on}")
        return {"model": relearn_model(runner.path(self.model), rows, runner.root / self.name, self.steps, self.lr,
                                       self.batch_size, seed, self.runtime.accelerator, self.plan.max_length)}


def relearn_set(bench: Benchmark, plan: SplitPlan, source: Any, groups: int,
                on: Literal["forget", "retain"]) -> tuple[RelearnSplit, list[dict[str, Any]]]:
    """The forget set's halves (:meth:`Benchmark.relearn_split`, refused in one line where there are none) and the
    relearn set: the relearned half, or as many rows from the start of the retain split of unlearning (text of the
    same kind, none of the forget set's facts)."""
    split = bench.relearn_split(plan, source, groups)
    if split is None and groups == 0:
        raise PertaValueError(f"{bench.name} has no relearning attack (no split of its forget set into a relearned "
                              "and a held-out half); quantize instead")
    if split is None:
        raise PertaValueError(f"{bench.name} {plan.name} of {groups} author(s): no relearning attack (it needs a "
                              "forget set of at least two authors, to hold one half out)")
    if on == "forget":
        return split, split.relearn_rows
    return split, [{"question": r["question"], "answer": r["answer"]}
                   for r in source.rows(plan.retain_for_unlearning)[: len(split.relearn_rows)]]


def model_id_of(model: Product) -> str:
    """A model's name in the attacks' folders: ``target``, ``retain``, ``tv/alpha_2``, ``npo/epoch_3``."""
    name = model.stage.name.rsplit("/models/", 1)[-1].removeprefix("models/")
    if name == "full":
        return "target"
    if model.key == "model":
        return name
    return f"{name.rsplit('/round_', 1)[0]}/{model.key}"


def attack_labels(attacks: Attacks) -> list[str]:
    """The attacks' labels: ``quantize_<scheme>`` for each scheme, then ``relearn_forget`` and ``relearn_retain``."""
    return ([f"quantize_{scheme}" for scheme in attacks.quantize] + (["relearn_forget"] if attacks.relearn else [])
            + (["relearn_retain"] if attacks.relearn_retain else []))


@dataclass(frozen=True)
class Selected:
    """The models a split's matched comparison selects: per method, the row chosen at each level (``None``: the
    level is not reached), beside the target's and θ_retain's rows."""

    by_method: dict[str, list[ResultRow | None]]
    target: ResultRow
    retain: ResultRow

    @property
    def models(self) -> list[ResultRow]:
        """Every model to attack, once each: θ_retain, the target, then the selected ones in order."""
        out = {str(self.retain.model): self.retain, str(self.target.model): self.target}
        for rows in self.by_method.values():
            for row in rows:
                if row is not None:
                    out.setdefault(str(row.model), row)
        return list(out.values())


def select(rows: list[ResultRow], bench: Benchmark, levels: list[float]) -> Selected:
    """The rows the matched rule (:func:`~perta_lightning.functional.tradeoff.utility_at_level`) picks at each
    level, from each row's summary: the same choice as the report's ``matched`` table."""
    ax = bench.axes
    summaries = {id(row): bench.summarize(row.eval_file, row.reference_file) for row in rows}
    target = next(row for row in rows if row.method == "target")
    retain = next(row for row in rows if row.method == "retain")
    target_utility = summaries[id(target)][ax.utility_key]
    start = CurvePoint(0.0, summaries[id(target)][ax.forget_key], target_utility)
    curves: dict[str, list[tuple[CurvePoint, ResultRow]]] = {}
    for row in rows:
        if row.family == "reference":
            continue
        s = summaries[id(row)]
        point = CurvePoint(row.alpha, s[ax.forget_key], s[ax.utility_key],
                           is_collapsed(s[ax.utility_key], target_utility))
        curves.setdefault(row.method, [(start, target)]).append((point, row))
    by_method = {}
    for method, pairs in curves.items():
        of_point = {id(point): row for point, row in pairs}
        chosen = [utility_at_level([point for point, _ in pairs], level) for level in levels]
        by_method[method] = [None if point is None else of_point[id(point)] for point in chosen]
    return Selected(by_method, target, retain)


def robustness(runner: StageRunner, run: Run, graph: Any, rows: list[ResultRow],
               products: dict[str, Product]) -> dict[str, Any]:
    """Attack every model the matched comparison of ``rows`` selects, the target and θ_retain (``run.attacks``);
    return the report's ``robustness`` (:func:`robustness_table`).

    ``products``: each row's model, by its path, as a stage product (what the attack stages read)."""
    attacks, bench, plan, p = run.attacks, run.benchmark, graph.plan, run.preset
    chosen = select(rows, bench, list(run.search.levels))
    reference_file = chosen.retain.eval_file
    groups = bench.forget_groups(plan, p, synthetic=run.source is None)
    wants_relearn = attacks.relearn or attacks.relearn_retain
    split = bench.relearn_split(plan, graph.eval_data.source(runner), groups) if wants_relearn else None
    notes = [] if split is not None or not wants_relearn else [
        f"no relearning attack on {plan.name}: " + (f"{bench.name} has no relearning split" if groups == 0 else
                                                   f"its forget set holds {groups} author(s), and relearning needs "
                                                   "one half to relearn on and one held out")]
    heldout = None if split is None else split.heldout
    labels = [label for label in attack_labels(attacks) if heldout is not None or not label.startswith("relearn")]
    models = chosen.models
    ids = {str(row.model): model_id_of(products[str(row.model)]) for row in models}
    metrics: dict[str, dict[str, Any]] = {}
    for row in models:
        metrics[ids[str(row.model)]] = {"before": bench.forget_metrics(row.eval_file, reference_file)}
        if heldout is not None:
            metrics[ids[str(row.model)]]["before_heldout"] = bench.forget_metrics(row.eval_file, reference_file, heldout)
    for label in labels:
        for row in models:
            model_id, product = ids[str(row.model)], products[str(row.model)]
            name = f"{plan.name}/attacks/{label}/models/{model_id}"
            if label.startswith("quantize"):
                attack: Stage = Quantize(name, product, label.removeprefix("quantize_"))
            else:
                attack = Relearn(name, product, graph.reinforced.data, bench, plan, label.removeprefix("relearn_"), groups,
                                 attacks.relearn_steps, attacks.relearn_lr or p.finetune_lr, p.batch_size, run.runtime)
            evaluation = graph.evaluate(f"{plan.name}/attacks/{label}/eval/{model_id}", Product(attack))
            runner.progress.plan([attack, evaluation])
            runner.run(attack)
            runner.run(evaluation)
            metrics[model_id][label] = bench.forget_metrics(runner.path(Product(evaluation, "eval")), reference_file,
                                                            None if label.startswith("quantize") else heldout)
    seconds = {label: sum(record.seconds for name, record in runner.records.items()
                          if name.startswith(f"{plan.name}/attacks/{label}/")) for label in labels}
    selected = {method: [None if r is None else ids[str(r.model)] for r in chosen_rows]
                for method, chosen_rows in chosen.by_method.items()}
    table = robustness_table(metrics, selected, labels, list(bench.recovery_metrics), bench.recovery_log_metrics)
    table |= {"seconds": seconds, "notes": notes,
              "relearn": None if split is None else {"groups": list(split.groups), "heldout_examples": len(heldout)}}
    return table


def robustness_table(metrics: dict[str, dict[str, Any]], selected: dict[str, list[str | None]], labels: list[str],
                     keys: list[str], log_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per attack and method, the recovery of the model selected at each level (:func:`recoveries` of the forget
    metrics and their mean, ``log_keys`` in decades; ``None`` where the level is not reached), and θ_retain's own, from
    each attacked model's forget metrics before (``before``; ``before_heldout`` for relearning) and after each attack."""
    target, retain = metrics["target"], metrics["retain"]
    recovery: dict[str, dict[str, list[dict[str, float | None] | None]]] = {}
    reference: dict[str, dict[str, float | None]] = {}
    for label in labels:
        relearn = label.startswith("relearn")
        before = "before_heldout" if relearn else "before"

        def of(model: str, label: str = label, relearn: bool = relearn, before: str = before) -> dict[str, Any]:
            entry = metrics[model]
            if relearn:
                return recoveries(entry[label], entry[before], target[before], retain[label], retain[before], log_keys)
            return recoveries(entry[label], entry[before], target[before], log_keys=log_keys)

        # θ_retain's: what the attack alone does to a model that never knew the forget set (quantization), or 0 by
        # construction (relearning, whose reference it is)
        reference[label] = of("retain")
        recovery[label] = {method: [None if model is None else of(model) for model in models]
                           for method, models in selected.items()}
    return {"attacks": labels, "metrics": keys, "log_metrics": list(log_keys), "selected": selected,
            "recovery": recovery, "retain": reference,
            "models": metrics}


def mean_recovery(robustness: dict[str, Any], label: str, method: str) -> list[float | None] | None:
    """The mean recovery (over the forget metrics) of ``method``'s selected model at each level under attack
    ``label``; ``None`` when the report has no such attack or method."""
    per_level = robustness.get("recovery", {}).get(label, {}).get(method)
    if per_level is None:
        return None
    return [None if entry is None else entry["mean"] for entry in per_level]
