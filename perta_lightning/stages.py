"""Resumable stages: each builds one artifact, and a record says what made it and checks it is still whole.

A :class:`Stage` has a ``name`` (unique in its run), its ``settings`` (plain JSON: what it does), its
``inputs`` (the stages whose artifacts it reads), the ``outputs`` it writes (paths relative to the run
folder) and a ``run``. :class:`StageRunner` runs a stage unless its record in ``<run>/stages/`` shows that
the same work was done and its files are intact:

* the record's **key** is a digest of the stage's settings and of its inputs' **fingerprints** (digests of
  their files), so a changed setting, or an input rebuilt into different bytes, reruns the stage and, through
  the fingerprints, everything downstream of it;
* the record lists every output file with its size and a checksum (BLAKE2b of the whole file up to
  ``FULL_HASH_BYTES``, of its first and last MiB beyond), so a missing, truncated or damaged artifact
  reruns its stage;
* paths are stored relative to the run folder, so ``--output runs/x`` and ``--output /abs/runs/x`` resume
  alike; settings must never hold an absolute path inside the run folder;
* each stage runs under its own seed, derived from the run's seed and the stage's name, so skipping one
  stage cannot shift the random numbers of another, and a resumed run reproduces an uninterrupted one.

A stage object only describes work: constructing one loads nothing, and a skipped stage builds nothing.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from perta_lightning.io import atomic_write_text

RECORD_DIR = "stages"
FULL_HASH_BYTES = 64 * 2**20
_EDGE_BYTES = 2**20


def plain(value: Any) -> Any:
    """``value`` as plain JSON data (dataclasses as dicts, paths and other objects as strings)."""
    def default(item: Any) -> Any:
        if is_dataclass(item):
            return asdict(item)
        return str(item)

    return json.loads(json.dumps(value, default=default, sort_keys=True))


def digest(value: Any) -> str:
    """A short, stable digest of JSON-able ``value``."""
    return hashlib.blake2b(json.dumps(plain(value), sort_keys=True).encode(), digest_size=16).hexdigest()


def stage_seed(run_seed: int, stage_name: str) -> int:
    """The seed of one stage: a 31-bit number from the run's seed and the stage's name."""
    return int.from_bytes(hashlib.blake2b(f"{run_seed}/{stage_name}".encode(), digest_size=4).digest(), "big") >> 1


@dataclass(frozen=True)
class FileRecord:
    """One output file: its path (relative to the run folder when inside it), size and checksum."""

    path: str
    size: int
    checksum: str


def checksum_file(path: Path) -> str:
    """BLAKE2b of the file (of its size, first and last MiB when larger than ``FULL_HASH_BYTES``)."""
    size = path.stat().st_size
    hasher = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(2**20), b""):
                hasher.update(block)
        else:
            hasher.update(handle.read(_EDGE_BYTES))
            handle.seek(size - _EDGE_BYTES)
            hasher.update(handle.read(_EDGE_BYTES))
    return hasher.hexdigest()


def relative_to_run(root: Path, path: Path) -> str:
    """``path`` as stored in records and reports: relative to the run folder when inside it (a relative
    ``path`` is taken as relative to ``root``), else absolute."""
    absolute = path if path.is_absolute() else root / path
    try:
        return absolute.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(absolute.resolve())


def record_files(root: Path, paths: Iterable[Path]) -> list[FileRecord]:
    """File records of ``paths`` (folders expanded, hidden entries and stage records left out), sorted."""
    files: set[Path] = set()
    for path in paths:
        path = path if path.is_absolute() else root / path
        if path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.add(path)
        else:
            raise FileNotFoundError(f"{path}: the stage did not write this output")
    return sorted((FileRecord(relative_to_run(root, p), p.stat().st_size, checksum_file(p)) for p in files),
                  key=lambda r: r.path)


def damaged(root: Path, files: Sequence[FileRecord]) -> str | None:
    """Why the recorded files are no longer what was recorded (``None`` when every one is intact)."""
    if not files:
        return "the record lists no files"
    for record in files:
        path = Path(record.path) if os.path.isabs(record.path) else root / record.path
        if not path.is_file():
            return f"{record.path} is missing"
        if path.stat().st_size != record.size:
            return f"{record.path} has {path.stat().st_size} bytes, {record.size} were written"
        if checksum_file(path) != record.checksum:
            return f"{record.path} changed since it was written"
    return None


@dataclass
class StageRecord:
    """What ``<run>/stages/<name>.json`` holds about a finished stage."""

    name: str
    key: str
    settings: dict[str, Any]
    inputs: dict[str, str]
    files: list[FileRecord]
    seconds: float
    seed: int
    products: dict[str, str] = field(default_factory=dict)
    #: What the stage computed, in machine-free counts (``Stage.work``): example passes, bytes, evaluations.
    work: dict[str, float] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Digest of the stage's output files: what downstream stages key on."""
        return digest([asdict(f) for f in self.files])

    @classmethod
    def load(cls, path: Path) -> StageRecord | None:
        """The record at ``path``, or ``None`` when it is missing or unreadable (the stage then reruns)."""
        try:
            data = json.loads(path.read_text())
            data["files"] = [FileRecord(**f) for f in data["files"]]
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError):
            return None


