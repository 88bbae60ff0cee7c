"""Wall-clock cost of one unlearning run: PerTA (reinforce + importance + merge) and TV (reinforce + merge)
against the training-based GradAscent, GradDiff and NPO, on the models of a finished demo pipeline run.

Every method sees the same forget examples per epoch (GradDiff and NPO also see as many retain examples,
paired); the epochs and learning rates are the preset's. Each method runs ``--repeats`` times, interleaved,
into a scratch folder; the median is reported.

    PYTHONPATH=. python bench/bench_unlearning_cost.py --run runs/demo --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a finished `perta pipeline` output folder")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.merge import merge_checkpoints
    from perta_lightning.modules.baselines import UnlearningModule
    from perta_lightning.modules.finetune import CausalLMModule
    from perta_lightning.modules.importance import estimate_importance
    from perta_lightning.study.options import PRESETS
    from perta_lightning.study.stages import Runtime, _adamw, fit

    p, run, runtime = PRESETS[args.preset], Path(args.run), Runtime()
    source, full = TofuSource(path=str(run / "data")), run / "models" / "full"

    def timed(work) -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        scratch = Path(tempfile.mkdtemp(prefix="perta-cost-"))
        try:
            reinforce = timed(lambda: fit(
                CausalLMModule(model=str(full), output_dir=str(scratch / "reinforced"), optimizer=_adamw(p.reinforce_lr)),
                source, str(full), ["forget10"], p.reinforce_epochs, p.batch_size, runtime))
            for statistic in ("grad", "fisher"):
                imp = scratch / statistic
                importance = timed(lambda: estimate_importance(
                    str(full), source, str(imp), statistic=statistic, num_examples=p.importance_examples))
                merge = timed(lambda: merge_checkpoints(
                    full, scratch / "reinforced", scratch / f"perta_{statistic}", alpha=1.0, method="perta",
                    forget_importance=imp / "forget.safetensors", retain_importance=imp / "retain.safetensors",
                    progress=False))
                times.setdefault(f"perta_{statistic}", []).append(reinforce + importance + merge)
            merge = timed(lambda: merge_checkpoints(full, scratch / "reinforced", scratch / "tv", alpha=1.0,
                                                   method="tv", progress=False))
            times.setdefault("tv", []).append(reinforce + merge)
            for method in ("grad_ascent", "grad_diff", "npo"):
                times.setdefault(method, []).append(timed(lambda: fit(
                    UnlearningModule(str(full), method=method, output_dir=str(scratch / method),
                                     optimizer=_adamw(p.unlearn_lr)),
                    source, str(full), ["forget10"], p.unlearn_epochs, p.batch_size, runtime, paired_split="retain90")))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    baseline = statistics.median(times["grad_diff"])
    print(f"torch threads {torch.get_num_threads()}; {args.repeats} repeats; medians (s) and ratio to GradDiff")
    print("| method | median s | runs | × GradDiff |\n|---|---|---|---|")
    for method, values in times.items():
        median = statistics.median(values)
        print(f"| {method} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {median / baseline:.2f} |")
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))


if __name__ == "__main__":
    main()
