"""The stages of ``perta pipeline`` (see ``perta_lightning.pipeline`` for the list and the resume rule)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from perta_lightning.data.tofu import TofuSource
from perta_lightning.pipeline import Preset, Stage, _train


def _adamw(lr: float) -> Any:
    return partial(torch.optim.AdamW, lr=lr, weight_decay=0.01)


def _scratch_config(p: Preset) -> dict[str, Any]:
    return dict(model_type="llama", vocab_size=p.vocab_size, hidden_size=p.hidden_size,
                intermediate_size=2 * p.hidden_size, num_hidden_layers=p.num_layers, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
                eos_token_id=1, bos_token_id=1)


def run_study(out: Path, p: Preset, source: TofuSource, base_model: str | None, forget_split: str,
              retain_split: str, importance_at: list[str], baselines: list[str], seed: int, accelerator: str,
              devices: int) -> None:
    from perta_lightning.evaluate import evaluate_model
    from perta_lightning.merge import alpha_dir_name, merge_checkpoints
    from perta_lightning.modules.baselines import UnlearningModule
    from perta_lightning.modules.finetune import CausalLMModule
    from perta_lightning.modules.importance import estimate_importance
    from perta_lightning.report import write_report

    models, run = out / "models", dict(accelerator=accelerator, devices=devices)
    common = {"preset": p, "seed": seed, "forget": forget_split, "retain": retain_split, "source": source}
    seconds: dict[str, float] = {}

    # θ0, θ_full, θ_retain, θ_r
    replay: list[str] = []
    if base_model is None:
        base, tokenizer = models / "base", str(out / "data" / "tokenizer")
        Stage(base, {**common, "stage": "base"}).run(lambda: _train(
            CausalLMModule(model_config=_scratch_config(p), tokenizer=tokenizer, output_dir=str(base), seed=seed,
                           optimizer=_adamw(p.pretrain_lr)),
            source, tokenizer, "world_corpus", p.pretrain_epochs, 2 * p.batch_size, **run))
        replay = ["world_corpus"]  # replayed while fine-tuning, so θ_full keeps its world knowledge
    else:
        base = Path(base_model)
    for name, split in (("full", "full"), ("retain", retain_split)):
        Stage(models / name, {**common, "stage": name, "base": str(base)}).run(partial(
            _train, CausalLMModule(model=str(base), output_dir=str(models / name), optimizer=_adamw(p.finetune_lr)),
            source, str(base), [split, *replay], p.finetune_epochs, p.batch_size, **run))
    full, reinforced = models / "full", models / "reinforced"
    seconds["reinforce"] = Stage(reinforced, {**common, "stage": "reinforce"}).run(lambda: _train(
        CausalLMModule(model=str(full), output_dir=str(reinforced), optimizer=_adamw(p.reinforce_lr)),
        source, str(full), forget_split, p.reinforce_epochs, p.batch_size, **run))

    # importance and merges
    candidates: dict[str, tuple[str, float | None, Path]] = {"target": ("target", None, full)}
    tv_dir = models / "tv"
    seconds["merge_tv"] = Stage(tv_dir, {**common, "stage": "tv", "alphas": p.alphas}).run(lambda: merge_checkpoints(
        full, reinforced, tv_dir, alpha=p.alphas, method="tv", overwrite=True, progress=False))
    for alpha in p.alphas:
        candidates[f"tv_{alpha_dir_name(alpha)}"] = ("tv", alpha, tv_dir / alpha_dir_name(alpha))
    for where in importance_at:
        model_at = full if where == "full" else base
        for statistic in ("grad", "fisher"):
            imp_dir = out / "importance" / f"at_{where}" / statistic
            seconds[f"importance_{statistic}_{where}"] = Stage(imp_dir, {**common, "stage": "importance", "at": where,
                                                                       "statistic": statistic}).run(
                lambda: estimate_importance(str(model_at), source, str(imp_dir), statistic=statistic,
                                            granularity="example", forget_split=forget_split,
                                            retain_split=retain_split, num_examples=p.importance_examples,
                                            subsample_seed=seed, overwrite=True, system_prompt=None))
            files = {kind: _importance_file(imp_dir, kind) for kind in ("forget", "retain")}
            method = f"perta_{statistic}" + ("" if where == "full" else "_at_base")
            merged = models / method
            seconds[f"merge_{method}"] = Stage(merged, {**common, "stage": method, "alphas": p.alphas}).run(
                lambda: merge_checkpoints(full, reinforced, merged, alpha=p.alphas, method="perta",
                                          forget_importance=files["forget"], retain_importance=files["retain"],
                                          overwrite=True, progress=False))
            for alpha in p.alphas:
                candidates[f"{method}_{alpha_dir_name(alpha)}"] = (method, alpha, merged / alpha_dir_name(alpha))

    for method in baselines:
        target = models / method
        seconds[method] = Stage(target, {**common, "stage": method, "epochs": p.unlearn_epochs}).run(partial(
            _train, UnlearningModule(str(full), method=method, output_dir=str(target), optimizer=_adamw(p.unlearn_lr)),
            source, str(full), forget_split, p.unlearn_epochs, p.batch_size, paired_split=retain_split, **run))
        candidates[method] = (method, None, target)

    # evaluation: θ_retain first, the reference of every Forget Quality
    evals = out / "eval"
    evaluate = partial(evaluate_model, source=source, forget_split=f"{forget_split}_perturbed",
                       holdout_split=forget_split.replace("forget", "holdout"), max_new_tokens=p.eval_max_new_tokens,
                       batch_size=32, accelerator=accelerator, devices=devices, system_prompt=None)
    reference = evals / "retain.json"
    Stage(evals / "retain", {**common, "stage": "eval_retain"}).run(
        lambda: evaluate(str(models / "retain"), output_json=str(reference)))
    rows = [("retain", None, models / "retain", evals / "retain.json")]
    for name, (method, alpha, model_dir) in candidates.items():
        result = evals / f"{name}.json"
        Stage(evals / name, {**common, "stage": f"eval_{name}"}).run(
            lambda: evaluate(str(model_dir), output_json=str(result), retain_result=str(reference)))
        rows.append((method, alpha, model_dir, result))
    write_report(out, rows, seconds, p, importance_at)


def _importance_file(directory: Path, kind: str) -> Path:
    for pattern in (f"{kind}*.safetensors.index.json", f"{kind}*.safetensors"):
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"{directory}: no {kind} importance file")
