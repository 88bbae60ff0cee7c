"""Streaming TV / PerTA merge of Hugging Face checkpoints (``perta merge``).

``θ_u = θ_t − α · (w ⊙ (θ_r − θ_base))`` with ``w = 1`` (``method="tv"``) or the PerTA weights
``w = s_f^p / (s_f^p + β s_r^p + ε)`` (``method="perta"``); the maths is
:mod:`perta_lightning.functional` (its in-place forms), this module only streams tensors through it.

Inputs are read one tensor at a time (large tensors by blocks of rows), so peak memory is a few
blocks, not a model. Every header is checked before any output is written.

Output layout, one rule by count: one ``α`` (a number, or a list of one) writes the model at
``output``; several ``α`` are merged in one pass over the inputs and write one model each at
``output/alpha_<α>`` (:func:`alpha_dir_name`). :func:`merge_checkpoints` returns ``{α: model folder}``
either way. The result is written to a temporary folder beside ``output`` and renamed into place
(see :mod:`perta_lightning.io`: removed on errors and SIGTERM, swept on the next run after a SIGKILL).

Fewer bytes per merged parameter: ``save_weighted_task_vector=DIR`` also writes the weighted task
vector ``v = w ⊙ τ`` (float32) once, and ``method="weighted"`` with ``task_vector=DIR`` then merges
``θ_u = θ_t − α v`` reading only ``θ_t`` and ``v`` (6 bytes per parameter for a bf16 model instead of
12), bit for bit the model of the direct merge.

Tied weights: when the config ties word embeddings, the tied name (e.g. ``lm_head.weight``) is
usually absent from the safetensors and its importance entry, if any, is ignored in favour of the
source's. If both names are in the checkpoints, their inputs must be equal (checked) and both are
merged with the source's importance, so they stay identical.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from perta_lightning.checkpoints import (
    WEIGHT_FILE_PATTERN,
    CheckpointError,
    StreamingSafetensorsWriter,
    TensorSource,
    index_file_name,
    parse_size,
    plan_shards,
    shard_file_names,
    write_index,
)
from perta_lightning.errors import PertaValueError
from perta_lightning.functional.task_vectors import negate_task_vector_into, task_vector, weight_task_vector_
from perta_lightning.functional.weights import DEFAULT_EPS, perta_weights
from perta_lightning.io import atomic_directory, atomic_write_text, check_output_path

DEFAULT_CHUNK_NUMEL = 1 << 19  # 512K entries (2 MiB float32 temporaries): fastest of 128K-1M measured


class MergeError(PertaValueError):
    """Inputs to a merge are inconsistent; the message names the file and the key."""


def alpha_dir_name(alpha: float) -> str:
    """Stable directory name for one ``α``: ``alpha_`` + Python's shortest repr of the float
    (``0.5 -> alpha_0.5``, ``1 -> alpha_1.0``, ``1e-05 -> alpha_1e-05``)."""
    return f"alpha_{float(alpha)!r}"


def model_dirs(output: Path, alphas: Sequence[float]) -> dict[float, Path]:
    """Where each ``α``'s model goes: ``output`` itself for one ``α``, ``output/alpha_<α>`` for several."""
    alphas = [float(a) for a in alphas]
    if len(alphas) == 1:
        return {alphas[0]: Path(output)}
    return {a: Path(output) / alpha_dir_name(a) for a in alphas}


TASK_VECTOR_STEM = "task_vector"  # DIR/task_vector.safetensors (or sharded, with its index)
TASK_VECTOR_RECORD = "perta_task_vector.json"


@dataclass(frozen=True)
class MergeSources:
    """The open inputs of a merge. ``base`` is ``target`` itself when ``θ_base = θ_t``; ``importance``
    is ``(s_f, s_r)`` for PerTA, else ``None``; ``tied`` maps tied aliases to their source name.
    ``weighted`` is a stored ``v = w ⊙ τ`` (``method="weighted"``; ``reinforced`` is then ``None``)."""

    target: TensorSource
    reinforced: TensorSource | None
    base: TensorSource
    importance: tuple[TensorSource, TensorSource] | None
    tied: dict[str, str]
    weighted: TensorSource | None = None


