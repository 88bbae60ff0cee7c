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

**A prefix every prompt shares** (a chat template's system turn: 24 of SmolLM2's ~40 prompt tokens; MUSE's
few-shot questions) is encoded once. :func:`pad_after_shared_prefix` lays a batch out as
``[shared prefix][padding][rest of the prompt]``, so the shared tokens sit in the same columns of every row;
:func:`encode_prefix` runs those columns for one row, repeats that cache along the batch, and runs only the rest.
Padding in the middle is masked like padding on the left, and positions count unmasked tokens only.

**Decoding.** :func:`greedy_decode` continues each row from that cache, and a row leaves the batch when it ends;
:class:`GreedyPool` decodes the rows of many batches in one running batch, which new batches join.

**Drafts.** :func:`accept_drafts` runs ``[last prompt token] ++ draft`` for a guessed continuation per prompt in
one pass and keeps the tokens greedy decoding would produce first (speculative decoding's acceptance rule).
"""

from __future__ import annotations

from collections.abc import Callable
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


def pad_after_shared_prefix(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask ``(B, P)`` of ``prompts``, each row ``[shared prefix][padding][rest]``: the longest
    prefix all prompts share (at most one token short of the shortest, so that every row ends in a token of its
    own) first, then the row's padding, then the rest of its prompt, which ends in column ``P - 1``. With no
    shared prefix this is left padding."""
    shortest = min(len(p) for p in prompts)
    shared = 0
    while shared < shortest - 1 and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        rest = len(prompt) - shared
        ids[row, :shared], ids[row, width - rest:] = torch.as_tensor(prompt[:shared]), torch.as_tensor(prompt[shared:])
        mask[row, :shared], mask[row, width - rest:] = 1, 1
    return ids, mask


def shared_columns(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """How many leading columns hold the same unmasked token in every row."""
    same = (prompt_ids == prompt_ids[:1]).all(0) & prompt_mask.bool().all(0)
    return int(same.long().cumprod(0).sum())


def encode_prefix(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> DynamicCache:
    """Key/value cache of the prompts ``(B, P)``, padded on the left or after a shared prefix
    (:func:`pad_after_shared_prefix`), without their last column ``(B, P - 1)``. Leading columns that every row
    shares (:func:`shared_columns`) are encoded for one row and repeated along the batch."""
    if prompt_ids.shape[1] < 2 or not bool(prompt_mask[:, -1].all()):
        raise ValueError(f"prompts must end in column P - 1 (padded on the left or after a shared prefix) and be at "
                         f"least 2 tokens long, got shape {tuple(prompt_ids.shape)}")
    width, rows = prompt_ids.shape[1] - 1, prompt_ids.shape[0]
    positions = prompt_positions(prompt_mask)
    shared = min(shared_columns(prompt_ids, prompt_mask), width) if rows > 1 else 0
    cache = None
    if shared:
        out = model(input_ids=prompt_ids[:1, :shared], attention_mask=prompt_mask[:1, :shared],
                    position_ids=positions[:1, :shared], use_cache=True, logits_to_keep=1)
        layers = _full_attention(model, getattr(out, CACHE_ARG)).layers
        cache = DynamicCache(ddp_cache_data=[(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                                             for layer in layers])
    if shared < width:
        out = model(input_ids=prompt_ids[:, shared:width], attention_mask=prompt_mask[:, :width],
                    position_ids=positions[:, shared:width], use_cache=True, logits_to_keep=1,
                    **({} if cache is None else {CACHE_ARG: cache}))
        cache = _full_attention(model, getattr(out, CACHE_ARG))
    return cache


def _full_attention(model: torch.nn.Module, cache: DynamicCache) -> DynamicCache:
    """``cache``, refused when a layer is a sliding window's (its keys cannot be shared across answers)."""
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
    cache = gather_cache(prefix, example)
    ids = torch.cat([prompt_ids[example, -1:], answer_ids], dim=1)
    mask = torch.cat([prompt_mask[example], answer_mask], dim=1)
    start = prompt_mask.long().sum(-1)[example] - 1
    positions = start[:, None] + torch.arange(ids.shape[1], device=ids.device)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                 **{CACHE_ARG: cache}).logits


def gather_cache(prefix: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A new cache holding ``prefix``'s rows ``rows`` (repeats allowed), ``prefix`` left unchanged."""
    return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
                                        for layer in prefix.layers])


def block_labels(answer_labels: torch.Tensor) -> torch.Tensor:
    """Labels ``(N, 1 + A)`` aligned with :func:`score_answers`' input block: ``-100`` for the prompt token."""
    return torch.nn.functional.pad(answer_labels, (1, 0), value=IGNORE_INDEX)


def accept_drafts(model: torch.nn.Module, prefix: DynamicCache, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  draft_ids: torch.Tensor, draft_mask: torch.Tensor, width: int) -> list[list[int]]:
    """Per prompt, the first tokens of its greedy continuation that one pass over ``[last prompt token] ++ draft``
    settles: with ``g[t]`` the argmax after block token ``t``, the draft's leading tokens ``d[t] == g[t]`` and then
    ``g`` at the first mismatch (or after the whole draft), at most ``width`` tokens (the drafts are cut to
    ``width - 1``). ``draft_ids`` / ``draft_mask``: ``(B, D)`` right padded, ``D`` may be 0; a row with an empty
    draft gets its first greedy token. ``prefix`` (from :func:`encode_prefix`) is left unchanged."""
    draft_ids, draft_mask = draft_ids[:, : width - 1], draft_mask[:, : width - 1]
    rows = torch.arange(draft_ids.shape[0], device=draft_ids.device)
    greedy = _score_block(model, prefix, prompt_ids, prompt_mask, draft_ids, draft_mask, rows).argmax(-1)
    accepted = ((greedy[:, :-1] == draft_ids) & draft_mask.bool()).long().cumprod(-1).sum(-1)
    return [guess[: count + 1] for guess, count in zip(greedy.tolist(), accepted.tolist())]


def greedy_decode(model: torch.nn.Module, cache: DynamicCache, input_ids: torch.Tensor, mask: torch.Tensor,
                  limits: list[int], eos_token_id: int | None,
                  keep_going: Callable[[bool], bool] | None = None) -> list[list[int]]:
    """Greedy continuation of each row, at most ``limits[row]`` tokens, stopped before EOS; rows leave the batch
    as they end, so a decode step runs only the rows still open (:class:`GreedyPool` with one batch).

    ``cache`` holds the first ``K`` columns of every row (a cache of its own, :func:`gather_cache`: it is grown and
    cut here); ``input_ids`` / ``mask`` ``(B, T)`` are the rows whole, padded on the left or after a shared prefix,
    and columns ``K:`` are run in the first pass. Positions are ``cumsum(mask) - 1``, as Hugging Face ``generate``
    counts them, and each step passes the same 2-D mask that ``generate`` would, so every row's numbers are
    ``generate``'s up to the float rounding that a different batch size gives a matrix product.

    ``keep_going(open)``: under a strategy that shards parameters every rank must run the same forward passes;
    called once a step with whether this rank has rows open, it returns whether any rank has. While it does, a
    rank with none runs its last row on (its tokens are discarded). ``None`` in one process.
    """
    pool = GreedyPool(model, eos_token_id)
    pool.add(0, cache, input_ids, mask, limits, keep_going)
    pool.run(0, keep_going)
    return pool.take(0)


class GreedyPool:
    """Greedy decoding of the rows of many batches in one running batch: rows join as their batch arrives
    (:meth:`add`) and leave as they end, so a decode step runs the open rows of several batches where decoding
    each batch apart ends every batch on a few long rows (on this project's CPU a step of one SmolLM2 row costs
    a third to a half of a step of eight: the weights are read once a step either way).

    Rows of different batches hold caches of different lengths: the shorter are padded on the left with masked
    positions, which attention gives no weight, so each row's numbers are those of decoding its batch alone up to
    float rounding. A batch's continuations are ready once all its rows have ended (:meth:`finished`,
    :meth:`take`). Pure torch, no Lightning."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int | None) -> None:
        self.model, self.eos = model, eos_token_id
        self.cache: DynamicCache | None = None
        self.mask = self.tokens = self.positions = self.limit = self.count = torch.empty(0)
        self.owners: list[tuple[object, int] | None] = []  # (batch key, row) of each open row; None: a stand-in
        self.outputs: dict[object, list[list[int]]] = {}
        self.waiting: dict[object, int] = {}  # open rows left per batch added and not taken

    @property
    def open_rows(self) -> int:
        return sum(owner is not None for owner in self.owners)

    def finished(self) -> list[object]:
        """The keys of the batches added whose rows have all ended and that were not taken yet."""
        return [key for key, left in self.waiting.items() if left == 0]

    def take(self, key: object) -> list[list[int]]:
        """The continuations of the finished batch ``key`` (forgotten here)."""
        if self.waiting.get(key) != 0:
            raise KeyError(f"batch {key!r} is not finished")
        del self.waiting[key]
        return self.outputs.pop(key)

    def add(self, key: object, cache: DynamicCache, input_ids: torch.Tensor, mask: torch.Tensor, limits: list[int],
            keep_going: Callable[[bool], bool] | None = None) -> None:
        """Run the first pass of a batch (its arguments as :func:`greedy_decode` takes them) and let its open rows
        join the running batch. With ``keep_going`` (a rank of a sharded model, whose passes every rank must run)
        the pass runs even when no row is open here, and a stand-in row stays when all have ended."""
        if key in self.outputs:
            raise KeyError(f"batch {key!r} was added already")
        self.outputs[key] = [[] for _ in range(input_ids.shape[0])]
        limit = torch.as_tensor(limits, device=input_ids.device)
        rows = (limit > 0).nonzero().squeeze(1)
        self.waiting[key] = int(rows.numel())
        owners: list[tuple[object, int] | None] = [(key, row) for row in rows.tolist()]
        if not owners:
            if keep_going is None:
                return
            rows, owners = rows.new_zeros(1), [None]
        if rows.numel() < input_ids.shape[0]:
            cache.batch_select_indices(rows)
        tokens = input_ids[rows, cache.get_seq_length():]
        positions = prompt_positions(mask[rows])[:, -tokens.shape[1]:]
        self._step(cache, mask[rows], tokens, positions, limit[rows], torch.zeros_like(limit[rows]), owners,
                   joining=True, keep_one=keep_going is not None)

    def run(self, at_most: int, keep_going: Callable[[bool], bool] | None = None) -> None:
        """Decode until at most ``at_most`` rows are open (``0``: every batch added is finished). ``keep_going``
        as :func:`greedy_decode` takes it, with ``at_most`` 0."""
        while True:
            go_on = self.open_rows > at_most
            if keep_going is not None:
                go_on = keep_going(go_on)
            if not go_on:
                break
            mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            self._step(self.cache, mask, self.tokens, self.positions, self.limit, self.count, self.owners,
                       joining=False, keep_one=keep_going is not None)
        if self.open_rows == 0:  # stand-ins only: nothing to carry to the next batch
            self.cache, self.owners = None, []

    def _step(self, cache, mask, tokens, positions, limit, count, owners, joining: bool, keep_one: bool) -> None:
        """One forward pass (the first of rows ``joining``, or a decode step of the running batch): its greedy
        tokens recorded, the ended rows dropped, the others kept as (or merged into) the running batch.
        ``keep_one``: when every row has ended, one stays as a stand-in (its tokens are not recorded)."""
        logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{CACHE_ARG: cache}).logits
        step = logits[:, -1].argmax(-1)
        count = count.clone()
        keep = []
        for i, (owner, token) in enumerate(zip(owners, step.tolist())):
            if owner is None:
                continue
            key, row = owner
            ended = token == self.eos
            if not ended:
                self.outputs[key][row].append(token)
                count[i] += 1
                ended = bool(count[i] >= limit[i])
            if ended:
                self.waiting[key] -= 1
            else:
                keep.append(i)
        owners = list(owners)
        if not keep and keep_one:
            keep, owners[0] = [0], None
        index = torch.as_tensor(keep, dtype=torch.long, device=step.device)
        if len(keep) < len(owners):
            cache.batch_select_indices(index)
        state = (cache, mask[index], step[index, None], positions[index, -1:] + 1, limit[index], count[index],
                 [owners[i] for i in keep])
        if joining:
            self._merge(*state)
        else:
            self.cache, self.mask, self.tokens, self.positions, self.limit, self.count, self.owners = state

    def _merge(self, cache, mask, tokens, positions, limit, count, owners) -> None:
        """Let rows join the running batch, the shorter caches padded on the left with masked positions."""
        if not owners:
            return
        if not self.owners:
            self.cache, self.mask, self.tokens, self.positions, self.limit, self.count, self.owners = (
                cache, mask, tokens, positions, limit, count, owners)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        ours, theirs = width - self.mask.shape[1], width - mask.shape[1]
        pad = torch.nn.functional.pad
        self.cache = DynamicCache(ddp_cache_data=[
            (torch.cat([pad(a.keys, (0, 0, ours, 0)), pad(b.keys, (0, 0, theirs, 0))]),
             torch.cat([pad(a.values, (0, 0, ours, 0)), pad(b.values, (0, 0, theirs, 0))]))
            for a, b in zip(self.cache.layers, cache.layers)])
        self.mask = torch.cat([pad(self.mask, (ours, 0)), pad(mask, (theirs, 0))])
        self.tokens, self.positions = torch.cat([self.tokens, tokens]), torch.cat([self.positions, positions])
        self.limit, self.count = torch.cat([self.limit, limit]), torch.cat([self.count, count])
        self.owners = self.owners + owners
