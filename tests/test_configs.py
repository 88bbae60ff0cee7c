"""Every YAML under configs/ parses against the signatures it configures (classes are not instantiated)."""

from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


class ParseOnlyCLI(LightningCLI):
    def instantiate_classes(self) -> None:  # validate types and class paths, build nothing
        pass


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_parses(config):
    import yaml

    content = yaml.safe_load(config.read_text())
    if "trainer" in content:
        cli = ParseOnlyCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           run=False, args=["--config", str(config)])
        assert cli.config["model"]["class_path"].startswith("perta_lightning.")
    else:
        from perta_lightning.cli import parse_function_config

        parse_function_config(config)
