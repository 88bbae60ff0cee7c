"""MUSE functionals against naive loops and hand-computed cases; the torchmetrics classes on 1 and 2 processes."""

import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from muse_lightning_metrics import expected, validate  # noqa: E402

from perta_lightning.benchmarks.muse.metrics import KnowMem, MiaAUC, MuseMetrics, PrivLeak, VerbMem
from perta_lightning.functional import muse_metrics as M  # noqa: E402
from perta_lightning.functional import tofu_metrics  # noqa: E402
from tests.processes import run_helper  # noqa: E402

WORDS = ["the", "cat", "cats", "sat", "sitting", "on", "a", "mat", "Mats,", "runs", "running", "3", "été"]


# ---- naive twins


def naive_rouge_l(prediction: str, reference: str, kind: str, stem: bool = True) -> float:
    """LCS by dynamic programme over rouge_score's tokens."""
    from rouge_score.tokenizers import DefaultTokenizer

    tokenizer = DefaultTokenizer(use_stemmer=stem)
    pred, ref = tokenizer.tokenize(prediction), tokenizer.tokenize(reference)
    if not pred or not ref:
        return 0.0
    table = [[0] * (len(ref) + 1) for _ in range(len(pred) + 1)]
    for i in range(1, len(pred) + 1):
        for j in range(1, len(ref) + 1):
            if pred[i - 1] == ref[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    lcs = table[-1][-1]
    recall, precision = lcs / len(ref), lcs / len(pred)
    if kind == "recall":
        return recall
    return 0.0 if lcs == 0 else 2 * precision * recall / (precision + recall)


def naive_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> list[list[tuple[float, float]]]:
    """Per row, per scored token (labelled, not the row's last labelled one): ``(log p, Min-K%++ z)``, float64."""
    out = []
    for row in range(labels.shape[0]):
        stats = []
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target == -100:
                continue
            lp = torch.log_softmax(logits[row, t].double(), dim=-1)
            p = lp.exp()
            mu = float((p * lp).sum())
            variance = float((p * (lp - mu) ** 2).sum())
            stats.append((float(lp[target]), (float(lp[target]) - mu) / math.sqrt(max(variance, 1e-6))))
        out.append(stats[:-1])
    return out


def naive_bottom_k(values: list[float], k: float) -> float:
    count = max(1, int(len(values) * k))
    return -sum(sorted(values)[:count]) / count


def naive_auc(forget: list[float], holdout: list[float]) -> float:
    total = 0.0
    for f in forget:
        for h in holdout:
            total += 1.0 if h > f else 0.5 if h == f else 0.0
    return total / (len(forget) * len(holdout))


def random_texts(seed: int, count: int) -> tuple[list[str], list[str]]:
    pick = random.Random(seed)
    make = lambda low: " ".join(pick.choices(WORDS, k=pick.randint(low, 8)))  # noqa: E731
    return [make(0) for _ in range(count)], [make(1) for _ in range(count)]


def random_batch(seed: int, rows: int = 6, length: int = 12, vocab: int = 17, scale: float = 3.0):
    """Random logits and labels with right or left padding (and an unlabelled prefix on some rows)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, vocab, generator=generator) * scale
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    for row in range(rows):
        size = 3 + row % (length - 3)
        if row % 2:
            labels[row, size:] = -100  # right padding
        else:
            labels[row, : length - size] = -100  # left padding (or a prefix)
        if row % 3 == 0:
            labels[row, 0] = -100  # open-unlearning never labels index 0; it must not matter
    return logits, labels


# ---- ROUGE


def test_rouge_l_hand_cases():
    f1 = M.rouge_l(["the cat sat down"], ["the cat sat"], "f1")
    recall = M.rouge_l(["the cat sat down"], ["the cat sat"], "recall")
    assert f1.dtype == torch.float64 and f1.shape == (1,)
    assert recall.item() == 1.0 and f1.item() == pytest.approx(6 / 7, abs=1e-15)
    # Porter stemming (open-unlearning's use_stemmer=True) makes these equal; MUSE's own scorer does not stem
    assert M.rouge_l(["cats running"], ["cat runs"], "f1").item() == 1.0
    assert M.rouge_l(["cats running"], ["cat runs"], "f1", stem=False).item() == 0.0
    assert M.rouge_l(["", "  the cat  "], ["the cat", "the cat"], "f1").tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        M.rouge_l(["a"], ["a", "b"], "f1")
    with pytest.raises(ValueError):
        M.rouge_l(["a"], ["a"], "precision")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["f1", "recall"])
@pytest.mark.parametrize("stem", [True, False])
def test_rouge_l_matches_naive_lcs(kind, stem):
    predictions, references = random_texts(1 + stem, 60)
    fast = M.rouge_l(predictions, references, kind, stem=stem)
    naive = [naive_rouge_l(p, r, kind, stem) for p, r in zip(predictions, references)]
    assert fast.tolist() == pytest.approx(naive, abs=1e-15)
    assert 0 < fast.mean() < 1


def test_verbmem_and_knowmem_are_rouge_l_f1_stemmed():
    predictions, references = random_texts(7, 30)
    f1 = M.rouge_l(predictions, references, "f1")
    assert torch.equal(M.verbmem_scores(predictions, references), f1)
    assert torch.equal(M.knowmem_scores(predictions, references), f1)
    recall = M.rouge_l(predictions, references, "recall")
    assert torch.equal(recall, tofu_metrics.rouge_l_recall(predictions, references))


# ---- token selection, Min-K%, Min-K%++


def test_text_token_mask_hand_case():
    labels = torch.tensor([[-100, 5, 6, 7, -100], [1, 2, 3, -100, -100], [-100, -100, 4, 5, 6]])
    assert M.text_token_mask(labels).tolist() == [
        [True, True, False, False],  # predicts 5, 6; drops the last labelled token (7)
        [True, False, False, False],  # token 0 has no prediction: predicts 2 only
        [False, True, True, False],  # left padding: predicts 4, 5
    ]


@pytest.mark.parametrize("k", [0.2, 0.4, 1.0])
def test_min_k_scores_match_per_token_loop(k):
    logits, labels = random_batch(seed=int(k * 10))
    naive = naive_token_stats(logits, labels)
    min_k = M.min_k_text_score(logits, labels, k)
    plus = M.min_k_plus_plus_score(logits, labels, k)
    assert min_k.dtype == plus.dtype == torch.float64 and min_k.shape == plus.shape == (labels.shape[0],)
    naive_min_k = [naive_bottom_k([lp for lp, _ in row], k) for row in naive]
    naive_plus = [naive_bottom_k([z for _, z in row], k) for row in naive]
    assert min_k.tolist() == pytest.approx(naive_min_k, abs=1e-5)
    assert plus.tolist() == pytest.approx(naive_plus, abs=1e-4)
    # in float64 the fast path and the loop agree to rounding
    assert M.min_k_plus_plus_score(logits.double(), labels, k).tolist() == pytest.approx(naive_plus, abs=1e-10)
    assert M.min_k_text_score(logits.double(), labels, k).tolist() == pytest.approx(naive_min_k, abs=1e-12)
    # the same token selection as TOFU's answers
    assert min_k.tolist() == pytest.approx(tofu_metrics.min_k_score(logits, labels, k).tolist(), abs=1e-6)


def test_min_k_plus_plus_token_scores_per_token():
    logits, labels = random_batch(seed=3)
    z = M.min_k_plus_plus_token_scores(logits, labels)
    assert z.shape == labels[:, 1:].shape and (z[labels[:, 1:] == -100] == 0).all()
    for row, stats in enumerate(naive_token_stats(logits, labels)):
        assert z[row][M.text_token_mask(labels)[row]].tolist() == pytest.approx([s for _, s in stats], abs=1e-4)


def test_min_k_hand_cases():
    vocab = 8
    labels = torch.tensor([[-100, 1, 2, 3, 4, 5, 6]])
    uniform = torch.zeros(1, 7, vocab)
    # uniform: every log p is -log V; mu = -log V, variance 0 -> clamped at 1e-6, so z = 0 (up to float32
    # rounding of log p - mu, about 2e-7, times 1 / sigma = 1000)
    assert M.min_k_text_score(uniform, labels).item() == pytest.approx(math.log(vocab), abs=1e-6)
    assert M.min_k_plus_plus_score(uniform, labels).item() == pytest.approx(0.0, abs=1e-3)
    # 5 scored tokens (1..5; 6 is dropped), k = 0.4: the 2 least likely ones
    peaked = torch.zeros(1, 7, vocab)
    for t, boost in enumerate([0.0, 1.0, 2.0, 3.0, 4.0]):
        peaked[0, t, labels[0, t + 1]] = boost
    log_p = [b - math.log(math.exp(b) + vocab - 1) for b in [0.0, 1.0, 2.0, 3.0, 4.0]]
    assert M.min_k_text_score(peaked, labels, 0.4).item() == pytest.approx(-(log_p[0] + log_p[1]) / 2, abs=1e-6)
    # k = 0.1: int(0.5) = 0, but at least one token counts
    assert M.min_k_text_score(peaked, labels, 0.1).item() == pytest.approx(-log_p[0], abs=1e-6)


def test_min_k_edges_raise():
    logits = torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        M.min_k_text_score(logits, torch.tensor([[-100, 1, 2, 3], [-100, -100, -100, 4]]))
    with pytest.raises(ValueError, match="k must be"):
        M.min_k_plus_plus_score(logits, torch.tensor([[-100, 1, 2, 3]] * 2), k=0.0)


def test_memorised_forget_set_scores_lower_and_auc_convention():
    """A model sure of every forget token scores lower than on holdout text: AUC 1, PrivLeak -100 (MUSE's)."""
    logits, labels = random_batch(seed=5, rows=8, scale=1.0)
    sure = logits.clone()
    sure[:, :-1].scatter_(2, labels[:, 1:].clamp(min=0).unsqueeze(-1), 30.0)
    for score in (M.min_k_text_score, M.min_k_plus_plus_score):
        auc = M.auc_forget_vs_holdout(score(sure, labels), score(logits, labels))
        assert auc == 1.0
        assert M.privleak(auc, 0.5) == pytest.approx(-100.0)


# ---- AUC and PrivLeak (imported from tofu_metrics)


def test_auc_matches_pair_loop():
    generator = torch.Generator().manual_seed(11)
    forget = (torch.rand(23, generator=generator, dtype=torch.float64) * 5).round() / 5  # ties
    holdout = (torch.rand(17, generator=generator, dtype=torch.float64) * 5 + 0.5).round() / 5
    naive = naive_auc(forget.tolist(), holdout.tolist())
    assert M.auc_forget_vs_holdout(forget, holdout) == pytest.approx(naive, abs=1e-15)
    assert M.auc_forget_vs_holdout is tofu_metrics.auc_forget_vs_holdout and M.privleak is tofu_metrics.privleak


def test_privleak_hand_cases():
    assert M.privleak(1.0, 0.5) == pytest.approx(-100.0)  # target model: forget set fully familiar
    assert M.privleak(0.5, 0.5) == pytest.approx(0.0)  # retrained model
    assert M.privleak(0.0, 0.5) == pytest.approx(100.0)  # over-unlearned
    assert M.privleak(0.8, 0.6) == pytest.approx((0.2 - 0.4) / 0.4 * 100)


# ---- torchmetrics classes


def test_classes_one_process_match_functionals_and_drop_repeats():
    predictions, references = random_texts(3, 9)
    index = torch.arange(9)
    verbmem, knowmem = VerbMem(), KnowMem()
    for metric in (verbmem, knowmem):
        metric.update(index[:5], predictions[:5], references[:5])
        metric.update(index[4:], predictions[4:], references[4:])  # index 4 repeated (a padded batch)
    assert verbmem.compute().item() == M.verbmem_scores(predictions, references).mean().item()
    assert knowmem.compute().item() == M.knowmem_scores(predictions, references).mean().item()

    logits, labels = random_batch(seed=9, rows=10)
    score = M.min_k_plus_plus_score(logits, labels)
    mia, leak = MiaAUC(), PrivLeak(retain_auc=0.4)
    for metric in (mia, leak):
        metric.update(torch.arange(6), score[:6], holdout=False)
        metric.update(torch.tensor([0, 1, 2, 0]), score[6:], holdout=True)
    expected_auc = M.auc_forget_vs_holdout(score[:6], score[6:9])
    assert mia.compute().item() == expected_auc
    assert leak.compute().item() == M.privleak(expected_auc, 0.4)
    with pytest.raises(ValueError):
        PrivLeak(retain_auc=1.0)


def test_muse_metrics_collection():
    muse = MuseMetrics()
    assert set(muse.keys()) == {"forget_verbmem_rouge", "forget_knowmem_rouge", "retain_knowmem_rouge",
                                "privleak"}
    with pytest.raises(TypeError, match="update each member"):
        muse.update(torch.arange(1), ["a"], ["a"])


def test_user_module_one_process():
    values, _ = validate(1)
    for key, value in expected().items():
        assert values[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key  # logged as float32 by Lightning


@pytest.mark.distributed
def test_user_module_two_processes(tmp_path):
    """13 rows in batches of 2 on 2 ranks: the sampler pads rank 1 with row 0 again; the metrics drop the repeat
    by index and give the one-process values."""
    out = tmp_path / "ddp.json"
    result = run_helper("muse_lightning_metrics.py", out, 2, out=out)
    assert result["world_size"] == 2
    one, _ = validate(1)
    for key, value in expected().items():
        assert result["values"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        assert result["values"][key] == one[key], key
