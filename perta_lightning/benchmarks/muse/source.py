"""Where MUSE's splits come from: the hub (``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books``), a local folder in
MUSE's ``<config>/<split>.json`` layout, a file per split, or the seeded synthetic news generator
(:mod:`perta_lightning.benchmarks.muse.splits` has the layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from perta_lightning.benchmarks.muse.splits import MUSE_SPLITS, check_rows, check_split_name
from perta_lightning.benchmarks.muse.synthetic import MuseSyntheticSpec, generate_muse_benchmark
from perta_lightning.data.sources import SplitSource
from perta_lightning.errors import PertaValueError


@dataclass
class MuseSource(SplitSource):
    """Where MUSE-format splits come from: exactly one of ``path``, ``hub`` or ``synthetic``; or ``files``,
    alone or beside ``path``.

    Args:
        path: a local folder holding ``<config>/<split>.json`` files (JSON lines or a JSON list), such as the
            one ``perta data muse-synthetic`` writes.
        files: a file per split, e.g. ``{raw/forget: /x/forget.jsonl}`` (same formats as in ``path``). A split
            named here is read from its file; any other from ``path`` when it is given.
        hub: a Hugging Face dataset id, e.g. ``muse-bench/MUSE-News``; ``raw/forget`` is config ``raw``, split
            ``forget``.
        hub_revision: optional revision (commit or tag) of the hub dataset, for reproducibility.
        synthetic: generate the seeded synthetic news benchmark in memory.
    """

    benchmark = "MUSE"

    synthetic: MuseSyntheticSpec | None = None

    def check_split(self, split: str, where: str) -> None:
        check_split_name(split, where)

    def generate(self) -> dict[str, list[dict[str, Any]]]:
        return generate_muse_benchmark(self.synthetic)

    def hub_rows(self, split: str) -> list[dict[str, Any]]:
        if split not in MUSE_SPLITS:
            raise PertaValueError(
                f"{self.describe(split)}: {split!r} is written by the synthetic generator only; the MUSE hub "
                "datasets have no such split"
            )
        import datasets  # imported lazily: only hub users pay for it

        config, _, name = split.partition("/")
        dataset = datasets.load_dataset(self.hub, config, split=name, revision=self.hub_revision)
        return [dict(row) for row in dataset]

    def check_rows(self, rows: list[dict[str, Any]], split: str, where: str) -> None:
        check_rows(rows, split, where)

    def describe_generator(self) -> str:
        return f"muse-synthetic(num_articles={self.synthetic.num_articles}, seed={self.synthetic.seed})"
