"""Where a benchmark's splits come from: one base class for every benchmark's source, and the JSON-lines reader.

A source is exactly one of a local folder (``path``), a file per split (``files``, alone or beside ``path``),
a Hugging Face dataset (``hub``, optionally at ``hub_revision``) or a seeded generator (``synthetic``, its
spec). :class:`SplitSource` holds what every benchmark's source shares: the checks of those options, where a
split's file is, how a split is described in messages, and reading a split (file, generator or hub) and
checking its rows. A benchmark's source says what is its own: its name in messages, its split names, how the
hub lays its splits out, its generator and the checks of its rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from perta_lightning.errors import PertaFileNotFoundError, PertaValueError


def read_json_rows(file: Path) -> list[dict[str, Any]]:
    """The rows of a split file: a JSON list of objects, or JSON lines (one object a line)."""
    text = file.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise PertaValueError(f"{file}: not valid JSON: {error}") from error
    else:
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise PertaValueError(f"{file}: line {line_number} is not valid JSON: {error}") from error
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise PertaValueError(f"{file}: every row must be a JSON object")
    return rows


@dataclass
class SplitSource:
    """The options every benchmark's source has; subclasses set :attr:`benchmark` and the hooks below."""

    #: The benchmark's name in messages (``TOFU``, ``MUSE``).
    benchmark: ClassVar[str] = "benchmark"

    path: str | None = None
    files: dict[str, str] | None = None
    hub: str | None = None
    hub_revision: str | None = None
    synthetic: Any = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        given = [option for option in ("path", "hub", "synthetic") if getattr(self, option) is not None]
        if self.files is not None:
            if given not in ([], ["path"]):
                raise PertaValueError(f"{name}: files= goes alone or beside path=, not beside {given[-1]}=")
            if not isinstance(self.files, dict) or not self.files:
                raise PertaValueError(f"{name}: files= must map split names to files, got {self.files!r}")
            for split, file in self.files.items():
                if not isinstance(split, str) or not split:
                    raise PertaValueError(f"{name}: files[{split!r}] must name a split")
                self.check_split(split, f"{name} files=")
                if not isinstance(file, (str, os.PathLike)) or not str(file):
                    raise PertaValueError(f"{name}: files[{split!r}] must be a non-empty path, got {file!r}")
        elif len(given) != 1:
            raise PertaValueError(f"{name} needs exactly one of path=, files=, hub= or synthetic=, got {given or 'none'}")

    # ---- what a benchmark's source says for itself

    def check_split(self, split: str, where: str) -> None:
        """Refuse a split name this benchmark does not have (default: any name goes)."""

    def generate(self) -> dict[str, list[dict[str, Any]]]:
        """Every split of the seeded generator ``synthetic``."""
        raise NotImplementedError(f"{type(self).__name__} has no generator")

    def hub_rows(self, split: str) -> list[dict[str, Any]]:
        """The rows of ``split`` from the hub dataset ``hub``."""
        raise NotImplementedError(f"{type(self).__name__} reads no hub dataset")

    def check_rows(self, rows: list[dict[str, Any]], split: str, where: str) -> None:
        """Refuse rows this benchmark cannot use (default: an empty split)."""
        if not rows:
            raise PertaValueError(f"{where}: the split is empty")

    def describe_generator(self) -> str:
        return f"synthetic({self.synthetic})"

    # ---- shared

    def split_file(self, split: str) -> Path | None:
        """The local file of ``split`` (``None`` for hub and synthetic sources)."""
        if self.files is not None and split in self.files:
            return Path(self.files[split])
        if self.path is not None:
            return Path(self.path) / f"{split}.json"
        if self.files is not None:
            raise PertaValueError(
                f"{self.benchmark} split {split!r} is not in files= (which names {sorted(self.files)}) and no "
                "path= folder is given to find it in"
            )
        return None

    def describe(self, split: str) -> str:
        """Where ``split`` comes from, for messages: its file, ``hub[@revision]:split`` or the generator."""
        if self.files is not None or self.path is not None:
            return str(self.split_file(split))
        if self.hub is not None:
            revision = f"@{self.hub_revision}" if self.hub_revision is not None else ""
            return f"{self.hub}{revision}:{split}"
        return f"{self.describe_generator()}:{split}"

    def read(self, split: str) -> list[dict[str, Any]]:
        """The rows of ``split`` from its file, the generator or the hub, unchecked."""
        file = self.split_file(split)
        if file is not None:
            if not file.is_file():
                named = f"files[{split!r}]" if self.files is not None and split in self.files else "path="
                raise PertaFileNotFoundError(f"{self.benchmark} split {split!r} not found: no file {file} ({named})")
            return read_json_rows(file)
        if self.synthetic is not None:
            splits = self.generate()
            if split not in splits:
                raise PertaValueError(f"{self.describe(split)}: no such split; the generator writes {sorted(splits)}")
            return splits[split]
        return self.hub_rows(split)

    def rows(self, split: str) -> list[dict[str, Any]]:
        """The rows of ``split``, read and checked."""
        self.check_split(split, f"{type(self).__name__}({self.origin()})")
        rows = self.read(split)
        self.check_rows(rows, split, self.describe(split))
        return rows

    def origin(self) -> str:
        """Which origin this source has, as its argument: ``path=``, ``files=``, ``hub=`` or ``synthetic=``."""
        return "files=" if self.files is not None else next(
            f"{name}=" for name in ("path", "hub", "synthetic") if getattr(self, name) is not None)
