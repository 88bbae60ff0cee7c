"""Streaming TV / PerTA merge of Hugging Face checkpoints (``perta merge``).

``θ_u = θ_t − α · (w ⊙ (θ_r − θ_base))`` with ``w = 1`` (``method="tv"``) or the PerTA weights
``w = s_f^p / (s_f^p + β s_r^p + ε)`` (``method="perta"``); see :mod:`perta_lightning.functional`.

Inputs are read one tensor at a time (large tensors by blocks of rows), so peak memory is a few
blocks, not a model. Every header is checked before any output is written. Several ``α`` are
merged in one pass over the inputs, into ``output/alpha_<α>`` each. The result is written to a
temporary directory beside ``output`` and renamed into place.

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
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from perta_lightning.checkpoint_io import (
    WEIGHT_FILE_PATTERN,
    CheckpointError,
    StreamingSafetensorsWriter,
    TensorSource,
    parse_size,
    plan_shards,
    shard_file_names,
)
from perta_lightning.functional.weights import DEFAULT_EPS
from perta_lightning.io import replace_directory

DEFAULT_CHUNK_NUMEL = 1 << 19  # 512K entries (2 MiB float32 temporaries): fastest of 128K-1M measured


class MergeError(ValueError):
    """Inputs to a merge are inconsistent; the message names the file and the key."""


def alpha_dir_name(alpha: float) -> str:
    """Stable directory name for one ``α``: ``alpha_`` + Python's shortest repr of the float
    (``0.5 -> alpha_0.5``, ``1 -> alpha_1.0``, ``1e-05 -> alpha_1e-05``)."""
    return f"alpha_{float(alpha)!r}"


def merge_checkpoints(
    target: Path,
    reinforced: Path,
    output: Path,
    alpha: float | list[float] = 1.0,
    method: Literal["tv", "perta"] = "perta",
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
) -> list[Path]:
    """Unlearn by negating the forget task vector, with per-parameter PerTA weights or plain TV.

    Args:
        target: Hugging Face model directory of ``θ_t``, the model to unlearn from.
        reinforced: model directory of ``θ_r``, ``θ_t`` fine-tuned on the forget set.
        output: directory to write; with a list of ``α`` it holds one ``alpha_<α>`` model per value.
        alpha: scaling ``α`` of the negated task vector, or a list of them (inputs are read once).
        method: ``tv`` (``w = 1``) or ``perta`` (``w`` from the importance files).
        base: model directory of ``θ_base``; ``τ = θ_r − θ_base``. Defaults to ``target``.
        forget_importance: ``s_f``: a ``.safetensors`` file or ``*.safetensors.index.json`` keyed
            by the model's parameter names (``perta`` only).
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
        threads: torch intra-op threads during the merge (restored afterwards). Blocks fit in cache,
            so one thread is usually fastest; more threads stalled 40x on a busy 2-core machine.
        progress: show a progress bar on stderr.

    Returns:
        The written model directories, one per ``α`` in the given order.
    """
    alphas = [float(a) for a in (alpha if isinstance(alpha, (list, tuple)) else [alpha])]
    _check_options(alphas, method, forget_importance, retain_importance, power, beta, eps)
    output = Path(output)
    if output.exists() and not overwrite:
        raise MergeError(f"{output}: output exists; pass --overwrite true to replace it")
    target, reinforced = Path(target), Path(reinforced)
    base = target if base is None else Path(base)
    inputs = [target, reinforced, base] + [Path(p).parent for p in (forget_importance, retain_importance) if p]
    if any(output.resolve() == p.resolve() or output.resolve() in p.resolve().parents for p in inputs):
        raise MergeError(f"{output}: output must not be, or contain, an input directory")
    _check_configs(target, reinforced, base)
    with ExitStack() as stack:
        try:
            t_src = stack.enter_context(TensorSource.from_model_dir(target, allow_pickle))
            r_src = stack.enter_context(TensorSource.from_model_dir(reinforced, allow_pickle))
            b_src = t_src if base == target else stack.enter_context(TensorSource.from_model_dir(base, allow_pickle))
            imps = None
            if method == "perta":
                imps = (stack.enter_context(TensorSource.from_path(Path(forget_importance))),
                        stack.enter_context(TensorSource.from_path(Path(retain_importance))))
        except CheckpointError as e:
            raise MergeError(str(e)) from e
        tied = _tied_aliases(target)
        _check_tensors(t_src, r_src, b_src, imps, tied, missing_importance)

        order = sorted(t_src.infos, key=lambda n: (str(t_src.infos[n].file), t_src.infos[n].offset))
        shards = plan_shards([(n, t_src.infos[n].nbytes) for n in order], parse_size(max_shard_size))
        names = shard_file_names(len(shards))
        single = not isinstance(alpha, (list, tuple))
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            subdirs = [tmp] if single else [tmp / alpha_dir_name(a) for a in alphas]
            record = dict(method=method, alpha=alphas if not single else alphas[0], target=str(target),
                          reinforced=str(reinforced), base=str(base), power=power, beta=beta, eps=eps,
                          forget_importance=forget_importance and str(forget_importance),
                          retain_importance=retain_importance and str(retain_importance),
                          missing_importance=missing_importance)
            for subdir, a in zip(subdirs, alphas):
                _copy_non_weight_files(target, subdir)
                (subdir / "perta_merge.json").write_text(json.dumps({**record, "alpha": a}, indent=2) + "\n")
            total = sum(info.nbytes for info in t_src.infos.values())
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="perta merge", file=sys.stderr,
                       disable=not progress)
            merger = _BlockMerger(t_src, r_src, b_src, imps, tied, alphas, missing_importance, power, beta, eps)
            blocks = [(i, name, start, stop) for i, shard in enumerate(shards) for name in shard
                      for start, stop in _blocks(t_src.infos[name].shape, chunk_numel)]
            shard_writers = _ShardWriters(subdirs, names, shards, t_src)
            finished = 0
            # Three threads: a reader fetches block k+1 and a writer writes block k-1 while this one
            # computes block k (file reads and writes release the GIL). One block in flight each way.
            with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer:
                pending = reader.submit(merger.read, *blocks[0][1:]) if blocks else None
                written = None
                for k, (i, name, start, stop) in enumerate(blocks):
                    inputs = pending.result()
                    pending = reader.submit(merger.read, *blocks[k + 1][1:]) if k + 1 < len(blocks) else None
                    results = merger.merge(name, inputs)
                    if written is not None:
                        written.result()
                    written = writer.submit(shard_writers.write, i, name, results)
                    bar.update(inputs["target"].numel() * inputs["target"].element_size())
                    if stop is None or stop == t_src.infos[name].shape[0]:
                        finished += 1
                        bar.set_postfix_str(f"tensors {finished}/{len(order)}", refresh=False)
                if written is not None:
                    written.result()
                shard_writers.close()
            bar.close()
            if len(shards) > 1:
                index = {"metadata": {"total_size": total},
                         "weight_map": {n: f for shard, f in zip(shards, names) for n in shard}}
                for subdir in subdirs:
                    (subdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            replace_directory(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads(previous_threads)
    return [output] if single else [output / alpha_dir_name(a) for a in alphas]


class _ShardWriters:
    """The output shards of every ``α``, opened shard by shard as blocks arrive in file order."""

    def __init__(self, subdirs: list[Path], names: list[str], shards: list[list[str]], t_src: TensorSource):
        self.subdirs, self.names, self.shards, self.t_src = subdirs, names, shards, t_src
        self.shard: int | None = None
        self.writers: list[StreamingSafetensorsWriter] = []

    def write(self, shard: int, name: str, results: list[torch.Tensor]) -> None:
        if shard != self.shard:
            self.close()
            layout = {n: (self.t_src.infos[n].dtype, self.t_src.infos[n].shape) for n in self.shards[shard]}
            self.writers = [StreamingSafetensorsWriter(d / self.names[shard], layout, {"format": "pt"})
                            for d in self.subdirs]
            self.shard = shard
        for writer, result in zip(self.writers, results):
            writer.write(name, result)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def _check_options(alphas, method, forget_importance, retain_importance, power, beta, eps) -> None:
    if not alphas or not all(abs(a) <= torch.finfo(torch.float32).max for a in alphas):
        raise MergeError(f"alpha: need one or more finite float32 values, got {alphas}")
    if len({alpha_dir_name(a) for a in alphas}) != len(alphas):
        raise MergeError(f"alpha: repeated values in {alphas}")
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


def _check_tensors(t_src, r_src, b_src, imps, tied, missing_importance) -> None:
    """Keys, shapes and dtype kinds of every input agree, from headers only."""
    keys = set(t_src.infos)
    for src in {r_src, b_src} - {t_src}:
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

    Per block, with ``θ_t`` in bf16 and float32 importances, the work is six elementwise passes
    over float32 scratch buffers that are reused from block to block (no fresh temporaries):

    1. ``t32 ← θ_t`` (bf16 → float32 copy; skipped when ``θ_t`` is float32),
    2. ``τ ← θ_r − t32`` (``θ_r`` is converted inside the kernel; the result is exact),
    3. ``w ← s_f^p + β s_r^p``, 4. ``w ← w + ε``, 5. ``w ← s_f^p / w`` (in place; ``p = 1`` skips
       the powers), bit for bit :func:`~perta_lightning.functional.weights.perta_weights`,
    6. ``θ_u ← t32 − α τ ⊙ w`` per ``α``, one ``addcmul`` written straight into the output dtype,

    plus three reductions: ``aminmax`` of each importance (negative, NaN or ``+inf`` raises) and
    one sum of each result. Non-finite ``θ_t``, ``θ_r``, ``θ_base`` or ``τ`` always makes the
    result non-finite (``α ≠ 0`` and ``0 ≤ w ≤ 1``: ``α τ w`` is NaN or ``±inf``, and so is
    ``θ_t − α τ w``), so checking the result suffices; only then are the inputs examined one by
    one to name the culprit.
    """

    def __init__(self, t_src, r_src, b_src, imps, tied, alphas, missing, power, beta, eps):
        self.t_src, self.r_src, self.b_src, self.imps, self.tied = t_src, r_src, b_src, imps, tied
        self.alphas, self.missing, self.power, self.beta, self.eps = alphas, missing, power, beta, eps
        self._scratch: dict[str, torch.Tensor] = {}  # float32 buffers, grown to the largest block

    def _imp_keys(self, name: str) -> list[str | None] | None:
        return None if self.imps is None else [_importance_key(name, imp, self.tied) for imp in self.imps]

    def _copies_target(self, name: str) -> bool:
        keys = self._imp_keys(name)
        keep = keys is not None and None in keys and self.missing == "keep"
        return keep or all(a == 0 for a in self.alphas) or not self.t_src.infos[name].is_float

    def read(self, name: str, start: int | None, stop: int | None) -> dict[str, torch.Tensor]:
        inputs = {"target": self.t_src.read(name, start, stop)}
        if self._copies_target(name):
            return inputs
        source = self.tied.get(name)
        if source in self.t_src.infos:  # a tied alias present in the files: it must equal its source
            for src in {self.t_src, self.r_src, self.b_src}:
                if not torch.equal(src.read(name, start, stop), src.read(source, start, stop)):
                    raise MergeError(f"{src.label}: tied tensors {name!r} and {source!r} differ")
        inputs["reinforced"] = self.r_src.read(name, start, stop)
        if self.b_src is not self.t_src:
            inputs["base"] = self.b_src.read(name, start, stop)
        keys = self._imp_keys(name)
        if keys is not None and None not in keys:
            inputs["forget"], inputs["retain"] = (imp.read(k, start, stop) for imp, k in zip(self.imps, keys))
        return inputs

    def _buffer(self, key: str, numel: int) -> torch.Tensor:
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[key] = torch.empty(numel, dtype=torch.float32)
        return buffer[:numel]

    def _float32(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        """``tensor`` flattened, in float32: itself when it already is, else copied into scratch."""
        flat = tensor.reshape(-1)
        return flat if flat.dtype == torch.float32 else self._buffer(key, flat.numel()).copy_(flat)

    def merge(self, name: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        theta_t = inputs["target"]
        if self._copies_target(name):
            if self.t_src.infos[name].is_float and not _all_finite(theta_t):
                raise MergeError(f"{self.t_src.label}: tensor {name!r} contains NaN or inf")
            return [theta_t] * len(self.alphas)
        n = theta_t.numel()
        t32 = self._float32(theta_t, "target")
        b32 = t32 if "base" not in inputs else self._float32(inputs["base"], "base")
        tau = self._buffer("tau", n)
        reinforced = inputs["reinforced"].reshape(-1)
        if reinforced.dtype == torch.float64:  # float64 arithmetic would differ from task_vector's
            reinforced = self._float32(reinforced, "reinforced")
        torch.sub(reinforced, b32, out=tau)  # one float32 operand: the kernel computes in float32
        weight = None
        if "forget" in inputs:
            keys = self._imp_keys(name)
            s_f, s_r = (self._float32(inputs[k], k) for k in ("forget", "retain"))
            for s, key, imp in zip((s_f, s_r), keys, self.imps):
                _check_importance_minmax(s, key, imp.label)
            if self.power != 1:
                s_f = torch.pow(s_f, self.power, out=self._buffer("forget_p", n))
                s_r = torch.pow(s_r, self.power, out=self._buffer("retain_p", n))
            weight = torch.add(s_f, s_r, alpha=self.beta, out=self._buffer("weight", n))
            if self.eps:
                weight.add_(self.eps)
            torch.div(s_f, weight, out=weight)
        results = []
        for a in self.alphas:
            if a == 0:
                result = theta_t.clone()
            else:
                result = torch.empty(n, dtype=theta_t.dtype)
                if weight is None:
                    torch.add(t32, tau, alpha=-a, out=result)
                else:
                    torch.addcmul(t32, tau, weight, value=-a, out=result)
                result = result.view(theta_t.shape)
            if not _all_finite(result):
                _name_non_finite(name, [(self.t_src, theta_t), (self.r_src, inputs["reinforced"]),
                                        (self.b_src, inputs.get("base", theta_t))], tau, weight, a)
            results.append(result)
        return results


def _check_importance_minmax(s: torch.Tensor, key: str, label: str) -> None:
    """One pass: ``min >= 0`` fails on a negative entry or NaN (NaN propagates), ``max < inf`` on ``+inf``."""
    if s.numel():
        low, high = torch.aminmax(s)
        if not (bool(low >= 0) and bool(high < math.inf)):
            raise MergeError(f"{label}: importance {key!r} is negative, NaN or inf")


def _name_non_finite(name: str, inputs, tau: torch.Tensor, weight: torch.Tensor | None, alpha: float) -> None:
    """Raise naming why the merge of ``name`` is not finite: an input, ``τ``, ``w`` or the result."""
    for src, tensor in inputs:
        if not _all_finite(tensor):
            raise MergeError(f"{src.label}: tensor {name!r} contains NaN or inf")
    if not _all_finite(tau):
        raise MergeError(f"task vector {name!r} contains NaN or inf (float32 overflow)")
    if weight is not None and not _all_finite(weight):
        raise MergeError(f"PerTA weight {name!r} contains NaN "
                         "(s_f = s_r = 0 with eps = 0, or s^p overflows float32)")
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
    try:
        options = build_parser().parse_args(args).as_dict()
        options.pop("config", None)
        paths = merge_checkpoints(**options)
    except (MergeError, CheckpointError) as e:
        sys.exit(f"perta merge: error: {e}")
    for path in paths:
        print(path)