@dataclass(frozen=True)
class MergeOptions:
    """The numbers of a merge: the ``α`` values and the PerTA weight's ``p``, ``β`` and ``ε``."""

    alphas: tuple[float, ...]
    missing_importance: Literal["error", "tv", "keep"] = "error"
    power: float = 1.0
    beta: float = 1.0
    eps: float = DEFAULT_EPS
    keep_task_vector: bool = False  # compute v = w ⊙ τ of every merged tensor, even when every α is 0


@dataclass
class Block:
    """The inputs of one block of rows ``start:stop`` of tensor ``name`` (``None, None``: the whole tensor).

    Only ``target`` is read when the block copies the target (non-float tensors, all ``α = 0``,
    ``missing_importance="keep"``); ``base`` is ``None`` when ``θ_base = θ_t``; ``forget`` and
    ``retain`` are ``None`` without importance for this tensor (TV, or ``missing_importance="tv"``);
    ``weighted`` is the stored ``v = w ⊙ τ`` (``method="weighted"``).
    """

    name: str
    start: int | None
    stop: int | None
    target: torch.Tensor
    reinforced: torch.Tensor | None = None
    base: torch.Tensor | None = None
    forget: torch.Tensor | None = None
    retain: torch.Tensor | None = None
    weighted: torch.Tensor | None = None


