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
  model where a saved one is expected.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .modeling_loraprune import PER_LAYER_CLASSES


class PrunedModelError(ValueError):
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
    return new.eval()


def attach_export(model: nn.Module) -> nn.Module:
    """Give a compacted model the class whose ``save_pretrained`` reloads faithfully."""
    block = getattr(model.config, "loraprune", None) or {}
    uniform = block.get("uniform", True)
    if uniform and not (model.config.model_type == "llama" and model.config.hidden_size % model.config.num_attention_heads):
        return model
    if uniform and _needs_mistral_export(model.config):
        return _as_mistral(model)
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


def save_pruned(model: nn.Module, out_dir, overwrite: bool = False, tokenizer=None, extra_json: dict | None = None,
                **save_kwargs) -> Path:
    """Save atomically (safetensors + JSON): write a sibling temp dir, then rename it into place."""
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2), encoding="utf-8")
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
            return cls.from_pretrained(path, config=config, **kwargs)
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except PrunedModelError:
        raise
    except Exception as err:
        raise PrunedModelError(
            f"could not load {path}: {type(err).__name__}: {err}. The weights do not match config.json "
            "(a corrupted or mixed-up directory?); save the pruned model again."
        ) from err
