"""``perta attack``: quantize or relearn one model directory, then evaluate it with the benchmark's evaluation, so a
model unlearned elsewhere can be attacked as the study attacks its own (:mod:`perta_lightning.study.attacks`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from perta_lightning.errors import PertaFileNotFoundError, PertaValueError
from perta_lightning.study.attacks import relearn_set
from perta_lightning.study.options import resolve_preset


def attack(
    model: str,
    attack: Literal["quantize", "relearn"],
    output: str,
    data: str,
    benchmark: str = "tofu",
    forget_split: str = "forget10",
    retain_result: str | None = None,
    scheme: Literal["nf4", "int8"] = "nf4",
    relearn_on: Literal["forget", "retain"] = "forget",
    forget_groups: int | None = None,
    steps: int = 10,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    preset: str = "demo",
    pretrained: bool = False,
    accelerator: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Attack a model directory and evaluate the attacked model with the benchmark's evaluation.

    Writes ``<output>/model`` (the quantized or relearned model), ``<output>/eval.json`` (its evaluation, the
    file ``perta test`` writes) and ``<output>/attack.json`` (the attack's settings, the forget examples measured
    and the forget metrics there).

    Args:
        model: the model to attack (a Hugging Face directory, e.g. one unlearned elsewhere).
        attack: ``quantize`` (bitsandbytes ``scheme``) or ``relearn`` (``steps`` of fine-tuning).
        output: folder of the results.
        data: a folder of the benchmark's splits (``perta data synthetic`` writes one; TOFU's own in its layout).
        benchmark: ``tofu`` or ``muse`` (MUSE: quantization only).
        forget_split: the forget split evaluated (and, relearning, split into a relearned and a held-out half).
        retain_result: the retain model's evaluation file on the same forget split (Forget Quality, PrivLeak).
        scheme: the quantization: ``nf4`` (4-bit NormalFloat) or ``int8`` (LLM.int8()).
        relearn_on: relearn on half of the forget split's authors, or on as many examples of its retain split.
        forget_groups: how many authors the forget split holds (default: its share of TOFU's 200 authors).
        steps: relearning's optimizer steps.
        lr: relearning's learning rate (default: the preset's fine-tuning rate).
        batch_size: relearning's batch size (default: the preset's).
        seed: the relearning's shuffle.
        preset: the preset whose evaluation settings (generation length, batch) apply.
        pretrained: the model descends from a pretrained θ0 (MUSE then asks its questions with shots).
        accelerator: Lightning accelerator of the relearning and the evaluation.
        overwrite: replace an existing ``output``.
    """
    from perta_lightning.attacks import quantize_model, relearn_model
    from perta_lightning.benchmarks.registry import benchmark as find_benchmark
    from perta_lightning.io import atomic_write_text, check_output_path

    out = check_output_path(output)
    if out.exists() and not overwrite:
        raise PertaValueError(f"{out} already exists; pass --overwrite true to replace it")
    if not Path(data).is_dir():
        raise PertaFileNotFoundError(f"data: no such folder: {data}")
    bench, settings = find_benchmark(benchmark), resolve_preset(preset)
    plan = bench.split_plan(bench.forget_splits([forget_split])[0], settings)
    source = bench.source_at(Path(data))
    record: dict[str, Any] = {"attack": attack, "model": str(model), "benchmark": bench.name, "forget_split": forget_split}
    heldout = None
    if attack == "quantize":
        quantize_model(model, out / "model", scheme, overwrite=True)
        record["scheme"] = scheme
    elif attack == "relearn":
        groups = forget_groups or bench.forget_groups(plan, settings, synthetic=False)
        split, rows = relearn_set(bench, plan, source, groups, relearn_on)
        relearn_model(model, rows, out / "model", steps, lr if lr is not None else settings.finetune_lr,
                      batch_size or settings.batch_size, seed, accelerator, plan.max_length)
        heldout = split.heldout
        record |= {"relearn_on": relearn_on, "steps": steps, "relearn_examples": len(rows), "groups": list(split.groups),
                   "heldout": heldout}
    else:
        raise PertaValueError(f"attack must be quantize or relearn, got {attack!r}")
    evaluation = bench.evaluation(plan, settings, pretrained=pretrained)
    evaluation.run(str(out / "model"), source, str(out / "eval.json"), retain_result, accelerator, 1, "float32")
    if retain_result is not None:
        record["forget_metrics"] = bench.forget_metrics(out / "eval.json", retain_result, heldout)
    atomic_write_text(out / "attack.json", json.dumps(record, indent=2))
    return out


def build_parser() -> Any:
    from perta_lightning.arguments import function_parser

    return function_parser(attack, "perta attack")


def cli_main(argv: list[str]) -> None:
    from perta_lightning.arguments import call_with_arguments
    from perta_lightning.callbacks.progress import quiet_dependencies

    with quiet_dependencies():
        out = call_with_arguments(build_parser(), attack, argv)
    print(f"[perta attack] {out / 'eval.json'}")
