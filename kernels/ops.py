"""Public ops: validation, backend dispatch and the lora_linear autograd Function."""
from __future__ import annotations

import torch

from . import torch_ops
from .backend import resolve_backend, use_backend
from .validation import (
    check_float,
    check_lora_factors,
    check_same_device,
    check_shape,
    index_vector,
)


def _triton_module(name: str):
    """Import a Triton launcher module lazily (triton is only needed on that path)."""
    import importlib

    return importlib.import_module(f"{__package__}.{name}")


# ---------------------------------------------------------------------------
# lora_linear
# ---------------------------------------------------------------------------

def _lora_linear_impl(backend: str):
    if backend == "triton":
        mod = _triton_module("triton_lora_linear")
        return mod.lora_linear_forward, mod.lora_linear_backward
    return torch_ops.lora_linear_forward_torch, torch_ops.lora_linear_backward_torch


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + bias + s * drop(x) A^T B^T restricted to ``keep`` channels.

    Saved for backward: x, the fp32 ``xa = drop(x) A^T`` (r wide) and the dropout
    seed (the mask is recomputed).  weight, bias are frozen: their gradients
    are never formed (None is returned even if they require grad).
    """

    @staticmethod
    def forward(ctx, x2d, weight, lora_A, lora_B, bias, keep, scaling, p, seed, backend):
        fwd, _ = _lora_linear_impl(backend)
        y2d, xa = fwd(x2d, weight, lora_A, lora_B, bias, keep, scaling, p, seed)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, xa, keep)
        ctx.scaling, ctx.p, ctx.seed, ctx.backend = scaling, p, seed, backend
        return y2d

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, lora_A, lora_B, xa, keep = ctx.saved_tensors
        _, bwd = _lora_linear_impl(ctx.backend)
        need_dx, _, need_dA, need_dB = ctx.needs_input_grad[:4]
        dx, dA, dB = bwd(grad_y, x2d, weight, lora_A, lora_B, xa, keep, ctx.scaling, ctx.p, ctx.seed,
                         need_dx=need_dx, need_dA=need_dA, need_dB=need_dB)
        return dx, None, dA, dB, None, None, None, None, None, None


def _draw_seed() -> int:
    """Seed of the dropout mask, drawn from torch's global RNG (manual_seed applies)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, keep=None, dropout=0.0):
    """Frozen linear layer plus LoRA branch: x W^T + bias + scaling * drop(x) A^T B^T.

    x (..., in); weight (out, in); lora_A (r, in); lora_B (out, r); bias (out,).
    ``keep``: 1-D indices of output channels to compute; the result keeps full
    width (..., out) with exact zeros elsewhere (bias too), and the skipped
    channels are never computed nor receive gradient.  ``dropout`` p > 0 drops
    the LoRA branch input (pass 0.0 in eval mode).  Returns x's dtype.
    """
    check_float("x", x)
    check_float("weight", weight)
    r = check_lora_factors(weight, lora_A, lora_B)
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x must have shape (..., in) = (..., {in_f}), got {tuple(x.shape)}")
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (out_f,), "(out,)")
    check_same_device(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)
    p = float(dropout)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    keep = index_vector("keep", keep, out_f, x.device, unique=True)
    backend = resolve_backend(x, weight)
    seed = _draw_seed() if p > 0 else 0
    x2d = x.reshape(-1, in_f)
    y2d = LoRALinearFunction.apply(x2d, weight, lora_A, lora_B, bias, keep, float(scaling), p, seed, backend)
    return y2d.reshape(*x.shape[:-1], out_f)


def lora_linear_torch(*args, **kwargs):
    """``lora_linear`` forced onto the torch twin."""
    with use_backend("torch"):
        return lora_linear(*args, **kwargs)


def lora_linear_triton(*args, **kwargs):
    """``lora_linear`` forced onto the Triton kernels."""
    with use_backend("triton"):
        return lora_linear(*args, **kwargs)


# ---------------------------------------------------------------------------
# group_importance
# ---------------------------------------------------------------------------

def group_importance(weight, lora_A, lora_B, grad_A, grad_B, scaling, square=False):
    """LoRA-guided importance: fp32 (row_sums (out,), col_sums (in,)).

    G = grad_B A + B grad_A - grad_B grad_A; S = |G * (W + scaling B A)|
    (or its square with ``square=True``).  Never forms G, B A or any out x in
    temporary; weight may be fp32/fp16/bf16, all maths in fp32.
    """
    check_float("weight", weight)
    r = check_lora_factors(weight, lora_A, lora_B)
    check_lora_factors(weight, grad_A, grad_B, prefix="grad_")
    if grad_A.shape[0] != r:
        raise ValueError(f"grad_A must have shape (r, in) = {tuple(lora_A.shape)}, got {tuple(grad_A.shape)}")
    check_same_device(weight=weight, lora_A=lora_A, lora_B=lora_B, grad_A=grad_A, grad_B=grad_B)
    with torch.no_grad():
        if resolve_backend(weight) == "triton":
            return _triton_module("triton_importance").group_importance(
                weight, lora_A, lora_B, grad_A, grad_B, float(scaling), bool(square))
        return torch_ops.group_importance_torch(weight, lora_A, lora_B, grad_A, grad_B, float(scaling), bool(square))


# ---------------------------------------------------------------------------
# merge_gather
# ---------------------------------------------------------------------------

def merge_gather(weight, lora_A, lora_B, scaling, rows=None, cols=None):
    """(weight + scaling * lora_B @ lora_A)[rows][:, cols], contiguous, weight's dtype.

    lora_A / lora_B may both be None (pure gather); rows / cols None = all.
    """
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be given or both be None")
    if lora_A is not None:
        check_lora_factors(weight, lora_A, lora_B)
    check_same_device(weight=weight, lora_A=lora_A, lora_B=lora_B)
    out_f, in_f = weight.shape
    rows = index_vector("rows", rows, out_f, weight.device)
    cols = index_vector("cols", cols, in_f, weight.device)
    with torch.no_grad():
        if resolve_backend(weight) == "triton":
            return _triton_module("triton_merge_gather").merge_gather(weight, lora_A, lora_B, float(scaling), rows, cols)
        return torch_ops.merge_gather_torch(weight, lora_A, lora_B, float(scaling), rows, cols)
