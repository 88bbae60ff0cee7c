"""Atomic output: write into a temporary sibling, rename it into place when complete.

Every temporary folder or file this package writes is called ``.<name>.tmp-<8 characters>`` (or
``.<name>.old-<8 characters>`` for a folder being replaced) and sits beside its final place. While a
process writes it, it holds an exclusive ``fcntl.flock`` on it, and SIGTERM (what cluster schedulers
send) is turned into ``SystemExit(143)`` so that the temporary is removed on the way out.

A SIGKILL or a power cut cannot be caught: the next atomic write into the same folder finds such
leftovers, takes their lock (possible only when no live process holds it, so a concurrent run's
temporary is left alone), removes them and says so in one line on stderr.

What lands in place has the permissions of a plain ``mkdir`` / ``open``: folders ``0o777 & ~umask``,
files ``0o666 & ~umask`` (``tempfile`` would give ``0o700`` / ``0o600``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from perta_lightning.errors import PertaFileExistsError, PertaValueError

#: Names of this package's temporaries: ``.<name>.tmp-XXXXXXXX`` or ``.<name>.old-XXXXXXXX`` (``tempfile``'s suffix).
TEMPORARY_NAME = re.compile(r"\..+\.(tmp|old)-[a-z0-9_]{8}")


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_path(output: str | os.PathLike) -> Path:
    """``output`` as a path that an atomic write can replace: not ``.``, ``..`` or a folder above the current one."""
    path = Path(output)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if path.name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents or resolved.parent == resolved:
        raise PertaValueError(f"output {str(output)!r}: name a new folder or file (e.g. runs/merged), "
                              "not the current folder or one above it")
    return path


def apply_umask(path: str | os.PathLike, umask: int | None = None) -> None:
    """Give ``path`` and, for a folder, everything in it the modes a plain ``mkdir`` / ``open`` would have:
    folders ``0o777 & ~umask``, files ``0o666 & ~umask`` (``0o777 & ~umask`` when executable). Undoes the
    ``0o700`` / ``0o600`` of ``tempfile`` and of ``safetensors.save_file``; symbolic links are left alone."""
    mask = current_umask() if umask is None else umask
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        mode = item.stat().st_mode
        full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
        if stat.S_IMODE(mode) != full & ~mask:
            os.chmod(item, full & ~mask)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While inside, SIGTERM raises ``SystemExit(143)`` in the main thread, so ``finally`` and ``except``
    blocks (the removal of temporaries) run; the previous handler is restored on exit. Outside the main
    thread signals cannot be handled, and this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; ``False`` when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return False
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in ``folder`` that no live process holds (left by a SIGKILL); return them.

    Each candidate's lock is taken first: a temporary that a running process is writing is locked by
    it and is skipped. Removal happens while holding the lock, so a writer that had just created the
    temporary and not yet locked it notices (its path no longer names its folder) and starts over.
    """
    folder = Path(folder)
    removed: list[tuple[Path, int]] = []
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    for path in entries:
        if not TEMPORARY_NAME.fullmatch(path.name) or path.is_symlink():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
        except OSError:
            continue  # vanished, or not ours to open
        try:
            if not _lock(fd) or not _same_file(fd, path):
                continue
            size = _size(path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append((path, size))
        finally:
            os.close(fd)
    if removed:
        listed = ", ".join(f"{p} ({size / 2**20:.1f} MiB)" for p, size in removed)
        print(f"perta: removed {len(removed)} temporary output(s) left by an interrupted run: {listed}",
              file=sys.stderr)
    return [p for p, _ in removed]


def _locked_temporary(parent: Path, prefix: str, directory: bool) -> tuple[Path, int]:
    """Create a temporary folder (or file) in ``parent`` and lock it; ``(path, locked fd)``."""
    while True:
        if directory:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
            path = Path(name)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweeper that took it first removes it
        if _same_file(fd, path):
            return path, fd
        os.close(fd)  # a concurrent sweep removed it before it was locked: make another


@contextlib.contextmanager
def private_temporary_directory(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A locked temporary folder in ``parent``, removed on the way out (also on SIGTERM)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent)
    with terminate_as_exception():
        tmp, fd = _locked_temporary(parent, prefix, directory=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``output``; on success it replaces ``output``.

    On an exception, or SIGTERM, the temporary directory is removed and ``output`` is left as it was.
    Stale temporaries of killed runs in the same folder are removed first (see
    :func:`remove_stale_temporaries`). An existing ``output`` raises ``FileExistsError`` unless
    ``overwrite`` is true. The finished folder and everything in it get the umask's modes (:func:`apply_umask`).
    """
    output = check_output_path(output)
    if output.exists() and not overwrite:
        raise PertaFileExistsError(f"{output} already exists; pass overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output.parent)
    with terminate_as_exception():
        tmp, fd = _locked_temporary(output.parent, f".{output.name}.tmp-", directory=True)
        try:
            yield tmp
            apply_umask(tmp)
            replace_directory(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(fd)


def replace_directory(tmp: Path, output: Path) -> None:
    """Move the finished directory ``tmp`` to ``output``; an existing ``output`` is moved aside first, so
    ``output`` is always either the old or the new complete directory, and the old one is deleted after."""
    if output.exists():
        trash, fd = _locked_temporary(output.parent, f".{output.name}.old-", directory=True)
        try:
            os.replace(output, trash / output.name)
            os.replace(tmp, output)
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            os.close(fd)
    else:
        os.replace(tmp, output)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` (text ``"w"`` in UTF-8, or binary ``"wb"``) and rename it into place
    when the block ends; on an error or SIGTERM the temporary is removed and ``path`` is left as it was.

    The file gets mode ``0o666 & ~umask``.
    """
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with terminate_as_exception():
        tmp, fd = _locked_temporary(path.parent, f".{path.name}.tmp-", directory=False)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            with open(fd, mode, encoding=None if "b" in mode else "utf-8", closefd=False) as handle:
                yield handle
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through :func:`atomic_file`."""
    with atomic_file(path) as handle:
        handle.write(text)


def atomic_save_figure(figure: Any, path: str | os.PathLike, **options: Any) -> None:
    """``figure.savefig`` through :func:`atomic_file`, in the format of ``path``'s suffix."""
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format=Path(path).suffix.lstrip(".") or "png", **options)
