"""loraprune: LoRA-guided structured pruning of LLaMA-family models.

``loraprune.prune(model, data, ratio=0.5)`` returns the model physically
smaller (fewer KV-head groups, narrower MLPs), LoRA merged, ready for
``save_pretrained`` and :func:`load_pruned`. Options live in
:class:`PruneConfig`. For your own training loop: :class:`LoRAPruner` (the
engine), :class:`CubicSchedule`, :func:`compact`, and the Hugging Face Trainer
callback :class:`LoRAPruneCallback` (imported on first use, so ``import
loraprune`` does not pull in ``transformers.Trainer``).

The parts behind these stay public in the stage that owns them (docs/layout.md
lists the stages): e.g. ``loraprune.data.batches.make_batches``,
``loraprune.structure.masks.Masks``, ``loraprune.method.criterion`` or
``loraprune.errors.DataError`` (every error class).
"""
from __future__ import annotations

import importlib

from .config import PruneConfig
from .errors import LoRAPruneError
from .eval import perplexity
from .export.adapter import export_adapter
from .export.gguf_read import load_gguf
from .export.gguf_write import save_gguf
from .export.load import load_pruned
from .export.save import save_pruned
from .method.schedule import CubicSchedule
from .run.engine import LoRAPruner
from .run.oneshot import oneshot_prune
from .run.prune import prune
from .surgery.compaction import compact, merge_lora

#: The single source of the version: pyproject.toml reads it from here.
__version__ = "0.1.0"

__all__ = [
    "CubicSchedule", "LoRAPruneCallback", "LoRAPruneError", "LoRAPruner", "PruneConfig", "compact",
    "export_adapter", "load_gguf", "load_pruned", "merge_lora", "oneshot_prune", "perplexity", "prune", "save_gguf",
    "save_pruned",
]

#: Imported on first access: the Trainer callback (``transformers.Trainer`` is a heavy import).
_LAZY = {"LoRAPruneCallback": "run.callback"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loraprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
