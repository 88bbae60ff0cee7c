"""The TOFU formulas against hand-computed cases, and the torchmetrics classes against the formulas."""

import math

import pytest
import torch

from perta_lightning.benchmarks.metrics import IndexedValues, MeanOfValues, MinKMiaAUC
from perta_lightning.benchmarks.tofu.metrics import AnswerProbability, ProbabilityWithOptions, TruthRatio
from perta_lightning.functional import tofu_metrics as F


def test_probabilities_by_hand():
    nll = torch.tensor([0.0, math.log(2.0)])
    assert F.answer_probability(nll).tolist() == pytest.approx([1.0, 0.5])
    # p_true = 1/2, perturbed p = 1/4, 1/4 -> 0.5 / (0.5 + 0.5) = 0.5
    perturbed = torch.tensor([[math.log(4.0), math.log(4.0)]])
    assert F.probability_with_options(torch.tensor([math.log(2.0)]), perturbed).item() == pytest.approx(0.5)


def test_truth_ratio_by_hand():
    # mean perturbed nll 2.0, correct nll 1.0 -> R = e
    ratio = F.truth_ratio(torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 3.0], [0.0, 1.0]]))
    assert ratio.tolist() == pytest.approx([math.e, math.exp(-0.5)])
    assert F.truth_ratio_score(ratio, closer_to_one=True) == pytest.approx((1 / math.e + math.exp(-0.5)) / 2)
    assert F.truth_ratio_score(ratio, closer_to_one=False) == pytest.approx((1 - 1 / math.e + 0.0) / 2)


def _one_hot_logits(predictions, labels, vocab=5):
    """Logits whose argmax at position t-1 is predictions[t-1] for answer tokens labels (prompt of 1 token)."""
    length = len(labels) + 1
    logits = torch.zeros(1, length, vocab)
    for t, p in enumerate(predictions):
        logits[0, t, p] = 10.0
    full_labels = torch.tensor([[-100] + list(labels)])
    return logits, full_labels


def test_extraction_strength_by_hand():
    """Over the answer tokens without the final labelled one (EOS), as open-unlearning: labels 1 2 3 | 4."""
    logits, labels = _one_hot_logits([1, 2, 3, 4], [1, 2, 3, 4])
    assert F.extraction_strength(logits, labels).item() == 1.0
    logits, labels = _one_hot_logits([0, 2, 3, 4], [1, 2, 3, 4])  # N = 3, suffix from position 1 matches: 1 - 1/3
    assert F.extraction_strength(logits, labels).item() == pytest.approx(1 - 1 / 3, abs=1e-15)
    logits, labels = _one_hot_logits([1, 2, 0, 4], [1, 2, 3, 4])  # last scored token wrong: k stops at N-1
    assert F.extraction_strength(logits, labels).item() == pytest.approx(1 / 3, abs=1e-15)


def test_extraction_strength_leaves_out_eos():
    # every answer token predicted, only the EOS missed: 1.0 (counting EOS gave 1/4)
    logits, labels = _one_hot_logits([1, 2, 3, 0], [1, 2, 3, 4])
    assert F.extraction_strength(logits, labels).item() == 1.0
    # right padding after the EOS does not move "the final labelled token"
    logits, labels = _one_hot_logits([1, 2, 3, 0, 0], [1, 2, 3, 4, -100])
    assert F.extraction_strength(logits, labels).item() == 1.0
    logits, labels = _one_hot_logits([0], [4])  # an answer that is only EOS has nothing to score
    with pytest.raises(ValueError, match="no answer tokens before its final"):
        F.extraction_strength(logits, labels)


