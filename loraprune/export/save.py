"""Saving a pruned model (safetensors + JSON only), atomically.

:func:`save_pruned` gives the model its export class
(:mod:`loraprune.export.classes`) and writes it through
:func:`loraprune.utils.atomic.atomic_directory`: an interrupted save never
leaves a half-written model, or none, where a saved one is expected. Beside the
weights it writes ``loraprune_masks.json``: the kept KV groups and MLP channels
of every layer, as indices into the original model (:meth:`Masks.load_json`
reads it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from ..errors import PrunedModelError
from ..model.lora import LoRALinear, is_peft_lora_layer, unwrap_compiled
from ..utils.atomic import atomic_directory, check_target
from ..utils.paths import as_path, check_file_name
from .classes import attach_export
from .gguf_read import forget_gguf_origin

MASKS_FILE = "loraprune_masks.json"


def masks_payload(model: nn.Module) -> dict | None:
    """``loraprune_masks.json`` content: kept indices per layer plus the geometry to read them."""
    masks = getattr(model, "loraprune_masks", None)
    if masks is None:
        return None
    original = (getattr(model.config, "loraprune", None) or {}).get("original") or {}
    n_heads, n_kv = original.get("num_attention_heads"), original.get("num_key_value_heads")
    payload = {
        "description": "kept groups per layer, as indices into the original model: KV group g owns k/v rows "
                       "[g*head_dim, (g+1)*head_dim) and q rows / o_proj columns "
                       "[g*q_per_kv*head_dim, (g+1)*q_per_kv*head_dim); an MLP channel c owns gate/up row c "
                       "and down_proj column c",
        "head_dim": getattr(model.config, "head_dim", None),
        "q_per_kv": n_heads // n_kv if n_heads and n_kv else None,
    }
    payload.update(masks.to_dict())
    return payload


def write_masks(model: nn.Module, directory) -> Path | None:
    payload = masks_payload(model)
    if payload is None:
        return None
    path = Path(directory) / MASKS_FILE
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def require_pruned(model: nn.Module, what: str = "save_pruned") -> dict:
    """The model's ``config.loraprune`` block; refuse a model loraprune did not compact."""
    block = getattr(getattr(model, "config", None), "loraprune", None) or {}
    if not block.get("layers"):
        raise PrunedModelError(
            f"{what}: the model was not pruned by loraprune (its config has no loraprune block); prune it first "
            "(loraprune.prune or LoRAPruner.finalize), or save an unpruned model with model.save_pretrained(dir)"
        )
    return block


def require_merged(model: nn.Module) -> None:
    """Refuse a model that still holds LoRA layers (what save_pruned and save_gguf write is one dense model)."""
    lora = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) or is_peft_lora_layer(m)]
    if lora:
        raise PrunedModelError(
            f"the model still holds {len(lora)} LoRA layers (e.g. {lora[0]}); call loraprune.merge_lora(model) "
            "to save the merged model, or loraprune.export_adapter(model, dir) to save the pruned base and its adapter"
        )


def save_pruned(model: nn.Module, out_dir, overwrite: bool = False, tokenizer=None, extra_json: dict | None = None,
                **save_kwargs) -> Path:
    """Save atomically (safetensors + JSON): write a sibling temp dir, then rename it into place.

    The model is first given its export class (:func:`attach_export`), so a
    merged model from ``finalize``/``merge_lora`` saves the same way as one
    from :func:`loraprune.prune`. A model that still holds LoRA layers is
    refused: merge it (:func:`loraprune.merge_lora`) or export base and
    adapter apart (:func:`loraprune.export_adapter`). ``extra_json`` adds
    ``{file name: payload}`` files; a name the save itself writes
    (``config.json``, ``loraprune_masks.json``, ...) is refused rather than overwritten.
    """
    model = unwrap_compiled(model)  # a torch.compile'd pruned model saves as the module it wraps
    require_pruned(model)
    out_dir = as_path(out_dir, "out_dir")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        hint = (f" (to save the tokenizer of {tokenizer!r}, pass AutoTokenizer.from_pretrained({tokenizer!r}))"
                if isinstance(tokenizer, (str, os.PathLike)) else "")
        raise TypeError(f"tokenizer must be a tokenizer object with save_pretrained(), got "
                        f"{type(tokenizer).__name__}{hint}")
    _check_extra_json(extra_json)
    require_merged(model)
    check_target(out_dir, overwrite)
    model = attach_export(forget_gguf_origin(model))
    with atomic_directory(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
        write_masks(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            if (tmp / name).exists():
                raise PrunedModelError(f"extra_json names {name}, which save_pruned writes itself; choose another file name")
            (tmp / name).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return out_dir


def _check_extra_json(extra_json) -> None:
    """``extra_json`` must map file names to JSON-able payloads: checked before anything is written."""
    if extra_json is None:
        return
    if not isinstance(extra_json, dict) or not all(isinstance(k, str) and k for k in extra_json):
        raise TypeError(f"extra_json must be a dict of {{file name: JSON-able payload}}, got {extra_json!r:.80}")
    for name, payload in extra_json.items():
        check_file_name(name, "extra_json")
        try:
            json.dumps(payload)
        except (TypeError, ValueError) as err:
            raise TypeError(f"extra_json[{name!r}] cannot be written as JSON ({err}); convert numpy numbers and "
                            "tensors to Python values (e.g. float(x), x.tolist())") from err
