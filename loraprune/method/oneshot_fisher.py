"""The ``fisher`` group score without training: a few backward passes of the dense model.

The same mask-gradient score as the default criterion of :func:`loraprune.prune`
(:class:`loraprune.criterion.MaskGradientImportance`, ``Σ_sequences (Σ_tokens
h_g·∂L/∂h_g)²`` per KV group and per MLP channel), summed over the calibration
batches of the frozen dense model. No weight gradient is formed: every
parameter is frozen for the passes and only the embedding output requires a
gradient, so the backward carries activation gradients alone.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from ..errors import DataError
from ..structure.archs import decoder_layers, layer_projections
from .criterion import MaskGradientImportance


def fisher_group_scores(model: nn.Module, batches, layers, spec) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer ``(attention group scores, MLP channel scores)`` (float32, CPU), summed over ``batches``."""
    device = next(model.parameters()).device
    modules = [layer_projections(layer, spec) for layer in decoder_layers(model, spec)]
    view = SimpleNamespace(spec=spec, layers=layers, modules=modules)
    probe = MaskGradientImportance("fisher")
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    grad_in = embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    probe.attach(view)
    was_training = model.training
    model.eval()
    attn = mlp = None
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            kwargs = {"input_ids": ids, "use_cache": False, "labels": torch.as_tensor(batch.get("labels", ids)).to(device)}
            if "attention_mask" in batch:
                kwargs["attention_mask"] = torch.as_tensor(batch["attention_mask"]).to(device)
            with torch.enable_grad():
                model(**kwargs).loss.backward()
            got = probe.scores(view)
            if got is None:
                continue
            a, m = ([t.detach().float().cpu() for t in part] for part in got)
            attn = a if attn is None else [x + y for x, y in zip(attn, a)]
            mlp = m if mlp is None else [x + y for x, y in zip(mlp, m)]
    finally:
        probe.detach(view)
        grad_in.remove()
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.train(was_training)
    if attn is None:
        raise DataError("the fisher score got no calibration batches: pass data and calib_batches >= 1")
    return attn, mlp
