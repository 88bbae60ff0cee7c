"""A deliberately naive TOFU evaluation: one example and one answer per forward pass, one generation at a
time, plain-Python aggregation. The reference the batched, distributed evaluator is checked against."""

from __future__ import annotations

import math

import torch

from perta_lightning.benchmarks.tofu.source import TofuSource, load_split
from perta_lightning.data.formatting import QAFormatter, load_tokenizer


def _answer_token_logprobs(model, formatter: QAFormatter, question: str, answer: str) -> tuple[list[float], list[int], list[int]]:
    """Log-probabilities, argmax predictions and labels of the answer tokens (EOS included)."""
    encoded = formatter.encode(question, answer)
    ids = torch.tensor([encoded["input_ids"]])
    logits = model(input_ids=ids).logits[0].double()
    logprobs, predictions, labels = [], [], []
    for position in range(1, ids.shape[1]):
        label = encoded["labels"][position]
        if label == -100:
            continue
        row = torch.log_softmax(logits[position - 1], dim=-1)
        logprobs.append(row[label].item())
        predictions.append(int(logits[position - 1].argmax()))
        labels.append(label)
    return logprobs, predictions, labels


def _mean_nll(logprobs: list[float]) -> float:
    return -sum(logprobs) / len(logprobs)


def naive_evaluate(model_dir: str, source: TofuSource, splits: dict[str, str | None], max_new_tokens: int,
                   mink_k: float = 0.4, max_examples: int | None = None) -> dict:
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    formatter = QAFormatter(tokenizer)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out: dict = {"examples": {}, "aggregates": {}}
    with torch.no_grad():
        for name, split in splits.items():
            if split is None:
                continue
            rows = load_split(source, split)[:max_examples]
            col: dict[str, list] = {"answer_nll": [], "paraphrased_nll": [], "perturbed_nll": [], "generation": [],
                                    "rouge_l_recall": [], "extraction_strength": [], "min_k_score": [],
                                    "probability": [], "truth_ratio": []}
            for row in rows:
                logprobs, predictions, labels = _answer_token_logprobs(model, formatter, row["question"], row["answer"])
                answer_nll = _mean_nll(logprobs)
                col["answer_nll"].append(answer_nll)
                # extraction strength and Min-K% leave the final labelled token (EOS) out, as open-unlearning's
                # tokenwise_logprobs / tokenwise_vocab_logprobs do; the probabilities above keep it
                predictions, labels, kept = predictions[:-1], labels[:-1], logprobs[:-1]
                n = len(labels)
                k = 0
                for k in range(n):  # first position from which the argmax equals every label
                    if predictions[k:] == labels[k:]:
                        break
                col["extraction_strength"].append(1 - k / n)
                lowest = sorted(kept)[: max(1, int(n * mink_k))]
                col["min_k_score"].append(-sum(lowest) / len(lowest))
                if name == "holdout":
                    continue
                perturbed = [_mean_nll(_answer_token_logprobs(model, formatter, row["question"], a)[0])
                             for a in row["perturbed_answer"]]
                col["perturbed_nll"].append(perturbed)
                if name in ("forget", "retain"):
                    correct = _mean_nll(_answer_token_logprobs(model, formatter, row["question"], row["paraphrased_answer"])[0])
                    col["paraphrased_nll"].append(correct)
                    col["probability"].append(math.exp(-answer_nll))
                else:
                    correct = answer_nll
                    p_true = math.exp(-answer_nll)
                    col["probability"].append(p_true / (p_true + sum(math.exp(-x) for x in perturbed)))
                col["truth_ratio"].append(math.exp(sum(perturbed) / len(perturbed) - correct))
                prompt = torch.tensor([formatter.prompt_ids(row["question"])])
                generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                           max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                text = tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True).strip()
                col["generation"].append(text)
                col["rouge_l_recall"].append(scorer.score(row["answer"], text)["rougeL"].recall)
            out["examples"][name] = col
            if name == "holdout":
                continue
            ratios = col["truth_ratio"]
            if name == "forget":
                tr = sum(min(r, 1 / r) for r in ratios) / len(ratios)
            else:
                tr = sum(max(0.0, 1 - 1 / r) for r in ratios) / len(ratios)
            out["aggregates"][f"{name}_truth_ratio"] = tr
            out["aggregates"][f"{name}_probability"] = sum(col["probability"]) / len(rows)
            out["aggregates"][f"{name}_rouge"] = sum(col["rouge_l_recall"]) / len(rows)
    if "holdout" in out["examples"]:
        forget, holdout = out["examples"]["forget"]["min_k_score"], out["examples"]["holdout"]["min_k_score"]
        wins = sum((h > f) + 0.5 * (h == f) for f in forget for h in holdout)
        out["aggregates"]["mia_min_k_auc"] = wins / (len(forget) * len(holdout))
    return out
