"""Calibration / fine-tuning data for :func:`loraprune.prune`.

Accepts what users have: an iterable of batches (dicts with ``input_ids`` and
optionally ``attention_mask`` / ``labels``), a list of strings, local ``.txt``
/ ``.jsonl`` files or a folder of them, a ``datasets.Dataset`` with a text
column or a tokenized one with ``input_ids``, or a hub dataset name. Text is tokenised, documents joined by a blank
line, cut into fixed windows and shuffled under the seed.

This module is the one home of the text plumbing: the reference model,
evaluation and the benchmarks read and tokenize text through it.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import LoRAPruneError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
#: Separator placed between documents before tokenizing (as the papers' eval scripts).
DOC_SEPARATOR = "\n\n"


class DataError(LoRAPruneError):
    """The data given to prune/eval cannot be used; the message says why and what to pass."""


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n} is not valid JSON ({err.msg})") from err
            if isinstance(record, str):
                texts.append(record)
            elif isinstance(record, dict) and field in record:
                texts.append(str(record[field]))
            else:
                raise DataError(f"{path}:{n}: expected a JSON string or an object with a {field!r} field")
    return texts


def _read_path(path: Path, field: str) -> list[str]:
    """Documents of one file (.txt: the whole file; .jsonl: one per line) or folder."""
    if path.is_dir():
        found = sorted(f for f in path.iterdir() if f.suffix in TEXT_SUFFIXES and f.is_file())
        if not found:
            raise DataError(f"folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return [t for f in found for t in _read_path(f, field)]
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path, field)
    return [path.read_text(encoding="utf-8")]


def _is_path(s: str) -> bool:
    return "\n" not in s and len(s) < 4096 and os.path.exists(s)


def read_texts(source, text_field: str = "text") -> list[str]:
    """Documents from a text source.

    Accepts a string (a path to an existing file or folder, else the text
    itself), a ``Path``, a ``datasets.Dataset`` (its ``text_field`` column),
    or a list mixing these. Files: ``.txt`` is one document, ``.jsonl`` one
    per line; a folder stands for the text files directly inside it.
    """
    if isinstance(source, os.PathLike):
        path = Path(source)
        if not path.exists():
            raise DataError(f"no such file or folder: {path}")
        return _read_path(path, text_field)
    if isinstance(source, str):
        return _read_path(Path(source), text_field) if _is_path(source) else [source]
    if hasattr(source, "column_names"):  # a datasets.Dataset, without importing datasets
        if text_field not in source.column_names:
            raise DataError(f"the dataset has no {text_field!r} column (columns: {source.column_names}); "
                            "select or rename the text column")
        return [str(t) for t in source[text_field] if t is not None]
    if isinstance(source, Iterable):
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


def _looks_like_dataset_name(s: str) -> bool:
    return bool(s) and not any(c.isspace() for c in s) and not os.path.exists(s) and not s.endswith(TEXT_SUFFIXES)


def load_texts(source, split: str = "train", text_field: str = "text", max_documents: int | None = None) -> list[str]:
    """Like :func:`read_texts`, but a lone string that is neither a path nor
    text-like is a hub dataset name (``"name"`` or ``"name:config"``, loaded
    with ``datasets.load_dataset``): what a command line's ``--data`` means."""
    if isinstance(source, str) and _looks_like_dataset_name(source):
        import datasets

        name, _, config = source.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as err:
            raise DataError(
                f"{source!r} is neither a local file/folder nor a loadable hub dataset ({type(err).__name__}: {err}). "
                "Pass a path to .txt/.jsonl files, a folder of them, or a dataset name reachable from this machine."
            ) from err
        texts = read_texts(ds, text_field)
    elif isinstance(source, str) and not _is_path(source) and source.endswith(TEXT_SUFFIXES):
        raise DataError(f"no such file: {source}")
    else:
        texts = read_texts(source, text_field)
    texts = [t for t in texts if t.strip()]
    return texts[:max_documents] if max_documents else texts


