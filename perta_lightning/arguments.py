"""Commands' arguments: a jsonargparse parser made from a typed function's signature, and the call.

``perta pipeline`` and ``perta study`` are plain functions whose typed signatures are their configuration
(nested dataclasses such as ``PertaVariant`` and ``AlphaSearch`` are read from YAML). What both share is one
dataclass, :class:`~perta_lightning.study.options.RunOptions`, whose fields are top-level keys of their configs
beside the function's own; the function receives it built as its ``options``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any


def function_parser(function: Callable[..., Any], prog: str, options_class: type | None = None) -> Any:
    """A jsonargparse parser whose options are ``function``'s typed signature, plus ``--config``; with
    ``options_class``, that dataclass's fields too, at the top level (``function`` takes it as ``options``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=(function.__doc__ or "").splitlines()[0])
    parser.add_argument("--config", action="config")
    if options_class is not None:
        parser.add_class_arguments(options_class, nested_key=None, as_group=True)
    parser.add_function_arguments(function, as_positional=False, skip={"options"})
    return parser


def call_with_arguments(parser: Any, function: Callable[..., Any], argv: list[str],
                        options_class: type | None = None) -> Any:
    """Parse ``argv`` with ``parser``, build its dataclasses, and call ``function`` with the options."""
    args = parser.instantiate_classes(parser.parse_args(argv))
    values = {key: value for key, value in vars(args).items() if key != "config" and not key.startswith("__")}
    if options_class is not None:
        names = {f.name for f in fields(options_class)}
        values["options"] = options_class(**{name: values.pop(name) for name in names if name in values})
    return function(**values)
