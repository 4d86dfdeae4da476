"""Saving and reloading pruned models (safetensors + JSON only).

* Uniform models (every layer keeps the same widths) are stock models of a
  smaller config: ``AutoModelForCausalLM.from_pretrained(dir)`` reloads them
  with no remote code. One wrinkle: ``LlamaConfig`` rejects
  ``hidden_size % num_attention_heads != 0`` even with an explicit
  ``head_dim``; such a LLaMA (without biases) is exported as the
  architecturally identical Mistral with ``sliding_window=None``.
* Non-uniform models get the per-layer classes of
  :mod:`loraprune.modeling_loraprune`; their ``save_pretrained`` copies that
  file beside the weights and writes ``auto_map``, so both
  :func:`load_pruned` and ``from_pretrained(dir, trust_remote_code=True)``
  rebuild them.
* :func:`save_pruned` writes atomically: a temporary sibling directory is
  renamed into place, so an interrupted save never leaves a half-written
  model where a saved one is expected. Beside the weights it writes
  ``loraprune_masks.json``: the kept KV groups and MLP channels of every
  layer, as indices into the original model (:meth:`Masks.load_json` reads it).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from .errors import LoRAPruneError

from .gguf import forget_gguf_origin
from .lora import LoRALinear, is_peft_lora_layer
from .masks import Masks
from .modeling_loraprune import PER_LAYER_CLASSES

MASKS_FILE = "loraprune_masks.json"


class PrunedModelError(LoRAPruneError):
    """A directory does not hold a loadable loraprune model; the message says why."""


def _needs_mistral_export(config) -> bool:
    return (
        config.model_type == "llama"
        and config.hidden_size % config.num_attention_heads != 0
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
    )


def _as_mistral(model: nn.Module) -> nn.Module:
    """The same network as a stock ``MistralForCausalLM`` (no weight copies)."""
    from transformers import MistralConfig, MistralForCausalLM

    src = model.config.to_dict()
    drop = {"model_type", "architectures", "attention_bias", "mlp_bias", "pretraining_tp", "transformers_version",
            "auto_map", "_name_or_path"}
    kwargs = {k: v for k, v in src.items() if k not in drop}
    kwargs["sliding_window"] = None
    with torch.device("meta"):
        config = MistralConfig(**kwargs)
        config.loraprune = dict(src.get("loraprune") or {}, exported_as="mistral (LlamaConfig rejects "
                                "hidden_size % num_attention_heads != 0)")
        new = MistralForCausalLM(config)
    new.load_state_dict(model.state_dict(), assign=True, strict=True)
    # non-persistent buffers (rotary inv_freq) are not in the state dict
    src_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            new.get_submodule(owner).register_buffer(leaf, src_buffers[name].clone(), persistent=False)
    for module in new.modules():  # plain tensor attributes such as original_inv_freq
        for key, val in list(vars(module).items()):
            if torch.is_tensor(val) and val.is_meta and hasattr(module, "inv_freq"):
                setattr(module, key, module.inv_freq.clone())
    new.tie_weights()
    new.generation_config = model.generation_config
    if getattr(model, "loraprune_masks", None) is not None:
        new.loraprune_masks = model.loraprune_masks
    return new.eval()


def attach_export(model: nn.Module) -> nn.Module:
    """Give a compacted model the class whose ``save_pretrained`` reloads faithfully."""
    block = getattr(model.config, "loraprune", None) or {}
    uniform = block.get("uniform", True)
    if uniform and not (model.config.model_type == "llama" and model.config.hidden_size % model.config.num_attention_heads):
        return model
    if uniform and _needs_mistral_export(model.config):
        return _as_mistral(model)
    if uniform:
        # A LLaMA with biases whose head count no longer divides hidden_size:
        # neither LlamaConfig nor the bias-free Mistral can hold it, so it
        # goes out as a per-layer model whose stock fields keep the original
        # (valid) head counts and whose layers carry the real widths.
        original = block.get("original") or {}
        model.config.num_attention_heads = original["num_attention_heads"]
        model.config.num_key_value_heads = original["num_key_value_heads"]
        model.config.loraprune = dict(block, uniform=False, export="per-layer: LlamaConfig refuses hidden_size % "
                                      "num_attention_heads != 0 and Mistral has no biases")
    cls = PER_LAYER_CLASSES.get(model.config.model_type)
    if cls is None:
        raise PrunedModelError(f"no per-layer export for model_type={model.config.model_type!r}")
    if type(model) is not cls:
        if not isinstance(model, cls.__mro__[1]):
            raise PrunedModelError(f"expected a {cls.__mro__[1].__name__}, found {type(model).__name__}")
        model.__class__ = cls
    cls.register_for_auto_class("AutoModelForCausalLM")
    model.config.architectures = [cls.__name__]
    return model


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another directory or pass overwrite=True")


@contextmanager
def atomic_directory(out_dir, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``out_dir``, on error it vanishes."""
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def save_pruned(model: nn.Module, out_dir, overwrite: bool = False, tokenizer=None, extra_json: dict | None = None,
                **save_kwargs) -> Path:
    """Save atomically (safetensors + JSON): write a sibling temp dir, then rename it into place.

    The model is first given its export class (:func:`attach_export`), so a
    merged model from ``finalize``/``merge_lora`` saves the same way as one
    from :func:`loraprune.prune`. A model that still holds LoRA layers is
    refused: merge it (:func:`loraprune.merge_lora`) or export base and
    adapter apart (:func:`loraprune.export_adapter`).
    """
    lora = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) or is_peft_lora_layer(m)]
    if lora:
        raise PrunedModelError(
            f"the model still holds {len(lora)} LoRA layers (e.g. {lora[0]}); call loraprune.merge_lora(model) "
            "to save the merged model, or loraprune.export_adapter(model, dir) to save the pruned base and its adapter"
        )
    model = attach_export(forget_gguf_origin(model))
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
        write_masks(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return out_dir


def read_config(path) -> dict:
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise PrunedModelError(f"{path} has no config.json; expected a directory written by save_pretrained")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PrunedModelError(f"{cfg} is corrupted (not valid JSON: {err.msg}); save the model again") from err


def load_pruned(path, dtype=None, device_map=None, **kwargs) -> nn.Module:
    """Reload a pruned model (uniform or per-layer) with identical logits, no remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = read_config(path)
    if not any(path.glob("*.safetensors")):
        raise PrunedModelError(f"{path} holds no .safetensors weights; expected a model saved by loraprune")
    block = raw.get("loraprune") or {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if block and not block.get("uniform", True):
            cls = PER_LAYER_CLASSES.get(raw.get("model_type"))
            if cls is None:
                raise PrunedModelError(f"per-layer model of unknown model_type={raw.get('model_type')!r}")
            config = AutoConfig.from_pretrained(path)
            model, info = cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        # transformers only warns when weights are missing (it initialises them
        # randomly): for a pruned model that is a broken directory, so refuse.
        problems = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise PrunedModelError(
                f"{path}: the weights do not match config.json ({problems}); a corrupted or mixed-up "
                "directory? Save the pruned model again."
            )
        if (path / MASKS_FILE).is_file():
            model.loraprune_masks = Masks.load_json(path / MASKS_FILE)
        return model
    except PrunedModelError:
        raise
    except Exception as err:
        raise PrunedModelError(
            f"could not load {path}: {type(err).__name__}: {err}. The weights do not match config.json "
            "(a corrupted or mixed-up directory?); save the pruned model again."
        ) from err
