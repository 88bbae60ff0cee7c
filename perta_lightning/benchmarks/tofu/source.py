"""TOFU's splits: where they come from (the hub, a local folder, a file per split or the synthetic generator).

A TOFU split is a list of rows with at least ``question`` and ``answer``; the ``*_perturbed`` splits add
``paraphrased_answer``, ``paraphrased_question`` and ``perturbed_answer`` (a list of wrong answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from perta_lightning.benchmarks.tofu.synthetic import SyntheticSpec, generate_benchmark
from perta_lightning.data.sources import SplitSource
from perta_lightning.errors import PertaValueError

#: Columns every split must have.
BASE_COLUMNS = ("question", "answer")


@dataclass
class TofuSource(SplitSource):
    """Where TOFU-format splits come from: exactly one of ``path``, ``hub`` or ``synthetic``; or ``files``,
    alone or beside ``path``.

    Args:
        path: a local folder holding ``<split>.json`` files (JSON lines or a JSON list), such as the one
            ``perta data synthetic`` writes.
        files: a file per split, e.g. ``{forget10: /x/f.json, retain90: /y/r.jsonl}`` (same formats as in
            ``path``). A split named here is read from its file; any other from ``path`` when it is given.
        hub: a Hugging Face dataset id, e.g. ``locuslab/TOFU``; the split name is the hub config name.
        hub_revision: optional revision (commit or tag) of the hub dataset, for reproducibility.
        synthetic: generate the seeded synthetic benchmark in memory.
    """

    benchmark = "TOFU"

    synthetic: SyntheticSpec | None = None

    def generate(self) -> dict[str, list[dict[str, Any]]]:
        return generate_benchmark(self.synthetic)

    def hub_rows(self, split: str) -> list[dict[str, Any]]:
        import datasets  # imported lazily: only hub users pay for it

        dataset = datasets.load_dataset(self.hub, split, split="train", revision=self.hub_revision)
        return [dict(row) for row in dataset]

    def check_rows(self, rows: list[dict[str, Any]], split: str, where: str,
                   required: Sequence[str] = BASE_COLUMNS) -> None:
        """Refuse an empty split or one without a ``required`` column."""
        super().check_rows(rows, split, where)
        for column in required:
            missing = [index for index, row in enumerate(rows) if column not in row]
            if missing:
                raise PertaValueError(f"{where}: column {column!r} is missing (first in row {missing[0]})")

    def describe_generator(self) -> str:
        return f"synthetic(num_authors={self.synthetic.num_authors}, seed={self.synthetic.seed})"


def load_split(source: TofuSource, split: str, required: Sequence[str] = BASE_COLUMNS) -> list[dict[str, Any]]:
    """One TOFU split as row dicts, checked to be non-empty and to have the ``required`` columns."""
    rows = source.read(split)
    source.check_rows(rows, split, source.describe(split), required)
    return rows
