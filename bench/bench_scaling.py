"""How each stage's cost grows with model size and with forget-set size, PerTA against GradDiff and NPO.

    PYTHONPATH=. python bench/bench_scaling.py [--sizes 128x4,320x6,640x8] [--forget forget05]
        [--forget-sizes forget01,forget05,forget10] [--forget-size-model 320x6] [--repeats 3]
        [--plot bench/scaling.png] [--json FILE]

Every stage is timed as the pipeline runs it, in this process: a whole call, with its Trainer set-up and its
model loading and saving, so fixed costs stay in the figures (they are what dominates small models). On a
synthetic 40-author benchmark, for each model (a random Llama ``hidden x layers``; the cost of a step does not
depend on what the weights hold) and each forget set, each repetition runs:

- ``finetune_epoch``: one training epoch of ``θ_t`` over the forget set and as many retain examples;
- ``reinforce``: ``θ_r`` = ``θ_t`` fine-tuned on the forget set for the demo preset's epochs;
- ``importance_grad`` / ``importance_fisher``: |mean gradient| and exact per-example Fisher on the forget set
  and as many retain examples (``fisher_mode="auto"``: one batched backward per batch);
- ``merge``: the streaming PerTA merge at one α;
- ``evaluate``: the TOFU evaluation on the forget set and as many examples of every other set;
- ``grad_diff`` / ``npo``: open-unlearning's default of 10 epochs over the same forget examples, each paired
  with a retain example.

PerTA's unlearning cost is ``reinforce + importance + merge`` (TV's ``reinforce + merge``). The exponent of a
stage is the least-squares slope of log(seconds) against log(parameters). One warm-up pass on the smallest model
is run first and discarded. Prints a markdown table and writes the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("finetune_epoch", "reinforce", "importance_grad", "importance_fisher", "merge", "evaluate", "grad_diff", "npo")
UNLEARNING = {
    "PerTA-fisher": ("reinforce", "importance_fisher", "merge"),
    "PerTA-grad": ("reinforce", "importance_grad", "merge"),
    "TV": ("reinforce", "merge"),
    "GradDiff": ("grad_diff",),
    "NPO": ("npo",),
}
BASELINE_EPOCHS = 10  # open-unlearning's TOFU unlearning default


def parse_size(text: str) -> tuple[int, int]:
    hidden, layers = text.lower().split("x")
    return int(hidden), int(layers)


def write_model(folder: Path, tokenizer: Path, hidden: int, layers: int) -> int:
    from tests.tiny import write_tiny_model

    heads = max(4, hidden // 64)
    write_tiny_model(folder, tokenizer, hidden_size=hidden, intermediate_size=int(8 * hidden / 3) // 8 * 8,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                     max_position_embeddings=512, bos_token_id=None)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def time_stages(model: Path, source, forget: str, scratch: Path) -> dict[str, float]:
    """One repetition of every stage on ``model`` and forget split ``forget``; seconds per stage."""
    from perta_lightning.benchmarks.tofu.evaluator import evaluate_model
    from perta_lightning.benchmarks.tofu.source import load_split
    from perta_lightning.merge import merge_checkpoints
    from perta_lightning.modules.baselines import UnlearningModule
    from perta_lightning.modules.finetune import CausalLMModule
    from perta_lightning.modules.importance import estimate_importance
    from perta_lightning.study.options import PRESETS
    from perta_lightning.study.stages import Runtime, _adamw, fit

    preset, runtime = PRESETS["demo"], Runtime()
    n = len(load_split(source, forget))
    seconds: dict[str, float] = {}

    def timed(name, work) -> None:
        start = time.perf_counter()
        work()
        seconds[name] = time.perf_counter() - start

    timed("finetune_epoch", lambda: fit(
        CausalLMModule(model=str(model), output_dir=str(scratch / "epoch"), optimizer=_adamw(preset.finetune_lr)),
        source, str(model), [forget], 1, preset.batch_size, runtime, paired_split="retain90"))
    timed("reinforce", lambda: fit(
        CausalLMModule(model=str(model), output_dir=str(scratch / "reinforced"), optimizer=_adamw(preset.reinforce_lr)),
        source, str(model), [forget], preset.reinforce_epochs, preset.batch_size, runtime))
    for statistic in ("grad", "fisher"):
        timed(f"importance_{statistic}", lambda: estimate_importance(
            str(model), source, str(scratch / statistic), statistic=statistic, forget_split=forget,
            num_examples=n, trainer_kwargs={"enable_progress_bar": False}))
    timed("merge", lambda: merge_checkpoints(
        model, scratch / "reinforced", scratch / "merged", alpha=1.0, method="perta",
        forget_importance=scratch / "fisher" / "forget.safetensors",
        retain_importance=scratch / "fisher" / "retain.safetensors", progress=False))
    timed("evaluate", lambda: evaluate_model(
        str(scratch / "merged"), source, forget_split=f"{forget}_perturbed", holdout_split=forget.replace("forget", "holdout"),
        max_examples=n, batch_size=preset.batch_size, max_new_tokens=preset.eval_max_new_tokens, accelerator="cpu"))
    for method in ("grad_diff", "npo"):
        timed(method, lambda: fit(
            UnlearningModule(str(model), method=method, output_dir=str(scratch / method), optimizer=_adamw(preset.unlearn_lr)),
            source, str(model), [forget], BASELINE_EPOCHS, preset.batch_size, runtime, paired_split="retain90"))
    return seconds


def exponent(sizes: list[float], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def totals(stage_medians: dict[str, float]) -> dict[str, float]:
    return {method: sum(stage_medians[s] for s in parts) for method, parts in UNLEARNING.items()}


def crossover(params: list[float], perta: list[float], baseline: list[float]) -> str:
    """Where the fitted power laws of two costs cross, in parameters (or why they do not within reach)."""
    ratios = [p / b for p, b in zip(perta, baseline)]
    if all(r < 1 for r in ratios):
        return f"cheaper at every size measured (ratio {ratios[0]:.2f} at the smallest, {ratios[-1]:.2f} at the largest)"
    slope = exponent(params, ratios)
    if abs(slope) < 1e-9:
        return "no crossover: the ratio does not change with size"
    log_mid = statistics.fmean(math.log(r) for r in ratios)
    log_n = statistics.fmean(math.log(p) for p in params) - log_mid / slope
    where = math.exp(log_n)
    return (f"ratio {ratios[0]:.2f} at the smallest, {ratios[-1]:.2f} at the largest; the fitted ratio "
            f"(∝ N^{slope:.2f}) reaches 1 at about {where / 1e6:.1f}M parameters")


def plot(path: Path, params: list[float], medians: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for stage in STAGES:
        values = [m[stage] for m in medians]
        left.loglog(params, values, "o-", label=f"{stage} (N^{exponent(params, values):.2f})")
    left.set(xlabel="parameters", ylabel="seconds (median)", title="stage cost against model size")
    left.legend(fontsize=7)
    method_totals = [totals(m) for m in medians]
    for method in UNLEARNING:
        values = [t[method] for t in method_totals]
        right.loglog(params, values, "o-", label=f"{method} (N^{exponent(params, values):.2f})")
    right.set(xlabel="parameters", ylabel="seconds (median)", title="one unlearning run (without evaluation)")
    right.legend(fontsize=8)
    fig.tight_layout()
    from perta_lightning.io import atomic_save_figure

    atomic_save_figure(fig, path, dpi=110)


def table(rows: list[tuple[str, float, dict[str, float]]], first: str = "model", size: str = "parameters") -> str:
    lines = [f"| {first} | {size} | " + " | ".join(STAGES) + " | " + " | ".join(UNLEARNING) + " |",
             "|---" * (2 + len(STAGES) + len(UNLEARNING)) + "|"]
    for label, amount, medians in rows:
        cells = [f"{medians[s]:.2f}" for s in STAGES] + [f"{v:.2f}" for v in totals(medians).values()]
        shown = f"{amount / 1e6:.2f}M" if size == "parameters" else f"{amount:.0f}"
        lines.append(f"| {label} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128x4,320x6,640x8", help="models as hidden x layers, comma separated")
    parser.add_argument("--forget", default="forget05", help="forget split of the model-size sweep")
    parser.add_argument("--forget-sizes", default="forget01,forget05,forget10", help="splits of the forget-size sweep")
    parser.add_argument("--forget-size-model", default="320x6", help="model of the forget-size sweep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default="bench/scaling.png")
    parser.add_argument("--json", default=None, help="also write every timing here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from perta_lightning.benchmarks.tofu.source import TofuSource, load_split
    from perta_lightning.benchmarks.tofu.synthetic import SyntheticSpec, write_benchmark
    from perta_lightning.callbacks.progress import quiet_dependencies

    root = Path(tempfile.mkdtemp(prefix="bench_scaling-"))
    quiet = quiet_dependencies()
    quiet.__enter__()
    try:
        data = root / "data"
        write_benchmark(SyntheticSpec(num_authors=40, seed=0), str(data), overwrite=True, tokenizer_vocab_size=1024)
        source = TofuSource(path=str(data))
        sizes = [parse_size(s) for s in args.sizes.split(",")]
        models: dict[tuple[int, int], tuple[Path, int]] = {}
        for size in {*sizes, parse_size(args.forget_size_model)}:
            folder = root / f"model_{size[0]}x{size[1]}"
            models[size] = (folder, write_model(folder, data / "tokenizer", *size))

        def medians(size: tuple[int, int], forget: str, repeats: int) -> dict[str, list[float]]:
            runs: dict[str, list[float]] = {s: [] for s in STAGES}
            for _ in range(repeats):
                scratch = Path(tempfile.mkdtemp(prefix="run-", dir=root))
                for stage, value in time_stages(models[size][0], source, forget, scratch).items():
                    runs[stage].append(value)
                shutil.rmtree(scratch)
            return runs

        load_before = os.getloadavg()
        medians(sizes[0], args.forget, 1)  # warm-up: imports, kernels, allocator
        everything: dict[str, dict] = {"sizes": {}, "forget_sizes": {}}
        by_size = []
        for size in sizes:
            runs = medians(size, args.forget, args.repeats)
            label = f"{size[0]}x{size[1]}"
            everything["sizes"][label] = {"parameters": models[size][1], "runs": runs}
            by_size.append((label, float(models[size][1]), {s: statistics.median(v) for s, v in runs.items()}))
            print(f"  {label}: {by_size[-1][2]}", flush=True)
        by_forget = []
        fs_model = parse_size(args.forget_size_model)
        for forget in args.forget_sizes.split(","):
            label = f"{fs_model[0]}x{fs_model[1]}"
            if forget == args.forget and label in everything["sizes"]:  # measured in the size sweep
                runs = everything["sizes"][label]["runs"]
            else:
                runs = medians(fs_model, forget, args.repeats)
            n = len(load_split(source, forget))
            everything["forget_sizes"][forget] = {"examples": n, "runs": runs}
            by_forget.append((forget, float(n), {s: statistics.median(v) for s, v in runs.items()}))
            print(f"  {forget}: {by_forget[-1][2]}", flush=True)
    finally:
        quiet.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)

    params = [p for _, p, _ in by_size]
    print(f"\nload average before/after: {load_before} / {os.getloadavg()}; torch threads {args.threads}; "
          f"{args.repeats} repeats, medians (s); forget set {args.forget} for the size sweep")
    print(table(by_size))
    print(f"\nforget-set sweep on {args.forget_size_model}:")
    print(table(by_forget, "forget split", "examples"))
    print("\nexponents (slope of log seconds against log parameters / log forget examples):")
    print("| stage or method | in parameters | in forget examples |\n|---|---|---|")
    counts = [n for _, n, _ in by_forget]
    for stage in STAGES:
        print(f"| {stage} | {exponent(params, [m[stage] for _, _, m in by_size]):.2f} | "
              f"{exponent(counts, [m[stage] for _, _, m in by_forget]):.2f} |")
    for method in UNLEARNING:
        print(f"| {method} | {exponent(params, [totals(m)[method] for _, _, m in by_size]):.2f} | "
              f"{exponent(counts, [totals(m)[method] for _, _, m in by_forget]):.2f} |")
    for method in ("PerTA-fisher", "PerTA-grad"):
        for baseline in ("GradDiff", "NPO"):
            cost = [totals(m)[method] for _, _, m in by_size]
            base = [totals(m)[baseline] for _, _, m in by_size]
            print(f"{method} against {baseline}: {crossover(params, cost, base)}")
    plot(Path(args.plot), params, [m for _, _, m in by_size])
    print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
