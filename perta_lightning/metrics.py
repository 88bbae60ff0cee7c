"""torchmetrics classes for TOFU evaluation.

Every metric keeps per-example values in ``"cat"`` states next to the example's index in its split.
``compute()`` orders them by index and drops repeats, so the result is the same on one process and on
many: a ``DistributedSampler`` pads the last batch by repeating examples, and ranks see interleaved
indices. The formulas live in :mod:`perta_lightning.functional.tofu_metrics`.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from perta_lightning.functional import tofu_metrics as F


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

    def update(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        if set(values) != set(self.names):
            raise KeyError(f"{type(self).__name__}.update expects {sorted(self.names)}, got {sorted(values)}")
        self.index.append(index.detach().long().reshape(-1))
        for name in self.names:
            value = values[name].detach()
            value = value.double() if value.is_floating_point() else value.long()
            if value.shape[0] != index.numel():
                raise ValueError(f"{name}: {value.shape[0]} values for {index.numel()} indices")
            getattr(self, name).append(value)

    def ordered(self) -> dict[str, torch.Tensor]:
        """``{"index": (N,), name: (N, ...)}`` sorted by index, each index once."""
        if isinstance(self.index, list) and not self.index:  # after a sync the state is one tensor
            raise RuntimeError(f"{type(self).__name__}: compute() before any update()")
        index = dim_zero_cat(self.index)
        unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
        # first occurrence of every unique index
        position = torch.arange(index.numel(), device=index.device)
        first = torch.full_like(unique, index.numel()).scatter_reduce(0, inverse, position, reduce="amin")
        out = {"index": unique}
        for name in self.names:
            out[name] = dim_zero_cat(getattr(self, name))[first]
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        return self.ordered()


class AnswerProbability(IndexedValues):
    """Mean of ``exp(-nll(answer))`` (forget / retain probability)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(("answer_nll",), **kwargs)

    def compute(self) -> torch.Tensor:
        return F.answer_probability(self.ordered()["answer_nll"]).mean()


class ProbabilityWithOptions(IndexedValues):
    """Mean of ``p(answer) / (p(answer) + sum_j p(perturbed_j))`` (real authors / world facts)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(("answer_nll", "perturbed_nll"), **kwargs)

    def compute(self) -> torch.Tensor:
        values = self.ordered()
        return F.probability_with_options(values["answer_nll"], values["perturbed_nll"]).mean()


class TruthRatio(IndexedValues):
    """TOFU truth-ratio score: ``mean min(R, 1/R)`` when ``forget`` else ``mean max(0, 1 - 1/R)``."""

    def __init__(self, forget: bool, **kwargs) -> None:
        super().__init__(("correct_nll", "perturbed_nll"), **kwargs)
        self.forget = forget

    def compute(self) -> torch.Tensor:
        values = self.ordered()
        ratio = F.truth_ratio(values["correct_nll"], values["perturbed_nll"])
        return torch.tensor(F.truth_ratio_score(ratio, self.forget), dtype=torch.float64)


class MeanOfValues(IndexedValues):
    """Mean of one per-example value (ROUGE-L recall, extraction strength, ...)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(("value",), **kwargs)

    def compute(self) -> torch.Tensor:
        return self.ordered()["value"].mean()


class MinKMiaAUC(Metric):
    """AUC of Min-K% scores, forget (label 0) against holdout (label 1), open-unlearning's convention."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.forget = IndexedValues(("value",))
        self.holdout = IndexedValues(("value",))

    def update(self, index: torch.Tensor, score: torch.Tensor, holdout: bool) -> None:
        (self.holdout if holdout else self.forget).update(index, value=score)

    def compute(self) -> torch.Tensor:
        return torch.tensor(
            F.auc_forget_vs_holdout(self.forget.compute()["value"], self.holdout.compute()["value"]),
            dtype=torch.float64,
        )
