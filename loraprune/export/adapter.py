"""Export a pruned model as its pruned *base* plus a PEFT LoRA adapter that fits it.

PEFT cannot load an adapter trained on the full model onto a pruned one: the
shapes no longer match (peft issue #1746). After pruning with ``merge=False``
(:func:`loraprune.prune` or ``LoRAPruner.finalize``) the model still holds
:class:`~loraprune.model.lora.LoRALinear` layers whose base weights *and* factors
were gathered to the kept groups: ``B`` keeps the kept output rows, ``A`` the
kept input columns. :func:`export_adapter` writes the two apart::

    out_dir/base/      the pruned model without LoRA (reload: loraprune.load_pruned)
    out_dir/adapter/   adapter_config.json + adapter_model.safetensors (PEFT layout)

``PeftModel.from_pretrained(load_pruned(out_dir / "base"), out_dir / "adapter")``
then computes what the merged pruned model computes. The model passed in is
left as it was (still unmerged); :func:`loraprune.merge_lora` merges it.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import PrunedModelError
from ..model.lora import LoRALinear
from ..utils.atomic import atomic_directory, check_target
from ..utils.paths import as_path
from .save import save_pruned

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PeftModel names the wrapped transformers model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Dotted module path -> :class:`LoRALinear`, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_tensors(layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """PEFT's key names: ``base_model.model.<path>.lora_A.weight`` (r x in) and ``lora_B.weight`` (out x r)."""
    out = {}
    for name, m in layers.items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    return out


def _majority(values):
    return Counter(values).most_common(1)[0][0]


def adapter_config(layers: dict[str, LoRALinear], base_model_name_or_path: str = ""):
    """A ``peft.LoraConfig`` reproducing every layer's rank and scale.

    PEFT's scale is ``lora_alpha / r``; loraprune keeps the scale itself (a
    ``PeftModel`` handed to pruning may have used rsLoRA), so ``lora_alpha`` is
    written as ``scale * r``. Layers whose rank or scale differ from the most
    common one get an entry in ``rank_pattern`` / ``alpha_pattern`` keyed by
    their full module path.
    """
    from peft import LoraConfig

    r = _majority(m.r for m in layers.values())
    alpha = _majority(m.scaling * m.r for m in layers.values())
    rank_pattern, alpha_pattern = {}, {}
    for name, m in layers.items():
        if m.r != r:
            rank_pattern[name] = m.r
        if m.scaling * m.r != alpha:
            alpha_pattern[name] = m.scaling * m.r
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=_majority(m.dropout for m in layers.values()),
        bias="none", task_type="CAUSAL_LM", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        base_model_name_or_path=base_model_name_or_path,
    )


def _detach_lora(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
    for name, m in layers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, m.base)


def _reattach_lora(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
    for name, m in layers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, m)


def export_adapter(model: nn.Module, out_dir, *, overwrite: bool = False, tokenizer=None) -> tuple[Path, Path]:
    """Write ``out_dir/base`` (pruned base model) and ``out_dir/adapter`` (PEFT LoRA); returns both paths.

    ``model`` comes from ``loraprune.prune(..., merge=False)`` or
    ``LoRAPruner.finalize(merge=False)``. The whole directory is written
    atomically; the model is unchanged afterwards.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise PrunedModelError(
            "the model holds no LoRA layers (its LoRA was merged already); prune with merge=False "
            "(loraprune.prune(..., merge=False) or LoRAPruner.finalize(merge=False)) to export an adapter"
        )
    if not (getattr(model.config, "loraprune", None) or {}).get("layers"):
        raise PrunedModelError("the model has no config.loraprune block: it was not compacted by loraprune")
    out_dir = as_path(out_dir, "out_dir")
    check_target(out_dir, overwrite)  # before any work: a wrong overwrite, a taken name, a symlink
    original_class = type(model)
    original_architectures = getattr(model.config, "architectures", None)
    with atomic_directory(out_dir, overwrite) as tmp:
        _detach_lora(model, layers)
        try:
            save_pruned(model, tmp / "base", tokenizer=tokenizer)
        finally:
            _reattach_lora(model, layers)
            model.__class__ = original_class
            model.config.architectures = original_architectures
        adapter = tmp / "adapter"
        adapter.mkdir()
        adapter_config(layers, base_model_name_or_path=str((out_dir / "base").resolve())).save_pretrained(adapter)
        save_file(adapter_tensors(layers), str(adapter / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir / "base", out_dir / "adapter"
