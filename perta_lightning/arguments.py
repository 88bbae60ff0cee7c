"""Commands' arguments: a jsonargparse parser made from a typed function's signature, the call, and
LightningCLI run on an argument list of our own.

``perta pipeline`` and ``perta study`` are plain functions whose typed signatures are their configuration
(nested dataclasses such as ``PertaVariant`` and ``AlphaSearch`` are read from YAML).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


def function_parser(function: Callable[..., Any], prog: str) -> Any:
    """A jsonargparse parser whose options are ``function``'s typed signature, plus ``--config``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=(function.__doc__ or "").splitlines()[0])
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(function, as_positional=False)
    return parser


def call_with_arguments(parser: Any, function: Callable[..., Any], argv: list[str]) -> Any:
    """Parse ``argv`` with ``parser``, build its dataclasses, and call ``function`` with the options."""
    args = parser.instantiate_classes(parser.parse_args(argv))
    return function(**{key: value for key, value in vars(args).items()
                       if key != "config" and not key.startswith("__")})


@contextlib.contextmanager
def as_command_line(args: list[str]) -> Iterator[None]:
    """Hand ``args`` to LightningCLI as its own command line (it warns when given both ``args`` and a
    ``sys.argv``), with the dependency noise that teaches a user nothing muted."""
    from perta_lightning.callbacks.progress import quiet_dependencies

    saved = sys.argv
    sys.argv = [saved[0] if saved else "perta"]
    try:
        with quiet_dependencies():
            yield
    finally:
        sys.argv = saved
