"""The evaluator's torchmetrics classes, driven from a plain LightningModule's validation step on 1 and 2 processes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from lightning_metrics import expected, validate  # noqa: E402

from perta_lightning.benchmarks.metrics import MinKMiaAUC
from perta_lightning.benchmarks.tofu.evaluator import TofuEvaluator
from perta_lightning.benchmarks.tofu.metrics import TofuSetMetrics, TruthRatio
from tests.processes import run_helper  # noqa: E402


def test_evaluator_aggregates_with_these_classes():
    evaluator = TofuEvaluator("unused-until-setup")
    assert isinstance(evaluator.mia, MinKMiaAUC)
    from perta_lightning.benchmarks.tofu.sets import EVAL_SET_BY_NAME

    forget = TofuSetMetrics(EVAL_SET_BY_NAME["forget"])
    assert isinstance(forget["truth_ratio"], TruthRatio) and forget["truth_ratio"].closer_to_one


def test_user_module_one_process():
    values, _ = validate(1)
    for key, value in expected().items():
        assert values[key] == pytest.approx(value, abs=1e-6), key  # logged as float32 by Lightning


@pytest.mark.distributed
def test_user_module_two_processes(tmp_path):
    """13 rows (7 forget, 6 holdout) in batches of 2 on 2 ranks: DistributedSampler pads rank 1 by repeating
    row 0; the metrics drop the repeat by index and give the one-process values."""
    out = tmp_path / "ddp.json"
    result = run_helper("lightning_metrics.py", out, 2, out=out)
    assert result["world_size"] == 2
    one, _ = validate(1)
    for key, value in expected().items():
        assert result["values"][key] == pytest.approx(value, abs=1e-6), key
        assert result["values"][key] == one[key], key
