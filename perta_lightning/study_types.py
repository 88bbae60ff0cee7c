"""The typed settings and results of a PerTA study: sizes, PerTA variants, the α search, result rows.

Plain dataclasses, read from YAML by jsonargparse and shared by the pipeline, the report and the study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Baseline = Literal["grad_ascent", "grad_diff", "npo"]


@dataclass(frozen=True)
class Preset:
    """Sizes and schedules of one seed of the study."""

    num_authors: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    pretrain_epochs: int
    finetune_epochs: int
    reinforce_epochs: int
    unlearn_epochs: int
    importance_examples: int
    eval_max_new_tokens: int
    finetune_lr: float = 2e-3
    pretrain_lr: float = 3e-3
    reinforce_lr: float = 1e-3
    unlearn_lr: float = 5e-4
    batch_size: int = 16
    num_background_authors: int = 6
    attribute_values: int | None = None
    num_world_items: int = 30
    # MUSE only (benchmark: muse): the synthetic news corpus, the context raw text is chunked to, KnowMem's
    # answer length (eval_max_new_tokens is VerbMem's continuation length there)
    num_articles: int = 24
    num_background_articles: int = 96
    context_length: int = 128
    knowmem_max_new_tokens: int = 16

    def model_config(self) -> dict[str, Any]:
        """The small Llama trained from scratch as θ0."""
        return dict(model_type="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    intermediate_size=2 * self.hidden_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=self.context_length,
                    tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)

    def muse_spec(self, seed: int) -> Any:
        """The synthetic MUSE corpus of this preset: ``num_articles`` forget articles, as many in each retain
        corpus and in the holdout corpus."""
        from perta_lightning.data.muse_synthetic import MuseSyntheticSpec

        return MuseSyntheticSpec(num_articles=self.num_articles, num_retain_articles=self.num_articles,
                                 num_holdout_articles=self.num_articles,
                                 num_background_articles=self.num_background_articles, seed=seed)


def resolve_preset(name: str, overrides: dict[str, Any] | None = None) -> Preset:
    """The named preset with ``overrides`` (field → value) applied; unknown fields are refused."""
    from dataclasses import fields, replace

    from perta_lightning.errors import PertaValueError

    if name not in PRESETS:
        raise PertaValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    known = {f.name for f in fields(Preset)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise PertaValueError(f"preset_overrides: unknown field(s) {unknown}; the fields are {sorted(known)}")
    return replace(PRESETS[name], **(overrides or {}))


PRESETS = {
    "tiny": Preset(num_authors=20, hidden_size=64, num_layers=2, vocab_size=512, pretrain_epochs=6,
                   finetune_epochs=8, reinforce_epochs=3, unlearn_epochs=2, importance_examples=20,
                   eval_max_new_tokens=24, num_background_authors=2),
    "demo": Preset(num_authors=40, hidden_size=128, num_layers=3, vocab_size=768, pretrain_epochs=15,
                   finetune_epochs=20, reinforce_epochs=5, unlearn_epochs=5, importance_examples=40,
                   eval_max_new_tokens=32),
    # forget10 holds 10 authors × 10 questions = 100 examples, so the KS test of Forget Quality resolves
    # finer steps than on the demo's 40.
    "large": Preset(num_authors=100, hidden_size=128, num_layers=3, vocab_size=1024, pretrain_epochs=15,
                    finetune_epochs=20, reinforce_epochs=5, unlearn_epochs=5, importance_examples=100,
                    eval_max_new_tokens=32, num_background_authors=10),
    # Fine-tuning a pretrained SmolLM2-135M-Instruct (base_model: its GGUF); the model sizes above are unused.
    # Learning rates as open-unlearning's TOFU fine-tuning (1e-5, 10 epochs, batch 32) scaled for a 135M model
    # and a few epochs; 10 authors and 10 real-authors / world-facts questions so that one seed fits about an
    # hour on a 2-core CPU (see configs/smollm2/pipeline.yaml for what was cut).
    # MUSE (benchmark: muse) on the synthetic news corpus: from-scratch θ0 pre-trained on background articles
    "muse_tiny": Preset(num_authors=0, hidden_size=64, num_layers=2, vocab_size=512, pretrain_epochs=6,
                        finetune_epochs=10, reinforce_epochs=3, unlearn_epochs=2, importance_examples=12,
                        eval_max_new_tokens=24, num_articles=8, num_background_articles=24,
                        knowmem_max_new_tokens=8),
    "muse_demo": Preset(num_authors=0, hidden_size=128, num_layers=3, vocab_size=768, pretrain_epochs=15,
                        finetune_epochs=40, reinforce_epochs=5, unlearn_epochs=5, importance_examples=24,
                        eval_max_new_tokens=48, num_articles=24, num_background_articles=96),
    "smollm2": Preset(num_authors=10, hidden_size=64, num_layers=2, vocab_size=512, pretrain_epochs=0,
                      finetune_epochs=3, reinforce_epochs=2, unlearn_epochs=2, importance_examples=10,
                      eval_max_new_tokens=32, finetune_lr=5e-5, reinforce_lr=5e-5, unlearn_lr=1e-5, batch_size=8,
                      num_background_authors=2, num_world_items=10),
}


@dataclass(frozen=True)
class PertaVariant:
    """One PerTA setting: w = s_f^p / (s_f^p + β·s_r^p + ε) with importance ``statistic`` at a model.

    Args:
        statistic: ``grad`` (|mean gradient|) or ``fisher`` (mean squared per-example gradient).
        beta: β of the weight (the paper's default is 1).
        power: p of the weight.
        importance_at: the model at which importance is estimated: θ_full (``full``) or θ0 (``base``).
        granularity: Fisher by ``example`` (exact) or by ``batch`` (squared batch-mean gradients).
        num_examples: importance examples per split (``None``: the preset's).
        transform: this project's variants, not the paper's: ``rank`` makes w the rank quantile of
            s_f / s_r within each tensor (β and p must stay 1), ``excess`` keeps only the forget importance
            beyond what s_r predicts (see :mod:`perta_lightning.functional.weights`).
    """

    statistic: Literal["grad", "fisher"] = "fisher"
    beta: float = 1.0
    power: float = 1.0
    importance_at: Literal["full", "base"] = "full"
    granularity: Literal["example", "batch"] = "example"
    num_examples: int | None = None
    transform: Literal["none", "rank", "excess"] = "none"

    def __post_init__(self) -> None:
        from perta_lightning.errors import PertaValueError

        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise PertaValueError(f"PertaVariant: beta (β, the weight of the retain importance) must be >= 0, "
                                  f"got {self.beta}")
        if not (math.isfinite(self.power) and self.power > 0):
            raise PertaValueError(f"PertaVariant: power (p) must be > 0, got {self.power}")
        if self.num_examples is not None and self.num_examples <= 0:
            raise PertaValueError(f"PertaVariant: num_examples must be positive, got {self.num_examples}")
        if self.transform == "rank" and (self.beta != 1.0 or self.power != 1.0):
            raise PertaValueError(f"PertaVariant: transform 'rank' sets w itself; beta and power must be 1, got "
                                  f"beta={self.beta}, power={self.power}")

    def importance_key(self, default_examples: int | None) -> tuple:
        """What decides the raw importance files this variant starts from (variants sharing it share them)."""
        return (self.statistic, self.importance_at, self.granularity, self.num_examples or default_examples)

    def files_key(self, default_examples: int | None) -> tuple:
        """What decides the importance files this variant's merges read: the raw ones and the transform."""
        return (*self.importance_key(default_examples), self.transform)

    def at(self, where: Literal["full", "base"]) -> PertaVariant:
        """The same variant with importance estimated at another model."""
        from dataclasses import replace

        return replace(self, importance_at=where)

    @property
    def label(self) -> str:
        """``perta_<statistic>`` plus what differs from the paper's defaults, e.g. ``perta_fisher_b16``."""
        parts = [f"perta_{self.statistic}"]
        if self.beta != 1.0:
            parts.append(f"b{self.beta:g}")
        if self.power != 1.0:
            parts.append(f"p{self.power:g}")
        if self.importance_at != "full":
            parts.append(f"at_{self.importance_at}")
        if self.granularity != "example":
            parts.append(self.granularity)
        if self.num_examples is not None:
            parts.append(f"n{self.num_examples}")
        if self.transform != "none":
            parts.append(self.transform)
        return "_".join(parts)


@dataclass(frozen=True)
class AlphaSearch:
    """How α is searched for each merge method (see ``functional.tradeoff.next_alphas``).

    Args:
        levels: Forget Quality levels to bracket (and to compare methods at).
        initial: α of the first round.
        rounds: further rounds at most (each merges its α in one pass and evaluates them).
        ratio: stop refining a level once α_hi / α_lo is at most this.
        alpha_max: never search above this α.
    """

    levels: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.3])
    initial: list[float] = field(default_factory=lambda: [1.0, 4.0])
    rounds: int = 4
    ratio: float = 1.5
    alpha_max: float = 256.0

    def __post_init__(self) -> None:
        from perta_lightning.errors import PertaValueError

        if not self.levels:
            raise PertaValueError("search.levels is empty: give the levels methods are compared at")
        bad = [level for level in self.levels if not (0.0 < level <= 1.0)]
        if bad:
            raise PertaValueError(f"search.levels must lie in (0, 1] (a p-value or a forget score), got {bad}")
        if len(set(self.levels)) != len(self.levels):
            raise PertaValueError(f"search.levels has repeated values: {self.levels}")
        if not self.initial or any(not (math.isfinite(a) and a > 0) for a in self.initial):
            raise PertaValueError(f"search.initial must be one or more α > 0, got {self.initial}")
        if self.rounds < 0:
            raise PertaValueError(f"search.rounds must be >= 0, got {self.rounds}")
        if not self.ratio > 1.0:
            raise PertaValueError(f"search.ratio must be > 1, got {self.ratio}")
        if not self.alpha_max >= max(self.initial):
            raise PertaValueError(f"search.alpha_max {self.alpha_max} is below search.initial {self.initial}")


