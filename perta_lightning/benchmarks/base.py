"""The benchmark protocol: what the study asks of a benchmark, and the typed values it gets back.

A benchmark is one way of saying what a model has forgotten and what it still knows. The study (seed graph,
α search, matched comparison, replication table) is the same for every benchmark; a :class:`Benchmark` supplies
what differs:

* its **source** of splits (:attr:`Benchmark.source_option`, :meth:`Benchmark.source_at`) and its seeded
  **synthetic** data (:meth:`Benchmark.synthetic_data`, :meth:`Benchmark.write_synthetic`);
* its **split plan** for one forget split (:meth:`Benchmark.split_plan`, a :class:`SplitPlan`): which splits
  train θ0, θ_full and θ_retain, which are forgotten and which are kept while unlearning;
* its **evaluation** (:meth:`Benchmark.evaluation`, an :class:`Evaluation` the evaluation stage runs) and its
  **summary** of an evaluation file against the retain model's (:meth:`Benchmark.summarize`);
* optionally a **screening** (:meth:`Benchmark.screening`): a cheaper evaluation that gives the forgetting axis
  alone, exactly as the full one would, with which the α search decides which models to evaluate in full;
* its two comparison **axes** (:class:`Axes`: the forgetting reached and the utility kept, their keys in
  summaries and report rows, and their names in reports) and its default levels along the first;
* what an **attack** on forgetting reads (:mod:`perta_lightning.attacks`): its forget metrics, on every forget
  example or some (:meth:`Benchmark.forget_metrics`), and, for the relearning attack, the split of the forget set
  into a half to relearn on and a held-out half (:meth:`Benchmark.relearn_split`);
* its **report** rows and texts (:meth:`Benchmark.report_row`, :attr:`Benchmark.report_intro`), and what it adds
  to the study's tables and to the replication table.

Every benchmark is an entry of :data:`perta_lightning.benchmarks.BENCHMARKS`, keyed by its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class Axes:
    """The two axes methods are compared along: the forgetting reached (matched at levels) and the utility kept.

    ``*_key``: the key of the value in the benchmark's summaries and in report rows; ``*_name`` / ``*_short``: what
    reports call it."""

    forget_key: str
    forget_name: str
    forget_short: str
    utility_key: str
    utility_name: str
    utility_short: str
    data_name: str  # what the synthetic data is called in reports

    @property
    def quantity(self) -> str:
        """The replication table's quantity: the utility difference at matched forgetting."""
        return f"Δ{self.utility_short} at matched {self.forget_short}"


@dataclass(frozen=True)
class SplitPlan:
    """Which splits one forget split of a seed trains and unlearns with.

    Attributes:
        name: the split's folder in a seed's run (``forget10``; ``forget`` for a benchmark with one forget set).
        pretrain: θ0's corpus when θ0 is trained from scratch.
        full: θ_full's training splits (the target model), before any replay.
        retain: θ_retain's training splits (the model that never saw the forget set), before any replay.
        replay: splits replayed while fine-tuning θ_full and θ_retain from a θ0 pre-trained here (so that they keep
            what θ0 learnt); none when θ0 is given.
        forget: the split reinforced, forgotten by the baselines and scored for forget importance.
        retain_for_unlearning: the retain split of unlearning: retain importance and the baselines' retain term.
        max_length: raw-text chunk length in tokens (``None``: question/answer pairs at the prompt's length).
    """

    name: str
    pretrain: tuple[str, ...]
    full: tuple[str, ...]
    retain: tuple[str, ...]
    replay: tuple[str, ...]
    forget: str
    retain_for_unlearning: str
    max_length: int | None = None


@dataclass(frozen=True)
class RelearnSplit:
    """The relearning attack's halves of one forget set, split by author (or article): ``relearn_rows``, the
    training rows of the relearned half, and ``heldout``, the example indices (in the forget evaluation set) of the
    other half, on which the attack is measured; ``groups``: how many authors each half holds."""

    relearn_rows: list[dict[str, Any]]
    heldout: list[int]
    groups: tuple[int, int]


