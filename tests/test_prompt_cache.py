"""Prompt-cache scoring equals running every ``prompt ++ answer`` on its own, and leaves the prefix usable."""

import pytest
import torch

from perta_lightning.data.formatting import pad_batch
from perta_lightning.functional.losses import example_nll
from perta_lightning.prompt_cache import (
    CACHE_ARG,
    GreedyPool,
    block_labels,
    encode_prefix,
    gather_cache,
    greedy_decode,
    pad_after_shared_prefix,
    score_answers,
    shared_columns,
)
from tests.tiny import random_llama


@pytest.fixture(scope="module")
def model():
    return random_llama(vocab_size=64, seed=0)


@torch.no_grad()
@pytest.mark.parametrize("groups, min_group", [(1, 1), (2, 1), (4, 1), (4, 2)])
def test_cached_scores_equal_full_sequences(model, groups, min_group):
    """One block, or answers grouped by length (each group padded to its own longest, its rows put back)."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]  # different lengths: left padding matters
    answers = [[20, 21, 1], [22, 1], [23, 24, 25, 26, 1], [27, 1], [28, 29, 1]]
    example = torch.tensor([0, 1, 2, 0, 2])
    prompt_ids = pad_batch(prompts, 0, side="left")
    prompt_mask = pad_batch([[1] * len(p) for p in prompts], 0, side="left")
    answer_ids = pad_batch(answers, 0)
    answer_mask = pad_batch([[1] * len(a) for a in answers], 0)
    prefix = encode_prefix(model, prompt_ids, prompt_mask)
    logits = score_answers(model, prefix, prompt_ids, prompt_mask, answer_ids, answer_mask, example, groups, min_group)
    assert logits.shape[:2] == (len(answers), answer_ids.shape[1] + 1)
    labels = block_labels(pad_batch(answers, -100))
    nll, count = example_nll(logits, labels)
    for n, answer in enumerate(answers):
        prompt = prompts[int(example[n])]
        full = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        assert torch.allclose(logits[n, : len(answer)], full, atol=1e-5), n
        reference = torch.nn.functional.cross_entropy(full, torch.tensor(answer), reduction="sum")
        assert count[n] == len(answer) and nll[n].item() == pytest.approx(reference.item(), abs=1e-5)
    assert prefix.get_seq_length() == prompt_ids.shape[1] - 1  # scoring did not extend the shared prefix


def test_prompts_must_be_left_padded(model):
    ids, mask = pad_batch([[5, 6], [7, 8, 9]], 0, side="right"), pad_batch([[1, 1], [1, 1, 1]], 0, side="right")
    with pytest.raises(ValueError, match="end in column P - 1"):
        encode_prefix(model, ids, mask)


@torch.no_grad()
@pytest.mark.parametrize("groups, min_group", [(1, 1), (3, 1)])
def test_token_scores_equal_those_of_the_whole_logits(model, groups, min_group):
    """The per-token NLL and argmax hits kept group by group are those of the whole ``(N, 1 + A, V)`` logits."""
    from perta_lightning.functional.losses import token_nll
    from perta_lightning.prompt_cache import score_answer_tokens

    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    answers = [[20, 21, 1], [22, 1], [23, 24, 25, 26, 1], [27, 1], [28, 29, 30, 1]]
    example = torch.tensor([0, 1, 1, 0, 0])
    prompt_ids = pad_batch(prompts, 0, side="left")
    prompt_mask = pad_batch([[1] * len(p) for p in prompts], 0, side="left")
    answer_ids, answer_labels = pad_batch(answers, 0), pad_batch(answers, -100)
    answer_mask = pad_batch([[1] * len(a) for a in answers], 0)
    prefix = encode_prefix(model, prompt_ids, prompt_mask)
    logits = score_answers(model, prefix, prompt_ids, prompt_mask, answer_ids, answer_mask, example, groups=1)
    labels = block_labels(answer_labels)
    nll, hits = score_answer_tokens(model, prefix, prompt_ids, prompt_mask, answer_ids, answer_labels, answer_mask,
                                    example, groups, min_group)
    mask = labels[:, 1:] != -100
    assert nll.shape == hits.shape == mask.shape
    torch.testing.assert_close(nll[mask], token_nll(logits, labels)[mask], rtol=0, atol=1e-5)
    assert torch.equal(hits[mask], (logits[:, :-1].argmax(-1) == labels[:, 1:])[mask])
    assert not hits[~mask].any() and not nll[~mask].any()


def test_padding_goes_after_the_shared_prefix():
    """Hand-built layouts: the shared prefix first, then each row's padding, then the rest; a prompt that is all
    prefix keeps its last token in the last column; nothing shared is left padding."""
    ids, mask = pad_after_shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], 0)
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 0, 5], [1, 2, 0, 3]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 0, 1]]
    assert shared_columns(ids, mask) == 2
    ids, mask = pad_after_shared_prefix([[7, 8], [7, 8, 9]], 0)  # [7, 8] is all prefix: only 7 is shared
    assert ids.tolist() == [[7, 0, 8], [7, 8, 9]] and shared_columns(ids, mask) == 1
    ids, mask = pad_after_shared_prefix([[5, 6], [7, 8, 9]], 0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert shared_columns(ids, mask) == 0


@torch.no_grad()
@pytest.mark.parametrize("prompts", [
    [[3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 10, 11], [3, 4, 5, 12, 13, 14]],  # a shared prefix, then different lengths
    [[3, 4, 5, 6], [3, 4, 5, 6]],  # identical prompts: all but the last token shared
])
def test_shared_prefix_scores_and_generations_equal_single_prompts(model, prompts):
    """With the shared prefix encoded once for the batch, answers score as on every prompt alone, and greedy
    generation from that cache equals greedy generation of each prompt alone."""
    answers = [[20, 21, 1], [22, 1], [23, 24, 25, 26, 1]][: len(prompts)]
    example = torch.arange(len(prompts))
    prompt_ids, prompt_mask = pad_after_shared_prefix(prompts, 0)
    assert shared_columns(prompt_ids, prompt_mask) >= 3
    answer_ids, answer_mask = pad_batch(answers, 0), pad_batch([[1] * len(a) for a in answers], 0)
    prefix = encode_prefix(model, prompt_ids, prompt_mask)
    logits = score_answers(model, prefix, prompt_ids, prompt_mask, answer_ids, answer_mask, example, groups=1)
    for n, answer in enumerate(answers):
        full = model(input_ids=torch.tensor([prompts[n] + answer])).logits[0, len(prompts[n]) - 1 : -1]
        assert torch.allclose(logits[n, : len(answer)], full, atol=1e-5), n
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **{CACHE_ARG: prefix}, max_new_tokens=6,
                         do_sample=False, pad_token_id=0, eos_token_id=None)[:, prompt_ids.shape[1]:]
    for n, prompt in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, len(prompt):]
        assert out[n].tolist() == alone.tolist(), n


@torch.no_grad()
def test_greedy_decode_equals_generate_and_drops_ended_rows(model):
    """``greedy_decode`` gives Hugging Face ``generate``'s tokens (cut before EOS, each row at most its limit), and
    a step runs only the rows still open: the batch the model sees shrinks as rows end."""
    prompts = [[3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 10, 11], [3, 4, 5, 12, 13, 14], [15, 16]]
    width = 10
    ids, mask = pad_after_shared_prefix(prompts, 0)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=width, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[:, ids.shape[1]:].tolist()
    eos = free[1][2]  # a token that ends row 1 early: rows end at different steps
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=width, do_sample=False,
                               pad_token_id=0, eos_token_id=eos)[:, ids.shape[1]:].tolist()
    limits = [width, width, 4, width]
    expected = [(row[: row.index(eos)] if eos in row else row)[:limit] for row, limit in zip(generated, limits)]
    assert len({len(row) for row in expected}) > 1
    prefix = encode_prefix(model, ids, mask)
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        out = greedy_decode(model, gather_cache(prefix, torch.arange(4)), ids, mask, limits, eos)
    finally:
        hook.remove()
    assert out == expected, (out, expected, generated)
    # a row runs one pass per token it keeps, and one more for the EOS that ends it (none when its limit does)
    passes = [len(row) + (eos in full and full.index(eos) < limit) for row, full, limit in zip(expected, generated, limits)]
    assert batch_sizes == [sum(count > step for count in passes) for step in range(max(passes))]
    assert batch_sizes[-1] < batch_sizes[0]


@torch.no_grad()
def test_greedy_decode_keeps_step_with_other_ranks(model):
    """A rank whose rows have all ended keeps running passes while ``keep_going`` says another rank has rows open
    (sharded parameters need every rank's passes), and its tokens are not changed by them."""
    prompts = [[3, 4, 5, 6], [3, 4, 7]]
    ids, mask = pad_after_shared_prefix(prompts, 0)
    alone = greedy_decode(model, gather_cache(encode_prefix(model, ids, mask), torch.arange(2)), ids, mask, [3, 2],
                          None)
    prefix = encode_prefix(model, ids, mask)
    calls, passes = [], []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: passes.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        def keep_going(open_here: bool) -> bool:  # "another rank" decodes seven steps after the first pass
            calls.append(open_here)
            return len(calls) <= 7
        out = greedy_decode(model, gather_cache(prefix, torch.arange(2)), ids, mask, [3, 2], None, keep_going)
    finally:
        hook.remove()
    assert out == alone and [len(row) for row in out] == [3, 2]
    assert passes == [2, 2, 1, 1, 1, 1, 1, 1]  # the first pass, which every rank runs, then seven steps
    assert calls == [True, True] + [False] * 6


@torch.no_grad()
def test_pool_decodes_batches_of_different_widths_as_each_alone(model):
    """Batches join a running batch at different times, with prompts (so caches) of different widths, and rows
    ending at different steps: each batch's continuations are those of decoding it alone, and a batch is
    finished exactly when its last row has ended."""
    batches = [
        [[3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5, 12]],
        [[20, 21], [22, 23, 24], [25, 26, 27, 28, 29]],
        [[30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]],
    ]
    width = 9
    laid_out = [pad_after_shared_prefix(prompts, 0) for prompts in batches]
    free = [greedy_decode(model, gather_cache(encode_prefix(model, ids, mask), torch.arange(len(ids))), ids, mask,
                          [width] * len(ids), None) for ids, mask in laid_out]

    def cut(row, eos):
        return row[: row.index(eos)] if eos in row else row

    # the EOS token that ends the rows at the most different steps, so that they leave the running batch apart
    eos = max(sorted({t for rows in free for row in rows for t in row}),
              key=lambda t: len({len(cut(row, t)) for rows in free for row in rows}))
    alone = [greedy_decode(model, gather_cache(encode_prefix(model, ids, mask), torch.arange(len(ids))), ids, mask,
                           [width] * len(ids), eos) for ids, mask in laid_out]
    assert alone == [[cut(row, eos) for row in rows] for rows in free]
    assert len({len(row) for rows in alone for row in rows}) > 2
    pool, done = GreedyPool(model, eos), {}
    for key, (ids, mask) in enumerate(laid_out):
        pool.add(key, gather_cache(encode_prefix(model, ids, mask), torch.arange(len(ids))), ids, mask,
                 [width] * len(ids))
        pool.run(1 if key < len(laid_out) - 1 else 0)
        assert pool.open_rows <= (1 if key < len(laid_out) - 1 else 0)
        for finished in pool.finished():
            assert all(len(row) == len(alone[finished][i]) for i, row in enumerate(pool.outputs[finished]))
            done[finished] = pool.take(finished)
    assert done == dict(enumerate(alone))
    with pytest.raises(KeyError, match="not finished"):
        pool.take(0)
