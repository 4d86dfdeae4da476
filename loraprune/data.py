"""Calibration / fine-tuning data for :func:`loraprune.prune`.

Accepts what users have: an iterable of batches (dicts with ``input_ids`` and
optionally ``attention_mask`` / ``labels``), a list of strings, local ``.txt``
/ ``.jsonl`` files or a folder of them, a ``datasets.Dataset`` with a text
column, or a hub dataset name. Text is tokenised, concatenated with EOS
between documents, cut into fixed windows and shuffled under the seed.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


class DataError(ValueError):
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


def read_text_files(paths, text_field: str = "text") -> list[str]:
    """Documents from ``.txt`` files (one document per file) and ``.jsonl`` files
    (one per line); a folder stands for the text files directly inside it."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in TEXT_SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"folder {p} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"no such file or folder: {p}")
    texts = []
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            texts.extend(_read_jsonl(f, text_field))
        else:
            texts.append(f.read_text(encoding="utf-8"))
    return texts


def load_texts(source, split: str = "train", text_field: str = "text", max_documents: int | None = None) -> list[str]:
    """Strings from local paths, a ``datasets.Dataset``, or a hub dataset name
    (``"name"`` or ``"name:config"``, loaded with ``datasets.load_dataset``)."""
    if isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source) and not all(
        os.path.exists(s) for s in source
    ):
        return list(source)
    if isinstance(source, (list, tuple)) or isinstance(source, os.PathLike) or (
        isinstance(source, str) and os.path.exists(source)
    ):
        texts = read_text_files(source, text_field)
    elif isinstance(source, str):
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - datasets is a dependency
            raise DataError(f"{source!r} is not a local path and the datasets package is missing") from err
        name, _, config = source.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as err:
            raise DataError(
                f"{source!r} is neither a local file/folder nor a loadable hub dataset ({type(err).__name__}: {err}). "
                "Pass a path to .txt/.jsonl files, a folder of them, or a dataset name reachable from this machine."
            ) from err
        texts = [str(t) for t in ds[text_field]]
    elif hasattr(source, "column_names"):
        if text_field not in source.column_names:
            raise DataError(f"the dataset has no {text_field!r} column (columns: {source.column_names})")
        texts = [str(t) for t in source[text_field]]
    else:
        raise DataError(f"cannot read text from {type(source).__name__}")
    texts = [t for t in texts if t.strip()]
    return texts[:max_documents] if max_documents else texts


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """One flat LongTensor of tokens: documents joined by the EOS token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``seq_len`` windows of a token stream, (n, seq_len)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise DataError(
            f"the data has {stream.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "give more text or a smaller seq_len"
        )
    return stream[: n * seq_len].view(n, seq_len)


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


def _check_batch(batch, n: int, config) -> dict:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise DataError(f"batch {n} is a {type(batch).__name__}; expected a dict with 'input_ids'")
    ids = batch["input_ids"]
    if not torch.is_tensor(ids):
        ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.numel() == 0:
        raise DataError(f"batch {n} has empty input_ids")
    check_context(ids.shape[1], config)
    out = dict(batch, input_ids=ids)
    if "labels" not in out:
        labels = ids.clone()
        if "attention_mask" in out:
            labels = labels.masked_fill(torch.as_tensor(out["attention_mask"]) == 0, -100)
        out["labels"] = labels
    return out


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
        return text_batches(windows(token_stream(texts, tokenizer), seq_len), batch_size, seed)
    if isinstance(data, (list, tuple)) and not data:
        raise DataError("the data is empty: pass at least one batch or one text")
    return checked_batches(data, config)