class Evaluation(ABC):
    """How a benchmark evaluates one model, with its settings fixed (a picklable value a stage holds)."""

    #: what the evaluation stage's line says it does (``evaluate``, ``MUSE-evaluate``).
    verb: ClassVar[str] = "evaluate"
    #: what one run counts as in its stage record's work: ``evaluations``, or ``screens`` for a screening.
    work_key: ClassVar[str] = "evaluations"

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What of the evaluation decides its result (the stage record's settings, beside its data and model)."""

    @abstractmethod
    def run(self, model_dir: str, source: Any, output_json: str, retain_result: str | None, accelerator: str,
            devices: int, torch_dtype: str) -> dict[str, Any]:
        """Evaluate ``model_dir`` on ``source`` in this process and write ``output_json``."""

    @abstractmethod
    def command(self, model_dir: str, source: Any, output_json: str, retain_result: str | None,
                torch_dtype: str) -> dict[str, Any]:
        """The same evaluation as a ``perta test`` config (``model`` and ``data`` blocks): what a stage launches
        when it runs on several devices."""


class Benchmark(ABC):
    """One benchmark: see the module docstring for what the study asks of it."""

    #: the name configs give (``benchmark: tofu``) and the registry's key.
    name: ClassVar[str]
    axes: ClassVar[Axes]
    #: the levels of the forgetting axis methods are compared at, when the config gives none.
    default_levels: ClassVar[tuple[float, ...]]
    #: the run option that holds a source of this benchmark (``source``, ``muse_source``).
    source_option: ClassVar[str] = "source"
    #: whether its stages can run as ``perta`` commands on several devices (``devices`` > 1): its training data
    #: must be a TOFU-format source (question/answer rows) and its :meth:`Evaluation.command` a ``perta test`` config.
    launches_stages: ClassVar[bool] = False
    #: ``perta data <command>`` writes the synthetic data (``None``: no such command).
    data_command: ClassVar[str | None] = None
    #: report columns beside method, α and the two axes (keys of :meth:`report_row`), and their headings.
    report_columns: ClassVar[tuple[str, ...]] = ()
    #: the columns of ``report.md``'s table of every model (``None``: :attr:`report_columns`).
    markdown_columns: ClassVar[tuple[str, ...] | None] = None
    column_names: ClassVar[dict[str, str]] = {}
    #: what a report's title adds after its own (``" (MUSE)"``).
    title_note: ClassVar[str] = ""
    #: the paragraph under a report's settings that says what its numbers mean.
    report_intro: ClassVar[str] = ""
    #: the evaluation splits a synthetic run may read from given files (``eval_files``), by split name.
    eval_file_splits: ClassVar[tuple[str, ...]] = ()
    #: the keys of the target model's row the diagnostic records.
    diagnostic_columns: ClassVar[tuple[str, ...]] = ()
    #: a note on claim 4 (the forget proportions) where the benchmark has no such proportions.
    claim4_note: ClassVar[str | None] = None

    # ---- data

    @abstractmethod
    def forget_splits(self, given: list[str] | None) -> list[str]:
        """The forget splits a run studies (``given``, checked, or the default), each a folder of the seed."""

    @abstractmethod
    def split_plan(self, forget_split: str, preset: Any) -> SplitPlan:
        """The splits one forget split trains and unlearns with."""

    @abstractmethod
    def synthetic_data(self, preset: Any, seed: int) -> Any:
        """The spec of the seeded synthetic data of ``preset`` (a dataclass, written into stage records)."""

    @abstractmethod
    def write_synthetic(self, spec: Any, output: Path, vocab_size: int) -> None:
        """Write the synthetic data of ``spec`` and a tokenizer of ``vocab_size`` to ``output``."""

    def data_function(self) -> Callable[..., Any]:
        """The typed function behind ``perta data <data_command>`` (its signature is the command's options)."""
        raise NotImplementedError(f"{self.name} has no data command")

    def synthetic_settings(self) -> dict[str, Any]:
        """What the synthetic data stage's record says besides its spec and vocabulary (``{}`` by default)."""
        return {}

    @abstractmethod
    def source_at(self, path: Path, files: dict[str, str] | None = None) -> Any:
        """A source of this benchmark reading the folder ``path`` (and ``files`` for some splits)."""

    def check_run(self, source: Any, base_model: str | None) -> None:
        """Refuse a run this benchmark cannot make (default: every run goes)."""

    def describe_data(self) -> str:
        """What the synthetic data stage writes, in its progress line."""
        return "write the synthetic benchmark and train its tokenizer"

    # ---- evaluation

    @abstractmethod
    def evaluation(self, plan: SplitPlan, preset: Any, pretrained: bool) -> Evaluation:
        """The evaluation of every model of one forget split; ``pretrained``: θ0 is a pretrained model
        (``base_model``), not one trained from scratch on the synthetic data."""

    def screening(self, plan: SplitPlan, preset: Any, pretrained: bool) -> Evaluation | None:
        """A cheaper evaluation of one forget split's models that gives the forgetting axis alone, exactly as
        :meth:`evaluation` gives it (the same per-example values, to float noise), or ``None`` (the default): the
        benchmark cannot tell its forgetting without the full evaluation, and every α is evaluated in full.

        :meth:`summarize` of a screening's file against the retain model's full evaluation gives the forgetting
        axis under ``axes.forget_key``; its other keys may be ``None``."""
        return None

    @abstractmethod
    def is_evaluation(self, path: str | Path) -> bool:
        """Whether ``path`` is an evaluation file of this benchmark (read cheaply)."""

    @abstractmethod
    def summarize(self, eval_file: str | Path, reference_file: str | Path) -> dict[str, Any]:
        """The summary of one evaluation against the retain model's: both axes (under their keys) and the rest."""

    # ---- attacks on forgetting

    #: the forget metrics an attack's recovery is measured on (keys of :meth:`forget_metrics`).
    recovery_metrics: ClassVar[tuple[str, ...]] = ()
    #: those of them that are p-values, compared in decades (:mod:`perta_lightning.functional.robustness`).
    recovery_log_metrics: ClassVar[tuple[str, ...]] = ()

    def forget_metrics(self, eval_file: str | Path, reference_file: str | Path,
                       examples: list[int] | None = None) -> dict[str, float | None]:
        """The :attr:`recovery_metrics` of one evaluation against the retain model's, on every forget example or
        on ``examples`` (indices of the forget evaluation set) alone."""
        raise NotImplementedError(f"{self.name} has no forget metrics for attacks")

    def relearn_split(self, plan: SplitPlan, source: Any, groups: int) -> RelearnSplit | None:
        """The relearning attack's halves of ``plan``'s forget set of ``groups`` authors (or articles), or ``None``
        when it cannot be split (one author) or the benchmark has no such split (the default)."""
        return None

    def forget_groups(self, plan: SplitPlan, preset: Any, synthetic: bool) -> int:
        """How many authors (or articles) ``plan``'s forget set holds, in the synthetic data of ``preset`` or in
        the benchmark's own data; 0 (the default): the benchmark does not tell, and has no relearning split."""
        return 0

    # ---- reports

    @abstractmethod
    def report_row(self, summary: dict[str, Any], eval_file: Path) -> dict[str, Any]:
        """A report row's values besides method, α and the axes: the :attr:`report_columns`."""

    def checked_columns(self) -> tuple[str, ...]:
        """The report columns that must be finite numbers in every row (the axes by default)."""
        return (self.axes.forget_key, self.axes.utility_key)

    def study_tables(self, rows: dict[int, list[dict[str, Any]]], families: dict[str, str],
                     levels: list[float]) -> dict[str, Any]:
        """Tables the study adds to its ``test`` result for one split (``rows``: each test seed's report rows),
        keyed by name (``{}``: none); the study keeps each under ``test[name][split]``."""
        return {}

    def study_markdown(self, test: dict[str, Any], split: str, levels: list[float], seeds: int) -> list[str]:
        """The lines ``study.md`` shows for this benchmark's :meth:`study_tables` of one split (``test``: the
        study's ``test`` result)."""
        return []

    def replication_sections(self, table: dict[str, Any]) -> list[str]:
        """Sections of ``REPLICATION.md`` before its rules (``[]``: none)."""
        return []