class Stage(ABC):
    """One resumable step of a study. Subclasses are dataclasses holding their settings and input stages."""

    #: Unique name in the run; also names its record file (``/`` allowed: it becomes a folder).
    name: str
    #: Relative cost, for the progress estimate (a training epoch over the benchmark is about 1).
    cost: float = 1.0

    @property
    @abstractmethod
    def description(self) -> str:
        """What the stage does, in a few words, for the progress line."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Plain JSON of everything that decides the artifact, besides the inputs' artifacts."""

    @property
    def inputs(self) -> list[Stage]:
        """Stages whose artifacts this one reads."""
        return []

    @abstractmethod
    def outputs(self) -> list[Path]:
        """The files and folders this stage writes, relative to the run folder."""

    def work(self, runner: StageRunner) -> dict[str, float]:
        """Machine-free counts of what the stage computed (called after ``run``, kept in its record), e.g.
        ``{"forward": examples, "backward": examples}`` for training; none by default."""
        return {}

    @abstractmethod
    def run(self, runner: StageRunner) -> dict[str, Path] | None:
        """Build the artifact under ``runner.root`` (the run folder), atomically; return its named products
        (paths such as ``{"model": ...}``), which downstream stages read with ``runner.path``."""


@dataclass(frozen=True)
class Product:
    """A named product of a stage, e.g. ``Product(finetune, "model")``: a path once the stage has run."""

    stage: Stage
    key: str = "model"


