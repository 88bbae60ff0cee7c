"""Importance statistics in one process against a naive loop, one example at a time."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from perta_lightning.benchmarks.tofu.source import TofuSource, load_split
from perta_lightning.data.datamodule import EncodedQA
from perta_lightning.data.formatting import PromptFormat, QAFormatter, load_tokenizer
from perta_lightning.functional import importance as F
from perta_lightning.functional.losses import example_nll
from perta_lightning.modules.importance import estimate_importance
from tests.conftest import CPU


def naive_importance(model_dir: Path, data_dir: Path, split: str) -> dict[str, dict[str, torch.Tensor]]:
    """Loop over the examples one at a time; sum gradients by hand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokenizer = load_tokenizer(str(model_dir))
    rows = load_split(TofuSource(path=str(data_dir)), split)
    examples = EncodedQA(rows, QAFormatter(tokenizer), split).examples
    params = dict(model.named_parameters())
    summed = {name: torch.zeros_like(p) for name, p in params.items()}
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    tokens = 0
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor([example["labels"]])
        nll, count = example_nll(model(input_ids=ids).logits, labels)
        grads = torch.autograd.grad(nll.sum(), list(params.values()))
        tokens += int(count)
        for (name, _), g in zip(params.items(), grads):
            summed[name] += g
            squares[name] += (g / count) ** 2  # ∇ℓ_i = ∇(sum NLL) / |A_i|
    grad = {name: (s / tokens).abs().float() for name, s in summed.items()}
    fisher = {name: (s / len(examples)).float() for name, s in squares.items()}
    return {"grad": grad, "fisher": fisher}


