"""Tokenising text into the fixed windows the pruning papers train and evaluate on.

Documents are joined by a blank line, tokenised once, and cut into
non-overlapping windows; the checks that the tokens fit the model (its
vocabulary, its context) live here too.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import DataError
from .text_files import DOC_SEPARATOR, read_texts


def vocab_size_of(model_or_config: Any) -> int | None:
    """The number of token ids a model accepts.

    Args:
        model_or_config: a model (its input embedding's rows, else its
            ``config.vocab_size``) or a config (its ``vocab_size``).

    Returns:
        The size, or ``None`` if unknown.
    """
    get_embeddings = getattr(model_or_config, "get_input_embeddings", None)
    if callable(get_embeddings):
        emb = get_embeddings()
        if getattr(emb, "num_embeddings", None):
            return int(emb.num_embeddings)
    config = getattr(model_or_config, "config", model_or_config)
    size = getattr(config, "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def check_tokenizer(tokenizer: Any) -> None:
    """A tokenizer must be a tokenizer object (callable on text), not its name or folder."""
    if tokenizer is not None and not callable(tokenizer):
        hint = (f"; load it with AutoTokenizer.from_pretrained({tokenizer!r})" if isinstance(tokenizer, (str, os.PathLike))
                else "")
        raise TypeError(f"tokenizer must be a tokenizer object (callable on text), got {type(tokenizer).__name__}{hint}")


def check_tokenizer_fits(tokenizer: Any, vocab_size: int | None) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding has rows.

    Args:
        tokenizer: a Hugging Face tokenizer (``len(tokenizer)`` counts added tokens).
        vocab_size: the model's embedding rows; ``None`` skips the check.

    Raises:
        DataError: the tokenizer can produce ids the model has no embedding for.
    """
    if vocab_size is None or tokenizer is None:
        return
    try:
        n = len(tokenizer)
    except TypeError:
        n = getattr(tokenizer, "vocab_size", None)
    if isinstance(n, int) and n > vocab_size:
        raise DataError(
            f"the tokenizer has {n} tokens but the model's embedding has {vocab_size} rows: it is not this model's "
            "tokenizer. Pass the tokenizer the model was trained with (AutoTokenizer.from_pretrained(<model dir>))"
        )


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, where: str = "the data",
                    ignore_index: int | None = None) -> None:
    """Refuse token ids outside ``[0, vocab_size)`` (cheap: one min and one max).

    Args:
        ids: an integer tensor of token ids (or labels).
        vocab_size: the model's embedding rows; ``None`` checks only for negatives.
        where: names the offending input in the message.
        ignore_index: a value allowed besides the vocabulary (``-100`` for labels).

    Raises:
        DataError: naming the likely cause, a tokenizer that is not the model's.
    """
    if ids.numel() == 0:
        return
    if ignore_index is not None:
        ids = ids[ids != ignore_index]
        if ids.numel() == 0:
            return
    low, high = int(ids.min()), int(ids.max())
    bad = low if low < 0 else high if vocab_size is not None and high >= vocab_size else None
    if bad is not None and bad < 0 and ignore_index is not None:
        raise DataError(
            f"{where}: value {bad} is neither a token id nor the ignore index {ignore_index}; padding in labels must "
            f"be {ignore_index} (the value the loss skips), e.g. labels[labels == {bad}] = {ignore_index}"
        )
    if bad is not None:
        limit = f"[0, {vocab_size})" if vocab_size is not None else "non-negative values"
        raise DataError(
            f"{where}: token id {bad} is outside the model's vocabulary ({limit}); the text was tokenized with "
            "a different tokenizer than this model's. Tokenize with the model's own tokenizer."
        )


def token_stream(tokenizer: Any, source: Any, separator: str = DOC_SEPARATOR) -> torch.Tensor:
    """One flat LongTensor of tokens: documents joined by ``separator``, no special tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (unused for a tensor ``source``).
        source: any :func:`read_texts` source, or token ids as an integer
            tensor (rows concatenated).
        separator: placed between documents before tokenizing.

    Raises:
        DataError: float token tensors, no tokenizer for text, empty text.
    """
    if isinstance(source, torch.Tensor):
        if source.dtype not in (torch.int64, torch.int32):
            raise DataError(f"token ids must be an integer tensor (LongTensor), got {source.dtype}; "
                            "tokenize the text or pass the text with tokenizer=")
        return source.reshape(-1).long()
    if tokenizer is None:
        raise DataError("text needs a tokenizer: pass tokenizer=... (or token ids as a LongTensor)")
    check_tokenizer(tokenizer)
    texts = read_texts(source)
    if not any(t.strip() for t in texts):
        raise DataError("the text is empty: pass at least one non-blank document")
    ids = tokenizer(separator.join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def require_tokens(n_tokens: int, window: int) -> None:
    """Refuse text shorter than one window.

    Args:
        n_tokens: tokens in the text.
        window: tokens per window (``seq_len`` for training, ``window`` for perplexity).
    """
    if n_tokens < window:
        raise DataError(
            f"text too short: found {n_tokens} tokens, need at least window={window} tokens for one window; "
            "give more text or a smaller seq_len/window"
        )


def cut_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of a token stream; the tail is dropped.

    Args:
        stream: a 1-D token tensor.
        seq_len: tokens per window.

    Returns:
        ``(n, seq_len)`` windows, a view of ``stream``.
    """
    require_tokens(stream.numel(), seq_len)
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def text_windows(tokenizer: Any, source: Any, seq_len: int, separator: str = DOC_SEPARATOR) -> torch.Tensor:
    """Tokenize a text source and cut it into ``(n, seq_len)`` windows.

    Args:
        tokenizer, source, separator: as in :func:`token_stream`.
        seq_len: tokens per window.
    """
    return cut_windows(token_stream(tokenizer, source, separator), seq_len)


def check_context(seq_len: int, config: Any, name: str = "seq_len") -> None:
    """Refuse sequences longer than the model's context (training and evaluation alike).

    Args:
        seq_len: tokens per sequence.
        config: the model's config; its ``max_position_embeddings`` (if any) is the limit.
        name: the argument that set the length, for the message (``window`` in perplexity).
    """
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DataError(
            f"{name}={seq_len} exceeds the model's context (max_position_embeddings={limit}); pass {name}<={limit}"
        )
