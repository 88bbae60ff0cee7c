"""Batched TOFU evaluation vs a naive loop on a random Llama (by default hidden 256, 4 layers, ~4.7M parameters).

    PYTHONPATH=. python bench/bench_eval.py [--runs 3] [--max-examples 20] [--max-new-tokens 32] [--threads 2]
        [--hidden 256] [--layers 4]

``--hidden 640 --layers 8`` gives a ~40M-parameter model, where floating-point work rather than Python and
framework overhead per forward pass dominates.

Both evaluate forget, retain, real authors, world facts and holdout sets: the naive loop scores one
example and one answer per forward pass and generates one question at a time; the evaluator scores a
whole batch with all its answers in one pass and generates a batch at a time with left padding and the
KV cache. Prints the median wall time of each and checks that the numbers agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from naive_eval import naive_evaluate  # noqa: E402

from perta_lightning.benchmarks.tofu.evaluator import evaluate_model
from perta_lightning.benchmarks.tofu.source import TofuSource
from tests.tiny import make_tiny_setup  # noqa: E402

SPLITS = {"forget": "forget10_perturbed", "retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
          "world_facts": "world_facts_perturbed", "holdout": "holdout10"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-examples", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both paths")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (the MLP is 4x, heads of 64 or 4 heads)")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    data, model = make_tiny_setup(root, num_authors=40, hidden=args.hidden, layers=args.layers, vocab_size=1024,
                                  intermediate=4 * args.hidden, heads=max(4, args.hidden // 64))
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters())
    source = TofuSource(path=str(data))
    fast_times, naive_times = [], []
    load_before = os.getloadavg()
    from perta_lightning.callbacks.progress import quiet_dependencies

    with quiet_dependencies():
        for _ in range(args.runs):
            start = time.perf_counter()
            fast = evaluate_model(str(model), source, max_examples=args.max_examples, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, accelerator="cpu")
            fast_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            naive = naive_evaluate(str(model), source, SPLITS, max_new_tokens=args.max_new_tokens,
                                   max_examples=args.max_examples)
            naive_times.append(time.perf_counter() - start)
    worst, worst_ratio, generations_equal = 0.0, 0.0, True
    for name, columns in naive["examples"].items():
        for key, values in columns.items():
            if key not in fast["examples"][name] or not values:
                continue
            if key == "generation":
                generations_equal &= fast["examples"][name][key] == values
                continue
            flat = torch.tensor(values, dtype=torch.float64).flatten()
            ours = torch.tensor(fast["examples"][name][key], dtype=torch.float64).flatten()
            difference = (flat - ours).abs().max().item()
            if difference > 1e-5:
                relative = ((flat - ours).abs() / flat.abs().clamp(min=1e-12)).max().item()
                print(f"  {name}.{key}: max |difference| {difference:.2e}, max relative {relative:.2e}")
            if key == "truth_ratio":  # exp of an NLL difference: up to 1e6 on a random model, compared relatively
                worst_ratio = max(worst_ratio, ((flat - ours).abs() / flat.abs().clamp(min=1e-12)).max().item())
            elif key != "extraction_strength":  # a discrete score: one argmax tie flipped moves it by 1/N
                worst = max(worst, difference)
    examples = sum(len(c["answer_nll"]) for c in naive["examples"].values())
    fast_median, naive_median = statistics.median(fast_times), statistics.median(naive_times)
    print(f"load average before/after: {load_before} / {os.getloadavg()}")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {params / 1e6:.2f}M parameters; {examples} examples over 5 sets, "
          f"max_new_tokens={args.max_new_tokens}, batch_size={args.batch_size}, torch threads={args.threads}")
    print(f"batched evaluator: runs {[round(t, 1) for t in fast_times]} s, median {fast_median:.1f} s")
    print(f"naive loop:        runs {[round(t, 1) for t in naive_times]} s, median {naive_median:.1f} s")
    print(f"speed-up: {naive_median / fast_median:.1f}x; max |difference| of per-example NLLs, probabilities and "
          f"Min-K% scores {worst:.2e}; of truth ratios, relative {worst_ratio:.2e}; "
          f"generations identical: {generations_equal}")


if __name__ == "__main__":
    main()
