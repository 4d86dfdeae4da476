"""Public ops: validation, backend dispatch and the lora_linear autograd Function."""
from __future__ import annotations

import contextlib

import torch

from . import torch_ops
from .backend import resolve_backend, use_backend
from .validation import check_float, check_lora_factors, check_same_device, check_shape, index_vector


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


# ---- autocast -----------------------------------------------------------------
# Under autocast, lora_linear computes what F.linear would: x, weight and bias in
# the autocast dtype (bf16 from fp32 weights under Trainer(bf16=True)), output in
# that dtype. The LoRA factors stay fp32 (the kernels take fp32 factors and keep
# xa = drop(x) A^T in fp32). The casting is done once, in :func:`lora_linear`, and
# the Function itself then runs with autocast off, so that the torch twin's own
# matmuls are not downcast a second time (xa must stay fp32).
#
# Backward must run the same way whatever autocast state it is called under.
# ``torch.amp.custom_fwd``/``custom_bwd`` do that, but bind one device type:
# they are applied for CUDA (forward records "autocast off", backward re-enters
# it). Every other device (CPU) gets the same semantics by hand: the backward
# turns that device's autocast off itself (on CPU, backward runs in the calling
# thread, so ``loss.backward()`` inside ``torch.autocast("cpu")`` would otherwise
# downcast the fp32 LoRA-gradient matmuls).

def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The active autocast dtype for ``device_type``, or None when autocast is off there."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def _autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False)


def _fp32_maths(t: torch.Tensor):
    """Autocast off on ``t``'s device: ops documented as fp32 maths stay fp32 inside an autocast region."""
    return _autocast_off(t.device.type) if _autocast_dtype(t.device.type) is not None else contextlib.nullcontext()


if hasattr(torch.amp, "custom_fwd"):  # torch >= 2.4
    _cuda_custom_fwd = torch.amp.custom_fwd(device_type="cuda")
    _cuda_custom_bwd = torch.amp.custom_bwd(device_type="cuda")
else:  # pragma: no cover - torch 2.3
    _cuda_custom_fwd, _cuda_custom_bwd = torch.cuda.amp.custom_fwd, torch.cuda.amp.custom_bwd


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + bias + s * drop(x) A^T B^T restricted to ``keep`` channels.

    Saved for backward: x, the fp32 ``xa = drop(x) A^T`` (r wide) and the dropout
    seed.  The Triton kernels recompute the mask from the seed in registers; the
    torch twin (CPU) saves it instead, as a bool tensor of x's shape (one byte per
    element, only when dropout > 0): drawing it costs as much as a small GEMM on a
    CPU, and under gradient checkpointing a recomputing backward made it three
    draws per step (forward, recomputed forward, backward) where PEFT makes two.
    weight, bias are frozen: their gradients are never formed (None is returned
    even if they require grad).  Autocast: see the comment above;
    :func:`lora_linear` casts, this runs with autocast off.
    """

    @staticmethod
    @_cuda_custom_fwd
    def forward(ctx, x2d, weight, lora_A, lora_B, bias, keep, scaling, p, seed, backend):
        fwd, _ = _lora_linear_impl(backend)
        mask = None
        if backend != "triton" and p > 0:  # the twin's mask, drawn once and saved (see the class doc)
            mask = torch_ops.dropout_keep_mask_torch(x2d.shape, p, seed, x2d.device)
            y2d, xa = fwd(x2d, weight, lora_A, lora_B, bias, keep, scaling, p, seed, mask)
        else:
            y2d, xa = fwd(x2d, weight, lora_A, lora_B, bias, keep, scaling, p, seed)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, xa, keep, mask)
        ctx.scaling, ctx.p, ctx.seed, ctx.backend = scaling, p, seed, backend
        ctx.device_type = x2d.device.type
        return y2d

    @staticmethod
    @_cuda_custom_bwd
    def backward(ctx, grad_y):
        x2d, weight, lora_A, lora_B, xa, keep, mask = ctx.saved_tensors
        _, bwd = _lora_linear_impl(ctx.backend)
        need_dx, _, need_dA, need_dB = ctx.needs_input_grad[:4]
        guard = _autocast_off(ctx.device_type) if ctx.device_type != "cuda" else contextlib.nullcontext()
        extra = {} if mask is None else {"mask": mask}
        with guard:  # CUDA: custom_bwd restores the forward's (off) state
            dx, dA, dB = bwd(grad_y, x2d, weight, lora_A, lora_B, xa, keep, ctx.scaling, ctx.p, ctx.seed,
                             need_dx=need_dx, need_dA=need_dA, need_dB=need_dB, **extra)
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
    the LoRA branch input (pass 0.0 in eval mode).  Returns x's dtype, or under
    autocast the autocast dtype (x, weight and bias are cast to it, as
    ``F.linear`` would; the LoRA factors stay fp32).
    """
    check_float("x", x)
    check_float("weight", weight)
    check_lora_factors(weight, lora_A, lora_B)
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
    device_type = x.device.type
    amp = _autocast_dtype(device_type)
    if amp is not None:  # what autocast does to F.linear's inputs (differentiable casts: dx comes back in x's dtype)
        x, weight = x.to(amp), weight.to(amp)
        bias = None if bias is None else bias.to(amp)
    x2d = x.reshape(-1, in_f)
    with _autocast_off(device_type) if amp is not None else contextlib.nullcontext():
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
    with torch.no_grad(), _fp32_maths(weight):
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
    with torch.no_grad(), _fp32_maths(weight):
        if resolve_backend(weight) == "triton":
            return _triton_module("triton_merge_gather").merge_gather(weight, lora_A, lora_B, float(scaling), rows, cols)
        return torch_ops.merge_gather_torch(weight, lora_A, lora_B, float(scaling), rows, cols)
