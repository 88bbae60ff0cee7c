"""Launched by tests/test_importance_distributed.py: one importance estimation under one strategy.

usage: run_importance.py STRATEGY MODEL_DIR DATA_DIR OUTPUT_ROOT
Runs ``grad`` then ``fisher`` by example (``fisher_mode='auto'``), writing ``OUTPUT_ROOT/<statistic>/{forget,retain}.safetensors``.
Both runs go through one Trainer setup each; the strategy is built fresh for each run.
"""

from __future__ import annotations

import sys

from perta_lightning import distributed
from perta_lightning.data.tofu import TofuSource
from perta_lightning.modules.importance import estimate_importance


def make_strategy(name: str):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name in ("fsdp_flat", "fsdp_orig"):
        return distributed.CPUFSDPStrategy(
            auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=name == "fsdp_orig"
        )
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    if name in ("zero2", "zero3"):
        return distributed.CPUDeepSpeedStrategy(stage=int(name[-1]))
    raise ValueError(name)


SAVE_CHECKED = ("fsdp_flat", "fsdp2", "zero3")


def save_unchanged(strategy_name: str, model: str, data: str, output: str) -> None:
    """One fit step at learning rate 0, then save: under sharding the saved weights must be the gathered
    full ones, equal to the model we started from."""
    from functools import partial

    import lightning as L
    import torch

    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.modules.finetune import CausalLMModule

    module = CausalLMModule(model=model, output_dir=f"{output}/saved", optimizer=partial(torch.optim.SGD, lr=0.0))
    data_module = TofuDataModule(TofuSource(path=data), train_split="forget10", batch_size=2)
    L.Trainer(accelerator="cpu", devices=2, strategy=make_strategy(strategy_name), max_steps=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0).fit(module, data_module)


def main() -> None:
    strategy_name, model, data, output = sys.argv[1:5]
    statistics = sys.argv[5].split(",") if len(sys.argv) > 5 else ["grad", "fisher"]
    for statistic in statistics:
        estimate_importance(
            model, TofuSource(path=data), f"{output}/{statistic}", statistic, "example", batch_size=3,
            trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": make_strategy(strategy_name),
                            "enable_progress_bar": False},
        )
    if strategy_name in SAVE_CHECKED:
        save_unchanged(strategy_name, model, data, output)


if __name__ == "__main__":
    main()
