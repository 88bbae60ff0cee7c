"""Reading and writing checkpoints: safetensors files, sharded with an index, and Hugging Face model folders.

The one place that knows the file formats:

* :class:`TensorSource` reads a (sharded) safetensors checkpoint, or a pickle ``.bin`` one when
  explicitly allowed, one tensor, or one block of rows of a tensor, at a time;
  :func:`read_safetensors_header` checks a header without reading tensor data.
* :class:`StreamingSafetensorsWriter` writes one safetensors shard whose header is known up front,
  appending tensor bytes as they are computed, so a shard is never held in memory.
* :func:`plan_shards` splits an ordered list of tensors into shards the way ``save_pretrained``
  does, :func:`shard_file_names` names them (``<stem>.safetensors`` alone, else
  ``<stem>-00001-of-00002.safetensors`` ...) and :func:`write_index` writes
  ``<stem>.safetensors.index.json``; :func:`write_safetensors_sharded` does all three for an
  iterator of tensors, and :func:`safetensors_files_for` finds what such a write left.
* :func:`load_causal_lm` and :func:`save_hf_directory` load and save whole Hugging Face models.

No maths here and no global state: every handle lives in the object that opened it. Atomic
folders and files (temporary sibling, rename) are :mod:`perta_lightning.io`'s.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perta_lightning.errors import PertaFileNotFoundError, PertaValueError
from perta_lightning.io import apply_umask, atomic_directory, atomic_write_text, private_temporary_directory

SAFE_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
TORCH_TO_SAFE = {v: k for k, v in SAFE_DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
WEIGHT_FILE_PATTERN = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt)$|.*\.(safetensors|bin)\.index\.json$")


class CheckpointError(PertaValueError):
    """A checkpoint or importance file is missing, malformed or inconsistent; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, read from headers only."""

    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset of the tensor's data in ``file``

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.tensor([], dtype=SAFE_DTYPES[self.dtype]).element_size()

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one ``.safetensors`` file, from its JSON header (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        file_size = path.stat().st_size
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    infos = {}
    for name, entry in header.items():
        _check_header_entry(path, name, entry)
        if entry["dtype"] not in SAFE_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        info = TensorInfo(entry["dtype"], tuple(entry["shape"]), path, 8 + length + begin)
        if end - begin != info.nbytes or info.offset + info.nbytes > file_size:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent offsets or the file is truncated")
        infos[name] = info
    return infos


def _check_header_entry(path: Path, name: str, entry: Any) -> None:
    """One header entry has ``dtype`` (a string), ``shape`` (non-negative ints) and ``data_offsets`` (two ints)."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: header entry of tensor {name!r} is not a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise CheckpointError(f"{path}: header entry of tensor {name!r} has no {key!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(entry["dtype"], str):
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, not a string")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, not two byte offsets")


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a sharded index with a 'weight_map' ({e})") from e
    return {name: index_path.parent / file for name, file in weight_map.items()}


