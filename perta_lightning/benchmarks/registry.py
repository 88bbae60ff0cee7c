"""The benchmarks by name: the one place a benchmark's name is looked up.

:data:`BENCHMARKS` maps the name a config gives (``benchmark: muse``) to the :class:`~perta_lightning.benchmarks.base.Benchmark`
that implements it; adding a benchmark is its own folder beside ``tofu/`` and ``muse/`` and one entry here (or,
outside this package, the import path of its class in the config: ``benchmark: my_package.MyBenchmark``).
``perta data`` and ``perta summarize`` dispatch through it too.
"""

from __future__ import annotations

import json
from typing import Any

from perta_lightning.benchmarks.base import Benchmark
from perta_lightning.benchmarks.muse.benchmark import MuseBenchmark
from perta_lightning.benchmarks.tofu.benchmark import TofuBenchmark
from perta_lightning.errors import PertaValueError

BENCHMARKS: dict[str, Benchmark] = {"tofu": TofuBenchmark(), "muse": MuseBenchmark()}


def benchmark(name: str | Benchmark) -> Benchmark:
    """The benchmark called ``name``: a name of :data:`BENCHMARKS`, or the import path of a
    :class:`Benchmark` subclass of your own (``my_package.benchmarks.MyBenchmark``); a :class:`Benchmark` is
    returned as it is. Anything else is refused, listing the known names."""
    if isinstance(name, Benchmark):
        return name
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    module, _, attribute = name.rpartition(".")
    if module:
        import importlib

        try:
            found = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise PertaValueError(f"benchmark: cannot import {name!r} ({error})") from error
        if isinstance(found, type) and issubclass(found, Benchmark):
            return found()
        raise PertaValueError(f"benchmark: {name!r} is not a subclass of perta_lightning.benchmarks.base.Benchmark")
    raise PertaValueError(f"benchmark must be one of {sorted(BENCHMARKS)} or the import path of a Benchmark "
                          f"subclass, got {name!r}")


def benchmark_of(record: dict[str, Any]) -> Benchmark:
    """The benchmark a result file (a study's settings, a replication table) names; files written before MUSE
    existed name none and are TOFU's."""
    return benchmark(record.get("benchmark", "tofu"))


def check_source_options(chosen: Benchmark, given: dict[str, Any]) -> Any:
    """The source given for ``chosen`` (``None``: its synthetic data); a source option of another benchmark is
    refused, naming the benchmark it belongs to."""
    for option, value in given.items():
        if value is None or option == chosen.source_option:
            continue
        owners = [b.name for b in BENCHMARKS.values() if b.source_option == option]
        hint = f"; set benchmark: {owners[0]}" if owners else ""
        raise PertaValueError(f"{option}= is given but benchmark is {chosen.name!r}, which takes "
                              f"{chosen.source_option}={hint}")
    return given.get(chosen.source_option)


def data_main(argv: list[str]) -> None:
    """``perta data <command> ...``: write a benchmark's synthetic data (each benchmark's ``data_command``)."""
    from jsonargparse import ArgumentParser

    commands = {b.data_command: b for b in BENCHMARKS.values() if b.data_command is not None}
    parser = ArgumentParser(prog="perta data", description="Data preparation commands.")
    subcommands = parser.add_subcommands(dest="command")
    for name, owner in commands.items():
        function = owner.data_function()
        sub = ArgumentParser(description=function.__doc__.splitlines()[0])
        sub.add_function_arguments(function)
        sub.add_argument("--config", action="config")
        subcommands.add_subcommand(name, sub)
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args[args.command]).items() if k != "config" and not k.startswith("__")}
    commands[args.command].data_function()(**options)


def summarize(ckpt_result: str, retain_result: str) -> dict[str, Any]:
    """The summary of an evaluation file against the retain model's, by the benchmark the file belongs to:
    Forget Quality, Model Utility and the 12 sub-scores (TOFU), or VerbMem, KnowMem, PrivLeak and the forget
    score (MUSE)."""
    owner = next((b for b in BENCHMARKS.values() if b.is_evaluation(ckpt_result)), BENCHMARKS["tofu"])
    return owner.summarize(ckpt_result, retain_result)


def summarize_main(argv: list[str]) -> None:
    """``perta summarize --ckpt_result A.json --retain_result B.json``: print the summary as one JSON object."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="perta summarize", description=summarize.__doc__)
    parser.add_function_arguments(summarize)
    args = parser.parse_args(argv)
    print(json.dumps(summarize(args.ckpt_result, args.retain_result), indent=2, allow_nan=False))
