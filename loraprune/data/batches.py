"""Training batches from any accepted input, each checked before it reaches the model.

:func:`make_batches` is what :func:`loraprune.prune` trains on: batches (dicts
with ``input_ids``), text (strings, paths, a ``datasets.Dataset`` with a text
column, a hub dataset name) or a tokenised dataset. Every batch is checked:
integer ids inside the vocabulary, matching shapes, something to train on.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..errors import DataError
from .corpora import load_texts
from .text_files import check_not_streaming
from .windows import (
    check_context,
    check_token_ids,
    check_tokenizer,
    check_tokenizer_fits,
    text_windows,
    vocab_size_of,
)

_IGNORE_INDEX = -100  # label value the causal-LM loss skips


def text_batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches of windows (a new permutation every epoch).

    Args:
        rows: ``(n, seq_len)`` token windows (see :func:`cut_windows`).
        batch_size: windows per batch (the last batch of an epoch may be smaller).
        seed: seeds the permutations.
    """
    gen = torch.Generator().manual_seed(seed)
    while True:
        for chunk in torch.randperm(rows.shape[0], generator=gen).split(batch_size):
            ids = rows[chunk]
            yield {"input_ids": ids, "labels": ids}


def _as_2d(name: str, value: Any, n: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"batch {n}: {name} cannot be turned into a tensor ({err}); pad sequences to one length") from err
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise DataError(f"batch {n}: {name} must be (batch, seq) or (seq,), got shape {tuple(t.shape)}")
    if name == "attention_mask":
        if not bool(((t == 0) | (t == 1)).all()):
            raise DataError(f"batch {n}: attention_mask must hold only 0 and 1 (1 = a real token)")
        return t.long()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DataError(f"batch {n}: {name} must hold integer token ids, got {t.dtype}; "
                        "tokenize the text (float ids would be silently truncated)")
    return t.long()