def test_min_k_score_by_hand():
    logits = torch.zeros(1, 6, 4)  # uniform: every logprob is -log 4 ...
    logits[0, 1, 2] = 5.0  # ... except position 1 predicting label 2 is likely
    labels = torch.tensor([[-100, 2, 2, 1, 0, 3]])  # answer 2 2 1 0, then EOS = 3
    likely = math.log(math.exp(5.0) / (math.exp(5.0) + 3))
    # scored tokens 2 2 1 0 (EOS left out): logprobs -log4, likely, -log4, -log4; lowest int(4 * 0.5) = 2
    assert F.min_k_score(logits, labels, 0.5).item() == pytest.approx(math.log(4), abs=1e-6)
    # with k = 1 all four scored tokens: the EOS's -log 4 is not among them
    expected = -(likely - 3 * math.log(4)) / 4
    assert F.min_k_score(logits, labels, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_min_k_score_leaves_out_eos():
    logits = torch.zeros(1, 4, 4)
    logits[0, 0, 1] = logits[0, 1, 2] = 8.0  # answer tokens 1 2 near-certain; the EOS (3) has p = 1/4 or less
    labels = torch.tensor([[-100, 1, 2, 3]])
    certain = math.log(math.exp(8.0) + 3) - 8.0  # -log p of a near-certain token
    # k = 1: the mean over tokens 1 and 2 only; counting the EOS would give (2 c + log 4) / 3
    assert F.min_k_score(logits, labels, 1.0).item() == pytest.approx(certain, abs=1e-7)  # float32 log-softmax


def test_auc_and_privleak():
    # forget scores all lower (more familiar) than holdout -> AUC 1; ties count one half
    assert F.auc_forget_vs_holdout(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert F.auc_forget_vs_holdout(torch.tensor([0.3]), torch.tensor([0.3, 0.4])) == 0.75
    # open-unlearning: ((1-auc) - (1-ref)) / (1-ref) * 100
    assert F.privleak(0.9, 0.5) == pytest.approx((0.1 - 0.5) / 0.5 * 100)
    assert F.privleak(0.5, 0.5) == pytest.approx(0.0)


def test_forget_quality_is_ks_and_invariant_to_inverse():
    from scipy.stats import ks_2samp

    a, b = torch.tensor([0.5, 0.7, 1.2, 2.0]), torch.tensor([0.9, 1.1, 1.3, 3.0, 4.0])
    p, stat = F.forget_quality(a, b)
    assert p == pytest.approx(ks_2samp(a.numpy(), b.numpy()).pvalue)
    assert F.forget_quality(1 / a, 1 / b)[0] == pytest.approx(p)


def test_harmonic_mean_and_rouge():
    assert F.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / (1 + 2))
    assert F.harmonic_mean([1.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        F.harmonic_mean([1.0, float("nan")])
    # reference 4 tokens, LCS 2 ("the cat") -> recall 0.5; stemming makes "cats" match "cat"
    assert F.rouge_l_recall(["the cat"], ["the cat sat down"]).tolist() == [0.5]
    assert F.rouge_l_recall(["cats"], ["cat"]).tolist() == [1.0]


def test_rouge_is_float64_end_to_end():
    """LCS 5 of a 9-token reference: 5/9 to double precision (float32 stored 0.55555558), kept by the metric."""
    recall = F.rouge_l_recall(["a b c d e"], ["a b c d e f g h i"])
    assert recall.dtype == torch.float64 and recall.tolist() == [5 / 9]
    assert repr(recall.tolist()[0]) == "0.5555555555555556"
    mean = MeanOfValues()
    mean.update(torch.tensor([0]), recall)
    assert mean.compute().item() == 5 / 9


def test_indexed_values_orders_and_drops_sampler_padding():
    metric = IndexedValues(("value",))
    # rank 0 saw 0, 2, 4; rank 1 saw 1, 3, 0 (DistributedSampler repeats example 0 as padding)
    metric.update(torch.tensor([0, 2, 4]), value=torch.tensor([10.0, 12.0, 14.0]))
    metric.update(torch.tensor([1, 3, 0]), value=torch.tensor([11.0, 13.0, 10.0]))
    out = metric.compute()
    assert out["index"].tolist() == [0, 1, 2, 3, 4]
    assert out["value"].tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]


def test_metric_classes_match_functional():
    index = torch.tensor([1, 0, 1])
    answer, para = torch.tensor([0.5, 1.0, 0.5]), torch.tensor([0.7, 0.2, 0.7])
    perturbed = torch.tensor([[1.0, 2.0], [0.1, 0.3], [1.0, 2.0]])
    prob, options, tr = AnswerProbability(), ProbabilityWithOptions(), TruthRatio(closer_to_one=True)
    prob.update(index, answer_nll=answer)
    options.update(index, answer_nll=answer, perturbed_nll=perturbed)
    tr.update(index, correct_nll=para, perturbed_nll=perturbed)
    unique = slice(0, 2)
    order = torch.tensor([1, 0])
    assert prob.compute().item() == pytest.approx(F.answer_probability(answer[order]).mean().item())
    assert options.compute().item() == pytest.approx(F.probability_with_options(answer[order], perturbed[order]).mean().item())
    assert tr.compute().item() == pytest.approx(F.truth_ratio_score(F.truth_ratio(para[order], perturbed[order]), True))
    mean = MeanOfValues()
    mean.update(index[unique], value=torch.tensor([1.0, 3.0]))
    assert mean.compute().item() == 2.0
    auc = MinKMiaAUC()
    auc.update(torch.tensor([0, 1]), torch.tensor([0.1, 0.2]), holdout=False)
    auc.update(torch.tensor([0, 1]), torch.tensor([0.3, 0.15]), holdout=True)
    assert auc.compute().item() == pytest.approx(0.75)


def test_indexed_values_rejects_wrong_columns():
    metric = IndexedValues(("a",))
    with pytest.raises(KeyError, match="expects"):
        metric.update(torch.tensor([0]), b=torch.tensor([1.0]))
