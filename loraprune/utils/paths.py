"""Where loraprune writes: one check of an output path, one translation of the file system's refusals.

:func:`check_output_dir` runs before any work (``save_pruned``, ``export_adapter``,
``prune(checkpoint_dir=...)``, the CLI's ``--output``), so that a run does not
train for an hour and then fail to write. What it cannot foresee (a disk that
fills up meanwhile) is translated by :func:`output_error` where the writing
happens. Either way the error is an :class:`~loraprune.errors.OutputPathError`
(a ``LoRAPruneError`` and an ``OSError``) naming the path and the cause.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ..errors import OutputExistsError, OutputPathError

_CAUSES = {
    errno.ENOSPC: "the disk is full; free some space or choose a path on another disk",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose a path on another disk",
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.EACCES: "permission denied; choose a path you can write to",
    errno.EPERM: "permission denied; choose a path you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}


def _error(code: int, message: str, cls: type = OutputPathError) -> OutputPathError:
    err = cls(message)  # one-argument: str(err) is the message alone
    err.errno = code
    return err


def output_error(path, err: OSError, what: str = "the output") -> OutputPathError:
    """``err`` (raised while writing ``path``) as an :class:`OutputPathError` naming the path and the fix."""
    cause = _CAUSES.get(err.errno, f"{err.strerror or err}; choose another path")
    blocker = next((a for a in Path(path).parents if a.is_file()), None)
    if err.errno in (errno.EEXIST, errno.ENOTDIR) and blocker is not None:
        cause = f"{blocker} is a file, not a directory; choose another path"
    return _error(err.errno, f"cannot write {what} {path}: {cause}")


def as_path(value, name: str) -> Path:
    """A ``str`` or ``os.PathLike`` argument as a ``Path`` (``~`` expanded); anything else is a TypeError."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or pathlib.Path), got {type(value).__name__}: {value!r}")
    if not str(value).strip():
        raise _error(errno.ENOENT, f"{name} is empty; pass a directory path")
    return Path(value).expanduser()


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def check_output_dir(path, what: str = "the output directory") -> Path:
    """Refuse, before any work starts, a directory that cannot be created or written.

    ``path`` (which need not exist yet) must not be a file, nothing on the way
    to it may be a file, and the directory that will hold it (the nearest
    existing of ``path`` and its parent) must accept a new file: that is probed
    by creating and removing one, which sees read-only mounts and permissions
    alike. Returns ``path`` as a ``Path``.
    """
    path = as_path(path, what)
    if path.exists() and not path.is_dir():
        raise _error(errno.EEXIST, f"{what} {path} exists and is not a directory (a file); choose another path",
                     OutputExistsError)
    for probe in dict.fromkeys((_nearest_existing(path), _nearest_existing(path.parent))):
        if not probe.is_dir():
            raise _error(errno.ENOTDIR, f"cannot write {what} {path}: {probe} is a file, not a directory; "
                                                 "choose another path")
        try:
            fd, name = tempfile.mkstemp(prefix=".loraprune-probe-", dir=probe)
        except OSError as err:
            raise output_error(path, err, what) from err
        os.close(fd)
        os.unlink(name)
    return path


def check_file_name(name: str, what: str) -> str:
    """A file name given by the caller for a file inside an output folder: a plain name, never a path.

    ``../x.json``, ``/abs/x.json``, ``sub/x.json``, ``..`` or a name with a NUL would write outside the
    folder (or fail half-way); they are refused before anything is written."""
    seps = {"/", "\\"} | {s for s in (os.sep, os.altsep) if s}
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or "\0" in name
            or any(s in name for s in seps) or os.path.isabs(name) or Path(name).drive):
        raise _error(errno.EINVAL, f"{what} names {name!r}, which is not a plain file name inside the output "
                                   "folder; use a name without a folder part (e.g. 'notes.json')")
    return name


PATH_SUFFIXES = (".txt", ".jsonl", ".json", ".gguf", ".safetensors", ".bin")


def looks_like_path(text: str) -> bool:
    """A local path rather than a hub id or dataset name: exists, is absolute/relative-dotted, or has a file suffix."""
    return (os.path.exists(text) or text.startswith(("/", ".", "~"))
            or text.lower().endswith(PATH_SUFFIXES))
