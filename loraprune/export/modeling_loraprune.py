"""Models whose decoder layers have different widths, as loraprune saves them.

This file is copied next to the weights of a non-uniformly pruned model, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` can
rebuild it; :func:`loraprune.load_pruned` uses the same classes without
remote code. It must stay standalone: it imports only torch and transformers.

Each class is the stock model whose ``__init__`` then re-shapes the seven
projections of every layer from ``config.loraprune["layers"]`` (kept query
heads, KV heads and MLP channels per layer). The forward pass is the stock
one: attention reshapes by ``head_dim`` and the query heads per KV head are
unchanged by pruning whole KV groups, so nothing else depends on the widths.
Construction happens on whatever device ``from_pretrained`` chose (meta for
large models), so reloading needs no second copy of the weights.
"""
import torch.nn as nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM


def _resized(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (old.in_features, old.out_features) == (in_features, out_features):
        return old
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def apply_layer_widths(model) -> None:
    """Re-shape every decoder layer's projections to ``config.loraprune["layers"]``."""
    block = getattr(model.config, "loraprune", None) or {}
    widths = block.get("layers")
    if not widths:
        return
    layers = model.model.layers
    if len(widths) != len(layers):
        raise ValueError(f"config.loraprune lists {len(widths)} layers, the model has {len(layers)}")
    head_dim = model.config.head_dim
    hidden = model.config.hidden_size
    for layer, w in zip(layers, widths):
        attn, mlp = layer.self_attn, layer.mlp
        q = w["num_attention_heads"] * head_dim
        kv = w["num_key_value_heads"] * head_dim
        m = w["intermediate_size"]
        attn.q_proj = _resized(attn.q_proj, hidden, q)
        attn.k_proj = _resized(attn.k_proj, hidden, kv)
        attn.v_proj = _resized(attn.v_proj, hidden, kv)
        attn.o_proj = _resized(attn.o_proj, q, hidden)
        mlp.gate_proj = _resized(mlp.gate_proj, hidden, m)
        mlp.up_proj = _resized(mlp.up_proj, hidden, m)
        mlp.down_proj = _resized(mlp.down_proj, m, hidden)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = m


class LoRAPruneLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)


class LoRAPruneMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)


class LoRAPruneQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)


class LoRAPruneQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)


PER_LAYER_CLASSES = {
    "llama": LoRAPruneLlamaForCausalLM,
    "mistral": LoRAPruneMistralForCausalLM,
    "qwen2": LoRAPruneQwen2ForCausalLM,
    "qwen3": LoRAPruneQwen3ForCausalLM,
}
