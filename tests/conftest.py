from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_assets import make_tiny_assets

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny TOFU folder (forget10: 7 rows, retain90: 9 rows) and a tiny Llama with its tokenizer."""
    return make_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def single_process(tiny_assets, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """``grad`` and ``fisher`` (by example) at the tiny model, one process, batch size 3."""
    from perta_lightning.data.tofu import TofuSource
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
