"""Shared fixtures: a tiny synthetic benchmark with its tokenizer, and a tiny Llama saved as a HF dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from perta_lightning.benchmarks.tofu.synthetic import SyntheticSpec, write_benchmark
from tests.tiny import make_tiny_assets, write_tiny_model


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip without CUDA; ``slow`` tests skip unless PERTA_RUN_SLOW=1."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if os.environ.get("PERTA_RUN_SLOW") != "1":
        skips["slow"] = pytest.mark.skip(reason="slow: set PERTA_RUN_SLOW=1 to run")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tofu_reference() -> Path:
    """The real TOFU files in ../shared/tofu_reference (or $PERTA_TOFU_REFERENCE); skip when absent."""
    where = Path(os.environ.get("PERTA_TOFU_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "tofu_reference"))
    if not (where / "llama2-7b_full.eval_log_aggregated.json").is_file():
        pytest.skip(f"TOFU reference files not found in {where}")
    return where


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    """A 10-author synthetic benchmark with a 320-token BPE tokenizer in ``<dir>/tokenizer``."""
    out = tmp_path_factory.mktemp("bench") / "data"
    spec = SyntheticSpec(num_authors=10, seed=0, num_background_authors=2, num_world_items=8)
    return write_benchmark(spec, str(out), tokenizer_vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_benchmark, tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama with the benchmark's tokenizer, saved as a HF directory."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", tiny_benchmark / "tokenizer")

# ---- importance: a tiny local TOFU folder and model, and single-process importance at it

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny TOFU folder (forget10: 7 rows, retain90: 9 rows) and a tiny Llama with its tokenizer."""
    return make_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def single_process(tiny_assets, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """``grad`` and ``fisher`` (by example) at the tiny model, one process, batch size 3."""
    from perta_lightning.benchmarks.tofu.source import TofuSource
    from perta_lightning.modules.importance import estimate_importance

    root = tmp_path_factory.mktemp("importance")
    source = TofuSource(path=str(tiny_assets["data"]))
    return {
        statistic: estimate_importance(
            str(tiny_assets["model"]), source, str(root / statistic), statistic, "example", batch_size=3,
            trainer_kwargs=CPU,
        )
        for statistic in ("grad", "fisher")
    }