def check_seeds(key: str, seeds: list[int]) -> None:
    """Refuse negative or repeated seeds (a repeat would silently count one seed twice, or collapse to one)."""
    from perta_lightning.errors import PertaValueError

    negative = [seed for seed in seeds if seed < 0]
    if negative:
        raise PertaValueError(f"{key}: seeds must be >= 0, got {negative}")
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise PertaValueError(f"{key}: seed(s) {repeated} given more than once")


def check_not_empty(key: str, value: list | None) -> None:
    """Refuse an explicitly empty list where the default is a list of settings to run (``candidates: []`` would
    otherwise fall back to the defaults without a word)."""
    if value is not None and len(value) == 0:
        from perta_lightning.errors import PertaValueError

        raise PertaValueError(f"{key}: [] leaves nothing to run; leave the key out for the defaults")


@dataclass(frozen=True)
class ResultRow:
    """One evaluated model of a run: what the report reads."""

    method: str
    family: str
    alpha: float | None
    model: Path
    eval_file: Path
    reference_file: Path
    unlearn_seconds: float | None = None


@dataclass
class SplitResult:
    """Every evaluated model of one forget split of one seed, and how many evaluations each search took."""

    forget_split: str
    root: Path
    rows: list[ResultRow]
    search_evaluations: dict[str, int]




@dataclass(frozen=True)
class Axes:
    """What a benchmark's two comparison axes are called in reports (the keys stay ``forget_quality`` and
    ``model_utility`` in every file: on MUSE they hold the forget score and KnowMem on D_r)."""

    forget: str
    forget_short: str
    utility: str
    utility_short: str
    benchmark_name: str

    @property
    def quantity(self) -> str:
        return f"Δ{self.utility_short} at matched {self.forget_short}"


AXES = {"tofu": Axes("Forget Quality", "FQ", "Model Utility", "MU", "the synthetic benchmark"),
        "muse": Axes("forget score", "F", "KnowMem on D_r", "KnowMem_r", "the synthetic MUSE news corpus")}