def _check_batch(batch: Any, n: int, config: Any) -> dict:
    """Tensors of shape (batch, seq) for input_ids / attention_mask / labels, causal-LM labels added."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise DataError(f"batch {n} is a {type(batch).__name__}; expected a dict with 'input_ids'")
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        if key in out and out[key] is not None:
            out[key] = _as_2d(key, out[key], n)
    ids = out["input_ids"]
    if ids.numel() == 0:
        raise DataError(f"batch {n} has empty input_ids")
    for key in ("attention_mask", "labels"):
        if key in out and out[key] is not None and out[key].shape != ids.shape:
            raise DataError(f"batch {n}: {key} has shape {tuple(out[key].shape)}, input_ids {tuple(ids.shape)}")
    check_context(ids.shape[1], config)
    vocab = vocab_size_of(config)
    check_token_ids(ids, vocab, f"batch {n}: input_ids")
    mask = out.get("attention_mask")
    if out.get("labels") is None:
        out["labels"] = ids if mask is None else ids.masked_fill(mask == 0, _IGNORE_INDEX)
    else:
        check_token_ids(out["labels"], vocab, f"batch {n}: labels", ignore_index=_IGNORE_INDEX)
    trained = out["labels"][:, 1:] != _IGNORE_INDEX  # a causal LM predicts positions 1..L-1
    if mask is not None:
        trained &= mask[:, 1:] != 0
    if not bool(trained.any()):
        raise DataError(
            f"batch {n}: no token is trained on (labels all -100, attention_mask all 0, or sequences of one token); "
            "give each batch real tokens with labels"
        )
    return out


def dataset_batches(ds: Any, batch_size: int) -> list[dict]:
    """Batches of a tokenized ``datasets.Dataset``, in order (shuffle the dataset first if wanted).

    Args:
        ds: a dataset with an ``input_ids`` column, optionally ``attention_mask`` / ``labels``.
        batch_size: rows per batch.
    """
    cols = [c for c in ("input_ids", "attention_mask", "labels") if c in ds.column_names]
    if len(ds) == 0:
        raise DataError("the dataset is empty")
    return [{c: ds[i:i + batch_size][c] for c in cols} for i in range(0, len(ds), batch_size)]


def checked_batches(batches: Iterable, config: Any) -> Iterator[dict]:
    """Cycle through user batches, validating each and adding causal-LM labels.

    A list or tuple is checked in full before this returns, so a bad batch
    anywhere in it stops the run before any work starts; other iterables are
    checked as each batch is drawn.

    Args:
        batches: dicts with ``input_ids`` and optionally ``attention_mask`` / ``labels``.
        config: the model's config (context length and vocabulary size).
    """
    if isinstance(batches, (list, tuple)):
        checked = [_check_batch(b, n, config) for n, b in enumerate(batches, 1)]
        return itertools.cycle(checked) if checked else _no_batches()
    return _check_as_drawn(batches, config)


def _no_batches() -> Iterator[dict]:
    raise DataError("the data yielded no batches")
    yield  # pragma: no cover  (makes this a generator: the error comes on the first draw)


def _check_as_drawn(batches: Iterable, config: Any) -> Iterator[dict]:
    seen = 0
    for n in itertools.count():
        empty = True
        for batch in batches:
            empty = False
            seen += 1
            yield _check_batch(batch, seen, config)
        if empty:
            raise DataError("the data yielded no batches" if n == 0 else
                            "the data iterator cannot be re-iterated; pass a list or re-iterable")


def _is_text_source(data: Any) -> bool:
    first = data[0] if isinstance(data, (list, tuple)) and data else None
    return (isinstance(data, (str, os.PathLike)) or isinstance(first, (str, os.PathLike))
            or hasattr(data, "column_names"))


def make_batches(data: Any, config: Any, tokenizer: Any = None, seq_len: int = 128, batch_size: int = 4,
                 seed: int = 0) -> Iterator[dict]:
    """An endless iterator of checked training batches from any accepted ``data``.

    Args:
        data: batches (dicts with ``input_ids`` and optionally
            ``attention_mask`` / ``labels``; a list, a DataLoader or any
            re-iterable), text (a string, a path, a list of strings/paths, a
            ``datasets.Dataset`` with a ``text`` column, a hub dataset name), or a
            tokenized ``datasets.Dataset`` with ``input_ids``.
        config: the model's config (context length and vocabulary size are checked against it).
        tokenizer: needed for text; must not have more tokens than the model's vocabulary.
        seq_len: tokens per window cut from text.
        batch_size: windows (or dataset rows) per batch.
        seed: shuffles the text windows.

    Raises:
        DataError: anything unusable, before the first batch where possible
            (text, lists of batches, datasets) and otherwise as the batch is drawn.
    """
    if data is None:
        raise DataError("data is required: pass batches, a list of strings (with tokenizer=), or text file paths")
    check_tokenizer(tokenizer)
    check_not_streaming(data)
    if hasattr(data, "column_names") and "input_ids" in data.column_names:
        return checked_batches(dataset_batches(data, batch_size), config)
    if _is_text_source(data):
        if tokenizer is None:
            raise DataError("text data needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)")
        check_context(seq_len, config)
        check_tokenizer_fits(tokenizer, vocab_size_of(config))
        texts = load_texts(data)
        if not texts:
            raise DataError("the text data is empty")
        rows = text_windows(tokenizer, texts, seq_len)
        check_token_ids(rows, vocab_size_of(config), "the tokenized text")
        return text_batches(rows, batch_size, seed)
    if isinstance(data, dict):
        raise DataError("data is a single batch (a dict); pass a list of batches: [batch]")
    if isinstance(data, (list, tuple)) and not data:
        raise DataError("the data is empty: pass at least one batch or one text")
    if not isinstance(data, Iterable) or isinstance(data, (bytes, torch.Tensor)):
        raise DataError(
            f"unsupported data of type {type(data).__name__}: pass a list of batches (dicts with 'input_ids'), "
            "a DataLoader, text (strings, paths, a datasets.Dataset) with tokenizer=, or a tokenized Dataset"
        )
    return checked_batches(data, config)
