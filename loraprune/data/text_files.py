"""Reading local text: the one reader of ``.txt`` / ``.jsonl`` files, folders and text columns.

Every document loraprune trains or evaluates on passes through :func:`read_texts`
(or :func:`read_text_file` for one whole file), so what counts as text is decided
here once: UTF-8, not binary, and a JSON record's text field must be a string.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, DataNotFoundError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
#: Placed between documents when they are joined into one text.
DOC_SEPARATOR = "\n\n"


def require_text(value: Any, where: str) -> str:
    """``value`` if it is text; a ``DataError`` naming ``where`` otherwise.

    Text is a ``str`` without NUL characters (which no text file holds: a NUL
    marks a binary file, e.g. a saved tensor or an archive renamed ``.txt``).
    ``None``, numbers, lists and objects are refused rather than trained on as
    their ``str()`` (``"None"``, a dict's repr)."""
    if not isinstance(value, str):
        found = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: expected text (a string), found {found}; give every record its text as a string, "
                        "or drop the records that have none")
    if "\x00" in value:
        raise DataError(f"{where} holds NUL bytes: it is binary data, not text; pass UTF-8 text files")
    return value


def read_text_file(path: Path) -> str:
    """The whole of one UTF-8 text file."""
    try:
        return require_text(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); re-save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8 IN > OUT)"
        ) from err


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n} is not valid JSON ({err.msg}); .jsonl files hold one JSON value per line") from err
        if isinstance(record, str):
            texts.append(record)
        elif isinstance(record, dict) and field in record:
            texts.append(require_text(record[field], f"{path}:{n}, field {field!r}"))
        else:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{n}: expected a JSON string or an object with a {field!r} field, found {found}; "
                            f"name the text field {field!r}")
    return texts


def _read_path(path: Path, field: str) -> list[str]:
    """Documents of one file (.txt: the whole file; .jsonl: one per line) or folder."""
    if not path.exists():
        raise DataNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        found = sorted(f for f in path.iterdir() if f.suffix in TEXT_SUFFIXES and f.is_file())
        if not found:
            raise DataError(f"folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files; point at the text files")
        return [t for f in found for t in _read_path(f, field)]
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path, field)
    return [read_text_file(path)]


def _names_a_file(s: str) -> bool:
    """A string that reads as a file name (one line, no spaces, a text suffix) rather than as text."""
    return "\n" not in s and not any(c.isspace() for c in s) and s.endswith(TEXT_SUFFIXES)


def _is_path(s: str) -> bool:
    return "\n" not in s and len(s) < 4096 and os.path.exists(s)


def check_not_streaming(data: Any) -> None:
    """Refuse a ``datasets.DatasetDict`` (several splits) and a streaming ``IterableDataset``
    (no length, possibly endless), naming what to pass instead."""
    kind = type(data).__name__
    if kind in ("DatasetDict", "IterableDatasetDict"):
        splits = list(data.keys())
        raise DataError(f"data is a {kind} with splits {splits}; pass one split, e.g. ds[{splits[0]!r}]"
                        if splits else f"data is an empty {kind}; pass one split of a dataset")
    if kind == "IterableDataset":
        raise DataError("data is a streaming datasets.IterableDataset (no length, possibly endless); take a finite "
                        "part first: datasets.Dataset.from_list(list(ds.take(N)))")


def read_texts(source: Any, text_field: str = "text") -> list[str]:
    """Documents from a local text source.

    Args:
        source: a string (a path to an existing file or folder; a missing
            ``*.txt``/``*.jsonl`` name is an error; anything else is the text
            itself), a ``Path``, a ``datasets.Dataset`` (its ``text_field``
            column), or a list mixing these. ``.txt`` files are one document,
            ``.jsonl`` one per line; a folder stands for the text files directly inside it.
        text_field: the column / JSON field holding the text.

    Returns:
        The documents, in order.

    Raises:
        DataError: a missing path, a non-UTF-8 or binary file, an empty folder, a
            record or dataset without ``text_field`` or whose text is not a string,
            a streaming dataset, or an unsupported type.
    """
    if isinstance(source, os.PathLike):
        return _read_path(Path(source), text_field)
    if isinstance(source, str):
        if _is_path(source) or _names_a_file(source):
            return _read_path(Path(source), text_field)
        return [require_text(source, "the text")]
    check_not_streaming(source)
    if hasattr(source, "column_names"):  # a datasets.Dataset, without importing datasets
        if text_field not in source.column_names:
            raise DataError(f"the dataset has no {text_field!r} column (columns: {source.column_names}); "
                            f"select or rename the text column to {text_field!r}")
        return [require_text(t, f"row {i} of the dataset's {text_field!r} column")
                for i, t in enumerate(source[text_field])]
    if isinstance(source, Iterable) and not isinstance(source, (bytes, dict, torch.Tensor)):
        out: list[str] = []
        for item in source:
            if not isinstance(item, (str, os.PathLike)):
                raise DataError(f"expected strings or paths in the list, got {type(item).__name__}")
            out.extend(read_texts(item, text_field))
        return out
    raise DataError(
        f"unsupported text source {type(source).__name__}: pass a string, a path, a list of strings/paths "
        "or a datasets.Dataset with a text column"
    )
