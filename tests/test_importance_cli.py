"""``perta importance --config``: the shipped YAML parses, and the command writes both files."""

from __future__ import annotations

from pathlib import Path

import yaml

from perta_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_runs_on_tiny_assets(tiny_assets, tmp_path):
    config = yaml.safe_load((ROOT / "configs/demo/importance.yaml").read_text())
    config["model"]["init_args"].update(model=str(tiny_assets["model"]), output_dir=str(tmp_path / "out"))
    config["data"]["init_args"].update(source={"path": str(tiny_assets["data"])})
    config["trainer"]["enable_progress_bar"] = False
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    main(["importance", "--config", str(tmp_path / "c.yaml")])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["forget.safetensors",
                                                                                "retain.safetensors"]
