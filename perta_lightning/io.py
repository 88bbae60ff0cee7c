"""Atomic output: write into a temporary sibling directory, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``output``; on success it replaces ``output``.

    On an exception the temporary directory is removed and ``output`` is left as it was. An existing
    ``output`` raises ``FileExistsError`` unless ``overwrite`` is true.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, output)


def replace_directory(tmp: Path, output: Path) -> None:
    """Move the finished directory ``tmp`` to ``output``; an existing ``output`` is moved aside first, so
    ``output`` is always either the old or the new complete directory, and the old one is deleted after."""
    if output.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, trash / output.name)
        os.replace(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, output)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file in the same directory and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def safetensors_files_for(directory: str | os.PathLike, stem: str) -> list[Path]:
    """Existing outputs called ``stem`` in ``directory``: ``stem.safetensors``, its index and its shards."""
    directory = Path(directory)
    found = [directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"]
    found = [path for path in found if path.exists()]
    return found + sorted(directory.glob(f"{stem}-*-of-*.safetensors"))


def write_safetensors_sharded(
    tensors: Iterator[tuple[str, torch.Tensor]],
    directory: str | os.PathLike,
    stem: str,
    metadata: dict[str, str],
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``(name, tensor)`` pairs as ``stem.safetensors``, or as ``stem-0000k-of-0000n.safetensors``
    shards with ``stem.safetensors.index.json`` (Hugging Face layout) when they exceed ``max_shard_bytes``.

    Shards are collected in a temporary directory beside the output and renamed into place, the file
    that names the result (single file or index) last; a shard holds at most one shard of tensors in
    memory. Returns the path to hand to readers (the ``.safetensors`` file or the index).
    """
    import json

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.tmp-", dir=directory))
    try:
        shards: list[dict[str, str]] = []  # per shard: tensor name -> temporary file name
        current: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal current, size
            if current:
                file = f"part-{len(shards):05d}.safetensors"
                save_file(current, str(tmp / file), metadata=metadata)
                shards.append({name: file for name in current})
            current, size = {}, 0

        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = tensor.contiguous()
            size += nbytes
        flush()
        if not shards:
            raise ValueError(f"{directory / stem}: no tensors to write")
        if len(shards) == 1:
            target = directory / f"{stem}.safetensors"
            os.replace(tmp / next(iter(shards[0].values())), target)
            return target
        count = len(shards)
        weight_map = {}
        for index, shard in enumerate(shards, start=1):
            final = f"{stem}-{index:05d}-of-{count:05d}.safetensors"
            os.replace(tmp / next(iter(shard.values())), directory / final)
            weight_map.update({name: final for name in shard})
        index_path = directory / f"{stem}.safetensors.index.json"
        atomic_write_text(index_path, json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2))
        return index_path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
