"""GPU checks (marked ``gpu``; skipped without CUDA): the same statistics and evaluation on the GPU as on CPU."""

import json
from functools import partial

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_importance_on_gpu_equals_cpu(tiny_model_dir, tiny_benchmark, tmp_path):
    from safetensors.torch import load_file

    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.modules.importance import estimate_importance

    written = {}
    for accelerator in ("cpu", "gpu"):
        written[accelerator] = estimate_importance(
            str(tiny_model_dir), TofuSource(path=str(tiny_benchmark)), str(tmp_path / accelerator), "fisher",
            "example", num_examples=6, trainer_kwargs={"accelerator": accelerator, "devices": 1})
    for split in ("forget", "retain"):
        cpu, gpu = load_file(written["cpu"][split]), load_file(written["gpu"][split])
        for name, value in cpu.items():
            torch.testing.assert_close(gpu[name], value, rtol=1e-4, atol=1e-10)


def test_finetune_step_and_evaluation_on_gpu(tiny_model_dir, tiny_benchmark, tmp_path):
    import lightning as L

    from perta_lightning.benchmarks.tofu.evaluator import evaluate_model
    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.modules.finetune import CausalLMModule

    source = TofuSource(path=str(tiny_benchmark))
    module = CausalLMModule(model=str(tiny_model_dir), output_dir=str(tmp_path / "tuned"),
                            optimizer=partial(torch.optim.AdamW, lr=1e-3))
    L.Trainer(accelerator="gpu", devices=1, max_steps=2, precision="bf16-mixed", logger=False,
              enable_checkpointing=False, limit_val_batches=0).fit(
        module, TofuDataModule(source, train_split="forget10", batch_size=4))
    results = {device: evaluate_model(str(tmp_path / "tuned"), source, accelerator=device, max_new_tokens=8,
                                      max_examples=8) for device in ("cpu", "gpu")}
    for key in ("forget_probability", "retain_probability", "forget_truth_ratio"):
        assert results["gpu"]["aggregates"][key] == pytest.approx(results["cpu"]["aggregates"][key], rel=1e-3)


def test_study_stages_in_bf16_on_gpu(tiny_model_dir, tiny_benchmark, tmp_path):
    """A fine-tune and an evaluation stage under ``Runtime(precision="bf16-mixed")``, as the GPU study runs them."""
    from perta_lightning.benchmarks.tofu.benchmark import TofuEvaluation
    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.stages import Product, StageRunner
    from perta_lightning.study.stages import Data, Evaluate, FineTune, Pretrained, Runtime

    runtime = Runtime("gpu", 1, "bf16-mixed")
    data = Data(given=TofuSource(path=str(tiny_benchmark)))
    runner = StageRunner(tmp_path, seed=0)
    base = Pretrained(str(tiny_model_dir))
    tuned = FineTune("models/tuned", base, data, ["forget10"], 1, 1e-3, 4, runtime=runtime)
    evaluation = Evaluate("eval/tuned", Product(tuned), data, TofuEvaluation("forget10", 8), runtime=runtime)
    runner.run_all([base, tuned, evaluation])
    result = json.loads(runner.path(Product(evaluation, "eval")).read_text())
    for key in ("forget_probability", "retain_probability", "forget_truth_ratio"):
        assert 0.0 <= result["aggregates"][key] <= 1.0, key
