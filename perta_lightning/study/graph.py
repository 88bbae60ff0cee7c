"""One seed's graph of stages for one forget split, built from the benchmark's split plan.

Each stage writes one artifact under the seed's run folder (``<split>`` is the plan's name: ``forget10``, or
``forget`` for a benchmark with one forget set):

1. ``data``: the benchmark's synthetic data and its tokenizer (absent when a source is given);
2. ``models/base``: θ0 pre-trained on the plan's corpus (or a given pretrained model);
3. ``models/full``: θ0 fine-tuned on the plan's full splits (the target), with the pre-training corpus replayed;
4. ``<split>/models/retain``: θ0 fine-tuned on the retain splits only (the reference of forgetting);
5. ``<split>/models/reinforced``: θ_full fine-tuned further on the forget split; τ = θ_r − θ_full;
6. ``<split>/importance/<statistic>_at_<model>_<granularity>_n<examples>``: forget and retain importance (and a
   transform of it, for this project's variants);
7. ``<split>/models/<baseline>``: training-based baselines, each trained once, its model kept after several epochs
   (``epoch_<k>/``): the points of its trade-off curve;
8. ``<split>/eval/retain``, ``<split>/eval/target`` and each baseline point's evaluation
   (``<split>/eval/<baseline>/epoch_<k>``), by the benchmark's evaluation.

The α searches' merges, screenings (``<split>/screen/<method>/alpha_<α>``, where the benchmark screens) and
evaluations are added as the search goes (:mod:`perta_lightning.study.pipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from perta_lightning.benchmarks.base import Evaluation, SplitPlan
from perta_lightning.convert import ConvertGGUF, is_gguf
from perta_lightning.stages import Product, Stage
from perta_lightning.study.options import BaselineVariant, PertaVariant, Run
from perta_lightning.study.stages import (
    Data,
    Evaluate,
    FineTune,
    Importance,
    Pretrain,
    Pretrained,
    SyntheticData,
    TransformImportance,
    Unlearn,
)


def base_stage(base_model: str) -> Stage:
    """The stage giving θ0 from a ``base_model`` value: a GGUF file is converted, a directory is used as is."""
    return ConvertGGUF(base_model) if is_gguf(base_model) else Pretrained(base_model)


@dataclass(frozen=True)
class SeedGraph:
    """The stages of one forget split of one seed, by role, and how to evaluate a further model.

    ``importance``: the importance stage each variant's merges read, by :meth:`PertaVariant.files_key`;
    ``baselines``: each baseline's label, training stage and the evaluation of each point of its curve, by the
    epochs trained; ``screening``: the benchmark's screening (``None``: it has none)."""

    plan: SplitPlan
    stages: list[Stage]
    full: FineTune
    reinforced: FineTune
    importance: dict[tuple, Stage]
    reference: Evaluate
    target: Evaluate
    baselines: list[tuple[str, Unlearn, list[tuple[int, Evaluate]]]]
    eval_data: Data
    evaluation: Evaluation
    screening: Evaluation | None = None

    def evaluate(self, name: str, model: Product) -> Evaluate:
        """The evaluation of a further model (a merge of the α search), against θ_retain's."""
        return Evaluate(name, model, self.eval_data, self.evaluation, reference=self.reference,
                        runtime=self.reference.runtime)

    def screen(self, name: str, model: Product) -> Evaluate:
        """The screening of a further model (its forgetting axis alone), against θ_retain's full evaluation."""
        if self.screening is None:
            raise ValueError(f"{name}: this benchmark has no screening")
        return Evaluate(name, model, self.eval_data, self.screening, reference=self.reference,
                        runtime=self.reference.runtime, cost=0.05)

    def importance_of(self, variant: PertaVariant, default_examples: int | None) -> Stage:
        return self.importance[variant.files_key(default_examples)]


