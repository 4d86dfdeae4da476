"""loraprune: LoRA-guided structured pruning of LLaMA-family models.

``loraprune.prune(model, data, ratio=0.5)`` returns the model physically
smaller (fewer KV-head groups, narrower MLPs), LoRA merged, ready for
``save_pretrained`` and :func:`load_pruned`. Options live in
:class:`PruneConfig`. For your own training loop: :class:`LoRAPruner` (the
engine), :class:`CubicSchedule`, :func:`compact`, and the Hugging Face Trainer
callback :class:`LoRAPruneCallback` (imported on first use, so ``import
loraprune`` does not pull in ``transformers.Trainer``).

The parts behind these (criteria, masks, groups, architectures, checkpoints,
data and evaluation helpers, errors) stay public in their modules, e.g.
``loraprune.batches.make_batches``, ``loraprune.masks.Masks`` or ``loraprune.errors.DataError``.
"""
from __future__ import annotations

import importlib

from .adapter import export_adapter
from .compaction import compact, merge_lora
from .config import PruneConfig
from .engine import LoRAPruner
from .errors import LoRAPruneError
from .eval import perplexity
from .gguf_export import save_gguf
from .io import load_pruned, save_pruned
from .oneshot import oneshot_prune
from .prune import prune
from .schedule import CubicSchedule

#: The single source of the version: pyproject.toml reads it from here.
__version__ = "0.1.0"

__all__ = [
    "CubicSchedule", "LoRAPruneCallback", "LoRAPruneError", "LoRAPruner", "PruneConfig", "compact",
    "export_adapter", "load_pruned", "merge_lora", "oneshot_prune", "perplexity", "prune", "save_gguf",
    "save_pruned",
]

#: Imported on first access: the Trainer callback (``transformers.Trainer`` is a heavy import).
_LAZY = {"LoRAPruneCallback": "callback"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loraprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
