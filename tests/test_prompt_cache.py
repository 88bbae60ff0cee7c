"""Prompt-cache scoring equals running every ``prompt ++ answer`` on its own, and leaves the prefix usable."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from perta_lightning.data.formatting import pad_batch
from perta_lightning.functional.losses import example_nll
from perta_lightning.prompt_cache import block_labels, encode_prefix, score_answers


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


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
    with pytest.raises(ValueError, match="left padded"):
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
