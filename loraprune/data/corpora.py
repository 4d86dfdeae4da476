"""Where the text corpora live, and the named sets read from them.

:func:`resolve_data_dir`: an explicit folder, else ``$LORAPRUNE_DATA``, else
``../shared/data`` beside the repository, else the small public-domain sample
shipped inside the package (``loraprune/samples``), so a fresh clone or a plain
``pip install`` runs the tests and the demo with nothing beside it. Named
evaluation sets the sample lacks (WikiText-2, PTB) come from the hub when a
local copy is missing. :func:`shakespeare_split` gives the fixed train /
held-out split of the Shakespeare corpus; :func:`load_texts` adds hub dataset
names (``"name"`` or ``"name:config"``) to the local sources of
:func:`loraprune.data.text_files.read_texts`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import DataError, DataNotFoundError
from .text_files import DOC_SEPARATOR, TEXT_SUFFIXES, read_text_file, read_texts

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
            return read_text_file(local)
        try:
            return DOC_SEPARATOR.join(hub_texts(dataset, split, column, config or default_config))
        except DataNotFoundError as err:
            raise DataNotFoundError(f"no local copy at {local}; {err}") from err.__cause__
    path = Path(name).expanduser()
    if path.is_dir():
        f = path / f"{split}.txt"
        if not f.is_file():
            raise DataNotFoundError(f"{f} not found: a local eval folder must hold <split>.txt files.")
        return read_text_file(f)
    if path.is_file():
        return read_text_file(path)
    return DOC_SEPARATOR.join(hub_texts(name, split, "text", config))
