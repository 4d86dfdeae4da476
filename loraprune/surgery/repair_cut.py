"""The cut with repair, one decoder layer at a time (the one-shot mode's last step).

Given the masks, each layer's consumers (``o_proj``, ``down_proj``) get their
kept columns re-fitted by :func:`loraprune.repair.repair_columns` to what the
whole layer computed, from the second moments of their inputs over the
calibration windows. Only one layer's statistics exist at a time: the inputs
of the first decoder layer are captured once (embeddings, rotary tables and
mask kwargs as the model built them), and each layer is then run on the
previous layer's outputs.

``sequential=True`` (the default, as SparseGPT / FLAP-style sequential
pruning): layer ``l`` is calibrated on the outputs of the already cut and
repaired layers ``< l``, so each repair also absorbs the drift of the layers
before it (two runs of each layer). ``False``: every layer is calibrated on the
dense model's activations (one run per layer).

The layer is cut *in place* on the full-width weights: the repaired kept
columns are written back and the cut columns zeroed, which computes exactly
what the compacted layer computes; :func:`loraprune.compaction.compact` then
gathers the kept columns.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import DataError
from ..structure.archs import decoder_layers, layer_projections
from .repair import DAMP, SecondMoments, repair_columns


class _Captured(Exception):
    """Raised by the capture hook once the first layer's inputs are stored: nothing else needs to run."""


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches, spec) -> list[tuple[torch.Tensor, tuple, dict]]:
    """``(hidden states, other positional args, kwargs)`` of the first decoder layer, one per batch."""
    device = next(model.parameters()).device
    first = decoder_layers(model, spec)[0]
    store = []

    def hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store.append((hidden.detach(), tuple(args[1:]), kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            kwargs = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
            if "attention_mask" in batch:
                kwargs["attention_mask"] = torch.as_tensor(batch["attention_mask"]).to(device)
            try:
                model(**kwargs)
            except _Captured:
                pass
    finally:
        handle.remove()
    if not store:
        raise DataError("the repair got no calibration batches: pass data and calib_batches >= 1")
    return store


def _run(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _repair_module(module: nn.Module, keep: torch.Tensor, stats: SecondMoments, damp: float, bias: bool) -> None:
    """Write the repaired kept columns into ``module``, zero the cut ones, add the bias term."""
    W = module.weight
    new_k, b = repair_columns(W, keep, stats, damp=damp, bias=bias)
    keep = keep.to(W.device)
    cut = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    cut[keep] = False
    W[:, keep] = new_k
    W[:, cut] = 0
    if b is not None:
        if module.bias is not None:
            b = b + module.bias.detach()
        module.bias = nn.Parameter(b, requires_grad=False)


@torch.no_grad()
def cut_with_repair(model: nn.Module, masks, layers, batches, spec, *, damp: float = DAMP, bias: bool = False,
                    sequential: bool = True) -> int:
    """Cut ``masks``' groups out of every layer's consumers with the least-squares repair, in place
    (full widths kept: call :func:`loraprune.compaction.compact` after). ``bias``: fit an affine
    stand-in (each ``o_proj``/``down_proj`` gets a bias). Returns the number of calibration tokens."""
    was_training = model.training
    model.eval()
    try:
        inputs = capture_layer_inputs(model, batches, spec)
        tokens = sum(h.shape[:-1].numel() for h, _, _ in inputs)
        for layer, lg, a_keep, m_keep in zip(decoder_layers(model, spec), layers, masks.attn_keep, masks.mlp_keep):
            proj = layer_projections(layer, spec)
            slices = lg.kept_slices(spec, a_keep, m_keep)
            todo = [(proj[name], slices[name][1]) for name in (spec.o, spec.down) if slices[name][1] is not None]
            stats = [SecondMoments(module.weight.shape[1]) for module, _ in todo]
            handles = [module.register_forward_pre_hook(lambda _m, args, st=st: st.update(args[0]))
                       for (module, _), st in zip(todo, stats)]
            try:
                outputs = [_run(layer, h, a, kw) for h, a, kw in inputs]
            finally:
                for handle in handles:
                    handle.remove()
            for (module, keep), st in zip(todo, stats):
                _repair_module(module, keep, st, damp, bias)
            del stats
            if sequential and todo:
                outputs = [_run(layer, h, a, kw) for h, a, kw in inputs]
            inputs = [(out, a, kw) for out, (_, a, kw) in zip(outputs, inputs)]
        return tokens
    finally:
        model.train(was_training)
