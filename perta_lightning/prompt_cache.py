"""Score many answers to one prompt with the prompt encoded once (a shared key/value cache).

A TOFU example scores ``2 + K`` answers to the same question. Running the model over
``prompt ++ answer`` for each of them re-encodes the prompt ``2 + K`` times, and the prompt is most of
the tokens. Causal attention means the prompt's keys and values do not depend on the answer, so:

1. ``encode_prefix``: run the ``B`` prompts, left padded to ``(B, P)``, *without their last token*
   (column ``P - 1``) once, keeping the cache of ``P - 1`` positions per layer;
2. ``score_answers``: gather that cache to the ``N`` answers (``example[n]`` is the prompt of answer ``n``)
   and run only ``[last prompt token] ++ answer`` per answer, ``(N, 1 + A)`` tokens. Output position ``t``
   predicts token ``t + 1`` of that block, so the logits and the labels ``[-100] ++ answer`` have the usual
   next-token layout of :mod:`perta_lightning.functional.losses`, restricted to the answer.

The same prefix cache then seeds generation, which only has to run the last prompt token before decoding.
Positions follow Hugging Face ``generate``: ``cumsum(mask) - 1`` over the left-padded prompt, so row ``b``
sees the same positions as its unpadded sequence, and the numbers equal a one-sequence-at-a-time pass up to
float rounding of the masked attention.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from perta_lightning.functional.losses import IGNORE_INDEX

#: The keyword and output field that carry the key/value cache: ``cache`` from transformers 5.24,
#: ``past_key_values`` before it (5.24 still accepts the old name, with a deprecation warning).
CACHE_ARG = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, P)`` of left-padded prompts: ``cumsum(mask) - 1``, 0 on padding (as ``generate``)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prefix(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> DynamicCache:
    """Key/value cache of the left-padded prompts ``(B, P)`` without their last column ``(B, P - 1)``."""
    if prompt_ids.shape[1] < 2 or not bool(prompt_mask[:, -1].all()):
        raise ValueError(f"prompts must be left padded and at least 2 tokens long, got shape {tuple(prompt_ids.shape)}")
    out = model(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
                position_ids=prompt_positions(prompt_mask)[:, :-1], use_cache=True, logits_to_keep=1)
    cache = getattr(out, CACHE_ARG)
    sliding = [i for i, layer in enumerate(cache.layers) if getattr(layer, "is_sliding", False)]
    if sliding:
        raise NotImplementedError(f"{type(model).__name__}: sliding-window cache layers {sliding} cannot be shared "
                                  "across answers; prompt-cache scoring supports full-attention models")
    return cache


def score_answers(
    model: torch.nn.Module,
    prefix: DynamicCache,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    example: torch.Tensor,
    groups: int = 4,
    min_group: int = 16,
) -> torch.Tensor:
    """Logits ``(N, 1 + A, V)`` of ``[last prompt token of example[n]] ++ answer_ids[n]`` after the prefix.

    ``answer_ids`` / ``answer_mask``: ``(N, A)`` right padded; ``example``: ``(N,)`` prompt row of each answer.
    ``prefix`` (from :func:`encode_prefix`) is left unchanged. Logit ``[n, t]`` predicts block token ``t + 1``;
    logits past an answer's end mean nothing (its labels there are ``-100``). :func:`score_answer_tokens`
    gives what the metrics need without holding ``(N, 1 + A, V)`` logits.

    Answers of one batch differ in length (a paraphrase, five perturbed answers), so one block padded to the
    longest wastes about a third of its tokens. The answers are sorted by length and run in up to ``groups``
    blocks of at least ``min_group`` answers, each padded to its own longest: fewer padded tokens for a few
    more forward passes. Each row's numbers do not depend on the grouping beyond float rounding.
    """
    out: torch.Tensor | None = None
    for rows, width, logits in _grouped_blocks(model, prefix, prompt_ids, prompt_mask, answer_ids, answer_mask,
                                               example, groups, min_group):
        if rows is None:
            return logits
        if out is None:
            out = logits.new_zeros(answer_ids.shape[0], answer_ids.shape[1] + 1, logits.shape[-1])
        out[rows, : width + 1] = logits
    return out


def score_answer_tokens(
    model: torch.nn.Module,
    prefix: DynamicCache,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_labels: torch.Tensor,
    answer_mask: torch.Tensor,
    example: torch.Tensor,
    groups: int = 4,
    min_group: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL and argmax hits ``(N, A)`` of each answer token, as :func:`score_answers` would give them
    through :func:`~perta_lightning.functional.losses.token_nll` and ``argmax == label`` over
    :func:`block_labels`, but one group of answers' logits at a time.

    A batch's logits are ``N × (1 + A) × V`` floats: for batch 32 with 7 answers of 30 tokens and Llama 3's
    128k vocabulary, 3.6 GB, and the log-softmax as much again. Holding one group (of up to ``groups``) and
    reducing it to two ``(n, A)`` tensors keeps the peak to a fraction of that. NLL is float32, 0 where the
    label is ignored; hits are ``False`` there.
    """
    from perta_lightning.functional.losses import token_nll

    nll = torch.zeros(answer_ids.shape, dtype=torch.float32, device=answer_ids.device)
    hits = torch.zeros(answer_ids.shape, dtype=torch.bool, device=answer_ids.device)
    for rows, width, logits in _grouped_blocks(model, prefix, prompt_ids, prompt_mask, answer_ids, answer_mask,
                                               example, groups, min_group):
        labels = block_labels(answer_labels if rows is None else answer_labels[rows, :width])
        where = slice(None) if rows is None else rows
        nll[where, : labels.shape[1] - 1] = token_nll(logits, labels)
        hits[where, : labels.shape[1] - 1] = logits[:, :-1].argmax(dim=-1) == labels[:, 1:]
        del logits
    return nll, hits


def _grouped_blocks(model, prefix, prompt_ids, prompt_mask, answer_ids, answer_mask, example, groups, min_group):
    """``(rows, width, logits)`` per group of length-sorted answers (``rows`` ``None``: one block of all)."""
    lengths = answer_mask.long().sum(-1)
    count = max(1, min(groups, answer_ids.shape[0] // max(1, min_group)))
    if count == 1:
        yield None, answer_ids.shape[1], _score_block(model, prefix, prompt_ids, prompt_mask, answer_ids,
                                                      answer_mask, example)
        return
    order = torch.argsort(lengths, stable=True)
    for rows in torch.tensor_split(order, count):
        width = int(lengths[rows].max())
        yield rows, width, _score_block(model, prefix, prompt_ids, prompt_mask, answer_ids[rows, :width],
                                        answer_mask[rows, :width], example[rows])


def _score_block(model: torch.nn.Module, prefix: DynamicCache, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 answer_ids: torch.Tensor, answer_mask: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """:func:`score_answers` for one block of answers, padded to its longest."""
    cache = DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, example), layer.values.index_select(0, example))
                                         for layer in prefix.layers])
    ids = torch.cat([prompt_ids[example, -1:], answer_ids], dim=1)
    mask = torch.cat([prompt_mask[example], answer_mask], dim=1)
    start = prompt_mask.long().sum(-1)[example] - 1
    positions = start[:, None] + torch.arange(ids.shape[1], device=ids.device)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                 **{CACHE_ARG: cache}).logits


def block_labels(answer_labels: torch.Tensor) -> torch.Tensor:
    """Labels ``(N, 1 + A)`` aligned with :func:`score_answers`' input block: ``-100`` for the prompt token."""
    return torch.nn.functional.pad(answer_labels, (1, 0), value=IGNORE_INDEX)