@dataclass
class Progress:
    """Prints ``[stage k/N] name: what it does`` with the elapsed time and an estimate of what is left.

    The estimate is the cost (``Stage.cost``) still to come, by kind of stage (its class), times the seconds
    per unit of cost measured on that kind so far, or on every kind while that one has not run yet: the
    relative costs of a kind are right within a run, but not from one model to another (an evaluation of a
    pretrained 135M model with TOFU's real-world sets costs far more, against its fine-tuning, than one of
    the demo's models).
    """

    total: int = 0
    prefix: str = ""
    stream: Any = None
    done: int = 0
    _start: float = field(default_factory=time.perf_counter)
    _remaining: dict[str, float] = field(default_factory=dict)  # cost still to come, by kind
    _spent: dict[str, list[float]] = field(default_factory=dict)  # kind -> [cost, seconds] of stages run

    expected: int = 0
    expected_cost: float = 0.0
    expected_kind: str = ""

    def _add(self, kind: str, cost: float) -> None:
        self._remaining[kind] = self._remaining.get(kind, 0.0) + cost

    def plan(self, stages: Sequence[Stage]) -> None:
        """Add ``stages`` to the count and the cost still to come; they use up what ``expect`` foresaw."""
        claimed = min(self.expected, len(stages))
        share = self.expected_cost / self.expected if self.expected else 0.0
        self.expected -= claimed
        self.expected_cost -= claimed * share
        self.total += len(stages) - claimed
        self._add(self.expected_kind, -claimed * share)
        for stage in stages:
            self._add(type(stage).__name__, stage.cost)

    def expect(self, count: int, cost: float, kind: str = "Evaluate") -> None:
        """Foresee ``count`` stages of ``cost`` in all, mostly of ``kind``, that are not declared yet (a search's
        rounds)."""
        self.expected += count
        self.expected_cost += cost
        self.expected_kind = kind
        self.total += count
        self._add(kind, cost)

    def settle(self) -> None:
        """Drop what ``expect`` foresaw and did not happen."""
        self.total -= self.expected
        self._add(self.expected_kind, -self.expected_cost)
        self.expected, self.expected_cost = 0, 0.0

    def say(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def seconds_left(self) -> float | None:
        """The estimate of what is left (``None`` before any stage has run)."""
        spent_cost = sum(cost for cost, _ in self._spent.values())
        if spent_cost <= 0:
            return None
        overall = sum(seconds for _, seconds in self._spent.values()) / spent_cost
        left = 0.0
        for kind, cost in self._remaining.items():
            measured = self._spent.get(kind)
            rate = measured[1] / measured[0] if measured and measured[0] > 0 else overall
            left += rate * max(cost, 0.0)
        return left

    def _eta(self) -> str:
        left = self.seconds_left()
        return "" if left is None else f", about {_duration(left)} left"

    def start(self, stage: Stage) -> None:
        self.done += 1
        self.total = max(self.total, self.done)
        elapsed = _duration(time.perf_counter() - self._start)
        self.say(f"{self.prefix}[stage {self.done}/{self.total}] {stage.name}: {stage.description} "
                    f"({elapsed} elapsed{self._eta()})")

    def finish(self, stage: Stage, seconds: float, skipped: str | None) -> None:
        kind = type(stage).__name__
        self._add(kind, -stage.cost)
        if skipped is None:
            spent = self._spent.setdefault(kind, [0.0, 0.0])
            spent[0] += stage.cost
            spent[1] += seconds
            self.say(f"{self.prefix}    done in {_duration(seconds)}")
        else:
            self.say(f"{self.prefix}    {skipped}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class StageRunner:
    """Runs stages of one run folder in the order given, skipping those whose record and files hold.

    Args:
        root: the run folder.
        seed: the run's seed; each stage runs under ``stage_seed(seed, stage.name)``.
        progress: where the stage lines go (a fresh :class:`Progress` by default).
    """

    def __init__(self, root: str | os.PathLike, seed: int, progress: Progress | None = None) -> None:
        self.root = Path(root).absolute()  # products built from it are then absolute, whatever the cwd
        self.seed = seed
        self.progress = progress or Progress()
        self.records: dict[str, StageRecord] = {}

    def record_path(self, name: str) -> Path:
        return self.root / RECORD_DIR / f"{name}.json"

    def key(self, stage: Stage) -> str:
        missing = [s.name for s in stage.inputs if s.name not in self.records]
        if missing:
            raise RuntimeError(f"stage {stage.name!r} runs before its inputs {missing}")
        return digest({"settings": stage.settings(), "inputs": self._input_fingerprints(stage)})

    def _input_fingerprints(self, stage: Stage) -> dict[str, str]:
        return {s.name: self.records[s.name].fingerprint for s in stage.inputs}

    def why_run(self, stage: Stage) -> str | None:
        """Why ``stage`` must run (``None`` when its record and files hold)."""
        record = StageRecord.load(self.record_path(stage.name))
        if record is None:
            return "not run yet"
        if record.key != self.key(stage):
            return "its settings or inputs changed"
        return damaged(self.root, record.files)

    def run(self, stage: Stage) -> StageRecord:
        """Run ``stage`` unless it is up to date; return its record."""
        import lightning as L

        self.progress.start(stage)
        reason = self.why_run(stage)
        if reason is None:
            record = StageRecord.load(self.record_path(stage.name))
            self.progress.finish(stage, record.seconds, "up to date, skipped")
        else:
            if reason != "not run yet":
                self.progress.say(f"{self.progress.prefix}    running again: {reason}")
            seed = stage_seed(self.seed, stage.name)
            L.seed_everything(seed, verbose=False)
            self.root.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            try:
                products = stage.run(self) or {}
            finally:
                # A Trainer and its LightningModule reference each other, so a finished stage's model and
                # optimizer state wait for the cycle collector; on a 135M model that left 1-2 GiB per stage
                # alive and took a seed's process to 10 GiB. Collect now, before the next stage loads its own.
                gc.collect()
            seconds = time.perf_counter() - start
            record = StageRecord(stage.name, self.key(stage), plain(stage.settings()),
                                 self._input_fingerprints(stage), record_files(self.root, stage.outputs()),
                                 seconds, seed, {key: relative_to_run(self.root, Path(path)) for key, path in products.items()})
            self.records[stage.name] = record  # work() may read the stage's own products
            record.work = plain(stage.work(self))
            atomic_write_text(self.record_path(stage.name), json.dumps(asdict(record), indent=2))
            self.progress.finish(stage, seconds, None)
        self.records[stage.name] = record
        return record

    def path(self, product: Product) -> Path:
        """Where a product of a stage that has run (or was found up to date) lies."""
        record = self.records.get(product.stage.name)
        if record is None:
            raise RuntimeError(f"stage {product.stage.name!r} has not run in this runner")
        if product.key not in record.products:
            raise KeyError(f"stage {product.stage.name!r} has no product {product.key!r} "
                           f"(it has {sorted(record.products)})")
        relative = record.products[product.key]
        return Path(relative) if os.path.isabs(relative) else self.root / relative

    def run_all(self, stages: Sequence[Stage]) -> list[StageRecord]:
        return [self.run(stage) for stage in stages]