def merge_checkpoints(
    target: Path,
    reinforced: Path | None,
    output: Path,
    alpha: float | list[float] = 1.0,
    method: Literal["tv", "perta", "weighted"] = "perta",
    base: Path | None = None,
    forget_importance: Path | None = None,
    retain_importance: Path | None = None,
    power: float = 1.0,
    beta: float = 1.0,
    eps: float = DEFAULT_EPS,
    missing_importance: Literal["error", "tv", "keep"] = "error",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    threads: int = 1,
    progress: bool = True,
    save_weighted_task_vector: Path | None = None,
    task_vector: Path | None = None,
) -> dict[float, Path]:
    """Unlearn by negating the forget task vector, with per-parameter PerTA weights or plain TV.

    Args:
        target: Hugging Face model directory of ``θ_t``, the model to unlearn from.
        reinforced: model directory of ``θ_r``, ``θ_t`` fine-tuned on the forget set (not for ``weighted``).
        output: directory to write, outside the input folders. One ``α``: the model is written here;
            several ``α``: one model per value in ``output/alpha_<α>``.
        alpha: scaling ``α`` of the negated task vector, or a list of them (inputs are read once).
            Negative values are legitimate (they move towards ``θ_r``; useful in a sweep through 0).
        method: ``tv`` (``w = 1``), ``perta`` (``w`` from the importance files) or ``weighted``
            (``θ_t − α v`` with ``v = w ⊙ τ`` read from ``task_vector``).
        base: model directory of ``θ_base``; ``τ = θ_r − θ_base``. Defaults to ``target``.
        forget_importance: ``s_f``: a ``.safetensors`` file or ``*.safetensors.index.json`` keyed
            by the model's parameter names (``perta`` only; any float dtype, bf16 is upcast exactly).
        retain_importance: ``s_r``, same layout as ``forget_importance`` (``perta`` only).
        power: exponent ``p`` of the importances.
        beta: weight ``β`` of the retain importance.
        eps: ``ε`` in the denominator of ``w``; guards ``0/0`` (both importances zero gives ``w = 0``).
        missing_importance: for float parameters absent from the importance files: ``error``,
            ``tv`` (``w = 1``) or ``keep`` (``θ_u = θ_t``).
        max_shard_size: largest output shard, bytes or a string like ``5GB`` / ``500MiB``.
        overwrite: replace an existing ``output``.
        allow_pickle: accept ``pytorch_model.bin`` checkpoints (loaded with ``weights_only=True``).
        chunk_numel: entries per block when a large tensor is processed in blocks of rows.
        threads: torch intra-op threads during the merge (at least 1; restored afterwards). Blocks fit in
            cache, so one thread is usually fastest; more threads stalled 40x on a busy 2-core machine.
        progress: show a progress bar on stderr.
        save_weighted_task_vector: (``tv`` / ``perta``) also write ``v = w ⊙ τ`` in float32 to this new
            folder, for later ``--method weighted`` merges that read only ``θ_t`` and ``v``.
        task_vector: (``weighted`` only) a folder written by ``save_weighted_task_vector``.

    Returns:
        ``{α: model directory}`` in the given order of ``α``.
    """
    alphas = tuple(float(a) for a in (alpha if isinstance(alpha, (list, tuple)) else [alpha]))
    _check_options(alphas, method, reinforced, base, forget_importance, retain_importance, power, beta, eps,
                   save_weighted_task_vector, task_vector)
    if threads < 1 or chunk_numel < 1:
        raise MergeError(f"threads and chunk_numel: need at least 1, got threads={threads}, chunk_numel={chunk_numel}")
    max_shard_bytes = parse_size(max_shard_size)
    outputs = [check_output_path(p) for p in (output, save_weighted_task_vector) if p is not None]
    for out in outputs:
        if out.exists() and not overwrite:
            raise MergeError(f"{out}: output exists; pass --overwrite true to replace it")
    target = Path(target)
    reinforced = None if reinforced is None else Path(reinforced)
    base = target if base is None else Path(base)
    models = [p for p in (target, reinforced, base) if p is not None]
    files = [Path(p) for p in (forget_importance, retain_importance) if p]
    for out in outputs:
        _check_output_outside_inputs(out, models + ([Path(task_vector)] if task_vector else []), files)
    if len(outputs) == 2 and (outputs[0].resolve() in [outputs[1].resolve(), *outputs[1].resolve().parents]
                              or outputs[1].resolve() in outputs[0].resolve().parents):
        raise MergeError(f"{save_weighted_task_vector}: the task vector folder must be apart from output {output}")
    record: dict[str, Any] = dict(method=method, target=str(target), **_config_identity(target))
    if method == "weighted":
        record.update(task_vector_dir=str(task_vector),
                      task_vector=_check_task_vector_record(Path(task_vector), record))
    else:
        _check_configs(target, reinforced, base)
        record.update(reinforced=str(reinforced), base=str(base), power=power, beta=beta, eps=eps,
                      forget_importance=forget_importance and str(forget_importance),
                      retain_importance=retain_importance and str(retain_importance),
                      missing_importance=missing_importance)
    options = MergeOptions(alphas, missing_importance, power, beta, eps, save_weighted_task_vector is not None)
    with ExitStack() as stack:
        try:
            t_src = stack.enter_context(TensorSource.from_model_dir(target, allow_pickle))
            r_src = w_src = imps = None
            if method == "weighted":
                w_src = stack.enter_context(_task_vector_source(Path(task_vector)))
            else:
                r_src = stack.enter_context(TensorSource.from_model_dir(reinforced, allow_pickle))
            b_src = t_src if base == target else stack.enter_context(TensorSource.from_model_dir(base, allow_pickle))
            if method == "perta":
                imps = (stack.enter_context(TensorSource.from_path(Path(forget_importance))),
                        stack.enter_context(TensorSource.from_path(Path(retain_importance))))
        except CheckpointError as e:
            raise MergeError(str(e)) from e
        sources = MergeSources(t_src, r_src, b_src, imps, _tied_aliases(target), w_src)
        _check_tensors(sources, missing_importance)
        tmp = stack.enter_context(atomic_directory(output, overwrite=overwrite))
        saved = None
        if save_weighted_task_vector is not None:
            saved = stack.enter_context(atomic_directory(save_weighted_task_vector, overwrite=overwrite))
            atomic_write_text(saved / TASK_VECTOR_RECORD, json.dumps(record, indent=2) + "\n")
        _stream_merge(sources, options, model_dirs(tmp, alphas), target, record, max_shard_bytes, chunk_numel,
                      threads, progress, saved)
    return model_dirs(output, alphas)


def _config_identity(directory: Path) -> dict[str, Any]:
    config = _load_config(directory)
    return {"architectures": config.get("architectures"), "model_type": config.get("model_type")}


def _task_vector_file(directory: Path) -> Path:
    """The file holding the stored ``v = w ⊙ τ`` in ``directory`` (written by ``save_weighted_task_vector``)."""
    for name in (index_file_name(TASK_VECTOR_STEM), f"{TASK_VECTOR_STEM}.safetensors"):
        if (directory / name).is_file():
            return directory / name
    raise MergeError(f"{directory}: no {TASK_VECTOR_STEM}.safetensors(.index.json); write one with "
                     "--save_weighted_task_vector during a tv or perta merge")


def _task_vector_source(directory: Path) -> TensorSource:
    return TensorSource.from_path(_task_vector_file(directory))


