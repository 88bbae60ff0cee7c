"""``perta test --config configs/demo/eval.yaml`` runs end to end (paths pointed at a tiny model)."""

import json
from pathlib import Path

import yaml

from perta_lightning.cli import main
from tests.tiny import make_tiny_setup

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "eval.yaml"


def test_demo_eval_config_runs(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    assert config["model"]["class_path"] == "perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator"
    assert config["data"]["class_path"] == "perta_lightning.benchmarks.tofu.evaluation.TofuEvalDataModule"
    data, model = make_tiny_setup(tmp_path)
    out = tmp_path / "eval.json"
    main(["test", "--config", str(CONFIG),
          f"--trainer.default_root_dir={tmp_path}",
          f"--model.init_args.model={model}", f"--model.init_args.output_json={out}",
          "--model.init_args.max_new_tokens=4",
          f"--data.init_args.source.path={data}",
          "--data.init_args.max_examples=3"])
    result = json.loads(out.read_text())
    assert result["splits"]["forget"] == "forget10_perturbed"
    assert len(result["examples"]["forget"]["index"]) == 3
    assert result["aggregates"]["model_utility"] is not None
