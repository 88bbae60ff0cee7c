"""How a ``perta`` command starts Lightning, on one process or on many.

Lightning's own launcher (``--trainer.devices N`` without ``torchrun`` or SLURM) starts local ranks 1..N-1 by
re-executing this process's command line, ``sys.argv``, with ``LOCAL_RANK`` set. So ``sys.argv`` stays exactly
what the user typed (``perta fit --config ...`` or ``python -m perta_lightning fit ...``) for as long as
a Trainer may launch, and each rank parses the same arguments in the same working directory. LightningCLI is
handed perta's own argument list (the words after the subcommand, for ``perta importance``), which
:class:`PertaCLI` parses without comparing it with ``sys.argv``.

On the way out, every rank leaves its process group (an undestroyed gloo group can abort the interpreter at
exit: ``terminate called without an active exception``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

#: Class paths that moved when each benchmark got its own folder: a config written before names the old one.
MOVED = {
    "perta_lightning.evaluate.TofuEvaluator": "perta_lightning.benchmarks.tofu.evaluator.TofuEvaluator",
    "perta_lightning.data.evaluation.TofuEvalDataModule": "perta_lightning.benchmarks.tofu.evaluation.TofuEvalDataModule",
    "perta_lightning.muse_evaluate.MuseEvaluator": "perta_lightning.benchmarks.muse.evaluator.MuseEvaluator",
    "perta_lightning.data.muse_evaluation.MuseEvalDataModule":
        "perta_lightning.benchmarks.muse.evaluation.MuseEvalDataModule",
}


def check_moved_class_paths(args: list[str]) -> None:
    """Refuse, naming the new path, a command line or ``--config`` file that names a class by its old path."""
    from pathlib import Path

    from perta_lightning.errors import PertaValueError

    texts = []
    for index, arg in enumerate(args):
        texts.append((arg, "the command line"))
        path = args[index + 1] if arg == "--config" and index + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path is not None and Path(path).is_file():
            texts.append((Path(path).read_text(errors="replace"), path))
    for text, where in texts:
        for old, new in MOVED.items():
            if old in text:
                raise PertaValueError(f"{where}: class_path {old} has moved to {new}")


class NameTheFailingRank(Callback):
    """Marks an exception raised during a run of several processes with the rank it was raised on
    (``exception.perta_rank``), which ``perta``'s error line prints: the variables a launcher sets are gone by
    then (Lightning's teardown removes ``WORLD_SIZE``)."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.world_size > 1 and not hasattr(exception, "perta_rank"):
            exception.perta_rank = f"rank {trainer.global_rank} of {trainer.world_size}"


class PertaCLI(LightningCLI):
    """LightningCLI on an argument list perta has split off its command line; ``sys.argv`` is left alone for
    Lightning's launcher to re-execute (LightningCLI would warn that both are given). Every Trainer it builds
    names the rank of a failure (:class:`NameTheFailingRank`)."""

    def __init__(self, *args: Any, trainer_defaults: dict[str, Any] | None = None, **kwargs: Any) -> None:
        defaults = dict(trainer_defaults or {})
        given = defaults.get("callbacks", [])
        defaults["callbacks"] = [*(given if isinstance(given, list) else [given]), NameTheFailingRank()]
        super().__init__(*args, trainer_defaults=defaults, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        check_moved_class_paths([str(arg) for arg in args])
        self.config = parser.parse_args(args)


@contextlib.contextmanager
def process_group_closed_at_exit() -> Iterator[None]:
    """Destroy the default process group when the block ends, whether it returns or raises."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):  # a peer already gone must not mask the block's own error
                dist.destroy_process_group()


@contextlib.contextmanager
def lightning_session() -> Iterator[None]:
    """The block a command's LightningCLI and Trainer run in: dependency noise muted, and the process group
    left on the way out."""
    from perta_lightning.callbacks.progress import quiet_dependencies

    with process_group_closed_at_exit(), quiet_dependencies():
        yield
