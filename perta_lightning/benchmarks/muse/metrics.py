"""torchmetrics classes for MUSE (VerbMem, KnowMem, MIA AUC, PrivLeak), on one process or many.

Thin layers over :mod:`perta_lightning.benchmarks.tofu.metrics`: per-example values live in ``"cat"`` states next to the
example's index and ``compute()`` drops repeated indices (a ``DistributedSampler`` pads with repeats), then
applies :mod:`perta_lightning.functional.muse_metrics`::

    self.muse = MuseMetrics(retain_auc=0.5)                                       # in __init__
    self.muse["forget_verbmem_rouge"].update(index, generations, continuations)   # in validation_step
    self.muse["privleak"].update(index, min_k_text_score(logits, labels), holdout=False)
    self.log_dict(self.muse)                                      # computed and synced at epoch end
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import MetricCollection

from perta_lightning.benchmarks.metrics import MeanOfValues, MinKMiaAUC
from perta_lightning.functional import muse_metrics as M


class VerbMem(MeanOfValues):
    """Mean VerbMem over excerpts: ROUGE-L F1 (:func:`~perta_lightning.functional.muse_metrics.verbmem_scores`).

    ``update(index (B,), generations, continuations)``: the greedy continuations and the true ones (strings).
    """

    def update(  # type: ignore[override]
        self, index: torch.Tensor, generations: Sequence[str], continuations: Sequence[str]
    ) -> None:
        self._append(index, {"value": M.verbmem_scores(generations, continuations).to(index.device)})


class KnowMem(MeanOfValues):
    """Mean KnowMem over questions: ROUGE-L F1 (:func:`~perta_lightning.functional.muse_metrics.knowmem_scores`)

    ``update(index (B,), generations, answers)``: the greedy answers (cut at MUSE's stop strings), true answers.
    """

    def update(  # type: ignore[override]
        self, index: torch.Tensor, generations: Sequence[str], answers: Sequence[str]
    ) -> None:
        self._append(index, {"value": M.knowmem_scores(generations, answers).to(index.device)})


class MiaAUC(MinKMiaAUC):
    """ROC AUC of a membership score (Min-K%, Min-K%++), forget labelled 0 and holdout 1 (open-unlearning).

    ``update(index, score, holdout)`` with ``score`` from
    :func:`~perta_lightning.functional.muse_metrics.min_k_text_score` or
    :func:`~perta_lightning.functional.muse_metrics.min_k_plus_plus_score`; 1 when the forget set is familiar.
    """


class PrivLeak(MiaAUC):
    """MUSE PrivLeak against the retain model's AUC: ``((1-AUC) - (1-AUC_ret)) / (1-AUC_ret) * 100``.

    About -100 for a model that memorised the forget set, 0 for one retrained without it, positive when the
    forget set looks *less* familiar than unseen text (over-unlearning). ``update`` as :class:`MiaAUC`.

    Args:
        retain_auc: the retain model's :class:`MiaAUC` on the same sets (open-unlearning's ``ref_value``: 0.5).
    """

    def __init__(self, retain_auc: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= retain_auc < 1.0:
            raise ValueError(f"PrivLeak: retain_auc must be in [0, 1) (1 - AUC divides), got {retain_auc}")
        self.retain_auc = retain_auc

    def compute(self) -> torch.Tensor:
        return torch.tensor(M.privleak(float(super().compute()), self.retain_auc), dtype=torch.float64)


class MuseMetrics(MetricCollection):
    """The MUSE aggregates ``forget_verbmem_rouge``, ``forget_knowmem_rouge``, ``retain_knowmem_rouge`` and
    ``privleak``. Each member sees its own data: update the members, not the collection.

    Args:
        retain_auc: the retain model's MIA AUC, for :class:`PrivLeak`.
    """

    def __init__(self, retain_auc: float = 0.5) -> None:
        members = {"forget_verbmem_rouge": VerbMem(), "forget_knowmem_rouge": KnowMem(),
                   "retain_knowmem_rouge": KnowMem(), "privleak": PrivLeak(retain_auc)}
        super().__init__(members, compute_groups=False)

    def update(self, *args, **kwargs) -> None:
        raise TypeError("MuseMetrics: update each member, e.g. "
                        "metrics['forget_verbmem_rouge'].update(index, generations, continuations)")
