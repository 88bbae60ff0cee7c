"""torchmetrics classes every benchmark's evaluator builds on, usable from any LightningModule on one process or
many.

Every metric keeps per-example values in ``"cat"`` states next to the example's index in its set.
``compute()`` orders them by index and drops repeats, so the result is the same on one process and on many: a
``DistributedSampler`` pads the last batch by repeating examples, and ranks see interleaved indices.

* :class:`IndexedValues`: per-example values (the evaluation files' ``examples``);
* :class:`MeanOfValues`: the mean over examples of one value (ROUGE, VerbMem, KnowMem);
* :class:`MinKMiaAUC`: the AUC of a membership score, forget against holdout.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

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


