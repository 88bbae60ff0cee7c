"""``scripts/gpu_check.sh``: its figures, its comparison rule, and the CPU dry run end to end.

The dry run starts a ``perta`` command for each part and strategy (two processes each) and a tiny study: about 2-5 minutes on 2 busy
cores, so it is marked ``slow``; the rest runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def test_max_relative_difference_by_hand():
    expected = {"a": torch.tensor([1.0, -4.0]), "b": torch.zeros(3)}
    actual = {"a": torch.tensor([1.5, -4.0]), "b": torch.zeros(3)}
    figures = gpu_check.max_relative_difference(actual, expected)
    assert figures == {"max_rel_diff": 0.125, "worst_tensor": "a", "tensors": 2}  # 0.5 / 4
    assert gpu_check.max_relative_difference(expected, expected)["max_rel_diff"] == 0.0


@pytest.mark.parametrize("broken, message", [
    ({"a": torch.ones(2)}, "keys differ"),
    ({"a": torch.ones(3), "b": torch.zeros(3)}, "shape"),
    ({"a": torch.tensor([1.0, float("nan")]), "b": torch.zeros(3)}, "non-finite"),
])
def test_max_relative_difference_refuses_mismatches(broken, message):
    with pytest.raises(ValueError, match=message):
        gpu_check.max_relative_difference(broken, {"a": torch.ones(2), "b": torch.zeros(3)})


def test_strategies_are_the_real_ones_on_gpu_and_the_stand_ins_on_cpu():
    assert gpu_check.strategy_config("single", cpu=False) is None
    assert gpu_check.strategy_config("deepspeed_zero3", cpu=False) == {
        "class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 3}}
    assert gpu_check.strategy_config("deepspeed_zero3", cpu=True)["class_path"] == \
        "perta_lightning.distributed.CPUDeepSpeedStrategy"
    assert gpu_check.strategy_config("fsdp", cpu=False)["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert gpu_check.strategy_config("fsdp", cpu=True)["class_path"] == "perta_lightning.distributed.CPUFSDPStrategy"
    with pytest.raises(ValueError, match="zero2"):
        gpu_check.strategy_config("zero2", cpu=True)


def test_parts_are_perta_commands_on_every_device(tmp_path):
    """Each part is a ``perta`` command line with the strategy in a second config file, on every device."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "forget10.json").write_text('{"question": "q", "answer": "a"}\n')
    for part, count in (("importance", 2), ("finetune", 1)):
        commands = gpu_check.perta_command(part, "fsdp", tmp_path / "model", data, tmp_path / part, dry_run=True)
        assert len(commands) == count
        for command in commands:
            assert command[1:4] == ["-m", "perta_lightning", "fit" if part == "finetune" else "importance"]
            assert command[command.index("--trainer.devices") + 1] == "2"
            strategy = json.loads(Path(command[command.index("--config", 5) + 1]).read_text())
            assert strategy["trainer"]["strategy"]["class_path"] == "perta_lightning.distributed.CPUFSDPStrategy"
    single = gpu_check.perta_command("importance", "single", tmp_path / "model", data, tmp_path / "s", dry_run=True)
    assert all(c[c.index("--trainer.devices") + 1] == "1" and c.count("--config") == 1 for c in single)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_full_check_refuses_and_says_so(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--output", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--dry-run" in json.loads(out.read_text())["error"]


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "figures" / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--output", str(out)],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["ok"] and figures["dry_run"] and figures["failed"] == []
    parts = figures["parts"]
    assert set(parts) == {"model", "study", *(f"{p}/{s}" for p in ("importance", "finetune")
                                               for s in ("single", "deepspeed_zero3", "fsdp"))}
    for part in ("importance", "finetune"):
        for strategy in ("deepspeed_zero3", "fsdp"):
            assert parts[f"{part}/{strategy}"]["max_rel_diff"] < 1e-4, (part, strategy)
    assert parts["finetune/fsdp"]["update"]["max_rel_diff"] < 1e-3
    study = parts["study"]
    assert study["complete"] and study["stages_done"] > 0
    assert {row["method"] for row in study["rows"]} >= {"retain", "target", "tv", "perta_fisher_b16"}
    assert all(part["seconds"] > 0 for part in parts.values())
