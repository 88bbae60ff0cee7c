"""The ``perta`` command line.

``perta fit|validate|test|predict --config X.yaml`` are LightningCLI subcommands: the model and the
data module are chosen by ``class_path`` in the YAML, so any LightningModule of this package (or of
the user's) can be run. The other subcommands are plain typed functions parsed by jsonargparse:

* ``perta data synthetic``  write the synthetic fictitious-authors benchmark in the TOFU layout
* ``perta data muse-synthetic``  write the synthetic news corpus in the MUSE layout
* ``perta importance``      collect forget/retain importance at a fixed model (LightningCLI)
* ``perta merge``           streaming TV / PerTA merge of Hugging Face checkpoints
* ``perta summarize``       Forget Quality, Model Utility and sub-scores (TOFU), or VerbMem, KnowMem and
                            PrivLeak (MUSE), from evaluation files
* ``perta pipeline``        one seed of the study, end to end, with its report
* ``perta study``           the multi-seed study, PerTA's settings chosen on held-out seeds
* ``perta compare``         where two study runs part: kernels, then the first model whose bytes differ
* ``perta replication``     rewrite a finished study's replication table from its ``study.json``
* ``perta attack``          quantize or relearn a model directory and evaluate it: does its forgetting last?
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from perta_lightning.errors import PertaError

_LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# Function subcommands: name -> "module:function". Each function takes the remaining argv.
_FUNCTION_SUBCOMMANDS = {
    "data": "perta_lightning.benchmarks.registry:data_main",
    "importance": "perta_lightning.modules.importance:cli_main",
    "merge": "perta_lightning.merge:cli_main",
    "summarize": "perta_lightning.benchmarks.registry:summarize_main",
    "pipeline": "perta_lightning.study.pipeline:cli_main",
    "study": "perta_lightning.study.study:cli_main",
    "compare": "perta_lightning.provenance:compare_main",
    "replication": "perta_lightning.study.replication:main",
    "attack": "perta_lightning.study.attack_command:cli_main",
}


def lightning_main(args: list[str] | None = None) -> None:
    """Run LightningCLI with model and data chosen by ``class_path`` in the config."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from perta_lightning.launch import PertaCLI, lightning_session

    with lightning_session():
        PertaCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # Each stage writes the settings that made it beside its artifact (perta_hparams.json, the
            # evaluation's "settings"), so LightningCLI's own config.yaml in the working directory is not wanted.
            save_config_callback=None,
            args=list(args) if args is not None else sys.argv[1:],
            auto_configure_optimizers=True,
        )


def parse_function_config(path: str | Path) -> Any:
    """Parse (without running) a YAML config of a function subcommand, chosen by the file name's first word.

    ``merge*.yaml`` is checked by ``perta merge``'s parser, ``pipeline*.yaml`` by ``perta pipeline``'s, and so
    on: each such module has a ``build_parser()`` returning its jsonargparse parser. A qualifier may come first
    (``muse_study.yaml`` configures ``perta study``): the first word of the name that is a command counts.
    """
    path = Path(path)
    words = path.stem.replace("-", "_").replace(".", "_").split("_")
    command = next((word for word in words if word in _FUNCTION_SUBCOMMANDS), None)
    if command is None:
        raise ValueError(f"{path}: cannot tell which perta command it configures (name it <command>*.yaml)")
    module = importlib.import_module(_FUNCTION_SUBCOMMANDS[command].split(":")[0])
    return module.build_parser().parse_args(["--config", str(path)])


def _usage() -> str:
    names = ", ".join((*_LIGHTNING_SUBCOMMANDS, *_FUNCTION_SUBCOMMANDS))
    return f"usage: perta {{{names}}} [--help] ...\n\n{__doc__}"


#: OS errors that are the user's environment (a full disk, a folder that cannot be written), not bugs.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                       errno.EISDIR, errno.ENOTDIR, errno.EEXIST}


def user_error_message(error: BaseException) -> str | None:
    """The one-line message for a user error, or ``None`` when ``error`` is a bug (keep its traceback)."""
    seen = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:  # a user error wrapped by a library (jsonargparse)
        if isinstance(cause, PertaError):
            return str(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
        where = error.filename if error.filename is not None else "(no path given)"
        return f"{where}: {error.strerror or error}"
    return None


def rank_of_process(environ: Mapping[str, str] = os.environ) -> str | None:
    """Which process of a multi-process run this is, from the variables its launcher set (Lightning's own
    launcher, ``torchrun``, SLURM's ``srun``); ``None`` in a run of one process."""
    world = environ.get("WORLD_SIZE") or environ.get("SLURM_NTASKS")
    if world is None or not world.isdigit() or int(world) <= 1:
        return None
    for variable in ("RANK", "SLURM_PROCID"):
        if environ.get(variable, "").isdigit():
            return f"rank {environ[variable]} of {world}"
    return f"local rank {environ.get('LOCAL_RANK', '0')} of node {environ.get('NODE_RANK', '0')} ({world} in all)"


def run_command(command: str, work: Callable[[], Any]) -> Any:
    """Run ``work``; a user error becomes ``perta <command>: error: <message>`` and exit status 2.

    Bugs keep their traceback; ``PERTA_DEBUG=1`` keeps the traceback of user errors as well. In a process of a
    multi-process run every failure also names the rank it happened on, in one line: the other ranks are
    stopped by their launcher (Lightning's kills the whole group when a child exits non-zero), and that line is
    what tells the user which process it was.
    """
    try:
        return work()
    except SystemExit as exit_:
        rank = rank_of_process()
        where = f"{rank}: " if rank else ""
        if rank and exit_.code not in (0, None):
            print(f"perta {command}: error: {where}exited with status {exit_.code}", file=sys.stderr)
        raise
    except Exception as error:
        rank = getattr(error, "perta_rank", None) or rank_of_process()
        where = f"{rank}: " if rank else ""
        message = user_error_message(error)
        if message is None or os.environ.get("PERTA_DEBUG", "") not in ("", "0"):
            if rank:
                print(f"perta {command}: error: {where}{type(error).__name__}: {' '.join(str(error).split())}",
                      file=sys.stderr)
            raise
        print(f"perta {command}: error: {where}{' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    if command in _LIGHTNING_SUBCOMMANDS:
        run_command(command, lambda: lightning_main([command, *rest]))
        return
    if command not in _FUNCTION_SUBCOMMANDS:
        print(f"perta: error: unknown command {command!r}\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name, function_name = _FUNCTION_SUBCOMMANDS[command].split(":")
    run_command(command, lambda: getattr(importlib.import_module(module_name), function_name)(rest))


if __name__ == "__main__":
    main()
