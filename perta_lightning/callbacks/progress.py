"""Progress a person can watch: a bar on a terminal, plain periodic lines in logs; dependency noise muted.

``progress_bar()`` gives Lightning's tqdm bar when standard output is a terminal and a
:class:`LineProgressBar` otherwise (CI, log files, ``| tee``), which never writes a carriage return.
``quiet_dependencies()`` mutes what teaches a user nothing (Lightning's "GPU available" lines and tips,
transformers' per-load bars, a torch deprecation inside Lightning); real warnings stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class LineProgressBar(ProgressBar):
    """Lightning progress as plain lines, at most one every ``interval`` seconds, plus one at each epoch end.

    Args:
        interval: seconds between two lines within an epoch or an evaluation.
        indent: printed before each line.
    """

    def __init__(self, interval: float = 15.0, indent: str = "    ") -> None:
        super().__init__()
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self.interval, self.indent = interval, indent
        self._enabled = True
        self._last = time.monotonic()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _say(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self._enabled and (force or now - self._last >= self.interval):
            self._last = now
            print(f"{self.indent}{text}", file=sys.stdout, flush=True)

    def _train_line(self, trainer: Any) -> str:
        loss = trainer.callback_metrics.get("train_loss")
        loss_text = f", loss {float(loss):.4f}" if loss is not None else ""
        return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}{loss_text}"

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        total = trainer.num_training_batches
        self._say(f"{self._train_line(trainer)}, batch {batch_idx + 1}/{total}")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        self._say(self._train_line(trainer), force=last)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        totals = trainer.num_test_batches
        total = totals[dataloader_idx] if isinstance(totals, list) else totals
        self._say(f"evaluating set {dataloader_idx + 1}/{len(totals) if isinstance(totals, list) else 1}, "
                  f"batch {batch_idx + 1}/{total}")


def progress_bar(interval: float = 15.0) -> ProgressBar:
    """Lightning's tqdm bar on a terminal, :class:`LineProgressBar` when standard output is not one."""
    return TQDMProgressBar() if sys.stdout.isatty() else LineProgressBar(interval)


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Mute dependency messages a user cannot act on, for the duration of the block."""
    lightning_logs = [logging.getLogger(name) for name in
                      ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                       "lightning.fabric.utilities.seed")]
    levels = [log.level for log in lightning_logs]
    bars = None
    try:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        hf_logging = None
    for log in lightning_logs:
        log.setLevel(logging.WARNING)
    # DeepSpeed, when a dependency imports it, warns that it falls back to the CPU; on a machine without
    # CUDA that is the only choice, so name it and spare the warning (a user's own setting is kept)
    import torch

    accelerator_set = "DS_ACCELERATOR" in os.environ
    if not accelerator_set and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        if not accelerator_set:
            os.environ.pop("DS_ACCELERATOR", None)
        for log, level in zip(lightning_logs, levels):
            log.setLevel(level)
        if hf_logging is not None and bars:
            hf_logging.enable_progress_bar()
