"""Fixed costs of a study's stages: what each stage spends outside its training or evaluation loop.

    PYTHONPATH=. python bench/bench_fixed_costs.py [--config configs/demo/pipeline.yaml] [--threads 2] [pipeline options]

Runs one seed of ``perta pipeline`` from ``--config`` (into a scratch folder) in this process, with timers
around the pieces every stage is made of, and prints per stage kind: how many ran, their total time, the
time in Lightning's fit and test loops (the work itself), and the exclusive time of model loading, model
saving, tokenizer loading and data set-up (tokenization); "other" is the rest (Trainer set-up and teardown,
merges' streaming, records and checksums). The import of the libraries is timed at the start. Timers are
exclusive: a tokenizer load inside a data set-up counts once, as a tokenizer load.

The script imports ``perta_lightning`` from ``PYTHONPATH``, so the same script measures another checkout.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PIECES = ("loop", "model load", "model save", "tokenizer load", "data set-up")


class Timers:
    """Exclusive time per (stage kind, piece); nested timers subtract from their parent."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.stack: list[list] = []  # [piece, start, child seconds]
        self.stage = "outside stages"

    def wrap(self, owner, name: str, piece: str, classmethod_: bool = False) -> None:
        original = getattr(owner, name)
        function = original.__func__ if classmethod_ else original

        @functools.wraps(function)
        def timed(*args, **kwargs):
            self.stack.append([piece, time.perf_counter(), 0.0])
            try:
                return function(*args, **kwargs)
            finally:
                _, start, children = self.stack.pop()
                elapsed = time.perf_counter() - start
                self.seconds[(self.stage, piece)] += elapsed - children
                if self.stack:
                    self.stack[-1][2] += elapsed

        setattr(owner, name, classmethod(timed) if classmethod_ else timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo/pipeline.yaml")
    parser.add_argument("--threads", type=int, default=2)
    args, pipeline_options = parser.parse_known_args()

    start = time.perf_counter()
    import lightning.pytorch  # noqa: F401
    import torch
    import transformers
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
    from lightning.pytorch.loops.fit_loop import _FitLoop

    import perta_lightning
    from perta_lightning import stages
    from perta_lightning.benchmarks.tofu.evaluation import TofuEvalDataModule
    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.data.importance import ImportanceDataModule
    from perta_lightning.study.pipeline import cli_main

    imports = time.perf_counter() - start
    torch.set_num_threads(args.threads)
    timers = Timers()
    timers.wrap(_FitLoop, "run", "loop")
    timers.wrap(_EvaluationLoop, "run", "loop")
    timers.wrap(transformers.PreTrainedModel, "from_pretrained", "model load", classmethod_=True)
    timers.wrap(transformers.PreTrainedModel, "save_pretrained", "model save")
    timers.wrap(transformers.AutoTokenizer, "from_pretrained", "tokenizer load", classmethod_=True)
    for module in (TofuDataModule, TofuEvalDataModule, ImportanceDataModule):
        timers.wrap(module, "setup", "data set-up")

    counts: dict[str, int] = defaultdict(int)
    original_run = stages.StageRunner.run

    def run(runner, stage):
        kind = type(stage).__name__
        outer, timers.stage = timers.stage, kind
        counts[kind] += 1
        begin = time.perf_counter()
        try:
            return original_run(runner, stage)
        finally:
            timers.seconds[(kind, "total")] += time.perf_counter() - begin
            timers.stage = outer

    stages.StageRunner.run = run
    scratch = Path(tempfile.mkdtemp(prefix="bench_fixed_costs-"))
    try:
        begin = time.perf_counter()
        cli_main(["--config", args.config, *pipeline_options, "--output", str(scratch / "run")])
        pipeline_seconds = time.perf_counter() - begin
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"perta_lightning from {Path(perta_lightning.__file__).parent}; torch threads {args.threads}")
    print(f"imports: {imports:.2f} s; pipeline: {pipeline_seconds:.1f} s\n")
    print("| stage kind | count | total s | loop s | " + " | ".join(f"{p} s" for p in PIECES[1:])
          + " | other s | fixed s per stage |")
    print("|---" * (5 + len(PIECES)) + "|")
    sums = defaultdict(float)
    for kind in sorted(counts, key=lambda k: -timers.seconds[(k, "total")]):
        total = timers.seconds[(kind, "total")]
        pieces = [timers.seconds[(kind, p)] for p in PIECES]
        other = total - sum(pieces)
        fixed = total - pieces[0]
        for name, value in [("total", total), *zip(PIECES, pieces), ("other", other)]:
            sums[name] += value
        print(f"| {kind} | {counts[kind]} | {total:.2f} | " + " | ".join(f"{v:.2f}" for v in pieces)
              + f" | {other:.2f} | {fixed / counts[kind]:.3f} |")
    print(f"| all stages | {sum(counts.values())} | {sums['total']:.2f} | "
          + " | ".join(f"{sums[p]:.2f}" for p in PIECES) + f" | {sums['other']:.2f} | "
          f"{(sums['total'] - sums['loop']) / sum(counts.values()):.3f} |")
    outside = pipeline_seconds - sums["total"]
    print(f"\noutside stages (graph, α search bookkeeping, summaries, reports and plots): {outside:.2f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
