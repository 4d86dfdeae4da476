"""Atomic writes: the one home of how loraprune puts a file or a directory in place.

A reader (or a rerun after a kill) sees the old content or the complete new
content, never a mix, and never nothing: :func:`atomic_directory` writes a
temporary sibling and renames (or, over an existing directory, atomically
swaps) it into place; :func:`atomic_file` does the same for one file.

One exclusive-create rule for every output (``save_pruned``, ``save_gguf``,
``export_adapter``, checkpoints): ``overwrite`` is a bool; without it the final
name is claimed atomically and nothing there is followed or replaced (a
symlink, even a dangling one, counts as existing: ``os.path.lexists``), so of
two concurrent writers exactly one wins and the other gets
:class:`OutputExistsError`; with it, a symlink is written through to what it
names (never swapped for a copy). Temporary siblings are named
``.NAME.loraprune-tmp-<pid>-<host>-<random>`` (:data:`TEMP_PATTERN`); the next
save or load into that folder removes the stale ones (their process is gone,
or they are older than :data:`STALE_AFTER_S`), never a live writer's
(:func:`sweep_stale`).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import LoRAPruneError, OutputExistsError
from .paths import as_path, check_output_dir, output_error

STALE_AFTER_S = 24 * 3600  # a temporary sibling this old is stale even if a process with its pid is alive
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
TEMP_PATTERN = re.compile(r"\.(?P<name>.+)\.loraprune-tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-f]{8}")


def check_overwrite(overwrite) -> bool:
    """``overwrite`` must be a real bool: ``overwrite="no"`` is truthy and would replace what it names."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False (a bool), got {type(overwrite).__name__} {overwrite!r}; "
                        "pass overwrite=True to replace an existing output, overwrite=False to keep it")
    return overwrite


def temp_sibling(final: Path) -> Path:
    """A fresh name beside ``final`` in the one pattern :func:`sweep_stale` recognises."""
    return final.parent / f".{final.name}.loraprune-tmp-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or cannot tell): alive
    return True


def sweep_stale(parent) -> list[Path]:
    """Remove the temporary siblings in ``parent`` that no live writer owns; returns what was removed.

    Stale: written on this host by a process that no longer exists (killed mid-write), or older
    than :data:`STALE_AFTER_S` (another host's, or a reused pid). A live writer's is never touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = TEMP_PATTERN.fullmatch(entry.name)
        if match is None:  # not ours (earlier versions' .partial/.tmp names are left alone: other tools use them too)
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        dead = match["host"] == _HOST and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))
        if not dead and age < STALE_AFTER_S:
            continue
        path = Path(entry.path)
        with suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
    return removed


def _through_link(path: Path, overwrite: bool) -> Path:
    """The path to write: ``path`` itself, or with ``overwrite`` what a symlink there names.

    Without ``overwrite`` a symlink (dangling or not) is an existing output: refused."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if not overwrite:
        raise OutputExistsError(f"{path} exists (a symlink to {target}); choose another name or pass overwrite=True "
                                "(which replaces what the link names)")
    if not target.exists():
        raise OutputExistsError(f"{path} is a symlink to {target}, which does not exist; remove the link or write to "
                                f"{target} directly")
    return target


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output directory that exists and is not empty (unless ``overwrite``)."""
    check_overwrite(overwrite)
    out_dir = _through_link(Path(out_dir), overwrite)
    check_output_dir(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; choose another directory or pass overwrite=True")


def _renameat2(src: Path, dst: Path, flag: int) -> bool:
    """Linux ``renameat2(src, dst, flag)``: False where the platform, the C library or the file
    system cannot do it (then the caller falls back); other failures raise ``OSError``."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    False where the platform, the C library or the file system cannot; then
    :func:`atomic_directory` falls back to two renames and :func:`recover_interrupted_swap`.
    """
    return _renameat2(a, b, 2)


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
    sweep_stale(out_dir.parent)
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
    if not os.path.lexists(out_dir):
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
    check_overwrite(overwrite)
    out_dir = _through_link(out_dir, overwrite)
    recover_interrupted_swap(out_dir)
    check_target(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(out_dir)
        tmp.mkdir()
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
    path = as_path(path, "the output file")
    check_overwrite(overwrite)
    path = _through_link(path, overwrite)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists; choose another file name or pass overwrite=True")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent)
        tmp = temp_sibling(path)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as err:
        raise output_error(path, err, "the file") from err
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _claim_file(tmp, path)
    except BaseException as err:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, LoRAPruneError):
            raise output_error(path, err, "the file") from err
        raise


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Linux ``renameat2(RENAME_NOREPLACE)``: False where the platform or file system cannot."""
    return _renameat2(src, dst, 1)


def _claim_file(tmp: Path, path: Path) -> None:
    """Put the finished ``tmp`` at ``path`` only if no entry is there (a dangling symlink counts).

    ``renameat2(RENAME_NOREPLACE)``, else ``link`` + ``unlink`` (both fail on any existing entry and
    follow no link), so of two writers racing for one name exactly one wins, threads and processes alike."""
    taken = OutputExistsError(f"{path} was written by another save while this one was writing; nothing was "
                              "replaced. Choose another file name or pass overwrite=True")
    try:
        if _rename_noreplace(tmp, path):
            return
        os.link(tmp, path)
    except FileExistsError as err:
        raise taken from err
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        # no hard links here (e.g. some FUSE or FAT mounts): claim the name, then fill it in one rename
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError as err2:
            raise taken from err2
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_atomic(path, content: str | bytes) -> Path:
    """Write one file atomically: a temporary sibling, flushed, then renamed over ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def write_json(path, payload, indent: int | None = 1) -> Path:
    """:func:`write_atomic` of ``payload`` as JSON."""
    return write_atomic(path, json.dumps(payload, indent=indent) + "\n")