def assert_close_stats(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("statistic", ["grad", "fisher"])
@pytest.mark.parametrize("label, split", [("forget", "forget10"), ("retain", "retain90")])
def test_matches_naive_reference(tiny_assets, single_process, statistic, label, split):
    expected = naive_importance(tiny_assets["model"], tiny_assets["data"], split)[statistic]
    assert_close_stats(load_file(single_process[statistic][label]), expected)


def test_keys_and_metadata(tiny_assets, single_process):
    with safe_open(str(tiny_assets["model"] / "model.safetensors"), "pt") as handle:
        model_keys = set(handle.keys())
    path = single_process["fisher"]["forget"]
    with safe_open(str(path), "pt") as handle:
        assert set(handle.keys()) == model_keys
        metadata = handle.metadata()
    assert metadata["statistic"] == "fisher" and metadata["granularity"] == "example"
    assert metadata["num_examples"] == "7" and int(metadata["num_tokens"]) > 7
    assert metadata["model_dir"] == str(tiny_assets["model"]) and metadata["split"] == "forget"
    assert metadata["source"].endswith("forget10.json")
    assert json.loads((path.parent / "forget.json").read_text())["path"] == "forget.safetensors"


def test_batch_fisher_with_batch_one_is_exact_and_grad_ignores_batch_size(tiny_assets, single_process, tmp_path):
    source = TofuSource(path=str(tiny_assets["data"]))
    fisher = estimate_importance(str(tiny_assets["model"]), source, str(tmp_path / "fb"), "fisher", "batch",
                                 batch_size=1, trainer_kwargs=CPU)
    assert_close_stats(load_file(fisher["retain"]), load_file(single_process["fisher"]["retain"]))
    grad = estimate_importance(str(tiny_assets["model"]), source, str(tmp_path / "g"), "grad", batch_size=5,
                               trainer_kwargs=CPU)
    assert_close_stats(load_file(grad["retain"]), load_file(single_process["grad"]["retain"]))


def test_bf16_statistics_are_the_fp32_ones_rounded_once(tiny_assets, single_process, tmp_path):
    source = TofuSource(path=str(tiny_assets["data"]))
    out = estimate_importance(str(tiny_assets["model"]), source, str(tmp_path), "fisher", batch_size=3,
                              trainer_kwargs=CPU, save_dtype="bfloat16")
    exact = load_file(single_process["fisher"]["forget"])
    half = load_file(out["forget"])
    assert half.keys() == exact.keys() and all(t.dtype == torch.bfloat16 for t in half.values())
    for name in exact:  # round to nearest of the same fp32 sums: bit for bit the cast of the exact file
        assert torch.equal(half[name], exact[name].bfloat16()), name
    assert json.loads((tmp_path / "forget.json").read_text())["dtype"] == "bfloat16"
    from perta_lightning.errors import PertaValueError

    with pytest.raises(PertaValueError, match="save_dtype must be one of \\['bfloat16', 'float32'\\], got 'float16'"):
        estimate_importance(str(tiny_assets["model"]), source, str(tmp_path / "x"), "fisher", save_dtype="float16")


def test_subsample_and_sharded_output(tiny_assets, tmp_path):
    from perta_lightning.modules.importance import ImportanceModule  # noqa: F401  (public API)

    source = TofuSource(path=str(tiny_assets["data"]))
    out = estimate_importance(str(tiny_assets["model"]), source, str(tmp_path), "grad", num_examples=4,
                              batch_size=2, trainer_kwargs=CPU, prompt=PromptFormat(max_length=64))
    with safe_open(str(out["forget"]), "pt") as handle:
        assert handle.metadata()["num_examples"] == "4"
    # the same statistics, sharded with an index, read back equal
    from perta_lightning.checkpoints import write_safetensors_sharded

    tensors = load_file(out["forget"])
    index = write_safetensors_sharded(iter(sorted(tensors.items())), tmp_path / "sharded", "forget", {"a": "b"},
                                      max_shard_bytes=20_000)
    weight_map = json.loads(index.read_text())["weight_map"]
    assert index.name == "forget.safetensors.index.json" and len(set(weight_map.values())) > 1
    joined = {}
    for file in set(weight_map.values()):
        joined.update(load_file(index.parent / file))
    assert_close_stats(joined, tensors, rtol=0)


def test_refuses_existing_output_and_interrupted_run(tiny_assets, single_process, tmp_path):
    source = TofuSource(path=str(tiny_assets["data"]))
    existing = single_process["grad"]["forget"].parent
    with pytest.raises(FileExistsError, match="already exists"):
        estimate_importance(str(tiny_assets["model"]), source, str(existing), "grad", trainer_kwargs=CPU)
    (tmp_path / ".forget.tmp-abc").mkdir()  # what a crash during writing leaves behind
    with pytest.raises(FileExistsError, match="interrupted"):
        estimate_importance(str(tiny_assets["model"]), source, str(tmp_path), "grad", trainer_kwargs=CPU)


def test_split_without_answer_tokens_is_an_error(tiny_assets, tmp_path):
    from lightning.pytorch import Trainer

    from perta_lightning.data.importance import ImportanceDataModule
    from perta_lightning.modules.importance import ImportanceModule

    data = ImportanceDataModule(TofuSource(path=str(tiny_assets["data"])), batch_size=4)
    original = data.setup

    def setup_without_answers(stage=None):
        original(stage)
        for batch in data.batches:
            batch["labels"].fill_(-100)

    data.setup = setup_without_answers
    module = ImportanceModule(str(tiny_assets["model"]), str(tmp_path / "out"), "grad")
    with pytest.raises(ValueError, match="no answer tokens"):
        Trainer(max_epochs=1, logger=False, enable_checkpointing=False, **CPU).fit(module, data)
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


def test_collector_on_an_ordinary_fit_run(tiny_assets, single_process, tmp_path):
    """With the whole split in one batch, the token-mean training gradient times the token count is the
    summed gradient, so ``grad`` collected during training (before the step) equals the estimate."""
    from lightning.pytorch import Trainer

    from perta_lightning.callbacks.importance import ImportanceCollector
    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.modules.finetune import CausalLMModule

    class Finetune(CausalLMModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_train_start(self):
            self.model.eval()

    data = TofuDataModule(TofuSource(path=str(tiny_assets["data"])),
                          train_split="forget10", batch_size=100, shuffle=False)
    collector = ImportanceCollector(str(tmp_path), "grad", model_dir=str(tiny_assets["model"]))
    Trainer(max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[collector], **CPU).fit(
        Finetune(model=str(tiny_assets["model"])), data
    )
    assert_close_stats(load_file(tmp_path / "train.safetensors"), load_file(single_process["grad"]["forget"]))
    with pytest.raises(ValueError, match="importance_loss"):
        ImportanceCollector(str(tmp_path / "x"), "fisher", "example").setup(
            Trainer(**CPU), Finetune(model=str(tiny_assets["model"])), "fit"
        )


def test_functional_accumulation_by_hand():
    acc = F.new_accumulator(3)
    F.accumulate_gradient(acc, torch.tensor([1.0, -2.0, 3.0]), 2.0)
    F.accumulate_gradient(acc, torch.tensor([1.0, 0.0, -7.0], dtype=torch.bfloat16))
    assert torch.equal(F.finalize("grad", acc, num_tokens=3, num_examples=1), torch.tensor([1.0, 4 / 3, 1 / 3]))
    sq = F.new_accumulator(2)
    F.accumulate_squared(sq, torch.tensor([1.0, -2.0]))
    F.accumulate_squared(sq, torch.tensor([3.0, 0.0]), 0.5)
    assert torch.equal(F.finalize("fisher", sq, num_tokens=9, num_examples=2), torch.tensor([2.75, 2.0]))
    with pytest.raises(ValueError, match="no answer tokens"):
        F.finalize("grad", acc, num_tokens=0, num_examples=1)


def test_fisher_by_hooks_equals_the_loop(tiny_assets, single_process, tmp_path):
    """The default (``auto``: hooks in one process) against one backward per example, both splits."""
    source = TofuSource(path=str(tiny_assets["data"]))
    loop = estimate_importance(str(tiny_assets["model"]), source, str(tmp_path), "fisher", "example", "loop",
                               batch_size=3, trainer_kwargs=CPU)
    for split in ("forget", "retain"):
        hooks = single_process["fisher"][split]
        assert_close_stats(load_file(hooks), load_file(loop[split]))
        with safe_open(str(hooks), "pt") as h, safe_open(str(loop[split]), "pt") as lp:
            assert h.metadata()["loss_convention"] == "example_losses"
            assert lp.metadata()["loss_convention"] == "one_example"


def test_fisher_mode_per_strategy():
    """``auto`` takes hooks where ranks hold whole parameters; explicit hooks under sharding is refused by name."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    from perta_lightning import distributed
    from perta_lightning.errors import PertaValueError

    whole = [SingleDeviceStrategy(torch.device("cpu")), DDPStrategy()]
    sharded = {"FSDPStrategy": FSDPStrategy(), "ModelParallelStrategy (FSDP2)": ModelParallelStrategy()}
    if importlib.util.find_spec("deepspeed"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        whole.append(DeepSpeedStrategy(stage=2))
        sharded["DeepSpeedStrategy (ZeRO stage 3)"] = DeepSpeedStrategy(stage=3)
    for strategy in whole:
        assert distributed.resolve_fisher_mode("auto", strategy) == "hooks"
        assert distributed.resolve_fisher_mode("loop", strategy) == "loop"
    for name, strategy in sharded.items():
        assert distributed.resolve_fisher_mode("auto", strategy) == "loop"
        with pytest.raises(PertaValueError, match=re.escape(name) + ".*fisher_mode='loop'"):
            distributed.resolve_fisher_mode("hooks", strategy)
    with pytest.raises(PertaValueError, match="'fast'"):
        distributed.resolve_fisher_mode("fast", whole[0])


def test_bad_fisher_mode_is_a_user_error(tmp_path):
    from perta_lightning.errors import PertaValueError
    from perta_lightning.modules.importance import ImportanceModule

    with pytest.raises(PertaValueError, match="fisher_mode.*'hook'"):
        ImportanceModule("unused", str(tmp_path), "fisher", fisher_mode="hook")