def _check_task_vector_record(directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record of how the task vector in ``directory`` was made; its model must be the target's kind."""
    _task_vector_file(directory)
    path = directory / TASK_VECTOR_RECORD
    try:
        made = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: cannot read the task vector's record ({e})") from e
    for key in ("architectures", "model_type"):
        if made.get(key) != record[key]:
            raise MergeError(f"{path}: {key} {made.get(key)!r} differs from {record[key]!r} of the target")
    return made


def _stream_merge(sources: MergeSources, options: MergeOptions, outputs: dict[float, Path], target_dir: Path,
                  record: dict[str, Any], max_shard_bytes: int, chunk_numel: int, threads: int,
                  progress: bool, task_vector_dir: Path | None = None) -> None:
    """Merge every tensor of ``sources`` into the model folders ``outputs`` (``{α: folder}``), and write
    ``v = w ⊙ τ`` of every merged tensor into ``task_vector_dir`` when given."""
    t_src = sources.target
    order = sorted(t_src.infos, key=lambda n: (str(t_src.infos[n].file), t_src.infos[n].offset))
    shards = plan_shards([(n, t_src.infos[n].nbytes) for n in order], max_shard_bytes)
    subdirs = list(outputs.values())
    merger = _BlockMerger(sources, options)
    shard_writers = _ShardWriters(subdirs, "model", shards, {n: (t_src.infos[n].dtype, t_src.infos[n].shape)
                                                            for n in order})
    tv_writer = tv_shards = None
    if task_vector_dir is not None:
        tv_names = [n for n in order if not merger.copies_target(n)]
        tv_layout = {n: ("F32", t_src.infos[n].shape) for n in tv_names}
        tv_shards = plan_shards([(n, 4 * t_src.infos[n].numel) for n in tv_names], max_shard_bytes)
        tv_writer = _ShardWriters([task_vector_dir], TASK_VECTOR_STEM, tv_shards, tv_layout)
    for a, subdir in outputs.items():
        _copy_non_weight_files(target_dir, subdir)
        (subdir / "perta_merge.json").write_text(json.dumps({**record, "alpha": a}, indent=2) + "\n")
    total = sum(info.nbytes for info in t_src.infos.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="perta merge", file=sys.stderr, disable=not progress)
    blocks = [(name, start, stop) for name in order for start, stop in _blocks(t_src.infos[name].shape, chunk_numel)]
    finished = 0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Three threads: a reader fetches block k+1 and a writer writes block k-1 while this one
        # computes block k (file reads and writes release the GIL). One block in flight each way.
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer:
            pending = reader.submit(merger.read, *blocks[0]) if blocks else None
            written = None
            for k, (name, start, stop) in enumerate(blocks):
                block = pending.result()
                pending = reader.submit(merger.read, *blocks[k + 1]) if k + 1 < len(blocks) else None
                results, v = merger.merge(block)
                if written is not None:
                    written.result()
                if tv_writer is not None and v is not None:
                    v = v.clone().view(block.target.shape)  # the scratch buffer is reused by the next block
                written = writer.submit(_write_block, shard_writers, tv_writer, name, results, v)
                bar.update(block.target.numel() * block.target.element_size())
                if stop is None or stop == t_src.infos[name].shape[0]:
                    finished += 1
                    bar.set_postfix_str(f"tensors {finished}/{len(order)}", refresh=False)
            if written is not None:
                written.result()
            shard_writers.close()
            if tv_writer is not None:
                tv_writer.close()
    finally:
        torch.set_num_threads(previous_threads)
        bar.close()  # before an error message, so that it starts on a line of its own
    merger.check_importance_not_all_zero()
    if len(shards) > 1:
        for subdir in subdirs:
            write_index(subdir, "model", shards, total)
    if task_vector_dir is not None and len(tv_shards) > 1:
        write_index(task_vector_dir, TASK_VECTOR_STEM, tv_shards, sum(4 * t_src.infos[n].numel for s in tv_shards
                                                                      for n in s))


def _write_block(models: _ShardWriters, task_vector: _ShardWriters | None, name: str, results: list[torch.Tensor],
                 v: torch.Tensor | None) -> None:
    models.write(name, results)
    if task_vector is not None and v is not None:
        task_vector.write(name, [v])


class _ShardWriters:
    """Shards ``<stem>...safetensors`` written in several folders at once (one per ``α``), opened shard
    by shard as blocks arrive in file order; ``layout`` gives each tensor's dtype code and shape."""

    def __init__(self, folders: list[Path], stem: str, shards: list[list[str]],
                 layout: dict[str, tuple[str, tuple[int, ...]]]):
        self.folders, self.shards, self.layout = folders, shards, layout
        self.names = shard_file_names(len(shards), stem)
        self.shard_of = {name: k for k, shard in enumerate(shards) for name in shard}
        self.shard: int | None = None
        self.writers: list[StreamingSafetensorsWriter] = []

    def write(self, name: str, results: list[torch.Tensor]) -> None:
        shard = self.shard_of[name]
        if shard != self.shard:
            self.close()
            layout = {n: self.layout[n] for n in self.shards[shard]}
            self.writers = [StreamingSafetensorsWriter(d / self.names[shard], layout, {"format": "pt"})
                            for d in self.folders]
            self.shard = shard
        for writer, result in zip(self.writers, results):
            writer.write(name, result)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def _check_output_outside_inputs(output: Path, models: list[Path], files: list[Path]) -> None:
    """``output`` is neither an input, nor inside a model folder, nor a folder holding an input."""
    out = output.resolve()
    for path in models + [f.parent for f in files]:
        inp = path.resolve()
        if out == inp or out in inp.parents:
            raise MergeError(f"{output}: output must not be, or contain, an input directory ({path})")
    for path in models:
        if path.resolve() in out.parents:
            raise MergeError(f"{output}: output must not be inside the input model folder {path} "
                             "(every later merge from it would copy the output along)")


def _check_options(alphas, method, reinforced, base, forget_importance, retain_importance, power, beta, eps,
                   save_weighted_task_vector, task_vector) -> None:
    if not alphas or not all(abs(a) <= torch.finfo(torch.float32).max for a in alphas):
        raise MergeError(f"alpha: need one or more finite float32 values, got {alphas}")
    if len({alpha_dir_name(a) for a in alphas}) != len(alphas):
        raise MergeError(f"alpha: repeated values in {alphas}")
    if method not in ("tv", "perta", "weighted"):
        raise MergeError(f"method: one of tv, perta, weighted; got {method!r}")
    if method == "weighted":
        if task_vector is None or any(x is not None for x in (reinforced, base, forget_importance, retain_importance,
                                                              save_weighted_task_vector)):
            raise MergeError("method weighted takes --target and --task_vector (a folder written by "
                             "--save_weighted_task_vector), and no reinforced, base or importance")
        return
    if reinforced is None:
        raise MergeError(f"method {method} needs --reinforced")
    if task_vector is not None:
        raise MergeError("--task_vector is read by --method weighted only")
    if method == "perta" and (forget_importance is None or retain_importance is None):
        raise MergeError("method perta needs --forget_importance and --retain_importance")
    if method == "tv" and (forget_importance is not None or retain_importance is not None):
        raise MergeError("method tv takes no importance files; use --method perta")
    if power <= 0 or beta < 0 or eps < 0:
        raise MergeError(f"need power > 0, beta >= 0, eps >= 0; got {power}, {beta}, {eps}")


def _load_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: cannot read model config ({e})") from e


def _check_configs(target: Path, reinforced: Path, base: Path) -> None:
    reference = _load_config(target)
    for other in {reinforced, base} - {target}:
        config = _load_config(other)
        for key in ("architectures", "model_type"):
            if config.get(key) != reference.get(key):
                raise MergeError(f"{other / 'config.json'}: {key} {config.get(key)!r} differs from "
                                 f"{reference.get(key)!r} in {target / 'config.json'}")


def _tied_aliases(target: Path) -> dict[str, str]:
    """``{alias: source}`` of tied parameters (e.g. ``lm_head.weight -> model.embed_tokens.weight``)
    when the config ties word embeddings, from the architecture class's ``_tied_weights_keys``."""
    config = _load_config(target)
    text_config = config.get("text_config") or {}
    if not config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)):
        return {}
    import transformers

    aliases: dict[str, str] = {}
    for arch in config.get("architectures") or []:
        keys = getattr(getattr(transformers, arch, None), "_tied_weights_keys", None)
        if isinstance(keys, dict):
            aliases.update({str(k): str(v) for k, v in keys.items() if "*" not in k and "*" not in v})
    return aliases


