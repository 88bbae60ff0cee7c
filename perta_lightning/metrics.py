"""torchmetrics classes for TOFU evaluation, usable from any LightningModule on one process or many.

Every metric keeps per-example values in ``"cat"`` states next to the example's index in its split.
``compute()`` orders them by index and drops repeats, so the result is the same on one process and on
many: a ``DistributedSampler`` pads the last batch by repeating examples, and ranks see interleaved
indices. ``compute()`` then applies the formula of :mod:`perta_lightning.functional.tofu_metrics`, the one
code path for the evaluator and for users::

    self.forget_tr = TruthRatio(closer_to_one=True)                      # in __init__
    self.forget_tr.update(batch["index"], paraphrased_nll, perturbed_nll)  # in validation_step
    self.log("forget_truth_ratio", self.forget_tr)                       # computed and synced at epoch end

:class:`TofuSetMetrics` groups the metrics of one evaluation set, as :mod:`perta_lightning.eval_sets`
describes it; :class:`perta_lightning.evaluate.TofuEvaluator` aggregates with one per set and one
:class:`MinKMiaAUC`.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from perta_lightning.eval_sets import EvalSetSpec
from perta_lightning.functional import tofu_metrics as F


def _first_of_each_index(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted unique indices, position of the first occurrence of each)`` of a 1-D index tensor."""
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    position = torch.arange(index.numel(), device=index.device)
    first = torch.full_like(unique, index.numel()).scatter_reduce(0, inverse, position, reduce="amin")
    return unique, first


class IndexedValues(Metric):
    """Per-example values keyed by example index, gathered with ``dist_reduce_fx="cat"``.

    Args:
        names: the value columns; each ``update`` passes one tensor per name with a leading batch dim.
    """

    full_state_update = False

    def __init__(self, names: tuple[str, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        if not names:
            raise ValueError("IndexedValues needs at least one value name")
        self.names = tuple(names)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        for name in self.names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _append(self, index: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        if set(values) != set(self.names):
            raise KeyError(f"{type(self).__name__}.update expects {sorted(self.names)}, got {sorted(values)}")
        index = index.detach().long().reshape(-1)
        for name in self.names:
            if values[name].shape[0] != index.numel():
                raise ValueError(f"{type(self).__name__}: {values[name].shape[0]} {name} values for {index.numel()} indices")
        self.index.append(index)
        for name in self.names:
            value = values[name].detach()
            getattr(self, name).append(value.double() if value.is_floating_point() else value.long())

    def update(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        self._append(index, values)

    def ordered(self) -> dict[str, torch.Tensor]:
        """``{"index": (N,), name: (N, ...)}`` sorted by index, each index once."""
        if isinstance(self.index, list) and not self.index:  # after a sync the state is one tensor
            raise RuntimeError(f"{type(self).__name__}: compute() before any update()")
        # .long(): a rank without updates syncs an empty float tensor, which a gather of nothing keeps
        unique, first = _first_of_each_index(dim_zero_cat(self.index).long())
        out = {"index": unique}
        for name in self.names:
            out[name] = dim_zero_cat(getattr(self, name))[first]
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        return self.ordered()


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


class MeanOfValues(IndexedValues):
    """Mean over examples of one per-example value (ROUGE-L recall, extraction strength). ``update(index, value)``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(("value",), **kwargs)

    def update(self, index: torch.Tensor, value: torch.Tensor) -> None:
        self._append(index, {"value": value})

    def compute(self) -> torch.Tensor:
        return self.ordered()["value"].mean()


class MinKMiaAUC(Metric):
    """AUC of Min-K% scores, forget (label 0) against holdout (label 1), open-unlearning's convention.

    ``update(index, score, holdout)``: ``score`` from :func:`perta_lightning.functional.tofu_metrics.min_k_score`
    of a forget batch (``holdout=False``) or a holdout batch (``holdout=True``).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for group in ("forget", "holdout"):
            self.add_state(f"{group}_index", default=[], dist_reduce_fx="cat")
            self.add_state(f"{group}_score", default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, score: torch.Tensor, holdout: bool) -> None:
        group = "holdout" if holdout else "forget"
        index = index.detach().long().reshape(-1)
        if score.shape != index.shape:
            raise ValueError(f"MinKMiaAUC: {tuple(score.shape)} scores for {index.numel()} indices")
        getattr(self, f"{group}_index").append(index)
        getattr(self, f"{group}_score").append(score.detach().double())

    def _scores(self, group: str) -> torch.Tensor:
        index = getattr(self, f"{group}_index")
        if isinstance(index, list) and not index:
            raise RuntimeError(f"MinKMiaAUC: no {group} scores were given to update()")
        _, first = _first_of_each_index(dim_zero_cat(index))
        return dim_zero_cat(getattr(self, f"{group}_score"))[first]

    def compute(self) -> torch.Tensor:
        return torch.tensor(F.auc_forget_vs_holdout(self._scores("forget"), self._scores("holdout")), dtype=torch.float64)


class TofuSetMetrics(MetricCollection):
    """The aggregate metrics of one scored evaluation set; ``compute()`` gives ``{"<set>_<metric>": tensor}``.

    ``probability`` (normalised or not), ``truth_ratio`` and ``rouge``, plus ``extraction_strength`` where
    the set has it, all as ``spec`` (:mod:`perta_lightning.eval_sets`) describes the set.
    """

    def __init__(self, spec: EvalSetSpec) -> None:
        if not spec.scored:
            raise ValueError(f"evaluation set {spec.name!r} has no probability, truth ratio or ROUGE")
        metrics: dict[str, Metric] = {
            "probability": ProbabilityWithOptions() if spec.normalised_probability else AnswerProbability(),
            "truth_ratio": TruthRatio(closer_to_one=spec.truth_ratio_closer_to_one),
            "rouge": MeanOfValues(),
        }
        if spec.extraction_strength:
            metrics["extraction_strength"] = MeanOfValues()
        super().__init__(metrics, prefix=f"{spec.name}_", compute_groups=False)
        self.spec = spec

    def update(  # type: ignore[override]
        self,
        index: torch.Tensor,
        answer_nll: torch.Tensor,
        perturbed_nll: torch.Tensor,
        rouge: torch.Tensor,
        paraphrased_nll: torch.Tensor | None = None,
        extraction_strength: torch.Tensor | None = None,
    ) -> None:
        """Per-example values of one batch: mean NLLs ``(B,)`` (``perturbed_nll``: ``(B, K)``), ROUGE-L recall and
        extraction strength ``(B,)``. ``paraphrased_nll`` is required when the set's truth ratio uses it."""
        correct = {"answer": answer_nll, "paraphrased_answer": paraphrased_nll}[self.spec.truth_ratio_correct]
        if correct is None or (self.spec.extraction_strength and extraction_strength is None):
            raise ValueError(f"{self.spec.name}: update needs {self.spec.truth_ratio_correct} NLLs"
                             + (" and extraction strength" if self.spec.extraction_strength else ""))
        if self.spec.normalised_probability:
            self["probability"].update(index, answer_nll, perturbed_nll)
        else:
            self["probability"].update(index, answer_nll)
        self["truth_ratio"].update(index, correct, perturbed_nll)
        self["rouge"].update(index, rouge)
        if self.spec.extraction_strength:
            self["extraction_strength"].update(index, extraction_strength)
