"""Coupled structures that are pruned together, read from the model itself.

Widths come from the actual module shapes (so an already pruned, per-layer
model is handled) and the head geometry from the config: ``head_dim`` and the
number of query heads per KV head. Nothing about head counts is hard-coded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .archs import ArchSpec, ModuleLayoutError, arch_for, decoder_layers, layer_projections


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ModuleLayoutError(f"expected a linear projection with a 2-D weight, found {type(module).__name__}")
    return weight.shape[0], weight.shape[1], getattr(module, "bias", None) is not None


def head_geometry(config) -> tuple[int, int]:
    """``(head_dim, query heads per KV head)`` from a config, validated."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if n_heads % n_kv:
        raise ModuleLayoutError(
            f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}"
        )
    return head_dim, n_heads // n_kv


@dataclass(frozen=True)
class LayerGroups:
    """Prunable groups of one decoder layer and what each costs in parameters."""

    layer: int
    hidden: int
    head_dim: int
    q_per_kv: int
    n_kv: int  # attention groups = KV heads
    n_channels: int  # MLP groups = intermediate channels
    attn_cost: int  # parameters removed with one attention group (bias included)
    mlp_cost: int  # parameters removed with one MLP channel (bias included)

    @property
    def params(self) -> int:
        """Projection parameters of this layer, biases of q/k/v/gate/up included.

        The o_proj/down_proj bias (if any) belongs to no group and is counted
        by :func:`layer_projection_params` instead.
        """
        return self.n_kv * self.attn_cost + self.n_channels * self.mlp_cost

    # ---- index maps: kept groups -> kept rows / columns -------------------
    def q_index(self, kv_keep: torch.Tensor) -> torch.Tensor:
        """Rows of q_proj (= columns of o_proj) of the kept KV groups."""
        width = self.q_per_kv * self.head_dim
        groups = torch.nonzero(kv_keep, as_tuple=False).flatten()
        return (groups[:, None] * width + torch.arange(width)).flatten()

    def kv_index(self, kv_keep: torch.Tensor) -> torch.Tensor:
        """Rows of k_proj and v_proj of the kept KV groups."""
        groups = torch.nonzero(kv_keep, as_tuple=False).flatten()
        return (groups[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()

    @staticmethod
    def channel_index(mlp_keep: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(mlp_keep, as_tuple=False).flatten()

    def kept_slices(self, spec: ArchSpec, kv_keep: torch.Tensor, mlp_keep: torch.Tensor) -> dict[str, tuple]:
        """Projection name -> ``(kept rows, kept columns)``, ``None`` where all are kept.

        The one statement of which projection a group owns rows or columns of:
        a KV group owns q rows and o columns (:meth:`q_index`) and k/v rows
        (:meth:`kv_index`); an MLP channel owns a gate row, an up row and a
        down column (:meth:`channel_index`). Masking, compaction and the
        one-shot bias compensation all read it from here.
        """
        q = kv = ch = None
        if not bool(kv_keep.all()):
            q, kv = self.q_index(kv_keep), self.kv_index(kv_keep)
        if not bool(mlp_keep.all()):
            ch = self.channel_index(mlp_keep)
        return {spec.q: (q, None), spec.k: (kv, None), spec.v: (kv, None), spec.o: (None, q),
                spec.gate: (ch, None), spec.up: (ch, None), spec.down: (None, ch)}

    # ---- per-module sums -> per-group sums ----------------------------------
    def attn_group_sums(self, q_rows, k_rows, v_rows, o_cols) -> torch.Tensor:
        """Sum q/k/v row scores and o_proj column scores into one score per KV group."""
        n = self.n_kv
        return (
            q_rows.view(n, -1).sum(1)
            + k_rows.view(n, -1).sum(1)
            + v_rows.view(n, -1).sum(1)
            + o_cols.view(n, -1).sum(1)
        )

    @staticmethod
    def mlp_group_sums(gate_rows, up_rows, down_cols) -> torch.Tensor:
        return gate_rows + up_rows + down_cols


def removed_params(groups: list[LayerGroups], masks) -> int:
    """Decoder-projection parameters that ``masks`` removes (the one count of it in loraprune)."""
    return sum(
        (lg.n_kv - kv) * lg.attn_cost + (lg.n_channels - ch) * lg.mlp_cost
        for lg, kv, ch in zip(groups, masks.kept_kv(), masks.kept_channels())
    )


def build_layer_groups(model: nn.Module, spec: ArchSpec | None = None) -> list[LayerGroups]:
    """One :class:`LayerGroups` per decoder layer, checked against the config."""
    spec = spec or arch_for(model)
    head_dim, q_per_kv = head_geometry(model.config)
    out = []
    for idx, layer in enumerate(decoder_layers(model, spec)):
        proj = layer_projections(layer, spec)
        q_out, hidden, q_bias = _linear_shape(proj[spec.q])
        k_out, _, k_bias = _linear_shape(proj[spec.k])
        v_out, _, v_bias = _linear_shape(proj[spec.v])
        _, o_in, _ = _linear_shape(proj[spec.o])
        g_out, _, g_bias = _linear_shape(proj[spec.gate])
        u_out, _, u_bias = _linear_shape(proj[spec.up])
        _, d_in, _ = _linear_shape(proj[spec.down])
        if k_out % head_dim or k_out != v_out:
            raise ModuleLayoutError(
                f"layer {idx}: k_proj/v_proj have {k_out}/{v_out} output rows; expected equal "
                f"multiples of head_dim={head_dim}"
            )
        n_kv = k_out // head_dim
        if q_out != n_kv * q_per_kv * head_dim or o_in != q_out:
            raise ModuleLayoutError(
                f"layer {idx}: q_proj has {q_out} rows and o_proj {o_in} columns; expected "
                f"{n_kv} KV heads x {q_per_kv} query heads x head_dim {head_dim} = {n_kv * q_per_kv * head_dim}"
            )
        if not (g_out == u_out == d_in):
            raise ModuleLayoutError(
                f"layer {idx}: gate/up/down widths {g_out}/{u_out}/{d_in} differ; expected one intermediate size"
            )
        q_rows = q_per_kv * head_dim
        attn_cost = (
            q_rows * hidden + 2 * head_dim * hidden  # q rows + k rows + v rows
            + q_rows * hidden  # o_proj columns
            + q_rows * q_bias + head_dim * (k_bias + v_bias)
        )
        mlp_cost = 3 * hidden + g_bias + u_bias
        out.append(LayerGroups(idx, hidden, head_dim, q_per_kv, n_kv, g_out, attn_cost, mlp_cost))
    return out


def layer_projection_params(model: nn.Module, spec: ArchSpec | None = None) -> list[int]:
    """Exact parameter count of each layer's seven projections (all biases included)."""
    spec = spec or arch_for(model)
    counts = []
    for layer in decoder_layers(model, spec):
        proj = layer_projections(layer, spec)
        total = 0
        for module in proj.values():
            out_f, in_f, has_bias = _linear_shape(module)
            total += out_f * in_f + (out_f if has_bias else 0)
        counts.append(total)
    return counts
