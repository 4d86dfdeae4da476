"""The training loss of a pruning run: the LM loss, mixed with self-distillation.

``loss = (1 - distill) · CE(student, labels) + distill · T² · KL(teacher ‖ student)``,
the teacher being the dense model computed from the same frozen weights
(:meth:`loraprune.engine.LoRAPruner.dense_teacher`).

**Chunked logits.** At pruning batch sizes the logits, not the decoder, hold
most of the memory: one fp32 copy of ``B x T x vocab`` is 384 MiB for SmolLM2
(49k vocabulary) at 4 x 512 tokens, 1 GiB for LLaMA-3 (128k), and the LM loss,
the teacher and the KL each keep several. So the loss is computed from the
final hidden states, ``loss_chunk`` positions at a time, each chunk under
activation checkpointing: its logits (student and teacher) exist only while
that chunk is computed, in the forward pass and again in the backward pass.
The value and the gradients are those of the whole-logits loss (tested); the
cost is one more LM-head GEMM per chunk in backward. ``loss_chunk=0``, or a
model whose head is not a plain linear layer, uses the model's own logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def trained_tokens(batch: dict) -> torch.Tensor:
    """Which positions' next-token predictions count in the loss (B x T-1, bool)."""
    labels = batch.get("labels", batch["input_ids"])
    valid = labels[:, 1:] != -100
    mask = batch.get("attention_mask")
    if mask is not None:
        valid = valid & mask[:, 1:].bool()
    return valid


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over trained positions of ``KL(teacher || student)`` at ``temperature``, times T²."""
    t = temperature
    s = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1)[valid]
    p = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)[valid]
    kl = F.kl_div(s, p, log_target=True, reduction="none").sum(-1)
    return kl.mean() * (t * t)


def _head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(decoder, lm_head)`` when the logits are exactly ``lm_head(decoder(...))``; else None."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if get_decoder is None or not isinstance(head, nn.Linear) or type(head) is not nn.Linear:
        return None
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        return None
    return get_decoder(), head


def _chunk_terms(h, h_teacher, targets, kd_rows, weight, bias, temperature: float):
    """Summed CE over ``targets`` (-100 ignored) and summed KL over ``kd_rows`` for one chunk."""
    logits = F.linear(h, weight, bias).float()
    ce = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    if h_teacher is None:
        return ce, torch.zeros((), device=ce.device)
    with torch.no_grad():
        teacher = F.log_softmax(F.linear(h_teacher, weight, bias).float() / temperature, dim=-1)
    student = F.log_softmax(logits / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return ce, (kl * kd_rows).sum()


def training_loss(pruner, batch: dict, config) -> torch.Tensor:
    """The loss of one micro-batch (see the module doc); the teacher forward runs here too."""
    model = pruner.model
    if "labels" not in batch:
        from .data import DataError

        raise DataError("a batch has no 'labels' (text data gets them; give batches with labels)")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    valid = trained_tokens(batch)
    parts = _head(model) if config.loss_chunk else None
    if parts is None:
        return _whole_logits_loss(pruner, batch, inputs, valid, config)
    decoder, head = parts
    teacher_h = None
    if config.distill > 0:
        with torch.no_grad(), pruner.dense_teacher():
            teacher_h = decoder(**inputs).last_hidden_state[:, :-1]
    h = decoder(**inputs).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:].to(h.device)
    width = h.shape[-1]
    h = h.reshape(-1, width)
    targets = labels.reshape(-1)
    kd_rows = valid.to(h.device).reshape(-1).float()
    teacher_h = None if teacher_h is None else teacher_h.reshape(-1, width)
    ce = kd = 0.0
    n = config.loss_chunk
    for start in range(0, h.shape[0], n):
        rows = slice(start, start + n)
        c, k = checkpoint(_chunk_terms, h[rows], None if teacher_h is None else teacher_h[rows], targets[rows],
                          kd_rows[rows], head.weight, head.bias, config.distill_temperature, use_reentrant=False)
        ce, kd = ce + c, kd + k
    ce = ce / (targets != -100).sum().clamp_min(1)
    if teacher_h is None:
        return ce
    t = config.distill_temperature
    kd = kd / kd_rows.sum().clamp_min(1) * (t * t)
    return (1.0 - config.distill) * ce + config.distill * kd


def _whole_logits_loss(pruner, batch: dict, inputs: dict, valid: torch.Tensor, config) -> torch.Tensor:
    """The same loss from the model's own forward (its logits whole, its own LM loss)."""
    model = pruner.model
    teacher = None
    if config.distill > 0:
        with torch.no_grad(), pruner.dense_teacher():
            teacher = model(**inputs).logits
    out = model(**batch)
    if teacher is None:
        return out.loss
    kd = distillation_loss(out.logits, teacher, valid.to(out.logits.device), config.distill_temperature)
    return (1.0 - config.distill) * out.loss + config.distill * kd