def _describe(names: set[str]) -> str:
    listed = sorted(names)
    return ", ".join(repr(n) for n in listed[:5]) + (f" and {len(listed) - 5} more" if len(listed) > 5 else "")


def _check_tensors(sources: MergeSources, missing_importance: str) -> None:
    """Keys, shapes and dtype kinds of every input agree, from headers only."""
    t_src, r_src, b_src, imps, tied = (sources.target, sources.reinforced, sources.base, sources.importance,
                                       sources.tied)
    keys = set(t_src.infos)
    if sources.weighted is not None:
        for name, info in sources.weighted.infos.items():
            if name not in keys or info.shape != t_src.infos[name].shape or not info.is_float:
                raise MergeError(f"{info.file}: task vector {name!r} ({info.dtype}, shape {info.shape}) is not a "
                                 "float parameter of the target of that shape")
    for src in {r_src, b_src} - {t_src, None}:
        if set(src.infos) != keys:
            raise MergeError(f"{src.label}: keys differ from {t_src.label}: only in {src.label}: "
                             f"{_describe(set(src.infos) - keys)}; only in target: {_describe(keys - set(src.infos))}")
        for name in sorted(keys):
            a, b = t_src.infos[name], src.infos[name]
            if a.shape != b.shape:
                raise MergeError(f"{b.file}: tensor {name!r} has shape {b.shape}, target has {a.shape} in {a.file}")
            if a.is_float != b.is_float or (not a.is_float and a.dtype != b.dtype):
                raise MergeError(f"{b.file}: tensor {name!r} has dtype {b.dtype}, target has {a.dtype}")
    for imp in imps or ():
        extra = {n for n in set(imp.infos) - keys if not (n in tied and tied[n] in keys)}
        if extra:
            raise MergeError(f"{imp.label}: importance for parameters not in the model: {_describe(extra)}")
        for name, info in imp.infos.items():
            if name in keys and info.shape != t_src.infos[name].shape:
                raise MergeError(f"{info.file}: importance {name!r} has shape {info.shape}, "
                                 f"model has {t_src.infos[name].shape}")
            if not info.is_float:
                raise MergeError(f"{info.file}: importance {name!r} has non-float dtype {info.dtype}")
        missing = {n for n in keys if t_src.infos[n].is_float and _importance_key(n, imp, tied) is None}
        if missing and missing_importance == "error":
            raise MergeError(f"{imp.label}: no importance for {_describe(missing)}; pass "
                             "--missing_importance tv|keep to merge those with w=1 or leave them at the target")


