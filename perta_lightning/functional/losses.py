"""Token-level losses over answer tokens (labels != -100). Pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of next-token prediction, 0 where the label is ignored.

    ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)`` aligned with the inputs (shifted here), -100 ignored.
    Returns ``(B, T-1)`` float32: ``nll[b, t] = -log softmax(logits[b, t])[labels[b, t+1]]``.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(shift_labels.shape)


def answer_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T-1)`` boolean mask of the shifted labels that count (answer tokens)."""
    return labels[:, 1:] != IGNORE_INDEX


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (a scalar): sum of token NLLs / number of answer tokens."""
    count = answer_token_mask(labels).sum()
    if count == 0:
        raise ValueError("the batch has no answer tokens (every label is -100)")
    return token_nll(logits, labels).sum() / count


def example_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed answer NLL ``(B,)`` and answer-token counts ``(B,)``; mean NLL is their ratio."""
    mask = answer_token_mask(labels)
    return (token_nll(logits, labels) * mask).sum(dim=1), mask.sum(dim=1)
