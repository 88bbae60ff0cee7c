import json
import math

import pytest
import torch
import yaml

from perta_lightning.cli import main
from perta_lightning.functional.losses import answer_nll, example_nll, token_nll


def test_answer_nll_by_hand():
    # vocabulary of 2, uniform logits except one confident position
    logits = torch.zeros(1, 4, 2)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0)])  # p(token 1) = 3/4 at position 1
    labels = torch.tensor([[-100, -100, 1, 0]])  # answer tokens are predicted from positions 1 and 2
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert answer_nll(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    total, count = example_nll(logits, labels)
    assert count.tolist() == [2] and total.item() == pytest.approx(2 * expected, rel=1e-6)
    assert token_nll(logits, labels)[0, 0].item() == 0.0
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_nll(logits, torch.full((1, 4), -100))


def write_config(path, **sections):
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def test_two_step_fit_from_scratch_then_from_pretrained(tiny_benchmark, tmp_path):
    from transformers import AutoModelForCausalLM

    from perta_lightning.data.formatting import load_tokenizer
    from tests.tiny import tiny_model_config

    tokenizer_dir = str(tiny_benchmark / "tokenizer")
    trainer = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False)
    data = {"class_path": "perta_lightning.data.datamodule.TofuDataModule",
            "init_args": {"source": {"path": str(tiny_benchmark)}, "prompt": {"tokenizer": tokenizer_dir},
                          "train_split": ["full", "world_corpus"], "batch_size": 4}}
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}
    lr_scheduler = {"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"total_iters": 2}}
    scratch = {"class_path": "perta_lightning.modules.finetune.CausalLMModule",
               "init_args": {"model_config": tiny_model_config(load_tokenizer(tokenizer_dir)),
                             "tokenizer": tokenizer_dir, "output_dir": str(tmp_path / "base"),
                             "optimizer": optimizer, "lr_scheduler": lr_scheduler}}
    main(["fit", "--config", write_config(tmp_path / "a.yaml", seed_everything=0, trainer=trainer, model=scratch,
                                           data=data)])
    base = tmp_path / "base"
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()
    made_by = json.loads((base / "perta_hparams.json").read_text())
    assert made_by["trainer"]["global_step"] == 2 and made_by["data"]["train_split"] == ["full", "world_corpus"]
    assert "lr=0.01" in made_by["optimizer"] and "LinearLR" in made_by["lr_scheduler"]

    tuned = {"class_path": "perta_lightning.modules.finetune.CausalLMModule",
             "init_args": {"model": str(base), "output_dir": str(tmp_path / "full"), "optimizer": optimizer}}
    data["init_args"].update(prompt={"tokenizer": str(base)}, train_split="forget10")
    main(["fit", "--config", write_config(tmp_path / "b.yaml", seed_everything=0, trainer=trainer, model=tuned,
                                           data=data)])
    before = AutoModelForCausalLM.from_pretrained(base)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    changed = [name for name, p in after.named_parameters() if not torch.equal(p, before.get_parameter(name))]
    assert len(changed) == len(list(after.parameters()))
    assert not any(name.startswith(".") for name in (p.name for p in tmp_path.iterdir()))


def test_module_rejects_ambiguous_model():
    from perta_lightning.modules.finetune import CausalLMModule

    with pytest.raises(ValueError, match="exactly one of"):
        CausalLMModule()
