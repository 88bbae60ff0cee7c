"""The typed stages of a PerTA study: data, training, importance, merge and evaluation.

Each is a dataclass of its settings and input stages (see :mod:`perta_lightning.stages` for how they are
run, skipped and checked). Constructing one loads nothing; the heavy imports happen in ``run``. Products:
a model stage's ``"model"`` folder, an importance stage's ``"forget"`` / ``"retain"`` files, a merge's
``"alpha_<α>"`` folders, an evaluation's ``"eval"`` JSON.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from perta_lightning.benchmarks.base import Benchmark, Evaluation
from perta_lightning.stages import Product, Stage, StageRunner, stage_seed
from perta_lightning.study.commands import fit_config, launch, optimizer_config, trainer_config
from perta_lightning.study.options import Runtime


def _adamw(lr: float) -> Any:
    return partial(torch.optim.AdamW, lr=lr, weight_decay=0.01)


def _rows(source: Any, split: str) -> int:
    return len(source.rows(split))


def _passes(examples: float, forward_only: float = 0.0) -> dict[str, float]:
    """Example passes of a stage: ``examples`` forward and backward, plus ``forward_only`` forward."""
    return {"forward": float(examples + forward_only), "backward": float(examples)}


def _text_settings(splits: Any, default_splits: Any, max_length: int | None) -> dict[str, Any]:
    """Settings only a MUSE run has (left out at TOFU's defaults, so TOFU runs keep their records)."""
    out: dict[str, Any] = {}
    if tuple(splits) != tuple(default_splits):
        out["splits"] = list(splits)
    if max_length is not None:
        out["max_length"] = max_length
    return out


def _weight_bytes(runner: StageRunner, stage: Stage) -> int:
    """Bytes of a finished stage's weight files (``*.safetensors``), as its record lists them."""
    return sum(f.size for f in runner.records[stage.name].files if f.path.endswith(".safetensors"))


def fit(module: Any, source: Any, tokenizer: str, splits: list[str], epochs: int, batch_size: int,
        runtime: Runtime, paired_split: str | None = None, max_length: int | None = None) -> None:
    """Fit ``module`` for ``epochs`` on ``splits`` (plus ``paired_split`` batches); the module saves itself.

    ``max_length``: longest example in tokens (raw-text corpora are chunked to it); ``None``: PromptFormat's."""
    import lightning as L

    from perta_lightning.callbacks.progress import progress_bar
    from perta_lightning.data.datamodule import TofuDataModule
    from perta_lightning.data.formatting import PromptFormat

    prompt = PromptFormat(tokenizer=str(tokenizer)) if max_length is None else PromptFormat(str(tokenizer), max_length)
    data = TofuDataModule(source, prompt, train_split=splits,
                          paired_split=paired_split, batch_size=batch_size)
    trainer = L.Trainer(accelerator=runtime.accelerator, devices=runtime.devices, precision=runtime.precision,
                        max_epochs=epochs, logger=False,
                        enable_checkpointing=False, callbacks=[progress_bar()], enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, data)


@dataclass(eq=False)
class SyntheticData(Stage):
    """A benchmark's seeded synthetic data and its BPE tokenizer, under ``data/``."""

    benchmark: Benchmark
    spec: Any
    vocab_size: int
    name: str = "data"
    cost: float = 0.05

    @property
    def description(self) -> str:
        return self.benchmark.describe_data()

    def settings(self) -> dict[str, Any]:
        return {"spec": self.spec, "vocab_size": self.vocab_size, **self.benchmark.synthetic_settings()}

    def outputs(self) -> list[Path]:
        return [Path("data")]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        out = runner.root / "data"
        self.benchmark.write_synthetic(self.spec, out, self.vocab_size)
        return {"data": out, "tokenizer": out / "tokenizer"}


@dataclass(frozen=True)
class Data:
    """Where a run's splits come from: the run's own synthetic stage, or a given source.

    ``files``: ``(split, path)`` pairs read from files instead of the synthetic stage (only the benchmark's
    :attr:`~perta_lightning.benchmarks.base.Benchmark.eval_file_splits`, e.g. TOFU's real real-authors and
    world-facts sets for a pretrained θ0, whose world is not the synthetic one). Their contents' digests enter the
    settings of the stages that read them."""

    stage: SyntheticData | None = None
    given: Any = None  # the benchmark's source
    files: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        from perta_lightning.errors import PertaFileNotFoundError, PertaValueError

        for split, path in self.files:
            if self.stage is None:
                raise PertaValueError("eval_files: only a synthetic run takes them; give a source's files= instead")
            allowed = self.stage.benchmark.eval_file_splits
            if split not in allowed:
                raise PertaValueError(f"eval_files: key {split!r} is not one of {list(allowed)}")
            if not Path(path).is_file():
                raise PertaFileNotFoundError(f"eval_files[{split}]: no such file: {path}")

    def source(self, runner: StageRunner) -> Any:
        if self.stage is not None:
            return self.stage.benchmark.source_at(runner.path(Product(self.stage, "data")), dict(self.files))
        return self.given

    def settings(self) -> Any:
        if self.stage is None:
            return self.given
        if not self.files:
            return "synthetic"
        from perta_lightning.stages import checksum_file

        return {"synthetic": True, "files": {split: checksum_file(Path(path)) for split, path in self.files}}

    @property
    def stages(self) -> list[Stage]:
        return [self.stage] if self.stage is not None else []


@dataclass(eq=False)
class Pretrained(Stage):
    """A model directory made outside the run (θ0 = a pretrained model); checked, not built."""

    path: str
    name: str = "models/base"
    cost: float = 0.0
    description = "use the given pretrained model"

    def settings(self) -> dict[str, Any]:
        return {"pretrained": str(Path(self.path).resolve())}

    def outputs(self) -> list[Path]:
        return [Path(self.path).resolve()]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        from perta_lightning.errors import PertaFileNotFoundError

        if not (Path(self.path) / "config.json").is_file():
            raise PertaFileNotFoundError(f"{self.path}: not a Hugging Face model directory (no config.json)")
        return {"model": Path(self.path).resolve()}


@dataclass(eq=False)
class Pretrain(Stage):
    """θ0 trained from scratch on the world-knowledge corpus of the synthetic benchmark."""

    data: SyntheticData
    model_config: dict[str, Any]
    epochs: int
    lr: float
    batch_size: int
    runtime: Runtime = field(default_factory=Runtime)
    name: str = "models/base"
    splits: tuple[str, ...] = ("world_corpus",)  # MUSE: ("pretrain/background",)
    max_length: int | None = None

    @property
    def description(self) -> str:
        corpus = "the world-knowledge corpus" if self.splits == ("world_corpus",) else " + ".join(self.splits)
        return f"pre-train θ0 on {corpus}"

    def __post_init__(self) -> None:
        self.cost = 0.5 * self.epochs

    @property
    def inputs(self) -> list[Stage]:
        return [self.data]

    def settings(self) -> dict[str, Any]:
        return {"model": self.model_config, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                **self.runtime.settings(), **_text_settings(self.splits, ("world_corpus",), self.max_length)}

    def outputs(self) -> list[Path]:
        return [Path(self.name)]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        from perta_lightning.modules.finetune import CausalLMModule

        out, tokenizer = runner.root / self.name, runner.path(Product(self.data, "tokenizer"))
        seed = stage_seed(runner.seed, self.name)
        if self.runtime.devices > 1:
            launch(runner, self.name, "fit", fit_config(
                "perta_lightning.modules.finetune.CausalLMModule",
                {"model_config": self.model_config, "tokenizer": str(tokenizer), "output_dir": str(out), "seed": seed,
                 "optimizer": optimizer_config(self.lr)},
                Data(self.data).source(runner), str(tokenizer), list(self.splits), self.epochs, self.batch_size,
                self.runtime, seed, max_length=self.max_length))
            return {"model": out}
        module = CausalLMModule(model_config=self.model_config, tokenizer=str(tokenizer), output_dir=str(out),
                                seed=seed, optimizer=_adamw(self.lr))
        fit(module, Data(self.data).source(runner), str(tokenizer), list(self.splits), self.epochs,
            self.batch_size, self.runtime, max_length=self.max_length)
        return {"model": out}

    def work(self, runner: StageRunner) -> dict[str, float]:
        source = Data(self.data).source(runner)
        return _passes(self.epochs * sum(_rows(source, split) for split in self.splits))


@dataclass(eq=False)
class FineTune(Stage):
    """A model fine-tuned from ``init`` on ``splits``: θ_full, θ_retain, or the reinforced θ_r."""

    name: str
    init: Stage
    data: Data
    splits: list[str]
    epochs: int
    lr: float
    batch_size: int
    what: str = "fine-tune"
    runtime: Runtime = field(default_factory=Runtime)
    max_length: int | None = None

    def __post_init__(self) -> None:
        self.cost = float(self.epochs) * (0.2 if "forget" in self.splits[0] else 1.0)

    @property
    def description(self) -> str:
        return f"{self.what} on {' + '.join(self.splits)} for {self.epochs} epochs"

    @property
    def inputs(self) -> list[Stage]:
        return [self.init, *self.data.stages]

    def settings(self) -> dict[str, Any]:
        return {"data": self.data.settings(), "splits": self.splits, "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, **self.runtime.settings(), **_text_settings((), (), self.max_length)}

    def outputs(self) -> list[Path]:
        return [Path(self.name)]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        from perta_lightning.modules.finetune import CausalLMModule

        init, out = runner.path(Product(self.init)), runner.root / self.name
        if self.runtime.devices > 1:
            launch(runner, self.name, "fit", fit_config(
                "perta_lightning.modules.finetune.CausalLMModule",
                {"model": str(init), "output_dir": str(out), "optimizer": optimizer_config(self.lr)},
                self.data.source(runner), str(init), self.splits, self.epochs, self.batch_size, self.runtime,
                stage_seed(runner.seed, self.name), max_length=self.max_length))
            return {"model": out}
        module = CausalLMModule(model=str(init), output_dir=str(out), optimizer=_adamw(self.lr))
        fit(module, self.data.source(runner), str(init), self.splits, self.epochs, self.batch_size, self.runtime,
            max_length=self.max_length)
        return {"model": out}

    def work(self, runner: StageRunner) -> dict[str, float]:
        source = self.data.source(runner)
        return _passes(self.epochs * sum(_rows(source, split) for split in self.splits))


@dataclass(eq=False)
class Unlearn(Stage):
    """A training-based unlearning baseline from the target model, trained once for ``epochs``: the model after each
    of ``save_epochs`` is a point of its trade-off curve (products ``epoch_<k>``, folders ``<name>/epoch_<k>``).

    ``options``: the unlearning module's options of the method (NPO's β, SimNPO's β and γ, RMU's steering)."""

    name: str
    target: Stage
    data: Data
    method: Literal["grad_ascent", "grad_diff", "npo", "simnpo", "rmu"]
    forget_split: str
    retain_split: str
    epochs: int
    lr: float
    batch_size: int
    runtime: Runtime = field(default_factory=Runtime)
    max_length: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    save_epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cost = 0.3 * self.epochs
        self.save_epochs = sorted(set(self.save_epochs or [self.epochs]))

    @property
    def description(self) -> str:
        return f"unlearn {self.forget_split} by {self.method} for {self.epochs} epochs"

    @property
    def inputs(self) -> list[Stage]:
        return [self.target, *self.data.stages]

    def settings(self) -> dict[str, Any]:
        return {"data": self.data.settings(), "method": self.method, "forget": self.forget_split,
                "retain": self.retain_split, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "options": self.options, "save_epochs": self.save_epochs,
                **self.runtime.settings(), **_text_settings((), (), self.max_length)}

    def outputs(self) -> list[Path]:
        return [Path(self.name)]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        from perta_lightning.modules.baselines import UnlearningModule

        target, out = runner.path(Product(self.target)), runner.root / self.name
        products = {f"epoch_{k}": out / f"epoch_{k}" for k in self.save_epochs}
        args = {"method": self.method, "save_epochs": self.save_epochs, "epoch_dir": str(out), **self.options}
        if self.runtime.devices > 1:
            launch(runner, self.name, "fit", fit_config(
                "perta_lightning.modules.baselines.UnlearningModule",
                {"model": str(target), **args, "optimizer": optimizer_config(self.lr)},
                self.data.source(runner), str(target), [self.forget_split], self.epochs, self.batch_size, self.runtime,
                stage_seed(runner.seed, self.name), paired_split=self.retain_split, max_length=self.max_length))
            return products
        module = UnlearningModule(str(target), optimizer=_adamw(self.lr), **args)
        fit(module, self.data.source(runner), str(target), [self.forget_split], self.epochs, self.batch_size,
            self.runtime, paired_split=self.retain_split, max_length=self.max_length)
        return products

    def work(self, runner: StageRunner) -> dict[str, float]:
        """GradAscent: the forget examples; the others: as many retain examples beside them (the retain split
        is cycled to the forget split's length); NPO and RMU: one more forward of the frozen reference."""
        forget = self.epochs * _rows(self.data.source(runner), self.forget_split)
        if self.method == "grad_ascent":
            return _passes(forget)
        return _passes(2 * forget, forget if self.method in ("npo", "rmu") else 0.0)


@dataclass(eq=False)
class Importance(Stage):
    """Forget and retain importance (grad or Fisher) at ``model`` on equally many examples of each split."""

    name: str
    model: Stage
    data: Data
    statistic: Literal["grad", "fisher"]
    granularity: Literal["example", "batch"]
    forget_split: str
    retain_split: str
    num_examples: int | None
    cost: float = 1.0
    max_length: int | None = None
    runtime: Runtime = field(default_factory=Runtime)  # where it runs; not a setting (the statistic is exact)

    @property
    def description(self) -> str:
        return f"{self.statistic} importance by {self.granularity} on {self.forget_split} and {self.retain_split}"

    @property
    def inputs(self) -> list[Stage]:
        return [self.model, *self.data.stages]

    def settings(self) -> dict[str, Any]:
        return {"data": self.data.settings(), "statistic": self.statistic, "granularity": self.granularity,
                "forget": self.forget_split, "retain": self.retain_split, "num_examples": self.num_examples,
                **_text_settings((), (), self.max_length)}

    def outputs(self) -> list[Path]:
        return [Path(self.name)]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        from perta_lightning.data.formatting import PromptFormat
        from perta_lightning.modules.importance import estimate_importance

        prompt = PromptFormat() if self.max_length is None else PromptFormat(max_length=self.max_length)
        if self.runtime.devices > 1:
            return self._launch(runner, prompt)
        written = estimate_importance(
            str(runner.path(Product(self.model))), self.data.source(runner), str(runner.root / self.name),
            statistic=self.statistic, granularity=self.granularity, forget_split=self.forget_split,
            retain_split=self.retain_split, num_examples=self.num_examples,
            subsample_seed=stage_seed(runner.seed, self.name), overwrite=True, prompt=prompt)
        return {"forget": written["forget"], "retain": written["retain"]}

    def _launch(self, runner: StageRunner, prompt: Any) -> dict[str, Path]:
        """The stage as ``perta importance`` on the runtime's devices (:func:`launch`)."""
        from dataclasses import asdict

        from perta_lightning.modules.importance import importance_trainer_defaults

        out = runner.root / self.name
        seed = stage_seed(runner.seed, self.name)
        launch(runner, self.name, "importance", {
            "seed_everything": seed,
            "trainer": {**importance_trainer_defaults(), **trainer_config(self.runtime, precision="32-true")},
            "model": {"class_path": "perta_lightning.modules.importance.ImportanceModule",
                      "init_args": {"model": str(runner.path(Product(self.model))), "output_dir": str(out),
                                    "statistic": self.statistic, "granularity": self.granularity, "overwrite": True}},
            "data": {"class_path": "perta_lightning.data.importance.ImportanceDataModule",
                     "init_args": {"source": asdict(self.data.source(runner)), "prompt": asdict(prompt),
                                   "forget_split": self.forget_split, "retain_split": self.retain_split,
                                   "num_examples": self.num_examples, "subsample_seed": seed}}})
        return {key: out / f"{key}.safetensors" for key in ("forget", "retain")}

    def work(self, runner: StageRunner) -> dict[str, float]:
        """One forward and backward per importance example of each split (batch Fisher as well)."""
        source = self.data.source(runner)
        sizes = [_rows(source, split) for split in (self.forget_split, self.retain_split)]
        return _passes(sum(sizes if self.num_examples is None else [min(n, self.num_examples) for n in sizes]))


@dataclass(eq=False)
class TransformImportance(Stage):
    """An importance pair transformed tensor by tensor before the weight rule (this project's variants):
    ``rank`` (:func:`~perta_lightning.functional.weights.rank_contrast`) or ``excess``
    (:func:`~perta_lightning.functional.weights.excess_importance`)."""

    name: str
    source: Stage
    transform: Literal["rank", "excess"]
    cost: float = 0.1

    @property
    def description(self) -> str:
        return f"{self.transform} transform of {self.source.name}"

    @property
    def inputs(self) -> list[Stage]:
        return [self.source]

    def settings(self) -> dict[str, Any]:
        return {"transform": self.transform}

    def outputs(self) -> list[Path]:
        return [Path(self.name)]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        import json

        from perta_lightning.checkpoints import TensorSource, write_safetensors_sharded
        from perta_lightning.functional.weights import excess_importance, rank_contrast
        from perta_lightning.io import atomic_write_text

        out = runner.root / self.name
        files = {key: runner.path(Product(self.source, key)) for key in ("forget", "retain")}
        written = {}
        with TensorSource.from_path(files["forget"]) as s_f, TensorSource.from_path(files["retain"]) as s_r:
            names = sorted(s_f.infos)
            if names != sorted(s_r.infos):
                from perta_lightning.errors import PertaValueError

                raise PertaValueError(f"{files['forget']} and {files['retain']}: different tensor names")

            def transformed(index: int):  # one tensor at a time; each file's pass recomputes its half
                for name in names:
                    forget, retain = s_f.read(name).float(), s_r.read(name).float()
                    if self.transform == "rank":
                        yield name, rank_contrast(forget, retain)[index]
                    else:
                        yield name, excess_importance(forget, retain) if index == 0 else retain

            for index, key in enumerate(("forget", "retain")):
                metadata = {"format": "pt", "transform": self.transform, "split": key,
                            "transformed_from": files[key].name}
                written[key] = write_safetensors_sharded(transformed(index), out, key, metadata)
                atomic_write_text(out / f"{key}.json", json.dumps({**metadata, "path": written[key].name}, indent=2))
        return written


def alpha_key(alpha: float) -> str:
    """The product key of one α of a merge."""
    return f"alpha_{alpha:g}"


@dataclass(eq=False)
class Merge(Stage):
    """TV (``importance`` is ``None``) or PerTA merges of ``target`` and ``reinforced`` at each α, one pass."""

    name: str
    target: Stage
    reinforced: Stage
    alphas: list[float]
    importance: Importance | None = None
    beta: float = 1.0
    power: float = 1.0
    cost: float = 0.1

    @property
    def description(self) -> str:
        method = "TV" if self.importance is None else f"PerTA (β = {self.beta:g}, p = {self.power:g})"
        return f"{method} merge at α = {', '.join(f'{a:g}' for a in self.alphas)}"

    @property
    def inputs(self) -> list[Stage]:
        return [self.target, self.reinforced] + ([self.importance] if self.importance is not None else [])

    def settings(self) -> dict[str, Any]:
        if self.importance is None:
            return {"method": "tv", "alphas": self.alphas}
        return {"method": "perta", "alphas": self.alphas, "beta": self.beta, "power": self.power}

    def outputs(self) -> list[Path]:
        return [Path(self.name)]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        from perta_lightning.merge import merge_checkpoints

        options: dict[str, Any] = {"method": "tv"}
        if self.importance is not None:
            options = {"method": "perta", "beta": self.beta, "power": self.power,
                       "forget_importance": runner.path(Product(self.importance, "forget")),
                       "retain_importance": runner.path(Product(self.importance, "retain"))}
        written = merge_checkpoints(runner.path(Product(self.target)), runner.path(Product(self.reinforced)),
                                    runner.root / self.name, alpha=list(self.alphas), overwrite=True,
                                    progress=sys.stdout.isatty(), **options)
        return {alpha_key(alpha): path for alpha, path in written.items()}

    def work(self, runner: StageRunner) -> dict[str, float]:
        """Bytes read (target, reinforced and importance weights, once for every α of the pass) and written."""
        read = sum(_weight_bytes(runner, stage) for stage in self.inputs)
        return {"bytes_read": float(read), "bytes_written": float(_weight_bytes(runner, self))}


@dataclass(eq=False)
class Evaluate(Stage):
    """The benchmark's evaluation of one model (``evaluation``); its scores against ``reference`` (θ_retain's)."""

    name: str
    model: Product
    data: Data
    evaluation: Evaluation
    reference: Evaluate | None = None
    runtime: Runtime = field(default_factory=Runtime)
    cost: float = 0.3

    @property
    def description(self) -> str:
        return f"{self.evaluation.verb} {self.model.stage.name}" + ("" if self.model.key == "model" else f" {self.model.key}")

    @property
    def inputs(self) -> list[Stage]:
        return [self.model.stage, *self.data.stages] + ([self.reference] if self.reference is not None else [])

    def settings(self) -> dict[str, Any]:
        return {"data": self.data.settings(), "model": self.model.key, **self.evaluation.settings(),
                **self.runtime.settings()}

    def outputs(self) -> list[Path]:
        return [Path(f"{self.name}.json")]

    def run(self, runner: StageRunner) -> dict[str, Path]:
        out = runner.root / f"{self.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        reference = None if self.reference is None else str(runner.path(Product(self.reference, "eval")))
        if self.runtime.devices > 1:
            config = self.evaluation.command(str(runner.path(self.model)), self.data.source(runner), str(out),
                                             reference, self.runtime.eval_dtype)
            launch(runner, self.name, "test", {"seed_everything": 0,
                                              "trainer": trainer_config(self.runtime, precision="32-true"), **config})
            return {"eval": out}
        self.evaluation.run(str(runner.path(self.model)), self.data.source(runner), str(out), reference,
                            self.runtime.accelerator, self.runtime.devices, self.runtime.eval_dtype)
        return {"eval": out}

    def work(self, runner: StageRunner) -> dict[str, float]:
        """One evaluation (every evaluation set scored and generated once, the same work for every model), or one
        screening (the benchmark's cheaper evaluation of its forgetting axis alone), as the evaluation says."""
        return {self.evaluation.work_key: 1.0}
