"""Text and batches: the one home of the data plumbing.

Everything that finds, reads, tokenizes or batches text lives here; the
reference model (:mod:`loraprune.reference`), evaluation (:mod:`loraprune.eval`),
the CLI and the benchmarks all go through it.

* **Where text lives** — :func:`resolve_data_dir`: an explicit folder, else
  ``$LORAPRUNE_DATA``, else ``../shared/data`` beside the repository, else the
  small public-domain sample shipped inside the package (``loraprune/samples``),
  so a fresh clone or a plain ``pip install`` runs the tests and the demo with
  nothing beside it. Named evaluation sets the sample lacks (WikiText-2, PTB)
  come from the hub when a local copy is missing. :func:`shakespeare_split`
  gives the fixed train / held-out split of the Shakespeare corpus.
* **Reading** — :func:`read_texts` / :func:`load_texts`: strings, ``.txt`` /
  ``.jsonl`` files or folders, a ``datasets.Dataset`` with a text column, or a
  hub dataset named ``"name"`` or ``"name:config"`` (:func:`hub_texts`).
* **Tokenizing** — :func:`token_stream`, :func:`cut_windows`,
  :func:`text_windows`: documents joined by a blank line, tokenized once, cut
  into fixed windows (the pruning papers' protocol).
* **Batches** — :func:`make_batches`: what :func:`loraprune.prune` trains on,
  from any accepted input; every batch is checked (integer ids inside the
  vocabulary, matching shapes, something to train on) before it reaches the model.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import LoRAPruneError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
#: Separator placed between documents before tokenizing (as the papers' eval scripts).
DOC_SEPARATOR = "\n\n"
#: The sample corpus shipped with the package (same layout as the shared data folder).
SAMPLE_DIR = Path(__file__).resolve().parent / "samples"
#: Shakespeare works held out for evaluation (fixed by the shared data README).
HELDOUT_FILES = ("hamlet.txt", "macbeth.txt", "twelfth_night.txt", "sonnets.txt")
#: Named evaluation sets: local folder under the data dir, and the hub fallback
#: (dataset, config, text column). The local WikiText-2 copy is the ``<unk>``-tokenised
#: version, hence ``wikitext-2-v1``.
EVAL_SETS = {
    "wikitext2": ("wikitext-2", ("wikitext", "wikitext-2-v1", "text")),
    "ptb": ("ptb", ("ptb_text_only", "penn_treebank", "sentence")),
}
_EVAL_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wiki": "wikitext2", "penn_treebank": "ptb"}
_SHAKESPEARE_SPLITS = ("train", "test", "valid", "validation", "heldout")
_IGNORE_INDEX = -100  # label value the causal-LM loss skips


class DataError(LoRAPruneError):
    """The data given to prune/eval cannot be used; the message says why and what to pass."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A file, folder or dataset could not be found; also a ``FileNotFoundError``."""


