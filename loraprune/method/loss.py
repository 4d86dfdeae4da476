"""The training loss of a pruning run: the LM loss, mixed with self-distillation.

``loss = (1 - distill) · CE(student, labels) + distill · T² · KL(teacher ‖ student)``,
the teacher being the dense model computed from the same frozen weights
(:meth:`loraprune.run.engine.LoRAPruner.dense_teacher`).

**Chunked logits, gradient in forward.** At pruning batch sizes the logits,
not the decoder, hold most of the memory: one fp32 copy of ``B x T x vocab`` is
384 MiB for SmolLM2 (49k vocabulary) at 4 x 512 tokens, 1 GiB for LLaMA-3
(128k), and the LM loss, the teacher and the KL each keep several. So the loss
is computed from the final hidden states, ``loss_chunk`` positions at a time,
and the gradient with respect to those hidden states is formed in the same
pass (:class:`_HeadLoss`): a chunk's logits (student and teacher) exist only
while it is computed, and backward keeps one ``B x T x hidden`` tensor. The
value and the gradients are those of the whole-logits loss (tested). A model
whose head is not a plain, frozen linear layer, or ``loss_chunk=0``, uses the
model's own logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    if any(p.requires_grad for p in head.parameters()):
        return None  # a trained head needs its own gradient: the whole-logits path forms it
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        return None
    return get_decoder(), head


class _HeadLoss(torch.autograd.Function):
    """``ce_coef · ΣCE + kd_coef · ΣKL`` of the LM head on the final hidden states, with ``dloss/dh``
    formed in forward, ``chunk`` positions at a time (the fused linear-cross-entropy of Liger-Kernel).

    Per chunk the student logits ``z``, the teacher's log-probabilities and two more buffers of
    ``chunk x vocab`` live only while that chunk is computed: the softmaxes and ``dz`` are made in
    place, ``dh = dz · W`` is written into one ``B·T x hidden`` tensor, and that is all backward
    keeps. No logits are recomputed in backward. The head's weight and bias are frozen (their
    gradients are never formed); :func:`training_loss` takes the whole-logits path otherwise.
    """

    @staticmethod
    def forward(ctx, h, teacher_h, targets, kd_rows, weight, bias, chunk, temperature, ce_coef, kd_coef):
        need = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        t = temperature
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            tg = targets[rows]
            ok = tg != -100
            z = F.linear(h[rows], weight, bias).float()
            lse = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, tg.clamp_min(0).unsqueeze(1)).squeeze(1)
            total += ce_coef * ((lse - picked) * ok).sum()
            dz_kd = soft = None
            if teacher_h is not None:
                log_p = F.linear(teacher_h[rows], weight, bias).float().div_(t)
                log_p = log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))  # teacher log-probs
                if t == 1.0:  # the student's log-probs at t are the LM loss's: z - lse, made once, in z
                    log_q = z.sub_(lse.unsqueeze(1))
                else:
                    log_q = z / t
                    log_q = log_q.sub_(torch.logsumexp(log_q, dim=-1, keepdim=True))  # student log-probs at t
                p = log_p.exp()
                w = kd_rows[rows]
                total += kd_coef * (log_p.sub_(log_q).mul_(p).sum(-1) * w).sum()  # KL(p || q) per row
                del log_p
                if need:  # dKL/dz = (q - p) / t
                    q = log_q.exp_()
                    if t == 1.0:  # q is also the LM loss's softmax: (q - p) goes into p's buffer, q is kept
                        dz_kd, soft = p.neg_().add_(q).mul_((kd_coef / t) * w.unsqueeze(1)), q
                    else:
                        dz_kd = q.sub_(p).mul_((kd_coef / t) * w.unsqueeze(1))
                    del q
                del p, log_q
            if need:
                if soft is None:
                    soft = z.sub_(lse.unsqueeze(1)).exp_()
                dz = soft.mul_((ce_coef * ok).unsqueeze(1))  # softmax minus one-hot
                hit = ok.nonzero().squeeze(1)
                dz[hit, tg[hit]] -= ce_coef
                if dz_kd is not None:
                    dz.add_(dz_kd)
                grad_h[rows] = dz.to(weight.dtype) @ weight
                del dz
            del z, dz_kd, soft  # before the next chunk's logits are made, not after
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype),) + (None,) * 9


def training_loss(pruner, batch: dict, config) -> torch.Tensor:
    """The loss of one micro-batch (see the module doc); the teacher forward runs here too."""
    model = pruner.model
    if "labels" not in batch:
        from ..errors import DataError

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
    width = h.shape[-1]
    targets = batch["labels"][:, 1:].to(h.device).reshape(-1)
    kd_rows = valid.to(h.device).reshape(-1).float()
    ce_coef = (1.0 - config.distill) / float((targets != -100).sum().clamp_min(1))
    kd_coef = 0.0
    if teacher_h is not None:
        t = config.distill_temperature
        kd_coef = config.distill * t * t / float(kd_rows.sum().clamp_min(1))
        teacher_h = teacher_h.reshape(-1, width)
    return _HeadLoss.apply(h.reshape(-1, width), teacher_h, targets, kd_rows, head.weight, head.bias,
                           config.loss_chunk, config.distill_temperature, ce_coef, kd_coef)


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