def token_stream(tokenizer, source, separator: str = DOC_SEPARATOR) -> torch.Tensor:
    """One flat LongTensor of tokens: documents joined by ``separator``, no special tokens.

    A LongTensor ``source`` is taken as already tokenized (rows concatenated).
    """
    if isinstance(source, torch.Tensor):
        if source.dtype not in (torch.int64, torch.int32):
            raise DataError(f"token tensor must be integer (LongTensor), got {source.dtype}")
        return source.reshape(-1).long()
    if tokenizer is None:
        raise DataError("text needs a tokenizer: pass tokenizer=... (or token ids as a LongTensor)")
    text = separator.join(read_texts(source))
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``seq_len`` windows of a token stream, (n, seq_len); the tail is dropped."""
    n = stream.numel() // seq_len
    if n == 0:
        raise DataError(
            f"the text has {stream.numel()} tokens, fewer than one window of {seq_len}; "
            "give more text or a smaller seq_len/window"
        )
    return stream[: n * seq_len].view(n, seq_len)


def text_windows(tokenizer, source, seq_len: int, separator: str = DOC_SEPARATOR) -> torch.Tensor:
    """Tokenize a text source and cut it into ``[n, seq_len]`` windows."""
    return cut_windows(token_stream(tokenizer, source, separator), seq_len)


def check_context(seq_len: int, config) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DataError(
            f"seq_len={seq_len} exceeds the model's context (max_position_embeddings={limit}); pass seq_len<={limit}"
        )


def text_batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches of windows (a new permutation every epoch)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for chunk in torch.randperm(rows.shape[0], generator=gen).split(batch_size):
            ids = rows[chunk]
            yield {"input_ids": ids, "labels": ids}


def _as_long_2d(name: str, value, n: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"batch {n}: {name} cannot be turned into a tensor ({err}); pad sequences to one length") from err
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise DataError(f"batch {n}: {name} must be (batch, seq) or (seq,), got shape {tuple(t.shape)}")
    return t.long()


def _check_batch(batch, n: int, config) -> dict:
    """Tensors of shape (batch, seq) for input_ids / attention_mask / labels, causal-LM labels added."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise DataError(f"batch {n} is a {type(batch).__name__}; expected a dict with 'input_ids'")
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        if key in out and out[key] is not None:
            out[key] = _as_long_2d(key, out[key], n)
    ids = out["input_ids"]
    if ids.numel() == 0:
        raise DataError(f"batch {n} has empty input_ids")
    for key in ("attention_mask", "labels"):
        if key in out and out[key] is not None and out[key].shape != ids.shape:
            raise DataError(f"batch {n}: {key} has shape {tuple(out[key].shape)}, input_ids {tuple(ids.shape)}")
    check_context(ids.shape[1], config)
    if out.get("labels") is None:
        labels = ids.clone()
        if out.get("attention_mask") is not None:
            labels = labels.masked_fill(out["attention_mask"] == 0, -100)
        out["labels"] = labels
    return out


def dataset_batches(ds, batch_size: int) -> list[dict]:
    """Batches of a tokenized ``datasets.Dataset`` (an ``input_ids`` column, optionally
    ``attention_mask``/``labels``), in order; shuffle the dataset first if wanted."""
    cols = [c for c in ("input_ids", "attention_mask", "labels") if c in ds.column_names]
    if len(ds) == 0:
        raise DataError("the dataset is empty")
    return [{c: ds[i:i + batch_size][c] for c in cols} for i in range(0, len(ds), batch_size)]


def checked_batches(batches: Iterable, config) -> Iterator[dict]:
    """Cycle through user batches, validating each and adding causal-LM labels."""
    seen = 0
    for n in itertools.count():
        empty = True
        for batch in batches:
            empty = False
            seen += 1
            yield _check_batch(batch, seen, config)
        if empty:
            raise DataError("the data yielded no batches" if n == 0 else "the data iterator cannot be re-iterated; pass a list or re-iterable")


def make_batches(data, config, tokenizer=None, seq_len: int = 128, batch_size: int = 4, seed: int = 0) -> Iterator[dict]:
    """An endless iterator of training batches from any accepted ``data``."""
    if data is None:
        raise DataError("data is required: pass batches, a list of strings (with tokenizer=), or text file paths")
    if hasattr(data, "column_names") and "input_ids" in data.column_names:
        return checked_batches(dataset_batches(data, batch_size), config)
    first = None
    if isinstance(data, (list, tuple)) and data:
        first = data[0]
    is_text = isinstance(data, (str, os.PathLike)) or isinstance(first, (str, os.PathLike)) or hasattr(data, "column_names")
    if is_text:
        if tokenizer is None:
            raise DataError("text data needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)")
        check_context(seq_len, config)
        texts = load_texts(data)
        if not texts:
            raise DataError("the text data is empty")
        return text_batches(text_windows(tokenizer, texts, seq_len), batch_size, seed)
    if isinstance(data, (list, tuple)) and not data:
        raise DataError("the data is empty: pass at least one batch or one text")
    return checked_batches(data, config)