# ------------------------------------------------------------- where text lives
def _beside_repository() -> list[Path]:
    """``../shared/data`` beside the current project directory and beside this source checkout."""
    return [Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the text corpora (``shakespeare/``, ``wikitext-2/``, ``ptb/``).

    Args:
        data_dir: an explicit folder; returned as given (it is the caller's choice).

    Returns:
        ``data_dir`` if given, else ``$LORAPRUNE_DATA`` if set, else the first
        existing ``../shared/data`` beside the working directory or beside this
        source checkout, else :data:`SAMPLE_DIR` (the sample shipped with the package).
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("LORAPRUNE_DATA")
    if env:
        return Path(env).expanduser()
    for candidate in _beside_repository():
        if candidate.is_dir():
            return candidate.resolve()
    return SAMPLE_DIR


def shakespeare_split(data_dir: str | os.PathLike | None = None) -> tuple[list[Path], list[Path]]:
    """The fixed train / held-out split of the Shakespeare corpus.

    Args:
        data_dir: the data folder (see :func:`resolve_data_dir`); its
            ``shakespeare/`` subfolder is read.

    Returns:
        ``(train_paths, heldout_paths)``, each sorted by file name. Held out:
        :data:`HELDOUT_FILES`; every other ``*.txt`` is training / calibration text.

    Raises:
        DataNotFoundError: the folder or one of the held-out works is missing.
    """
    folder = resolve_data_dir(data_dir) / "shakespeare"
    if not folder.is_dir():
        raise DataNotFoundError(
            f"Shakespeare corpus not found at {folder}. Pass data_dir=<folder containing shakespeare/>, "
            "set LORAPRUNE_DATA, or leave both unset to use the sample shipped with loraprune."
        )
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    heldout = [folder / name for name in HELDOUT_FILES]
    missing = [p.name for p in heldout if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"held-out files {missing} missing from {folder}; the split needs all of {list(HELDOUT_FILES)}."
        )
    train = [p for p in files if p.name not in HELDOUT_FILES]
    if not train:
        raise DataNotFoundError(f"no training .txt files in {folder} besides the held-out ones.")
    return train, sorted(heldout)


# ---------------------------------------------------------------------- reading
def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); re-save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8 IN > OUT)"
        ) from err


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for n, line in enumerate(_read_file(path).splitlines(), 1):
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
            texts.append(str(record[field]))
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
    return [_read_file(path)]


def _names_a_file(s: str) -> bool:
    """A string that reads as a file name (one line, no spaces, a text suffix) rather than as text."""
    return "\n" not in s and not any(c.isspace() for c in s) and s.endswith(TEXT_SUFFIXES)