def seed_graph(run: Run, seed: int, forget_split: str, variants: list[PertaVariant],
               baselines: list[BaselineVariant]) -> SeedGraph:
    """The static part of one seed's graph for ``forget_split``, declared once: stages by role, in a valid order."""
    bench, p, runtime = run.benchmark, run.preset, run.runtime
    plan = bench.split_plan(forget_split, p)
    synthetic = None
    if run.source is None:
        synthetic = SyntheticData(bench, bench.synthetic_data(p, seed), p.vocab_size)
    data = Data(stage=synthetic, given=run.source)
    eval_data = Data(synthetic, run.source, tuple(sorted((run.eval_files or {}).items())))  # training never reads these
    if run.base_model is None:
        base: Stage = Pretrain(synthetic, p.model_config(), p.pretrain_epochs, p.pretrain_lr, 2 * p.batch_size,
                               runtime, splits=plan.pretrain, max_length=plan.max_length)
        replay = list(plan.replay)  # replayed while fine-tuning, so θ_full and θ_retain keep what θ0 learnt
    else:
        base, replay = base_stage(run.base_model), []  # a GGUF file is converted once (ConvertGGUF)
    train: dict[str, Any] = dict(data=data, epochs=p.finetune_epochs, lr=p.finetune_lr, batch_size=p.batch_size,
                                 what="fine-tune θ0", runtime=runtime, max_length=plan.max_length)
    at = plan.name
    full = FineTune("models/full", base, splits=[*plan.full, *replay], **train)
    retain = FineTune(f"{at}/models/retain", base, splits=[*plan.retain, *replay], **train)
    reinforced = FineTune(f"{at}/models/reinforced", full, data, [plan.forget], p.reinforce_epochs, p.reinforce_lr,
                          p.batch_size, "reinforce θ_full", runtime, max_length=plan.max_length)
    raw: dict[tuple, Importance] = {}
    importance: dict[tuple, Stage] = {}
    for v in variants:
        key = v.importance_key(p.importance_examples)
        if key not in raw:
            statistic, where, granularity, n = key
            raw[key] = Importance(f"{at}/importance/{statistic}_at_{where}_{granularity}_n{n}",
                                  full if where == "full" else base, data, statistic, granularity,
                                  plan.forget, plan.retain_for_unlearning, n, max_length=plan.max_length,
                                  runtime=runtime)
            importance[(*key, "none")] = raw[key]
        files = v.files_key(p.importance_examples)
        if files not in importance:
            importance[files] = TransformImportance(f"{raw[key].name}_{v.transform}", raw[key], v.transform)
    epochs = run.curve_epochs()
    unlearned = [Unlearn(f"{at}/models/{b.label}", full, data, b.method, plan.forget, plan.retain_for_unlearning,
                         p.unlearn_epochs, b.learning_rate(p), p.batch_size, runtime, max_length=plan.max_length,
                         options=b.options(p), save_epochs=epochs)
                 for b in baselines]
    evaluation = bench.evaluation(plan, p, pretrained=run.base_model is not None)
    reference = Evaluate(f"{at}/eval/retain", Product(retain), eval_data, evaluation, runtime=runtime)
    target = Evaluate(f"{at}/eval/target", Product(full), eval_data, evaluation, reference=reference, runtime=runtime)
    curves = [[(k, Evaluate(f"{at}/eval/{b.label}/epoch_{k}", Product(u, f"epoch_{k}"), eval_data, evaluation,
                            reference=reference, runtime=runtime)) for k in u.save_epochs]
              for b, u in zip(baselines, unlearned)]
    stages = [*data.stages, base, full, retain, reinforced, *raw.values(),
              *(s for s in importance.values() if isinstance(s, TransformImportance)), *unlearned, reference, target,
              *(evaluate for curve in curves for _, evaluate in curve)]
    return SeedGraph(plan, stages, full, reinforced, importance, reference, target,
                     [(b.label, u, curve) for b, u, curve in zip(baselines, unlearned, curves)], eval_data, evaluation,
                     bench.screening(plan, p, pretrained=run.base_model is not None))
