"""Where each supported architecture keeps its prunable projections.

One table, one row per Hugging Face ``model_type``. Everything else in
loraprune (grouping, scoring, compaction, export) reads module locations from
here instead of spreading ``if model_type == ...`` through the code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import ModuleLayoutError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Module layout of one decoder-only architecture.

    Attention group = one KV head with every query head that shares it: its
    q/k/v output rows and the o_proj input columns of those query heads.
    MLP group = one intermediate channel: a gate row, an up row, a down column.
    """

    model_type: str
    layers: str = "model.layers"  # dotted path to the nn.ModuleList of decoder layers
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    notes: str = ""

    @property
    def attn_projections(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o)

    @property
    def mlp_projections(self) -> tuple[str, ...]:
        return (self.gate, self.up, self.down)


ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", notes="LLaMA-1/2/3.x, MHA and GQA"),
        ArchSpec("mistral", notes="GQA, sliding window"),
        ArchSpec("qwen2", notes="q/k/v carry a bias"),
        ArchSpec("qwen3", notes="q_norm/k_norm act per head_dim, untouched by head pruning"),
    )
}


def supported_model_types() -> list[str]:
    return sorted(ARCHS)


def arch_for(model_or_config) -> ArchSpec:
    """The :class:`ArchSpec` for a model, a config, or a ``model_type`` string."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UnsupportedArchitectureError(
            f"loraprune has no group definition for model_type={model_type!r}. "
            f"Supported: {', '.join(supported_model_types())}. "
            "To add one, add a row to loraprune.structure.archs.ARCHS naming its decoder-layer, "
            "attention and MLP projection modules."
        )
    return ARCHS[model_type]


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        if not hasattr(module, part):
            raise ModuleLayoutError(
                f"expected a submodule {dotted!r} on {type(root).__name__}, but "
                f"{type(module).__name__} has no attribute {part!r} "
                f"(found children: {[n for n, _ in module.named_children()]})"
            )
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers`` for LLaMA-likes)."""
    layers = get_submodule(model, spec.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModuleLayoutError(
            f"expected {spec.layers!r} to be a non-empty nn.ModuleList of decoder layers, "
            f"found {type(layers).__name__}"
        )
    return layers


def layer_projections(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Map ``"q_proj" ... "down_proj"`` to the linear modules of one decoder layer."""
    attn = get_submodule(layer, spec.attn)
    mlp = get_submodule(layer, spec.mlp)
    out = {name: get_submodule(attn, name) for name in spec.attn_projections}
    out.update({name: get_submodule(mlp, name) for name in spec.mlp_projections})
    return out