def _is_path(s: str) -> bool:
    return "\n" not in s and len(s) < 4096 and os.path.exists(s)


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
        DataError: a missing path, a non-UTF-8 file, an empty folder, a record
            or dataset without ``text_field``, or an unsupported type.
    """
    if isinstance(source, os.PathLike):
        return _read_path(Path(source), text_field)
    if isinstance(source, str):
        if _is_path(source) or _names_a_file(source):
            return _read_path(Path(source), text_field)
        return [source]
    if hasattr(source, "column_names"):  # a datasets.Dataset, without importing datasets
        if text_field not in source.column_names:
            raise DataError(f"the dataset has no {text_field!r} column (columns: {source.column_names}); "
                            f"select or rename the text column to {text_field!r}")
        return [str(t) for t in source[text_field] if t is not None]
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


def hub_texts(name: str, split: str = "train", text_field: str = "text", config: str | None = None) -> list[str]:
    """Documents of a hub dataset, via ``datasets.load_dataset``.

    Args:
        name: ``"dataset"`` or ``"dataset:config"`` (the command line's convention).
        split: the split to load.
        text_field: the text column.
        config: the configuration; overrides one given in ``name``.

    Raises:
        DataNotFoundError: the dataset cannot be loaded (offline, unknown name, ...).
        DataError: it has no ``text_field`` column.
    """
    import datasets

    dataset, _, named_config = name.partition(":")
    config = config or named_config or None
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # offline, unknown name, script datasets, ...
        raise DataNotFoundError(
            f"could not load the hub dataset {dataset!r} (config {config}, split {split!r}): "
            f"{type(err).__name__}: {err}. Pass local .txt/.jsonl files, set LORAPRUNE_DATA to a data folder, "
            "or check the network."
        ) from err
    return read_texts(ds, text_field)


def _looks_like_dataset_name(s: str) -> bool:
    return bool(s) and not any(c.isspace() for c in s) and not os.path.exists(s) and not s.endswith(TEXT_SUFFIXES)


def load_texts(source: Any, split: str = "train", text_field: str = "text",
               max_documents: int | None = None) -> list[str]:
    """Like :func:`read_texts`, but a lone string that is neither a path nor text-like
    names a hub dataset (``"name"`` or ``"name:config"``): what a command line's ``--data`` means.

    Args:
        source: see :func:`read_texts`, or a hub dataset name.
        split: the hub dataset's split.
        text_field: the column / JSON field holding the text.
        max_documents: keep only the first N documents.

    Returns:
        The non-blank documents.
    """
    if isinstance(source, str) and _looks_like_dataset_name(source):
        try:
            texts = hub_texts(source, split, text_field)
        except DataNotFoundError as err:
            raise DataNotFoundError(
                f"{source!r} is neither a local file/folder nor a loadable hub dataset ({err.__cause__!r}). "
                "Pass a path to .txt/.jsonl files, a folder of them, or a dataset name reachable from this machine."
            ) from err.__cause__
    else:
        texts = read_texts(source, text_field)
    texts = [t for t in texts if t.strip()]
    return texts[:max_documents] if max_documents else texts


def load_eval_text(name: str, split: str = "test", data_dir: str | os.PathLike | None = None,
                   config: str | None = None) -> str:
    """Evaluation text as one string (documents joined by a blank line).

    Args:
        name: ``"wikitext2"`` / ``"ptb"`` (``<data_dir>/<folder>/<split>.txt``,
            else the hub), ``"shakespeare"`` (the held-out works for split
            "test"/"valid"/"heldout", the training works for "train"), a local
            folder holding ``<split>.txt``, a text file, or any hub dataset
            (``"name"`` or ``"name:config"``).
        split: the split to read.
        data_dir: the data folder (see :func:`resolve_data_dir`).
        config: the hub configuration (overrides one given in ``name``).

    Raises:
        DataNotFoundError: no local copy and the hub is unreachable.
    """
    key = _EVAL_ALIASES.get(name.lower(), name.lower())
    if key == "shakespeare":
        if split not in _SHAKESPEARE_SPLITS:
            raise DataError(f"shakespeare split must be 'train' or 'test'/'heldout', got {split!r}.")
        train, heldout = shakespeare_split(data_dir)
        return DOC_SEPARATOR.join(read_texts(train if split == "train" else heldout))
    if key in EVAL_SETS:
        folder, (dataset, default_config, column) = EVAL_SETS[key]
        local = resolve_data_dir(data_dir) / folder / f"{split}.txt"
        if local.is_file():
            return _read_file(local)
        try:
            return DOC_SEPARATOR.join(hub_texts(dataset, split, column, config or default_config))
        except DataNotFoundError as err:
            raise DataNotFoundError(f"no local copy at {local}; {err}") from err.__cause__
    path = Path(name).expanduser()
    if path.is_dir():
        f = path / f"{split}.txt"
        if not f.is_file():
            raise DataNotFoundError(f"{f} not found: a local eval folder must hold <split>.txt files.")
        return _read_file(f)
    if path.is_file():
        return _read_file(path)
    return DOC_SEPARATOR.join(hub_texts(name, split, "text", config))


# ------------------------------------------------------------------- tokenizing
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


# ---------------------------------------------------------------------- batches
def check_context(seq_len: int, config: Any) -> None:
    """Refuse sequences longer than the model's context.

    Args:
        seq_len: tokens per sequence.
        config: the model's config; its ``max_position_embeddings`` (if any) is the limit.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DataError(
            f"seq_len={seq_len} exceeds the model's context (max_position_embeddings={limit}); pass seq_len<={limit}"
        )


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


__all__: Sequence[str] = (
    "DOC_SEPARATOR", "EVAL_SETS", "HELDOUT_FILES", "SAMPLE_DIR", "TEXT_SUFFIXES", "DataError", "DataNotFoundError",
    "check_context", "check_token_ids", "check_tokenizer_fits", "checked_batches", "cut_windows", "dataset_batches",
    "hub_texts", "load_eval_text", "load_texts", "make_batches", "read_texts", "require_tokens", "resolve_data_dir",
    "shakespeare_split", "text_batches", "text_windows", "token_stream", "vocab_size_of",
)
