"""Per-example squared gradients from one batched backward against a loop of one backward per example."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perta_lightning.functional import importance as F
from perta_lightning.functional.losses import example_nll
from perta_lightning.per_example import ExampleGradientSquares


def loop_squares(model: nn.Module, example_loss, batch: int) -> dict[str, torch.Tensor]:
    """``Σ_i (∇θ ℓ_i)²`` by one autograd call per example (the reference)."""
    params = dict(model.named_parameters())
    squares = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    for i in range(batch):
        grads = torch.autograd.grad(example_loss(i), list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                squares[name] += grad.double() ** 2
    return squares


def hook_squares(model: nn.Module, losses, chunk_bytes: int = 2**28) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    accumulators = {name: F.new_accumulator(p.numel()) for name, p in params.items()}
    ExampleGradientSquares(model, chunk_bytes).accumulate(losses, accumulators)
    return {name: accumulators[name].view(p.shape).double() for name, p in params.items()}


def max_relative_difference(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert actual.keys() == expected.keys()
    return max(float((actual[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)


class TiedToy(nn.Module):
    """Embedding (with a padding row) tied to the output layer, a biased Linear and a LayerNorm (torch.func)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=1)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        hidden = hidden + torch.tanh(self.mix(hidden)).cumsum(dim=1)  # positions mix, examples do not
        return self.head(self.norm(hidden))


@pytest.mark.parametrize("chunk_bytes", [2**28, 1])
def test_tied_toy_equals_loop(chunk_bytes):
    torch.manual_seed(0)
    model = TiedToy().double()
    ids = torch.randint(0, 11, (4, 7))
    ids[0, :3] = 1  # the padding row gets no gradient from the embedding, only from the tied head
    ids[1] = 3  # one token repeated: its positions' gradients add before squaring
    weights = torch.rand(4, 7, dtype=torch.float64)

    def losses(rows=slice(None)):
        logp = model(ids[rows]).log_softmax(-1)[..., 0]
        return (logp * weights[rows]).sum(1) / weights[rows].sum(1)

    expected = loop_squares(model, lambda i: losses(slice(i, i + 1)).sum(), 4)
    assert "head.weight" not in expected  # one tensor, two uses
    assert max_relative_difference(hook_squares(model, losses, chunk_bytes), expected) < 1e-6


def test_tied_llama_with_padding_equals_loop():
    """A tied tiny Llama, right-padded batch, ℓ_i = example i's mean answer NLL, against unpadded single examples."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lengths = [9, 5, 7]
    ids = torch.zeros(3, 9, dtype=torch.long)
    labels = torch.full((3, 9), -100)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, 40, (length,))
        labels[row, 3:length] = ids[row, 3:length]
    ids[2, 4] = ids[2, 5] = ids[2, 6]  # repeated answer tokens
    mask = (torch.arange(9) < torch.tensor(lengths)[:, None]).long()

    def mean_nll(input_ids, attention_mask, answer_labels):
        summed, count = example_nll(model(input_ids=input_ids, attention_mask=attention_mask).logits, answer_labels)
        return summed / count

    def one(i):
        n = lengths[i]
        return mean_nll(ids[i : i + 1, :n], mask[i : i + 1, :n], labels[i : i + 1, :n]).sum()

    expected = loop_squares(model, one, 3)
    actual = hook_squares(model, lambda: mean_nll(ids, mask, labels))
    assert max_relative_difference(actual, expected) < 1e-5


def test_parameter_used_outside_its_module_is_refused():
    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 3)
            self.other = nn.Linear(3, 3)

        def forward(self, x):  # other's weight is used, but other's forward never runs: no hook sees it
            return self.inner(x) @ self.other.weight

    model = Direct()
    x = torch.randn(2, 3)
    with pytest.raises(NotImplementedError, match="other.weight"):
        hook_squares(model, lambda: model(x).sum(1))


def test_batch_not_first_is_refused():
    model = nn.Sequential(nn.Linear(3, 3))
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="batch of 4"):
        hook_squares(model, lambda: model(x).reshape(2, 6).sum(1))


def test_rules_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # one example, two positions, in = 2
    delta = torch.tensor([[[1.0], [-1.0]]])  # out = 1
    assert torch.equal(F.linear_weight_example_gradients(x, delta), torch.tensor([[[-2.0, -2.0]]]))
    assert torch.equal(F.linear_bias_example_gradients(delta), torch.tensor([[0.0]]))
    ids = torch.tensor([[2, 0, 2], [1, 1, 2]])
    grads = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    examples, rows, values = F.embedding_example_gradients(ids, grads, padding_idx=1)
    assert examples.tolist() == [0, 0, 1] and rows.tolist() == [0, 2, 2]
    assert values.tolist() == [[2.0, 3.0], [0.0 + 4.0, 1.0 + 5.0], [10.0, 11.0]]
    table = F.new_accumulator(3 * 2)
    F.accumulate_sparse_example_squares(table, rows, values)
    assert table.view(3, 2).tolist() == [[4.0, 9.0], [0.0, 0.0], [16.0 + 100.0, 36.0 + 121.0]]


def test_activation_checkpointing_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.gradient_checkpointing_enable()
    with pytest.raises(NotImplementedError, match="checkpointing"):
        ExampleGradientSquares(model)


def test_accumulate_example_squares_by_hand():
    accumulator = F.new_accumulator(2)
    F.accumulate_example_squares(accumulator, torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    assert accumulator.tolist() == [10.0, 5.0]


def test_linear_squares_one_example_at_a_time_equal_the_batched_form():
    torch.manual_seed(0)
    x, delta = torch.randn(5, 4, 3), torch.randn(5, 4, 2)
    batched, streamed = F.new_accumulator(6), F.new_accumulator(6)
    F.accumulate_example_squares(batched, F.linear_weight_example_gradients(x, delta))
    F.accumulate_linear_weight_example_squares(streamed, x, delta)
    torch.testing.assert_close(streamed, batched, rtol=1e-6, atol=0)
