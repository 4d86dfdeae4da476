"""Progressive compaction: removed groups leave the computation at every mask update.

Masks only grow, and a removed group's rows produce zeros that the rest of the
layer reads as zeros, so the student network never needs them again. Instead
of carrying zeroed rows and columns to the end (the ``keep`` path of
:func:`loraprune.kernels.lora_linear`, and o_proj/down_proj multiplying zero
columns, and attention running removed heads), each layer's groups are
*reordered in place* so that the kept ones form a dense prefix, in their
original order, and every projection computes on that prefix alone: smaller
dense GEMMs, fewer attention heads, nothing gathered per step.

Why a permutation and not a copy: the full weights stay where they are (no
second copy, no allocation but one transient matrix per permutation), and the
self-distillation teacher (:meth:`LoRAPruner.dense_teacher`) still computes the
dense model from them: permuting whole KV groups (their q heads with them) and
whole MLP channels consistently across q/k/v/o and gate/up/down leaves the
dense function unchanged.

The physical order is a pure function of the masks: kept groups ascending,
then removed groups ascending (:func:`physical_order`). Checkpoints therefore
need nothing new (the masks give the order back), the final cut is the
masked compaction of the prefix, and :func:`unpermute_module` restores the
original layout when a run is abandoned. LoRA factors, their gradients and
the optimiser state (Adam moments) are permuted along with the weights.

The result equals masked training: the same kept outputs from the same
inputs, up to floating-point summation order. One exception: LoRA dropout on
o_proj/down_proj inputs draws its mask over the narrower input, so with
``lora_dropout > 0`` the random stream differs (same distribution).
"""
from __future__ import annotations

import torch

from ..model.lora import LoRALinear


def physical_order(keep: torch.Tensor) -> torch.Tensor:
    """Original group indices in physical order: kept ones ascending, then removed ones ascending."""
    idx = torch.arange(keep.numel())
    return torch.cat([idx[keep], idx[~keep]])


def expand(group_perm: torch.Tensor, width: int) -> torch.Tensor:
    """Row (or column) permutation of groups ``width`` rows wide, from a permutation of groups."""
    if width == 1:
        return group_perm
    return (group_perm[:, None] * width + torch.arange(width)).flatten()


def relative(current: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """The permutation of current physical positions that gives ``target`` order (None: already there)."""
    if torch.equal(current, target):
        return None
    position = torch.empty_like(current)
    position[current] = torch.arange(current.numel())
    return position[target]


def _optimizer_states(optimizer, param: torch.nn.Parameter) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]


@torch.no_grad()
def _permute_(tensor: torch.Tensor, dim: int, perm: torch.Tensor) -> None:
    tensor.copy_(tensor.index_select(dim, perm.to(tensor.device)))


@torch.no_grad()
def permute_module(module: LoRALinear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                   optimizer=None) -> None:
    """Reorder ``module``'s output rows and/or input columns in place (weights, bias, LoRA
    factors, their gradients, and ``optimizer``'s state of the factors), and record the
    order so :func:`unpermute_module` can undo it."""
    if rows is not None:
        tensors = [module.base.weight, module.lora_B, *_optimizer_states(optimizer, module.lora_B)]
        tensors += [t for t in (module.base.bias, module.lora_B.grad, module.base.weight.grad,
                                module.teacher_weight) if t is not None]
        for t in tensors:
            _permute_(t, 0, rows)
        order = module.out_order if module.out_order is not None else torch.arange(module.out_features)
        module.out_order = order[rows]
    if cols is not None:
        tensors = [module.base.weight, module.lora_A, *_optimizer_states(optimizer, module.lora_A)]
        tensors += [t for t in (module.lora_A.grad, module.base.weight.grad, module.teacher_weight) if t is not None]
        for t in tensors:
            _permute_(t, 1, cols)
        order = module.in_order if module.in_order is not None else torch.arange(module.in_features)
        module.in_order = order[cols]


@torch.no_grad()
def unpermute_module(module: LoRALinear, optimizer=None) -> None:
    """Put ``module`` back in its original row and column order, computing on its full width."""
    rows = None if module.out_order is None else torch.argsort(module.out_order)
    cols = None if module.in_order is None else torch.argsort(module.in_order)
    permute_module(module, rows, cols, optimizer)
    module.out_order = module.in_order = None
    module.live_out = module.live_in = None


def reorder_layer(mods: dict[str, LoRALinear], spec, lg, attn_now: torch.Tensor, attn_keep: torch.Tensor,
                  mlp_now: torch.Tensor, mlp_keep: torch.Tensor, optimizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring one layer from physical orders ``attn_now``/``mlp_now`` to the order of its masks
    and make every projection compute on the kept prefix; returns the new orders."""
    attn_new, mlp_new = physical_order(attn_keep), physical_order(mlp_keep)
    q_width = lg.q_per_kv * lg.head_dim
    group = relative(attn_now, attn_new)
    if group is not None:
        permute_module(mods[spec.q], rows=expand(group, q_width), optimizer=optimizer)
        permute_module(mods[spec.k], rows=expand(group, lg.head_dim), optimizer=optimizer)
        permute_module(mods[spec.v], rows=expand(group, lg.head_dim), optimizer=optimizer)
        permute_module(mods[spec.o], cols=expand(group, q_width), optimizer=optimizer)
    channel = relative(mlp_now, mlp_new)
    if channel is not None:
        permute_module(mods[spec.gate], rows=channel, optimizer=optimizer)
        permute_module(mods[spec.up], rows=channel, optimizer=optimizer)
        permute_module(mods[spec.down], cols=channel, optimizer=optimizer)
    kv, ch = int(attn_keep.sum()), int(mlp_keep.sum())
    for name in (spec.q, spec.k, spec.v, spec.gate, spec.up):  # row-owning projections compute kept rows
        width = {spec.q: q_width, spec.k: lg.head_dim, spec.v: lg.head_dim}.get(name, 1)
        mods[name].live_out = (kv if name in spec.attn_projections else ch) * width
    mods[spec.o].live_in = kv * q_width  # column-owning ones read only them
    mods[spec.down].live_in = ch
    return attn_new, mlp_new


def to_original(scores: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Scores of the first ``len(scores)`` physical groups, placed at their original indices
    (groups no longer computed score 0: masks only grow, so they are never ranked again)."""
    if scores.numel() == order.numel() and torch.equal(order, torch.arange(order.numel())):
        return scores
    out = torch.zeros(order.numel(), dtype=scores.dtype, device=scores.device)
    out[order[: scores.numel()].to(scores.device)] = scores
    return out
