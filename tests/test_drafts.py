"""Generation from drafts equals plain greedy decoding, whatever the drafts: right, partly right, wrong or empty."""

from types import SimpleNamespace

import pytest
import torch

from perta_lightning.benchmarks.evaluator import Evaluator
from perta_lightning.data.formatting import pad_batch
from perta_lightning.prompt_cache import accept_drafts, encode_prefix, pad_after_shared_prefix
from tests.tiny import random_llama

PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 10, 11], [3, 4, 5, 12, 13, 14], [15, 16]]
WIDTH = 8


@pytest.fixture(scope="module")
def model():
    return random_llama(vocab_size=40, seed=1)


def alone(model, prompt, width, eos):
    """The naive reference: one prompt, one token per pass, cut before EOS."""
    tokens = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(width):
            token = int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            tokens.append(token)
    return out


def evaluator(model, eos):
    module = Evaluator()
    module.model, module.tokenizer = model, SimpleNamespace(eos_token_id=eos, pad_token_id=0)
    return module


def greedy_rows(model, eos=None):
    return [alone(model, p, WIDTH, eos) for p in PROMPTS]


@pytest.mark.parametrize("kind", ["right", "partly", "wrong", "empty", "long", "none"])
@pytest.mark.parametrize("with_eos", [False, True])
def test_drafts_give_greedy_decoding(model, kind, with_eos):
    eos = None
    if with_eos:  # a token greedy decoding produces mid-way in row 0, so that rows end at different lengths
        eos = greedy_rows(model)[0][3]
    expected = greedy_rows(model, eos)
    drafts = {
        "right": [row + ([eos] if eos is not None and len(row) < WIDTH else []) for row in expected],
        "partly": [row[:2] + [(row[2] + 1) % 40] + row[3:] if len(row) > 2 else [39] for row in expected],
        "wrong": [[(t + 7) % 40 for t in row] or [1] for row in expected],
        "empty": [[] for _ in expected],
        "long": [row + [1, 2, 3, 4, 5, 6, 7, 8, 9] for row in expected],
        "none": None,
    }[kind]
    ids, mask = pad_after_shared_prefix(PROMPTS, 0)
    with torch.no_grad():
        out = evaluator(model, eos).generate(ids, mask, WIDTH, drafts=drafts)
    for row, reference in enumerate(expected):
        got = [t for t in out[row].tolist() if t >= 0]
        assert got == reference, (kind, row)
        assert out[row, len(reference):].eq(-1).all()


def test_accepted_tokens_by_hand(model):
    """The draft's tokens up to the first mismatch with greedy, then greedy's own token there."""
    expected = greedy_rows(model)
    ids, mask = pad_after_shared_prefix(PROMPTS, 0)
    with torch.no_grad():
        prefix = encode_prefix(model, ids, mask)
        drafts = [expected[0][:3] + [(expected[0][3] + 1) % 40, 5], [], expected[2], [(expected[3][0] + 1) % 40]]
        draft_ids, draft_mask = pad_batch(drafts, 0), pad_batch([[1] * len(d) for d in drafts], 0)
        settled = accept_drafts(model, prefix, ids, mask, draft_ids, draft_mask, WIDTH)
    assert settled[0] == expected[0][:4]  # three accepted, the fourth is greedy's correction
    assert settled[1] == expected[1][:1]  # no draft: the first greedy token
    assert settled[2] == expected[2][:WIDTH]  # capped at width - 1 draft tokens, plus the token after them
    assert settled[3] == expected[3][:1]
    assert prefix.get_seq_length() == ids.shape[1] - 1  # the prefix is left as it was
