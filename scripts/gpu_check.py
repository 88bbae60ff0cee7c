"""The GPU check behind ``scripts/gpu_check.sh``: every figure a first lent GPU should give, in one JSON file.

Parts, each timed and recorded even when it fails (``ok``, ``seconds``, figures or ``error``):

1. ``gpu_tests``: ``pytest -m gpu`` (passed / failed / skipped counts);
2. ``model``: θ0 = SmolLM2-135M-Instruct, converted from its GGUF by the ``ConvertGGUF`` stage;
3. ``importance/<strategy>``: forget and retain importance (grad and Fisher by example) on one device, then
   under the real DeepSpeed ZeRO-3 and FSDP strategies on every GPU of the machine, each compared with the
   single-device result: ``max_rel_diff`` = max over tensors of max|s − s_single| / max|s_single|;
4. ``finetune/<strategy>``: a few SGD steps under each strategy from θ0 on a one-example split (every rank
   holds that example, so the steps are the single device's), the saved (gathered) weights and the update
   θ − θ0 compared in the same way with the single-device steps;
5. ``study``: ``perta pipeline --config configs/smollm2/pipeline_gpu.yaml`` (bf16) under the time left;
   a run cut short reports the stages it finished and their seconds.

Parts 3 and 4 run the ``perta importance`` and ``perta fit`` commands as a user types them (the demo configs,
the model and data on the command line, the strategy block in a second ``--config`` file), each in its own
process tree started by Lightning's launcher, so a crash or hang of one strategy cannot take the others with it.

``--dry-run`` runs the same parts on CPU: the tests' tiny Llama instead of SmolLM2, two processes with the CPU
stand-ins of FSDP and DeepSpeed (``perta_lightning.distributed``), and the ``tiny`` preset with a one-α search.

usage: gpu_check.py [--dry-run] [--output FILE] [--work DIR] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("single", "deepspeed_zero3", "fsdp")
NUM_EXAMPLES = 8
FINETUNE_STEPS = 3


# ---------------------------------------------------------------------------------------------- commands


def devices(dry_run: bool) -> int:
    """Every GPU of the machine (so a lent machine with several checks the multi-device launch for real); two
    CPU processes in a dry run."""
    import torch

    return 2 if dry_run else max(1, torch.cuda.device_count())


def strategy_config(name: str, cpu: bool) -> dict[str, Any] | None:
    """The ``trainer.strategy`` block of one part, as a user writes it in YAML (``None``: Lightning's ``auto``):
    the real strategy on GPUs, its CPU stand-in (``perta_lightning.distributed``) in a dry run."""
    if name == "single":
        return None
    if name == "deepspeed_zero3":
        path = "perta_lightning.distributed.CPUDeepSpeedStrategy" if cpu else "lightning.pytorch.strategies.DeepSpeedStrategy"
        return {"class_path": path, "init_args": {"stage": 3}}
    if name == "fsdp":
        path = "perta_lightning.distributed.CPUFSDPStrategy" if cpu else "lightning.pytorch.strategies.FSDPStrategy"
        return {"class_path": path,
                "init_args": {"auto_wrap_policy": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]}}
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")


def perta_command(part: str, strategy: str, model: Path, data: Path, out: Path, dry_run: bool) -> list[list[str]]:
    """The ``perta`` command lines of one part under one strategy, as a user types them: the demo configs with
    the model, the data and the strategy given on the command line (the strategy as a second ``--config``).

    ``importance``: grad and Fisher by example on :data:`NUM_EXAMPLES` examples of each split. ``finetune``:
    :data:`FINETUNE_STEPS` SGD steps on a one-example split, so that every rank of a multi-device run holds
    that example and its steps are the single device's."""
    count = 1 if strategy == "single" else devices(dry_run)
    trainer = ["--trainer.accelerator", "cpu" if dry_run else "gpu", "--trainer.devices", str(count),
               "--trainer.enable_progress_bar", "false"]
    block = strategy_config(strategy, dry_run)
    if block is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "strategy.json").write_text(json.dumps({"trainer": {"strategy": block}}))
        trainer += ["--config", str(out / "strategy.json")]
    perta = [sys.executable, "-m", "perta_lightning"]
    if part == "importance":
        return [[*perta, "importance", "--config", str(ROOT / "configs/demo/importance.yaml"),
                 "--model.model", str(model), "--model.output_dir", str(out / statistic),
                 "--model.statistic", statistic, "--model.overwrite", "true", "--data.source.path", str(data),
                 "--data.num_examples", str(NUM_EXAMPLES), "--data.batch_size", "4", *trainer]
                for statistic in ("grad", "fisher")]
    if part == "finetune":
        first = out.parent / "first.json"
        first.parent.mkdir(parents=True, exist_ok=True)
        first.write_text((data / "forget10.json").read_text().splitlines()[0] + "\n")
        return [[*perta, "fit", "--config", str(ROOT / "configs/demo/full.yaml"), "--model.model", str(model),
                 "--model.output_dir", str(out / "model"), "--model.optimizer", "torch.optim.SGD",
                 "--model.optimizer.lr", "1e-3", "--model.optimizer.weight_decay", "0",
                 "--data.source.path", str(data), "--data.source.files", json.dumps({"first": str(first)}),
                 "--data.train_split", "[first]", "--data.prompt.tokenizer", str(model),
                 "--trainer.max_steps", str(FINETUNE_STEPS), "--trainer.max_epochs", "-1", *trainer]]
    raise ValueError(f"unknown part {part!r}")


