"""Atomic writes: the one home of how loraprune puts a file or a directory in place.

A reader (or a rerun after a kill) sees the old content or the complete new
content, never a mix, and never nothing: :func:`atomic_directory` writes a
temporary sibling and renames (or, over an existing directory, atomically
swaps) it into place; :func:`atomic_file` does the same for one file.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import LoRAPruneError, OutputExistsError
from .paths import as_path, check_output_dir, output_error


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output directory that exists and is not empty (unless ``overwrite``)."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    check_output_dir(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; choose another directory or pass overwrite=True")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    False where the platform, the C library or the file system cannot; then
    :func:`atomic_directory` falls back to two renames and :func:`recover_interrupted_swap`.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _old_copies(out_dir: Path) -> list[Path]:
    """The ``.<name>.<random>.old/old`` folders a two-rename swap leaves while the new copy is not yet in place."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.[A-Za-z0-9_]+\.old")
    found = [d / "old" for d in out_dir.parent.glob(f".{out_dir.name}.*.old") if pattern.fullmatch(d.name)]
    return sorted((d for d in found if d.is_dir()), key=lambda d: d.stat().st_mtime)


def recover_interrupted_swap(out_dir) -> bool:
    """Put back a directory that a save over it left only in its ``.old`` folder.

    Where :func:`_exchange` is unavailable, replacing a directory takes two
    renames (old out, new in); an interrupt between them leaves ``out_dir``
    absent and the old copy in ``.<name>.<random>.old/old``. The next save,
    load or inspect of ``out_dir`` moves it back, with a warning, so the path
    again holds the model it held before the interrupted save.
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return False
    copies = _old_copies(out_dir)
    if not copies:
        return False
    if out_dir.exists():  # the swap completed and only its clean-up was interrupted: the old copies are stale
        for copy in copies:
            shutil.rmtree(copy.parent, ignore_errors=True)
        return False
    with suppress(FileExistsError, OSError):
        os.rename(copies[-1], out_dir)
        shutil.rmtree(copies[-1].parent, ignore_errors=True)
        warnings.warn(f"{out_dir} was missing after an interrupted save; restored the copy it held before "
                      f"(from {copies[-1].parent.name})", RuntimeWarning, stacklevel=3)
        return True
    return False


def _claim(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir`` only if nothing is there (an empty directory counts as nothing).

    POSIX ``rename`` refuses a non-empty target directory, so of two saves racing for one new
    name exactly one wins, across threads and processes alike."""
    try:
        os.rename(tmp, out_dir)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise OutputExistsError(f"{out_dir} was filled by another save while this one was writing; nothing "
                                    "was replaced. Choose another directory or pass overwrite=True") from err
        raise


def _replace(tmp: Path, out_dir: Path) -> None:
    """Put ``tmp`` at ``out_dir`` so that the path holds a complete directory at every instant."""
    if not out_dir.exists():
        with suppress(OutputExistsError):
            return _claim(tmp, out_dir)  # appeared meanwhile: replace it below (overwrite=True)
    if _exchange(tmp, out_dir):  # out_dir now the new copy, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    try:
        os.rename(out_dir, trash / "old")
    except BaseException:
        trash.rmdir()
        raise
    os.rename(tmp, out_dir)  # an interrupt before this line: recover_interrupted_swap() undoes the first
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_directory(out_dir, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``out_dir``, on error it vanishes.

    The one home of atomic writes in loraprune: a reader (or a rerun after a
    kill) sees the old directory or the complete new one, never a mix, and
    never nothing (where the platform cannot swap two directories atomically,
    an interrupted swap is undone by the next call: :func:`recover_interrupted_swap`).
    With ``overwrite=False`` the final name is claimed exclusively: of two
    saves into one new directory, one fails with :class:`OutputExistsError`.
    File-system failures (a full or read-only disk) raise :class:`OutputPathError`.
    """
    out_dir = as_path(out_dir, "the output directory")
    recover_interrupted_swap(out_dir)
    check_target(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    except OSError as err:
        raise output_error(out_dir, err) from err
    try:
        yield tmp
        if overwrite:
            _replace(tmp, out_dir)
        else:
            _claim(tmp, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, LoRAPruneError):
            raise
        raise output_error(out_dir, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path, overwrite: bool = True):
    """Yield a temporary sibling path to write; on success it replaces ``path``, on error it vanishes.

    For writers that take a file name (the GGUF writer); :func:`write_atomic` writes bytes this way.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; choose another file name or pass overwrite=True")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise output_error(path, err, "the file") from err
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, LoRAPruneError):
            raise output_error(path, err, "the file") from err
        raise


def write_atomic(path, content: str | bytes) -> Path:
    """Write one file atomically: a temporary sibling, flushed, then renamed over ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def write_json(path, payload, indent: int | None = 1) -> Path:
    """:func:`write_atomic` of ``payload`` as JSON."""
    return write_atomic(path, json.dumps(payload, indent=indent) + "\n")
