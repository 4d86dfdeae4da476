"""Cut masked groups out: LoRA merged, kept rows/columns gathered into new,
smaller, dense ``nn.Linear`` layers (kernel :func:`loraprune.kernels.merge_gather`).

With ``merge=False`` the base weights and the LoRA factors are gathered
separately instead (``B`` keeps the kept output rows, ``A`` the kept input
columns), so the result still holds :class:`LoRALinear` layers whose adapter
fits the pruned base: :mod:`loraprune.export.adapter` exports the two apart and
:func:`merge_lora` merges them later.

The compacted model computes exactly what the masked model computed: a
removed KV group's q/k/v rows were producing zeros and its o_proj columns
were reading zeros; a removed MLP channel's gate/up rows gave
``act(0)·0 = 0`` into its down column.

Compaction completes or puts the model back: each new projection is swapped in
as soon as it is built, and the one it replaces is parked in host memory (a
no-op on CPU) until the whole model is cut; a failure anywhere (an
out-of-memory error at layer k) swaps every original back onto its device, so
the model, its LoRA factors and masks are exactly as before and the caller can
restore or retry (:class:`_Journal`). Parking also keeps the originals out of
the accelerator's peak: at most one layer's new projections are there beside them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import kernels
from ..model.lora import LoRALinear
from ..structure.archs import ArchSpec, arch_for, decoder_layers, get_submodule, layer_projections
from ..structure.groups import LayerGroups, build_layer_groups
from ..structure.masks import Masks


def _factors(module: nn.Module):
    if isinstance(module, LoRALinear):
        return module.base, module.lora_A.detach(), module.lora_B.detach(), module.scaling
    return module, None, None, 0.0


@torch.no_grad()
def compact_linear(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding ``(W + s·B·A)[rows][:, cols]`` (and ``bias[rows]``)."""
    base, A, B, scaling = _factors(module)
    W = base.weight
    if rows is not None:
        rows = rows.to(W.device)
    if cols is not None:
        cols = cols.to(W.device)
    weight = kernels.merge_gather(W, A, B, scaling, rows=rows, cols=cols)
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=base.bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    if base.bias is not None:
        bias = base.bias if rows is None else base.bias.index_select(0, rows)
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new


@torch.no_grad()
def gather_lora(module: LoRALinear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> LoRALinear:
    """A new :class:`LoRALinear` on ``W[rows][:, cols]`` with ``B[rows]`` and ``A[:, cols]`` (not merged)."""
    base = compact_linear(module.base, rows, cols)
    A, B = module.lora_A.detach(), module.lora_B.detach()
    if cols is not None:
        A = A.index_select(1, cols.to(A.device))
    if rows is not None:
        B = B.index_select(0, rows.to(B.device))
    return LoRALinear(base, r=module.r, dropout=module.dropout, lora_A=A, lora_B=B, scaling=module.scaling)


class _Journal:
    """The swaps and attribute writes of one compaction, undone in reverse if it fails.

    A replaced module is moved to the host (``park``) and moved back on undo;
    parameters keep their identity through ``Module.to``, so an optimiser (or a
    pruner) holding the LoRA factors sees the same tensors afterwards.
    """

    def __init__(self):
        self._undo: list = []

    def swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        old = getattr(parent, name)
        setattr(parent, name, new)
        self._undo.append(("swap", parent, name, old, _park(old)))

    def set(self, obj, name: str, value) -> None:
        self._undo.append(("attr", obj, name, obj.__dict__.get(name, _MISSING), None))
        setattr(obj, name, value)

    def undo(self) -> None:
        for kind, obj, name, old, device in reversed(self._undo):
            if kind == "swap":
                if device is not None:
                    old.to(device)
                setattr(obj, name, old)
            elif old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, old)
        self._undo = []


_MISSING = object()


def _park(module: nn.Module) -> torch.device | None:
    """Move a replaced module's tensors to the host; returns the device to move them back to
    (None: already on the host, or sharded tensors that are left where they are)."""
    tensors = list(module.parameters()) + list(module.buffers())
    if not tensors or any(hasattr(t, "device_mesh") for t in tensors):
        return None
    device = tensors[0].device
    if device.type in ("cpu", "meta") or any(t.device != device for t in tensors):
        return None
    module.to("cpu")
    return device