# ---------------------------------------------------------------------------------------------- figures


def max_relative_difference(actual: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """max over tensors of max|a − e| / max|e| (0/0 counts 0), the worst tensor, and any key mismatch."""
    if actual.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
        raise ValueError(f"keys differ: missing {missing[:3]}, extra {extra[:3]}")
    worst, worst_name = 0.0, None
    for name, value in expected.items():
        other = actual[name].float()
        if other.shape != value.shape:
            raise ValueError(f"{name}: shape {tuple(other.shape)} != {tuple(value.shape)}")
        if not bool(other.isfinite().all()):
            raise ValueError(f"{name}: non-finite values")
        scale = value.float().abs().max().item()
        diff = (other - value.float()).abs().max().item()
        relative = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if relative > worst or worst_name is None:
            worst, worst_name = relative, name
    return {"max_rel_diff": worst, "worst_tensor": worst_name, "tensors": len(expected)}


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------- the check


class Check:
    """Runs the parts under one time budget and writes the figures file after each part."""

    def __init__(self, output: Path, work: Path, dry_run: bool, budget: float) -> None:
        self.output, self.work, self.dry_run = output, work, dry_run
        self.deadline = time.monotonic() + budget
        self.figures: dict[str, Any] = {"dry_run": dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                 time.gmtime()),
                                        "budget_s": budget, "environment": environment(), "parts": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output.with_name(f".{self.output.name}.tmp")
        tmp.write_text(json.dumps(self.figures, indent=2, default=str))
        tmp.replace(self.output)

    def part(self, name: str, function: Any, *args: Any) -> Any:
        print(f"[gpu_check] {name} ({self.left():.0f} s left)", flush=True)
        start = time.perf_counter()
        record: dict[str, Any] = {}
        try:
            result = function(*args)
            record.update(ok=True, **(result if isinstance(result, dict) else {}))
        except Exception as error:  # recorded, and the check goes on with the next part
            result = None
            record.update(ok=False, error=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc()[-3000:])
        record["seconds"] = round(time.perf_counter() - start, 2)
        self.figures["parts"][name] = record
        self.save()
        print(f"[gpu_check]     {'ok' if record['ok'] else 'FAILED: ' + record['error']} in {record['seconds']} s",
              flush=True)
        return result if record["ok"] else None

    def subprocess(self, command: list[str], timeout: float, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            try:
                code = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                      timeout=max(timeout, 1)).returncode
            except subprocess.TimeoutExpired as error:
                raise TimeoutError(f"{' '.join(command[:4])}... ran past {timeout:.0f} s; log {log}") from error
        if code != 0:
            tail = log.read_text()[-1500:]
            raise RuntimeError(f"exit status {code}; log {log}; last lines:\n{tail}")


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                            "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
    for package in ("lightning", "transformers", "deepspeed"):
        try:
            info[package] = __import__(package).__version__
        except Exception as error:  # an absent optional package is a figure, not a failure
            info[package] = f"unavailable ({type(error).__name__})"
    return info


def gpu_tests(check: Check) -> dict[str, Any]:
    log = check.work / "logs" / "pytest_gpu.log"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
    try:
        check.subprocess(command, min(180, check.left() - 60), log)
    except RuntimeError:
        pass  # counted below; a failing test is a figure
    text = log.read_text()
    counts = {key: int(value) for value, key in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
    if counts.get("failed") or counts.get("error"):
        raise RuntimeError(f"GPU tests: {counts}; log {log}")
    return {"counts": counts}


def prepare_model(check: Check) -> dict[str, Any]:
    """θ0 and the data: SmolLM2 from its GGUF (or the tiny Llama in a dry run) and a small synthetic benchmark."""
    from perta_lightning.benchmarks.tofu.synthetic import SyntheticSpec, write_benchmark

    data = check.work / "data"
    if not data.is_dir():
        write_benchmark(SyntheticSpec(num_authors=10, seed=0, num_background_authors=2, num_world_items=8),
                        str(data), False, None)
    if check.dry_run:
        sys.path.insert(0, str(ROOT))
        from tests.tiny import make_tiny_assets

        model = make_tiny_assets(check.work / "tiny")["model"]
        info = {"model": "tests' tiny Llama (dry run)"}
    else:
        from perta_lightning.convert import SMOLLM2_GGUF, ConvertGGUF
        from perta_lightning.stages import Product, StageRunner

        runner = StageRunner(check.work / "convert", seed=0)
        stage = ConvertGGUF(SMOLLM2_GGUF)
        record = runner.run(stage)
        model = runner.path(Product(stage))
        info = {"model": "SmolLM2-135M-Instruct", "gguf": record.settings, "convert_seconds": record.seconds}
    check.model, check.data = Path(model), data
    return info


def distributed_part(check: Check, part: str, strategy: str) -> dict[str, Any]:
    out = check.work / part / strategy
    for index, command in enumerate(perta_command(part, strategy, check.model, check.data, out, check.dry_run)):
        check.subprocess(command, min(240, check.left() - 30), check.work / "logs" / f"{part}_{strategy}_{index}.log")
    if strategy == "single":
        return {"reference": True}
    single = check.work / part / "single"
    figures: dict[str, Any] = {}
    if part == "importance":
        for statistic in ("grad", "fisher"):
            for split in ("forget", "retain"):
                figures[f"{statistic}/{split}"] = max_relative_difference(
                    load_tensors(out / statistic / f"{split}.safetensors"),
                    load_tensors(single / statistic / f"{split}.safetensors"))
    else:  # the weights, and the update θ − θ0 (far smaller than the weights, so the stricter figure)
        tuned, reference = (load_tensors(folder / "model" / "model.safetensors") for folder in (out, single))
        start = load_tensors(check.model / "model.safetensors")
        figures["weights"] = max_relative_difference(tuned, reference)
        figures["update"] = max_relative_difference({k: v - start[k] for k, v in tuned.items()},
                                                    {k: v - start[k] for k, v in reference.items()})
    figures["max_rel_diff"] = max(value["max_rel_diff"] for value in figures.values())
    figures["devices"] = devices(check.dry_run)
    return figures


def study(check: Check) -> dict[str, Any]:
    """The SmolLM2 study at its GPU size in bf16 (a one-α tiny study in a dry run), within the time left."""
    output = check.work / "study"
    if check.dry_run:
        options = ["--preset", "tiny", "--base_model", str(check.model), "--accelerator", "cpu",
                   "--precision", "32-true", "--variants", '[{"statistic": "fisher", "beta": 16.0}]',
                   "--baselines", "[]", "--search", '{"levels": [0.3], "initial": [1.0], "rounds": 0}']
    else:
        options = ["--config", str(ROOT / "configs/smollm2/pipeline_gpu.yaml")]
    command = [sys.executable, "-m", "perta_lightning", "pipeline", *options, "--output", str(output)]
    error = None
    try:
        check.subprocess(command, check.left() - 10, check.work / "logs" / "study.log")
    except (TimeoutError, RuntimeError) as failure:
        error = failure
    stages = {}
    for record in sorted((output / "stages").rglob("*.json")) if (output / "stages").is_dir() else []:
        data = json.loads(record.read_text())
        stages[data["name"]] = round(data["seconds"], 2)
    figures: dict[str, Any] = {"command": " ".join(command[1:]), "stage_seconds": stages,
                               "stages_done": len(stages), "complete": error is None}
    report = output / "forget10" / "report.json"
    if report.is_file():
        content = json.loads(report.read_text())
        figures["rows"] = [{key: row.get(key) for key in ("method", "alpha", "forget_quality", "model_utility")}
                           for row in content["rows"]]
        figures["matched"] = content["matched"]
    if error is not None:
        figures["shortened"] = str(error)[:2000]
        if isinstance(error, RuntimeError):
            raise RuntimeError(json.dumps(figures)[:4000]) from error
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, CPU shims of the strategies")
    parser.add_argument("--output", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    parser.add_argument("--work", default=None, help="scratch folder (default: beside the output)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default 420; 300 dry)")
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    work = Path(args.work).resolve() if args.work else output.parent / "gpu_check_work"
    check = Check(output, work, args.dry_run, args.budget or (300.0 if args.dry_run else 420.0))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        check.figures["error"] = "no CUDA device: run with --dry-run on a CPU machine"
        check.save()
        print(f"[gpu_check] {check.figures['error']}", flush=True)
        return 2
    if not args.dry_run:
        check.part("gpu_tests", gpu_tests, check)
    if check.part("model", prepare_model, check) is not None:
        for part in ("importance", "finetune"):
            if check.part(f"{part}/single", distributed_part, check, part, "single") is None:
                continue
            for strategy in STRATEGIES[1:]:
                check.part(f"{part}/{strategy}", distributed_part, check, part, strategy)
        check.part("study", study, check)
    parts = check.figures["parts"]
    check.figures["ok"] = all(p["ok"] for p in parts.values())
    check.figures["failed"] = [name for name, p in parts.items() if not p["ok"]]
    check.save()
    print(f"[gpu_check] {'all parts ok' if check.figures['ok'] else 'FAILED: ' + ', '.join(check.figures['failed'])}"
          f"; figures in {output}", flush=True)
    return 0 if check.figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
