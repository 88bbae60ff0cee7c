"""The stages of ``perta pipeline`` (see ``perta_lightning.pipeline`` for the list and the resume rule).

A stage's settings are what it does plus the settings of the stages whose artifacts it reads, so changing
one setting reruns exactly the stages downstream of it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from perta_lightning.data.tofu import TofuSource
from perta_lightning.pipeline import Preset, Stage, train_stage


def _adamw(lr: float) -> Any:
    return partial(torch.optim.AdamW, lr=lr, weight_decay=0.01)


def _scratch_config(p: Preset) -> dict[str, Any]:
    return dict(model_type="llama", vocab_size=p.vocab_size, hidden_size=p.hidden_size,
                intermediate_size=2 * p.hidden_size, num_hidden_layers=p.num_layers, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
                eos_token_id=1, bos_token_id=1)


def _importance_file(directory: Path, kind: str) -> Path:
    for pattern in (f"{kind}*.safetensors.index.json", f"{kind}*.safetensors"):
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"{directory}: no {kind} importance file")


def run_study(out: Path, p: Preset, source: TofuSource, base_model: str | None, forget_split: str,
              retain_split: str, importance_at: list[str], baselines: list[str], seed: int, accelerator: str,
              devices: int) -> None:
    from perta_lightning.evaluate import evaluate_model
    from perta_lightning.merge import alpha_dir_name, merge_checkpoints
    from perta_lightning.modules.baselines import UnlearningModule
    from perta_lightning.modules.finetune import CausalLMModule
    from perta_lightning.modules.importance import estimate_importance
    from perta_lightning.report import write_report

    models, evals, run = out / "models", out / "eval", dict(accelerator=accelerator, devices=devices)
    data = {"source": source, "seed": seed}
    seconds: dict[str, float] = {}

    # θ0, θ_full, θ_retain, θ_r
    replay: list[str] = []
    if base_model is None:
        base, tokenizer = models / "base", str(out / "data" / "tokenizer")
        base_stage = Stage(base, {**data, "model": _scratch_config(p), "epochs": p.pretrain_epochs,
                                  "lr": p.pretrain_lr, "batch_size": 2 * p.batch_size})
        base_stage.run(lambda: train_stage(
            CausalLMModule(model_config=_scratch_config(p), tokenizer=tokenizer, output_dir=str(base), seed=seed,
                           optimizer=_adamw(p.pretrain_lr)),
            source, tokenizer, "world_corpus", p.pretrain_epochs, 2 * p.batch_size, **run))
        replay = ["world_corpus"]  # replayed while fine-tuning, so θ_full keeps its world knowledge
    else:
        base = Path(base_model)
        base_stage = Stage(base, {"pretrained": str(base)})
    tuned = {}
    for name, split in (("full", "full"), ("retain", retain_split)):
        tuned[name] = Stage(models / name, {"after": base_stage.settings, "splits": [split, *replay],
                                            "epochs": p.finetune_epochs, "lr": p.finetune_lr,
                                            "batch_size": p.batch_size})
        tuned[name].run(partial(
            train_stage, CausalLMModule(model=str(base), output_dir=str(models / name), optimizer=_adamw(p.finetune_lr)),
            source, str(base), [split, *replay], p.finetune_epochs, p.batch_size, **run))
    full, reinforced = models / "full", models / "reinforced"
    reinforce = Stage(reinforced, {"after": tuned["full"].settings, "split": forget_split,
                                   "epochs": p.reinforce_epochs, "lr": p.reinforce_lr})
    seconds["reinforce"] = reinforce.run(lambda: train_stage(
        CausalLMModule(model=str(full), output_dir=str(reinforced), optimizer=_adamw(p.reinforce_lr)),
        source, str(full), forget_split, p.reinforce_epochs, p.batch_size, **run))

    # merges: TV, and PerTA with importance at each requested model
    candidates: dict[str, tuple[str, float | None, Path, dict]] = {"target": ("target", None, full, tuned["full"].settings)}
    merged = {"tv": Stage(models / "tv", {"after": reinforce.settings, "method": "tv", "alphas": p.alphas})}
    seconds["merge_tv"] = merged["tv"].run(lambda: merge_checkpoints(
        full, reinforced, models / "tv", alpha=p.alphas, method="tv", overwrite=True, progress=False))
    for where in importance_at:
        model_at, made_by = (full, tuned["full"]) if where == "full" else (base, base_stage)
        for statistic in ("grad", "fisher"):
            imp_dir = out / "importance" / f"at_{where}" / statistic
            importance = Stage(imp_dir, {"after": made_by.settings, "statistic": statistic,
                                         "forget": forget_split, "retain": retain_split,
                                         "num_examples": p.importance_examples})
            seconds[f"importance_{statistic}_{where}"] = importance.run(
                lambda: estimate_importance(str(model_at), source, str(imp_dir), statistic=statistic,
                                            granularity="example", forget_split=forget_split,
                                            retain_split=retain_split, num_examples=p.importance_examples,
                                            subsample_seed=seed, overwrite=True))
            files = {kind: _importance_file(imp_dir, kind) for kind in ("forget", "retain")}
            method = f"perta_{statistic}" + ("" if where == "full" else "_at_base")
            merged[method] = Stage(models / method, {"after": [reinforce.settings, importance.settings],
                                                     "alphas": p.alphas, "beta": p.perta_beta})
            seconds[f"merge_{method}"] = merged[method].run(lambda: merge_checkpoints(
                full, reinforced, models / method, alpha=p.alphas, method="perta", beta=p.perta_beta, overwrite=True,
                progress=False, forget_importance=files["forget"], retain_importance=files["retain"]))
    for method, stage in merged.items():
        for alpha in p.alphas:
            name = alpha_dir_name(alpha)
            candidates[f"{method}_{name}"] = (method, alpha, stage.directory / name, stage.settings)

    # training-based baselines on the same forget / retain data
    for method in baselines:
        stage = Stage(models / method, {"after": tuned["full"].settings, "forget": forget_split,
                                        "retain": retain_split, "epochs": p.unlearn_epochs, "lr": p.unlearn_lr})
        seconds[method] = stage.run(partial(
            train_stage, UnlearningModule(str(full), method=method, output_dir=str(models / method),
                                     optimizer=_adamw(p.unlearn_lr)),
            source, str(full), forget_split, p.unlearn_epochs, p.batch_size, paired_split=retain_split, **run))
        candidates[method] = (method, None, models / method, stage.settings)

    # evaluation: θ_retain first, the reference of every Forget Quality
    evaluate = partial(evaluate_model, source=source, forget_split=f"{forget_split}_perturbed",
                       holdout_split=forget_split.replace("forget", "holdout"), max_new_tokens=p.eval_max_new_tokens,
                       batch_size=32, accelerator=accelerator, devices=devices)
    reference = evals / "retain.json"
    reference_stage = Stage(evals / "retain", {"after": tuned["retain"].settings,
                                               "max_new_tokens": p.eval_max_new_tokens})
    reference_stage.run(lambda: evaluate(str(models / "retain"), output_json=str(reference)))
    rows = [("retain", None, models / "retain", reference)]
    for name, (method, alpha, model_dir, made_by) in candidates.items():
        result = evals / f"{name}.json"
        Stage(evals / name, {"after": [made_by, reference_stage.settings], "alpha": alpha}).run(
            lambda: evaluate(str(model_dir), output_json=str(result), retain_result=str(reference)))
        rows.append((method, alpha, model_dir, result))
    write_report(out, rows, seconds, p, importance_at)