def _merge_rest(model: nn.Module, journal: _Journal) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                journal.swap(module, child_name, compact_linear(child))


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by a plain ``nn.Linear`` with LoRA merged (all or none of them)."""
    journal = _Journal()
    try:
        _merge_rest(model, journal)
    except BaseException:
        journal.undo()
        raise
    return model


@torch.no_grad()
def compact(model: nn.Module, masks: Masks, spec: ArchSpec | None = None, merge: bool = True) -> nn.Module:
    """Physically remove the groups ``masks`` drops, merge LoRA, update the config.

    ``merge=False`` keeps every :class:`LoRALinear`, its base and factors
    gathered to the kept rows/columns (see the module doc).

    Works in place and returns ``model``. After it, ``model.config`` carries a
    ``loraprune`` block with the per-layer widths; when every layer keeps the
    same widths the stock fields (``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``, explicit ``head_dim``) are
    updated too, so the model is a stock model of a smaller config. The kept
    indices stay on the model as ``model.loraprune_masks`` (a :class:`Masks`),
    which :func:`loraprune.save_pruned` writes to ``loraprune_masks.json``.
    """
    spec = spec or arch_for(model)
    layers = build_layer_groups(model, spec)
    if len(masks.attn_keep) != len(layers):
        raise ValueError(f"masks describe {len(masks.attn_keep)} layers, the model has {len(layers)}")
    for lg, a_keep, m_keep in zip(layers, masks.attn_keep, masks.mlp_keep):
        if a_keep.numel() != lg.n_kv or m_keep.numel() != lg.n_channels:
            raise ValueError(
                f"layer {lg.layer}: masks have {a_keep.numel()} KV groups / {m_keep.numel()} channels, "
                f"the model has {lg.n_kv} / {lg.n_channels}"
            )
        if not a_keep.any() or not m_keep.any():
            raise ValueError(f"layer {lg.layer}: a mask removes every group; keep at least one head group and one channel")
    journal = _Journal()
    config = model.config
    saved_config = dict(vars(config))
    try:
        for layer_module, lg, a_keep, m_keep in zip(decoder_layers(model, spec), layers, masks.attn_keep,
                                                    masks.mlp_keep):
            _compact_layer(journal, layer_module, lg, spec, a_keep, m_keep, merge)
        if merge:
            _merge_rest(model, journal)  # any LoRA layer outside the decoder projections
        record_widths(config, masks, layers)
        journal.set(model, "loraprune_masks", masks.clone())
    except BaseException:
        journal.undo()
        vars(config).clear()
        vars(config).update(saved_config)
        raise
    return model  # the journal goes: the parked originals are freed unless the caller holds them


def _compact_layer(journal: _Journal, layer_module: nn.Module, lg: LayerGroups, spec: ArchSpec,
                   a_keep: torch.Tensor, m_keep: torch.Tensor, merge: bool) -> None:
    """Build one decoder layer's pruned projections and swap each in (the original is parked)."""
    proj = layer_projections(layer_module, spec)
    attn = get_submodule(layer_module, spec.attn)
    mlp = get_submodule(layer_module, spec.mlp)
    slices = lg.kept_slices(spec, a_keep, m_keep)
    for name, (rows, cols) in slices.items():
        parent, module = (attn if name in spec.attn_projections else mlp), proj[name]
        keep_lora = not merge and isinstance(module, LoRALinear)
        journal.swap(parent, name, gather_lora(module, rows, cols) if keep_lora else compact_linear(module, rows, cols))
    _update_module_attrs(attn, mlp, lg, int(a_keep.sum()), int(m_keep.sum()), journal)


def _update_module_attrs(attn: nn.Module, mlp: nn.Module, lg: LayerGroups, kv: int, channels: int,
                         journal: _Journal) -> None:
    """Keep width attributes that some transformers versions read in sync."""
    if hasattr(attn, "num_heads"):
        journal.set(attn, "num_heads", kv * lg.q_per_kv)
    if hasattr(attn, "num_key_value_heads"):
        journal.set(attn, "num_key_value_heads", kv)
    if hasattr(mlp, "intermediate_size"):
        journal.set(mlp, "intermediate_size", channels)


def layer_widths(masks: Masks, layers: list[LayerGroups]) -> list[dict]:
    return [
        {
            "num_attention_heads": kv * lg.q_per_kv,
            "num_key_value_heads": kv,
            "intermediate_size": ch,
        }
        for lg, kv, ch in zip(layers, masks.kept_kv(), masks.kept_channels())
    ]


def record_widths(config, masks: Masks, layers: list[LayerGroups]) -> None:
    """Write the per-layer widths into ``config.loraprune`` (and the stock fields if uniform)."""
    widths = layer_widths(masks, layers)
    block = dict(getattr(config, "loraprune", None) or {})
    block["layers"] = widths
    block["uniform"] = all(w == widths[0] for w in widths)
    block.setdefault("original", {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
    })
    config.head_dim = layers[0].head_dim
    if block["uniform"]:
        # Plain attribute writes skip the config's validators on purpose: LLaMA's
        # config rejects hidden_size % num_heads != 0 even with an explicit
        # head_dim; the export (loraprune.export.classes) deals with that case.
        config.num_attention_heads = widths[0]["num_attention_heads"]
        config.num_key_value_heads = widths[0]["num_key_value_heads"]
        config.intermediate_size = widths[0]["intermediate_size"]
    config.loraprune = block
