"""What bf16-stored importance and the weighted task vector change in a finished pipeline run's PerTA models.

    PYTHONPATH=. python bench/bench_importance_dtype.py --run runs/pipeline [--split forget10] [--threads 2]

For every PerTA model the run's report lists (each variant and α), this merges again

1. with the run's importance files rounded once to bf16 (what ``save_dtype="bfloat16"`` writes), and
2. through the weighted task vector ``v = w ⊙ τ`` (written once per variant with ``save_weighted_task_vector``,
   then ``method="weighted"``, which reads only θ_t and v),

and prints, per model: for (2) whether θ_u is bit for bit the run's; for (1) the largest relative change of w
(over every parameter) and of the update θ_u − θ_t; then evaluates the run's own model again (the control:
same process, same settings as the run's evaluation, read from its file) and the bf16 model, and compares every
aggregate and the report's matched-Forget-Quality table. Bytes read per parameter of each merge path are given
for the run's float32 model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def bf16_copy(source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    target = out / source.name
    save_file({k: v.bfloat16() for k, v in load_file(source).items()}, str(target), metadata={"format": "pt"})
    return target


def weights(forget: dict, retain: dict, beta: float, power: float) -> dict[str, torch.Tensor]:
    from perta_lightning.functional.weights import perta_weights

    return {k: perta_weights(forget[k].float(), retain[k].float(), beta=beta, power=power) for k in forget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished `perta pipeline` output folder")
    parser.add_argument("--split", default="forget10")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from perta_lightning.benchmarks.tofu.evaluator import evaluate_model
    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.callbacks.progress import quiet_dependencies
    from perta_lightning.functional.tradeoff import CurvePoint, is_collapsed, utilities_at_levels
    from perta_lightning.merge import merge_checkpoints

    run = Path(args.run)
    report = json.loads((run / args.split / "report.json").read_text())
    levels = report["settings"]["levels"]
    target_eval = json.loads((run / args.split / "eval" / "target.json").read_text())
    settings = target_eval["settings"]
    reference = run / args.split / "eval" / "retain.json"
    source = TofuSource(path=str(run / "data"))
    target = run / "models" / "full"
    reinforced = run / args.split / "models" / "reinforced"
    scratch = Path(tempfile.mkdtemp(prefix="bench_importance_dtype-"))

    def evaluate(model: Path) -> dict:
        with quiet_dependencies():
            return evaluate_model(str(model), source, forget_split=target_eval["splits"]["forget"],
                                  holdout_split=target_eval["splits"]["holdout"], retain_result=str(reference),
                                  max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"],
                                  accelerator="cpu")["aggregates"]

    try:
        worst: dict[str, float] = {}
        curves: dict[str, dict[str, list[CurvePoint]]] = {}
        target_row = next(r for r in report["rows"] if r["method"] == "target")
        target_mu = target_row["model_utility"]
        lines = []
        for label, imp in report["importance"].items():
            forget_file, retain_file = run / imp["forget"], run / imp["retain"]
            half = scratch / label / "bf16"
            forget_bf16, retain_bf16 = bf16_copy(forget_file, half), bf16_copy(retain_file, half / "r")
            w32 = weights(load_file(forget_file), load_file(retain_file), imp["beta"], imp["power"])
            w16 = weights(load_file(forget_bf16), load_file(retain_bf16), imp["beta"], imp["power"])
            w_change = max(float(((w16[k] - w32[k]).abs() / w32[k].abs().clamp_min(1e-30)).max()) for k in w32)
            rows = [r for r in report["rows"] if r["method"] == label]
            alphas = [r["alpha"] for r in rows]
            common = dict(method="perta", beta=imp["beta"], power=imp["power"], overwrite=True, progress=False)
            merged16 = merge_checkpoints(target, reinforced, scratch / label / "m16", alpha=alphas,
                                         forget_importance=forget_bf16, retain_importance=retain_bf16, **common)
            vector = scratch / label / "v"
            merge_checkpoints(target, reinforced, scratch / label / "m32", alpha=alphas, forget_importance=forget_file,
                              retain_importance=retain_file, save_weighted_task_vector=vector, **common)
            weighted = merge_checkpoints(target, None, scratch / label / "mw", alpha=alphas, method="weighted",
                                         task_vector=vector, overwrite=True, progress=False)
            theta_t = load_file(target / "model.safetensors")
            for row in rows:
                alpha, original = row["alpha"], run / row["model_dir"]
                ours = load_file(original / "model.safetensors")
                same = all(torch.equal(v, load_file(weighted[alpha] / "model.safetensors")[k]) for k, v in ours.items())
                half_model = load_file(merged16[alpha] / "model.safetensors")
                update_change = max(float((half_model[k] - ours[k]).abs().max() /
                                          (ours[k] - theta_t[k]).abs().max().clamp_min(1e-30)) for k in ours)
                control, treated = evaluate(original), evaluate(merged16[alpha])
                for key, value in control.items():
                    if isinstance(value, float) and isinstance(treated.get(key), float):
                        worst[key] = max(worst.get(key, 0.0), abs(treated[key] - value))
                for name, aggregates in (("control", control), ("bf16", treated)):
                    curves.setdefault(label, {}).setdefault(name, []).append(CurvePoint(
                        alpha, aggregates["forget_quality"], aggregates["model_utility"],
                        is_collapsed(aggregates["model_utility"], target_mu)))
                lines.append(f"| {label} | {alpha:g} | {same} | {update_change:.2e} | {control['forget_quality']:.4f} "
                             f"| {treated['forget_quality']:.4f} | {control['model_utility']:.4f} "
                             f"| {treated['model_utility']:.4f} |")
            print(f"{label}: largest relative change of w with bf16 importance {w_change:.2e}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("\n| variant | α | weighted-vector merge bit for bit | max |Δθ_u| / max |θ_u − θ_t| (bf16) "
          "| FQ control | FQ bf16 | MU control | MU bf16 |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print("\nlargest |difference| of each aggregate, bf16 importance against the control:")
    for key, value in sorted(worst.items()):
        print(f"  {key}: {value:.3g}")
    print("\nmatched-FQ Model Utility (levels " + ", ".join(f"{level:g}" for level in levels) + "):")
    for label, curve in curves.items():
        start = CurvePoint(0.0, target_row["forget_quality"], target_mu)
        for name, points in curve.items():
            print(f"  {label} {name}: {utilities_at_levels([start, *points], levels)}")
    params = sum(v.numel() for v in load_file(target / "model.safetensors").values())
    print(f"\nbytes read per parameter ({params} float32 parameters): PerTA fp32 importance 16, bf16 importance 12, "
          "weighted task vector 8")


if __name__ == "__main__":
    main()
