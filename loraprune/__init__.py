"""loraprune: LoRA-guided structured pruning of LLaMA-family models.

``loraprune.prune(model, data, ratio=0.5)`` returns the model physically
smaller (fewer KV-head groups, narrower MLPs), LoRA merged, ready for
``save_pretrained`` and ``load_pruned``. The pieces are public for users with
their own training loop: :class:`LoRAPruner` (the engine), the criteria,
:class:`CubicSchedule`, :class:`PruningState` / :class:`Masks`, and
:func:`compact`.
"""
from .adapter import export_adapter
from .allocation import Allocation, allocate
from .archs import ARCHS, ArchSpec, ModuleLayoutError, UnsupportedArchitectureError, arch_for
from .callback import LoRAPruneCallback
from .checkpoint import Checkpointer, CheckpointError
from .compaction import compact, merge_lora
from .criterion import CRITERIA, score_module
from .data import DataError
from .engine import LoRAPruner
from .groups import LayerGroups, build_layer_groups
from .io import PrunedModelError, attach_export, load_pruned, save_pruned
from .lora import LoRALinear
from .masks import Masks
from .oneshot import oneshot_prune
from .prune import NonFiniteLossError, prune
from .schedule import CubicSchedule
from .state import PruningState

__version__ = "0.1.0"

__all__ = [
    "ARCHS", "Allocation", "ArchSpec", "CRITERIA", "CheckpointError", "Checkpointer", "CubicSchedule", "DataError",
    "LayerGroups", "LoRALinear", "LoRAPruneCallback", "LoRAPruner", "Masks", "ModuleLayoutError", "NonFiniteLossError", "PrunedModelError",
    "PruningState", "UnsupportedArchitectureError", "allocate", "arch_for", "attach_export", "build_layer_groups",
    "compact", "export_adapter", "load_pruned", "merge_lora", "oneshot_prune", "prune", "save_pruned", "score_module",
]