def _importance_key(name: str, imp: TensorSource, tied: dict[str, str]) -> str | None:
    """The key holding ``name``'s importance: its own, else its tied source's."""
    if name in tied and tied[name] in imp.infos:
        return tied[name]
    return name if name in imp.infos else None


def _blocks(shape: tuple[int, ...], chunk_numel: int):
    """``(start, stop)`` row ranges of about ``chunk_numel`` entries; ``(None, None)`` for the whole."""
    row_numel = math.prod(shape[1:])
    if len(shape) == 0 or shape[0] * row_numel <= chunk_numel:
        yield None, None
        return
    rows = max(1, chunk_numel // max(1, row_numel))
    for start in range(0, shape[0], rows):
        yield start, min(start + rows, shape[0])


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf. Fast path: the sum is finite (NaN and inf propagate into it); only when it is
    not (possibly a harmless overflow of the sum) are the entries examined one by one."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class _BlockMerger:
    """Reads the inputs of one block of one tensor and merges them (every alpha at once).

    Per block the work is the functional forms, over float32 scratch buffers reused from block to
    block (no fresh temporaries): ``t32 ← θ_t`` (a copy, skipped when ``θ_t`` is float32),
    :func:`~perta_lightning.functional.task_vectors.task_vector` into ``τ``,
    :func:`~perta_lightning.functional.weights.perta_weights` into ``w`` (PerTA),
    :func:`~perta_lightning.functional.task_vectors.weight_task_vector_` (``τ ← w ⊙ τ``) and
    :func:`~perta_lightning.functional.task_vectors.negate_task_vector_into` per ``α``, written straight
    into the output dtype; plus the checks: ``aminmax`` of each importance (negative, NaN or ``+inf``
    raises; the maxima are kept to refuse all-zero importance) and one sum of each result.

    Non-finite ``θ_t``, ``θ_r``, ``θ_base`` or ``τ`` always makes the result non-finite (``α ≠ 0`` and
    ``0 ≤ w ≤ 1``: ``α w τ`` is NaN or ``±inf``, and so is ``θ_t − α w τ``), so checking the result
    suffices; only then are the inputs examined one by one to name the culprit.
    """

    def __init__(self, sources: MergeSources, options: MergeOptions):
        self.sources, self.options = sources, options
        self._scratch: dict[str, torch.Tensor] = {}  # float32 buffers, grown to the largest block
        self.importance_max = [0.0, 0.0]  # largest s_f and s_r entry read so far
        self.importance_read = False

    def _imp_keys(self, name: str) -> list[str | None] | None:
        imps = self.sources.importance
        return None if imps is None else [_importance_key(name, imp, self.sources.tied) for imp in imps]

    def copies_target(self, name: str) -> bool:
        """Whether ``θ_u = θ_t`` for tensor ``name`` whatever ``α`` (and no ``v`` is formed for it)."""
        o, src = self.options, self.sources
        if not src.target.infos[name].is_float:
            return True
        if src.weighted is not None:
            return name not in src.weighted.infos
        keys = self._imp_keys(name)
        keep = keys is not None and None in keys and o.missing_importance == "keep"
        return keep or (all(a == 0 for a in o.alphas) and not o.keep_task_vector)

    def read(self, name: str, start: int | None, stop: int | None) -> Block:
        src = self.sources
        block = Block(name, start, stop, src.target.read(name, start, stop))
        if self.copies_target(name):
            return block
        if src.weighted is not None:
            block.weighted = src.weighted.read(name, start, stop)
            return block
        source = src.tied.get(name)
        if source in src.target.infos:  # a tied alias present in the files: it must equal its source
            for s in {src.target, src.reinforced, src.base}:
                if not torch.equal(s.read(name, start, stop), s.read(source, start, stop)):
                    raise MergeError(f"{s.label}: tied tensors {name!r} and {source!r} differ")
        block.reinforced = src.reinforced.read(name, start, stop)
        if src.base is not src.target:
            block.base = src.base.read(name, start, stop)
        keys = self._imp_keys(name)
        if keys is not None and None not in keys:
            block.forget, block.retain = (imp.read(k, start, stop) for imp, k in zip(src.importance, keys))
        return block

    def _buffer(self, key: str, numel: int) -> torch.Tensor:
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[key] = torch.empty(numel, dtype=torch.float32)
        return buffer[:numel]

    def _float32(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        """``tensor`` flattened, in float32: itself when it already is, else copied into scratch."""
        flat = tensor.reshape(-1)
        return flat if flat.dtype == torch.float32 else self._buffer(key, flat.numel()).copy_(flat)

    def _weights(self, block: Block) -> torch.Tensor:
        """``w`` of the block, checking each importance and recording its largest entry."""
        o, keys = self.options, self._imp_keys(block.name)
        s_f, s_r = self._float32(block.forget, "forget"), self._float32(block.retain, "retain")
        for k, (s, key, imp) in enumerate(zip((s_f, s_r), keys, self.sources.importance)):
            self.importance_max[k] = max(self.importance_max[k], _importance_max(s, key, imp.label))
        self.importance_read = True
        # s_f and s_r are this block's own buffers (fresh reads or scratch copies): s^p may overwrite them
        return perta_weights(s_f, s_r, o.power, o.beta, o.eps, out=self._buffer("weight", s_f.numel()),
                             powered=(s_f, s_r))

    def merge(self, block: Block) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The merged block for every ``α``, and ``v = w ⊙ τ`` (flat float32 scratch; ``None`` when the
        block copies the target)."""
        src, alphas = self.sources, self.options.alphas
        theta_t = block.target
        if self.copies_target(block.name):
            if src.target.infos[block.name].is_float and not _all_finite(theta_t):
                raise MergeError(f"{src.target.label}: tensor {block.name!r} contains NaN or inf")
            return [theta_t] * len(alphas), None
        n = theta_t.numel()
        t32 = self._float32(theta_t, "target")
        weight = None
        if block.weighted is not None:
            v = self._float32(block.weighted, "tau")
        else:
            b32 = t32 if block.base is None else self._float32(block.base, "base")
            tau = task_vector(block.reinforced.reshape(-1), b32, out=self._buffer("tau", n))
            weight = self._weights(block) if block.forget is not None else None
            v = weight_task_vector_(tau, weight)
        if alphas == (0.0,) * len(alphas) and not _all_finite(v):  # α = 0 alone would not reveal it
            _name_non_finite(block, src, v, weight, 0.0)
        results = []
        for a in alphas:
            result = negate_task_vector_into(theta_t.reshape(-1) if a == 0 else t32, v, a,
                                             out=torch.empty(n, dtype=theta_t.dtype)).view(theta_t.shape)
            if not _all_finite(result):
                _name_non_finite(block, src, v, weight, a)
            results.append(result)
        return results, v

    def check_importance_not_all_zero(self) -> None:
        """An importance file that is zero everywhere it was read makes the merge meaningless (all-zero
        ``s_f`` gives ``w = 0``: the target comes back unchanged); it is refused, naming the file."""
        if not self.importance_read:
            return
        for largest, imp in zip(self.importance_max, self.sources.importance):
            if largest == 0:
                raise MergeError(f"{imp.label}: importance is zero for every parameter merged; was it estimated "
                                 "on an empty split or a zero loss? (use --method tv for plain task vectors)")


def _importance_max(s: torch.Tensor, key: str, label: str) -> float:
    """The largest entry of ``s``, in one pass: ``min >= 0`` fails on a negative entry or NaN (NaN
    propagates), ``max < inf`` on ``+inf``, either raising naming ``label`` and ``key``."""
    if not s.numel():
        return 0.0
    low, high = torch.aminmax(s)
    if not (bool(low >= 0) and bool(high < math.inf)):
        raise MergeError(f"{label}: importance {key!r} is negative, NaN or inf")
    return float(high)


def _name_non_finite(block: Block, src: MergeSources, v: torch.Tensor, weight: torch.Tensor | None,
                     alpha: float) -> None:
    """Raise naming why the merge of a block is not finite: an input, ``w``, ``τ`` or the result."""
    name = block.name
    inputs = [(src.target, block.target), (src.reinforced, block.reinforced), (src.base, block.base),
              (src.weighted, block.weighted)]
    for source, tensor in inputs:
        if tensor is not None and not _all_finite(tensor):
            raise MergeError(f"{source.label}: tensor {name!r} contains NaN or inf")
    if weight is not None and not _all_finite(weight):
        raise MergeError(f"PerTA weight {name!r} contains NaN "
                         "(s_f = s_r = 0 with eps = 0, or s^p overflows float32)")
    if not _all_finite(v):  # finite 0 <= w <= 1 keeps a finite τ finite, so τ itself overflowed
        raise MergeError(f"task vector {name!r} contains NaN or inf (float32 overflow)")
    raise MergeError(f"merged tensor (alpha={alpha}) {name!r} contains NaN or inf (float32 overflow)")


def _copy_non_weight_files(source: Path, destination: Path) -> None:
    """Copy config, generation config, tokenizer and anything else that is not a weight file.

    The target's own provenance files (``perta_*.json``: how it was trained, merged or staged) describe the
    target, not the merge, and are not copied; the merge writes its own ``perta_merge.json``.
    """
    destination.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name.startswith((".", "perta_")) or WEIGHT_FILE_PATTERN.fullmatch(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, destination / item.name)
        else:
            shutil.copy2(item, destination / item.name)


def build_parser() -> Any:
    """The jsonargparse parser of ``perta merge``: the arguments of :func:`merge_checkpoints` and ``--config``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="perta merge", description=merge_checkpoints.__doc__.splitlines()[0])
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(merge_checkpoints, as_positional=False)
    return parser


def cli_main(argv: Sequence[str] | None = None) -> None:
    """``perta merge ...``: parse the arguments of :func:`merge_checkpoints` (or a ``--config`` YAML)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # jsonargparse booleans take a value; also accept the bare switches ``--overwrite`` and friends.
    switches = {"--overwrite", "--allow_pickle", "--progress"}
    args = [f"{a}=true" if a in switches and (i + 1 == len(args) or args[i + 1].startswith("--")) else a
            for i, a in enumerate(args)]
    options = build_parser().parse_args(args).as_dict()
    options.pop("config", None)
    for path in merge_checkpoints(**options).values():  # errors: one line via perta_lightning.cli
        print(path)
