"""torchmetrics classes for TOFU evaluation, usable from any LightningModule on one process or many.

Every metric keeps per-example values in ``"cat"`` states next to the example's index in its split.
``compute()`` orders them by index and drops repeats, so the result is the same on one process and on
many: a ``DistributedSampler`` pads the last batch by repeating examples, and ranks see interleaved
indices. ``compute()`` then applies the formula of :mod:`perta_lightning.functional.tofu_metrics`, the one
code path for the evaluator and for users::

    self.forget_tr = TruthRatio(closer_to_one=True)                      # in __init__
    self.forget_tr.update(batch["index"], paraphrased_nll, perturbed_nll)  # in validation_step
    self.log("forget_truth_ratio", self.forget_tr)                       # computed and synced at epoch end

:class:`TofuSetMetrics` groups the metrics of one evaluation set, as :mod:`perta_lightning.benchmarks.tofu.sets`
describes it; :class:`perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator` aggregates with one per set and one
:class:`MinKMiaAUC`.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection

from perta_lightning.benchmarks.metrics import IndexedValues, MeanOfValues
from perta_lightning.benchmarks.tofu.sets import EvalSetSpec
from perta_lightning.functional import tofu_metrics as F


class AnswerProbability(IndexedValues):
    """Mean of ``exp(-nll(answer))`` over examples (forget / retain probability). ``update(index, answer_nll)``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(("answer_nll",), **kwargs)

    def update(self, index: torch.Tensor, answer_nll: torch.Tensor) -> None:
        self._append(index, {"answer_nll": answer_nll})

    def compute(self) -> torch.Tensor:
        return F.answer_probability(self.ordered()["answer_nll"]).mean()


class ProbabilityWithOptions(IndexedValues):
    """Mean of ``p(answer) / (p(answer) + sum_j p(perturbed_j))`` (real authors / world facts).

    ``update(index, answer_nll (B,), perturbed_nll (B, K))``.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(("answer_nll", "perturbed_nll"), **kwargs)

    def update(self, index: torch.Tensor, answer_nll: torch.Tensor, perturbed_nll: torch.Tensor) -> None:
        self._append(index, {"answer_nll": answer_nll, "perturbed_nll": perturbed_nll})

    def compute(self) -> torch.Tensor:
        values = self.ordered()
        return F.probability_with_options(values["answer_nll"], values["perturbed_nll"]).mean()


class TruthRatio(IndexedValues):
    """TOFU truth-ratio score: ``mean min(R, 1/R)`` when ``closer_to_one`` (forget) else ``mean max(0, 1 - 1/R)``.

    ``update(index, correct_nll (B,), perturbed_nll (B, K))``; ``R = exp(mean_j perturbed_nll - correct_nll)``.
    """

    def __init__(self, closer_to_one: bool, **kwargs) -> None:
        super().__init__(("correct_nll", "perturbed_nll"), **kwargs)
        self.closer_to_one = closer_to_one

    def update(self, index: torch.Tensor, correct_nll: torch.Tensor, perturbed_nll: torch.Tensor) -> None:
        self._append(index, {"correct_nll": correct_nll, "perturbed_nll": perturbed_nll})

    def compute(self) -> torch.Tensor:
        values = self.ordered()
        ratio = F.truth_ratio(values["correct_nll"], values["perturbed_nll"])
        return torch.tensor(F.truth_ratio_score(ratio, self.closer_to_one), dtype=torch.float64)


class TofuSetMetrics(MetricCollection):
    """The aggregate metrics of one scored evaluation set; ``compute()`` gives ``{"<set>_<metric>": tensor}``.

    ``probability`` (normalised or not), ``truth_ratio`` and ``rouge``, plus ``extraction_strength`` where
    the set has it, all as ``spec`` (:mod:`perta_lightning.benchmarks.tofu.sets`) describes the set. Without
    ``rouge`` (an evaluation that generates nothing: a screening of the forget set) there is no ROUGE score.
    """

    def __init__(self, spec: EvalSetSpec, rouge: bool = True) -> None:
        if not spec.scored:
            raise ValueError(f"evaluation set {spec.name!r} has no probability, truth ratio or ROUGE")
        metrics: dict[str, Metric] = {
            "probability": ProbabilityWithOptions() if spec.normalised_probability else AnswerProbability(),
            "truth_ratio": TruthRatio(closer_to_one=spec.truth_ratio_closer_to_one),
        }
        if rouge:
            metrics["rouge"] = MeanOfValues()
        if spec.extraction_strength:
            metrics["extraction_strength"] = MeanOfValues()
        super().__init__(metrics, prefix=f"{spec.name}_", compute_groups=False)
        self.spec = spec

    def update(  # type: ignore[override]
        self,
        index: torch.Tensor,
        answer_nll: torch.Tensor,
        perturbed_nll: torch.Tensor,
        rouge: torch.Tensor | None,
        paraphrased_nll: torch.Tensor | None = None,
        extraction_strength: torch.Tensor | None = None,
    ) -> None:
        """Per-example values of one batch: mean NLLs ``(B,)`` (``perturbed_nll``: ``(B, K)``), ROUGE-L recall and
        extraction strength ``(B,)``. ``paraphrased_nll`` is required when the set's truth ratio uses it; ``rouge``
        is ``None`` exactly when the collection was built without ROUGE."""
        correct = {"answer": answer_nll, "paraphrased_answer": paraphrased_nll}[self.spec.truth_ratio_correct]
        if correct is None or (self.spec.extraction_strength and extraction_strength is None):
            raise ValueError(f"{self.spec.name}: update needs {self.spec.truth_ratio_correct} NLLs"
                             + (" and extraction strength" if self.spec.extraction_strength else ""))
        if (rouge is None) == ("rouge" in self):
            raise ValueError(f"{self.spec.name}: update needs ROUGE values exactly when the metrics were built with "
                             f"ROUGE (built with it: {'rouge' in self}, given: {rouge is not None})")
        if self.spec.normalised_probability:
            self["probability"].update(index, answer_nll, perturbed_nll)
        else:
            self["probability"].update(index, answer_nll)
        self["truth_ratio"].update(index, correct, perturbed_nll)
        if rouge is not None:
            self["rouge"].update(index, rouge)
        if self.spec.extraction_strength:
            self["extraction_strength"].update(index, extraction_strength)