class TensorSource:
    """Read tensors of a checkpoint by name, whole or by blocks of rows (first dimension).

    Build with :meth:`from_model_dir` (a Hugging Face model directory) or :meth:`from_path` (a
    ``.safetensors`` file or a ``*.safetensors.index.json``). Use as a context manager.
    """

    def __init__(self, infos: dict[str, TensorInfo], label: str, pickled: dict[str, torch.Tensor] | None = None):
        self.infos = infos
        self.label = label
        self._pickled = pickled
        self._handles: dict[Path, object] = {}  # open files, closed by close()

    @classmethod
    def from_path(cls, path: Path) -> TensorSource:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        if path.name.endswith(".json"):
            infos: dict[str, TensorInfo] = {}
            weight_map = _read_index(path)
            for file in sorted(set(weight_map.values())):
                if not file.is_file():
                    raise CheckpointError(f"{path}: shard {file.name} listed in weight_map does not exist")
                for name, info in read_safetensors_header(file).items():
                    if weight_map.get(name) != file:
                        raise CheckpointError(f"{path}: tensor {name!r} in {file.name} is not mapped to it")
                    infos[name] = info
            missing = set(weight_map) - set(infos)
            if missing:
                raise CheckpointError(f"{path}: weight_map names {sorted(missing)[:5]} absent from their shards")
            return cls(infos, str(path))
        if path.suffix == ".safetensors":
            return cls(read_safetensors_header(path), str(path))
        raise CheckpointError(f"{path}: expected a .safetensors file or a *.safetensors.index.json")

    @classmethod
    def from_model_dir(cls, directory: Path, allow_pickle: bool = False) -> TensorSource:
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such model directory")
        for name in ("model.safetensors.index.json", "model.safetensors"):
            if (directory / name).is_file():
                source = cls.from_path(directory / name)
                source.label = str(directory)
                return source
        for name in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
            if (directory / name).is_file():
                if not allow_pickle:
                    raise CheckpointError(
                        f"{directory / name}: pickle checkpoint refused; convert it to safetensors or pass "
                        "--allow_pickle true (it is then loaded with torch.load(weights_only=True))"
                    )
                return cls._from_pickle(directory / name, str(directory))
        raise CheckpointError(f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")

    @classmethod
    def _from_pickle(cls, path: Path, label: str) -> TensorSource:
        files = sorted(set(_read_index(path).values())) if path.name.endswith(".json") else [path]
        tensors: dict[str, torch.Tensor] = {}
        infos: dict[str, TensorInfo] = {}
        for file in files:
            # mmap keeps the shard on disk; weights_only refuses arbitrary pickled objects.
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
                raise CheckpointError(f"{file}: not a loadable weights-only pickle checkpoint ({e})") from e
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise CheckpointError(f"{file}: not a state dict of tensors")
            for name, tensor in state.items():
                if tensor.dtype not in TORCH_TO_SAFE:
                    raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {tensor.dtype}")
                tensors[name] = tensor
                infos[name] = TensorInfo(TORCH_TO_SAFE[tensor.dtype], tuple(tensor.shape), file, len(infos))
        return cls(infos, label, pickled=tensors)

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name``, or its rows ``start:stop`` when given (0-d tensors are always whole).

        Safetensors are read with plain positioned reads into a fresh buffer rather than through a
        memory map, so resident memory stays one block (mapped file pages would count in RSS), and
        the read releases the GIL.
        """
        info = self.infos[name]
        whole = start is None or len(info.shape) == 0
        if self._pickled is not None:
            tensor = self._pickled[name]
            return tensor.clone() if whole else tensor[start:stop].clone()
        shape = info.shape if whole else (stop - start, *info.shape[1:])
        row_bytes = 0 if whole else info.nbytes // info.shape[0]
        offset = info.offset + (0 if whole else start * row_bytes)
        buffer = torch.empty(shape, dtype=SAFE_DTYPES[info.dtype])
        view = buffer.reshape(-1).view(torch.uint8).numpy() if buffer.numel() else bytearray()
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb", buffering=0)
        done = 0
        while done < len(view):
            n = os.preadv(handle.fileno(), [memoryview(view)[done:]], offset + done)
            if not n:
                raise CheckpointError(f"{info.file}: unexpected end of file reading {name!r}")
            done += n
        return buffer

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._pickled = None

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_size(size: int | str) -> int:
    """Bytes from ``1000000``, ``"20KB"``, ``"5GB"`` (powers of 1000) or ``"4GiB"`` (powers of 1024)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise PertaValueError(f"max_shard_size: cannot parse {size!r} (use e.g. 5GB, 500MiB or bytes)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    return int(number * (1024 if "I" in unit else 1000) ** power)


def plan_shards(entries: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split ``(name, nbytes)`` in order into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own), like ``save_pretrained``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_names(n_shards: int, stem: str = "model") -> list[str]:
    """``[<stem>.safetensors]`` for one shard, else ``<stem>-00001-of-0000n.safetensors`` ... (Hugging Face's naming)."""
    if n_shards == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def index_file_name(stem: str = "model") -> str:
    return f"{stem}.safetensors.index.json"


def write_index(directory: Path, stem: str, shards: list[list[str]], total_size: int,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``<stem>.safetensors.index.json`` for ``shards`` (tensor names per shard, named by
    :func:`shard_file_names`): ``{"metadata": {"total_size": ..., **metadata}, "weight_map": {name: file}}``."""
    names = shard_file_names(len(shards), stem)
    weight_map = {name: file for shard, file in zip(shards, names) for name in shard}
    path = Path(directory) / index_file_name(stem)
    atomic_write_text(path, json.dumps({"metadata": {**(metadata or {}), "total_size": total_size},
                                        "weight_map": weight_map}, indent=2) + "\n")
    return path


def safetensors_files_for(directory: str | os.PathLike, stem: str) -> list[Path]:
    """Existing outputs called ``stem`` in ``directory``: ``stem.safetensors``, its index and its shards."""
    directory = Path(directory)
    found = [directory / f"{stem}.safetensors", directory / index_file_name(stem)]
    found = [path for path in found if path.exists()]
    return found + sorted(directory.glob(f"{stem}-*-of-*.safetensors"))


def write_safetensors_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str | os.PathLike,
    stem: str,
    metadata: dict[str, str],
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``(name, tensor)`` pairs as ``stem.safetensors``, or as ``stem-0000k-of-0000n.safetensors``
    shards with ``stem.safetensors.index.json`` when they exceed ``max_shard_bytes``.

    Shards are collected in a temporary directory beside the output and renamed into place, the file
    that names the result (single file or index) last; at most one shard of tensors is held in memory
    (the shard count is known only at the end, so shards are renamed once all are written). Returns the
    path to hand to readers (the ``.safetensors`` file or the index).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with private_temporary_directory(directory, f".{stem}.tmp-") as tmp:
        shards: list[list[str]] = []
        current: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush() -> None:
            nonlocal current, size
            if current:
                save_file(current, str(tmp / f"part-{len(shards):05d}.safetensors"), metadata=metadata)
                shards.append(list(current))
            current, size = {}, 0

        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = tensor.contiguous()
            size += nbytes
            total += nbytes
        flush()
        if not shards:
            raise CheckpointError(f"{directory / stem}: no tensors to write")
        apply_umask(tmp)  # safetensors writes 0o600 files
        for k, final in enumerate(shard_file_names(len(shards), stem)):
            os.replace(tmp / f"part-{k:05d}.safetensors", directory / final)
        if len(shards) == 1:
            return directory / shard_file_names(1, stem)[0]
        return write_index(directory, stem, shards, total, metadata)


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor (and block by block) in a fixed order.

    The header, with every offset, is written on construction from ``layout`` (``name -> (dtype
    code, shape)``, in file order); :meth:`write` then appends bytes, which must come in that order.
    :meth:`close` checks every byte was written.
    """

    def __init__(self, path: Path, layout: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, object] = {"__metadata__": metadata}
        self._expected: list[tuple[str, int]] = []
        offset = 0
        for name, (dtype, shape) in layout.items():
            nbytes = math.prod(shape) * torch.tensor([], dtype=SAFE_DTYPES[dtype]).element_size()
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        self._path = path
        self._file = open(path, "wb")
        self._write_bytes(struct.pack("<Q", len(raw)) + raw)
        self._index = 0
        self._written = 0  # bytes of the current tensor written so far

    def write(self, name: str, block: torch.Tensor) -> None:
        expected_name, nbytes = self._expected[self._index]
        if name != expected_name:
            raise RuntimeError(f"{self._path}: wrote {name!r} where {expected_name!r} was expected")
        data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._write_bytes(data)
        self._written += data.nbytes
        if self._written > nbytes:
            raise RuntimeError(f"{self._path}: too many bytes for {name!r}")
        if self._written == nbytes:
            self._index += 1
            self._written = 0

    def _write_bytes(self, data) -> None:
        """Write ``data``; an OS error (a full disk, a quota) is re-raised naming this file."""
        try:
            self._file.write(data)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self._path)) from e

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as e:  # a full disk may surface only when the buffer is flushed
            raise OSError(e.errno, e.strerror, str(self._path)) from e
        if self._index != len(self._expected):
            raise RuntimeError(f"{self._path}: closed before every tensor was written")


def from_pretrained(loader: Any, name_or_path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name_or_path)``; a name that is no local folder and that the hub cannot provide
    (a missing path, a mistyped repository, no network) is a user error naming it, not the hub's traceback."""
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        if Path(name_or_path).exists():
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PertaFileNotFoundError(
            f"{name_or_path}: no such model directory, and the Hugging Face hub cannot provide it ({reason})"
        ) from error


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """Load a Hugging Face tokenizer; set the pad token to EOS when it has none. Errors name the path."""
    from transformers import AutoTokenizer

    if os.path.isdir(name_or_path) and not any(
        (Path(name_or_path) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        raise PertaFileNotFoundError(f"{name_or_path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    tokenizer = from_pretrained(AutoTokenizer, name_or_path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    model: str | None, model_config: dict[str, Any] | None, torch_dtype: str = "float32", seed: int = 0
) -> torch.nn.Module:
    """A pretrained causal LM from ``model``, or a fresh one (seeded) from a config dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, torch_dtype)
    if model is not None:
        return from_pretrained(AutoModelForCausalLM, model, dtype=dtype)
    config_fields = dict(model_config or {})
    model_type = config_fields.pop("model_type", None)
    if model_type is None:
        raise PertaValueError("model_config needs a 'model_type' key (e.g. 'llama')")
    config = AutoConfig.for_model(model_type, **config_fields)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _with_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A model of ``model``'s architecture built on the meta device, its weights ``state_dict``'s tensors
    (assigned, not copied), with ``model``'s generation config."""
    from transformers import AutoModelForCausalLM

    dtype = next(t.dtype for t in state_dict.values() if t.is_floating_point())
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    skeleton.load_state_dict(state_dict, assign=True)
    skeleton.tie_weights()
    skeleton.generation_config = model.generation_config
    return skeleton


def save_hf_directory(
    model: torch.nn.Module,
    tokenizer_path: str | None,
    output_dir: str,
    hparams: dict[str, Any] | None = None,
    is_global_zero: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a Hugging Face model directory atomically (temporary directory, then rename).

    ``state_dict``: the full weights gathered from a sharded strategy. When the strategy holds every parameter
    itself (FSDP without an auto-wrap policy flattens the whole model into its root), ``model`` has none left,
    and the directory is written from a weightless copy of its architecture carrying ``state_dict``."""
    if not is_global_zero:
        return
    if state_dict is not None and not any(p.is_floating_point() for p in model.parameters()):
        model = _with_weights(model, state_dict)
    with atomic_directory(output_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer_path is not None:
            load_tokenizer(tokenizer_path).save_pretrained(tmp)
        if hparams is not None:
            Path(tmp, "perta_hparams.json").write_text(json.dumps(hparams, indent=2, default=repr))
