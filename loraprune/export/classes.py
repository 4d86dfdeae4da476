"""The class a compacted model is saved as, so that it reloads faithfully.

* Uniform models (every layer keeps the same widths) are stock models of a
  smaller config: ``AutoModelForCausalLM.from_pretrained(dir)`` reloads them
  with no remote code. One wrinkle: ``LlamaConfig`` rejects
  ``hidden_size % num_attention_heads != 0`` even with an explicit
  ``head_dim``; such a LLaMA (without biases) is exported as the
  architecturally identical Mistral with ``sliding_window=None``.
* Non-uniform models get the per-layer classes of
  :mod:`loraprune.export.modeling_loraprune`; their ``save_pretrained`` copies that
  file beside the weights and writes ``auto_map``, so both
  :func:`loraprune.load_pruned` and ``from_pretrained(dir, trust_remote_code=True)``
  rebuild them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import PrunedModelError
from .modeling_loraprune import PER_LAYER_CLASSES


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
    for attr in ("loraprune_masks", "loraprune_gguf_source"):
        if getattr(model, attr, None) is not None:
            setattr(new, attr, getattr(model, attr))
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
    check_exportable(model)
    cls = PER_LAYER_CLASSES[model.config.model_type]
    if type(model) is not cls:
        model.__class__ = cls
    cls.register_for_auto_class("AutoModelForCausalLM")
    model.config.architectures = [cls.__name__]
    return model


def check_exportable(model: nn.Module) -> None:
    """Refuse, before any training, a model :func:`attach_export` could not give a per-layer class."""
    cls = PER_LAYER_CLASSES.get(getattr(model.config, "model_type", None))
    if cls is None:
        raise PrunedModelError(f"no per-layer export for model_type={model.config.model_type!r}; pass uniform=True")
    if not isinstance(model, cls.__mro__[1]):
        raise PrunedModelError(f"expected a {cls.__mro__[1].__name__}, found {type(model).__name__}: the pruned "
                               "model could not be saved; pass the transformers model itself")
