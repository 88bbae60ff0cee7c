"""A callback that makes one rank fail, for the test that a dying rank fails the whole ``perta`` command fast.

Given on the command line as a user gives any callback:
``--trainer.callbacks+=tests.helpers.faults.FailOnRank --trainer.callbacks.rank 1``."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class FailOnRank(Callback):
    """Raise in ``setup`` on global rank ``rank``; every other rank carries on into the run."""

    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure on global rank {self.rank}")
