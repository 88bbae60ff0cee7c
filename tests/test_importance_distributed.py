"""Importance with 2 CPU processes under every supported strategy equals the single-process result.

Each case launches ``tests/scripts/run_importance.py`` (Lightning starts the second process), which
writes ``grad`` and ``fisher`` by example (``fisher_mode='auto'``: hooks under DDP and ZeRO-2, the
per-example loop under FSDP, FSDP2 and ZeRO-3); ``fisher`` is compared with the one-process loop; about 20-50 s a case on 2 cores (DeepSpeed compiles a
communication op on first use, about a minute, once per machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import CPU
from tests.test_importance import assert_close_stats

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["ddp", "fsdp_flat", "fsdp_orig", "fsdp2", "zero2", "zero3"]
BY_HOOKS = {"ddp", "zero2"}  # ranks hold whole parameters


@pytest.fixture(scope="module")
def single_process_loop(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """``fisher`` by the per-example loop (one backward per example), one process."""
    from perta_lightning.data.tofu import TofuSource
    from perta_lightning.modules.importance import estimate_importance

    return estimate_importance(str(tiny_assets["model"]), TofuSource(path=str(tiny_assets["data"])),
                               str(tmp_path_factory.mktemp("loop")), "fisher", "example", "loop", batch_size=3,
                               trainer_kwargs=CPU)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_equal_one(strategy, tiny_assets, single_process, single_process_loop, tmp_path):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(ROOT / "tests/scripts/run_importance.py"), strategy,
               str(tiny_assets["model"]), str(tiny_assets["data"]), str(tmp_path)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for split in ("forget", "retain"):
        assert_close_stats(load_file(tmp_path / "grad" / f"{split}.safetensors"),
                           load_file(single_process["grad"][split]))
        fisher = tmp_path / "fisher" / f"{split}.safetensors"
        assert_close_stats(load_file(fisher), load_file(single_process_loop[split]))
        with safe_open(str(fisher), "pt") as handle:
            convention = handle.metadata()["loss_convention"]
        assert convention == ("example_losses" if strategy in BY_HOOKS else "one_example")
    if strategy in ("fsdp_flat", "fsdp2", "zero3"):
        # the fine-tuning module saves gathered full weights, not this rank's shard
        saved, original = load_file(tmp_path / "saved" / "model.safetensors"), load_file(
            Path(tiny_assets["model"]) / "model.safetensors")
        assert saved.keys() == original.keys()
        for name, tensor in original.items():
            assert saved[name].shape == tensor.shape and saved[name].equal(tensor), name
