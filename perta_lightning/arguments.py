"""Commands' arguments: a jsonargparse parser made from a typed function's signature, and the call.

``perta pipeline`` and ``perta study`` are plain functions whose typed signatures are their configuration
(nested dataclasses such as ``PertaVariant`` and ``AlphaSearch`` are read from YAML).
"""

from __future__ import annotations

from collections.abc import Callable
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
