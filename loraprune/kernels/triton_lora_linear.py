"""Triton kernels of ``lora_linear``: y = x W^T + bias + s * drop(x) A^T B^T.

Forward (2 launches):
  * ``lora_down_kernel``      xa = drop(x) @ A^T           (M x r, fp32, saved)
  * ``lora_linear_fwd_kernel`` y[:, keep] = x @ W[keep]^T + s * xa @ B[keep]^T + bias[keep]

Backward (4 launches, weight and bias are frozen: no dW, no dbias):
  * ``lora_grad_xa_kernel``   dxa = s * g[:, keep] @ B[keep]          (M x r)
  * ``lora_grad_b_kernel``    dB[keep] = s * g[:, keep]^T @ xa        (out x r)
  * ``lora_grad_a_kernel``    dA = dxa^T @ drop(x)                    (r x in)
  * ``lora_grad_x_kernel``    dx = g[:, keep] @ W[keep] + drop'(dxa @ A)

``keep`` (indices of output channels) is applied *inside* the kernels: tiles
walk over "slots" 0..len(keep) and gather the rows of W / B / bias and the
columns of y by index, so skipped channels cost nothing.  In backward the
kept columns of the output gradient are gathered once (``gather_columns_kernel``)
into a compact buffer whose rows start 16-element aligned, so the three
backward kernels read g with the dense path's vectorised, pipelined loads
instead of one element at a time.  The dropout mask is a Philox function of
(seed, row, column), recomputed wherever needed.

LoRA-side dots whose results are fp32 (xa, dxa, dA, dB) follow torch's TF32
switch (``LORA_PRECISION``: "tf32" when allowed, else the fp32-accurate
"tf32x3").  The rank-r term folded into a y / dx tile (``UP_PRECISION``)
does too for fp32 weights; for fp16/bf16 weights it is TF32, whose operand
rounding (2^-11) is below the rounding of the 16-bit y / dx it lands in.

The LoRA rank is padded to BLOCK_R >= 16 with masked loads, because GPUs need
K >= 16 in ``tl.dot``.  ``NATIVE_DOT`` (GPU only) feeds fp16/bf16 tiles straight to
the tensor cores; under the interpreter every operand is cast to fp32 first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    INTERPRETING,
    dropout_keep_mask,
    lora_dot_precision,
    main_dot_precision,
    on_tensor_device,
    rank_block,
    rank_chunk,
    split_launch_options,
    tile_config,
    up_dot_precision,
)


@triton.jit
def _grouped_tile(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to a (row tile, column tile) in L2-friendly groups."""
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _channels(keep_ptr, slots, slot_ok, HAS_KEEP: tl.constexpr):
    """Output channels behind ``slots``: keep[slots], or the slots themselves (int32)."""
    if HAS_KEEP:
        chans = tl.load(keep_ptr + slots, mask=slot_ok, other=0).to(tl.int32)
    else:
        chans = slots
    return chans


# Addressing: activations (x, g, y, dx, xa, dxa) may exceed 2**31 elements, so each
# program moves a scalar int64 base pointer to its first row and uses int32
# offsets inside the tile; weights (< 2**31 elements, checked by the launchers)
# use int32 offsets throughout.  This keeps gathered tiles cheap in registers.

@triton.jit
def lora_down_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam,
    seed, p, inv_keep_prob,
    HAS_DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    x_ptr += row0.to(tl.int64) * stride_xm
    xa_ptr += row0.to(tl.int64) * stride_xam
    lr = tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = row0 + lr < M
    rank_ok = ranks < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + lr[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep_mask(seed, row0 + lr, k0, p, BLOCK_K), x * inv_keep_prob, 0.0)
        a_t = tl.load(a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=col_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x, a_t, acc, input_precision=LORA_PRECISION)
    tl.store(xa_ptr + lr[:, None] * stride_xam + ranks[None, :], acc,
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def lora_linear_fwd_kernel(
    x_ptr, w_ptr, lora_b_ptr, xa_ptr, bias_ptr, keep_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br,
    stride_xam, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
    NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, UP_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RANK_CHUNK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """N is the number of kept channels (slots); y is full width, pre-zeroed."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m * BLOCK_M
    x_ptr += row0.to(tl.int64) * stride_xm
    xa_ptr += row0.to(tl.int64) * stride_xam
    y_ptr += row0.to(tl.int64) * stride_ym
    lr = tl.arange(0, BLOCK_M)
    slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = row0 + lr < M
    slot_ok = slots < N
    chans = _channels(keep_ptr, slots, slot_ok, HAS_KEEP)

    # the accumulator starts as the low-rank term s * xa B[keep]^T, walked in rank
    # chunks of RANK_CHUNK (>= 16): its operands are dead before the main loop
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, R, RANK_CHUNK):
        ranks = c0 + tl.arange(0, RANK_CHUNK)
        rank_ok = ranks < R
        xa = tl.load(xa_ptr + lr[:, None] * stride_xam + ranks[None, :],
                     mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        b_t = tl.load(lora_b_ptr + chans[None, :] * stride_bn + ranks[:, None] * stride_br,
                      mask=rank_ok[:, None] & slot_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(xa * scaling, b_t, acc, input_precision=UP_PRECISION)

    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + lr[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + chans[None, :] * stride_wn + cols[:, None] * stride_wk,
                      mask=col_ok[:, None] & slot_ok[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(x, w_t.to(x.dtype), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x.to(tl.float32), w_t.to(tl.float32), acc)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + chans, mask=slot_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(y_ptr + lr[:, None] * stride_ym + chans[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit
def gather_columns_kernel(
    src_ptr, idx_ptr, dst_ptr,
    M, N,
    stride_sm, stride_sn, stride_dm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dst[:, j] = src[:, idx[j]]: the kept columns of g, packed once per backward."""
    row0 = tl.program_id(0) * BLOCK_M
    src_ptr += row0.to(tl.int64) * stride_sm
    dst_ptr += row0.to(tl.int64) * stride_dm
    lr = tl.arange(0, BLOCK_M)
    slots = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = slots < N
    chans = tl.load(idx_ptr + slots, mask=slot_ok, other=0).to(tl.int32)
    m = (row0 + lr < M)[:, None] & slot_ok[None, :]
    vals = tl.load(src_ptr + lr[:, None] * stride_sm + chans[None, :] * stride_sn, mask=m)
    tl.store(dst_ptr + lr[:, None] * stride_dm + slots[None, :], vals, mask=m)


# The three kernels below read the output gradient ``g`` by *slot*: it is either
# the dense gradient (no keep: slot == channel) or the compact gather of its kept
# columns.  Only the rows of W / B / dB are addressed through ``keep``.

@triton.jit
def lora_grad_xa_kernel(
    g_ptr, lora_b_ptr, keep_ptr, dxa_ptr,
    M, N, R,
    stride_gm, stride_bn, stride_br, stride_dxam,
    scaling,
    HAS_KEEP: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    g_ptr += row0.to(tl.int64) * stride_gm
    dxa_ptr += row0.to(tl.int64) * stride_dxam
    lr = tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = row0 + lr < M
    rank_ok = ranks < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        slot_ok = slots < N
        chans = _channels(keep_ptr, slots, slot_ok, HAS_KEEP)
        g = tl.load(g_ptr + lr[:, None] * stride_gm + slots[None, :],
                    mask=row_ok[:, None] & slot_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(lora_b_ptr + chans[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=slot_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(g, b, acc, input_precision=LORA_PRECISION)
    tl.store(dxa_ptr + lr[:, None] * stride_dxam + ranks[None, :], acc * scaling,
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def lora_grad_b_kernel(
    g_ptr, xa_ptr, keep_ptr, db_ptr,
    M, N, R,
    stride_gm, stride_xam, stride_dbn, stride_dbr,
    scaling,
    HAS_KEEP: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dB rows of kept channels; dB is pre-zeroed so skipped rows stay zero."""
    slots = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = slots < N
    chans = _channels(keep_ptr, slots, slot_ok, HAS_KEEP)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    lr = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        row_ok = m0 + lr < M
        g_t = tl.load(g_ptr + lr[None, :] * stride_gm + slots[:, None],
                      mask=slot_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
        xa = tl.load(xa_ptr + lr[:, None] * stride_xam + ranks[None, :],
                     mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = tl.dot(g_t, xa, acc, input_precision=LORA_PRECISION)
        g_ptr += BLOCK_M * stride_gm.to(tl.int64)
        xa_ptr += BLOCK_M * stride_xam.to(tl.int64)
    tl.store(db_ptr + chans[:, None] * stride_dbn + ranks[None, :] * stride_dbr,
             (acc * scaling).to(db_ptr.dtype.element_ty), mask=slot_ok[:, None] & rank_ok[None, :])


@triton.jit
def lora_grad_a_kernel(
    x_ptr, dxa_ptr, da_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_dxam, stride_dar, stride_dak,
    seed, p, inv_keep_prob,
    HAS_DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    lr = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        row_ok = m0 + lr < M
        dxa_t = tl.load(dxa_ptr + lr[None, :] * stride_dxam + ranks[:, None],
                        mask=rank_ok[:, None] & row_ok[None, :], other=0.0)
        x = tl.load(x_ptr + lr[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep_mask(seed, m0 + lr, tl.program_id(0) * BLOCK_K, p, BLOCK_K), x * inv_keep_prob, 0.0)
        acc = tl.dot(dxa_t, x, acc, input_precision=LORA_PRECISION)
        x_ptr += BLOCK_M * stride_xm.to(tl.int64)
        dxa_ptr += BLOCK_M * stride_dxam.to(tl.int64)
    tl.store(da_ptr + ranks[:, None] * stride_dar + cols[None, :] * stride_dak,
             acc.to(da_ptr.dtype.element_ty), mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def lora_grad_x_kernel(
    g_ptr, w_ptr, a_ptr, dxa_ptr, keep_ptr, dx_ptr,
    M, N, K, R,
    stride_gm, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_dxam, stride_dxm, stride_dxk,
    seed, p, inv_keep_prob,
    HAS_KEEP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, UP_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    RANK_CHUNK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx tile; the accumulator *starts* as the low-rank term drop'(dxa A), so the
    dropout epilogue never holds a second fp32 tile next to the GEMM accumulator."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    row0 = pid_m * BLOCK_M
    g_ptr += row0.to(tl.int64) * stride_gm
    dxa_ptr += row0.to(tl.int64) * stride_dxam
    dx_ptr += row0.to(tl.int64) * stride_dxm
    lr = tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = row0 + lr < M
    col_ok = cols < K

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, R, RANK_CHUNK):
        ranks = c0 + tl.arange(0, RANK_CHUNK)
        rank_ok = ranks < R
        dxa = tl.load(dxa_ptr + lr[:, None] * stride_dxam + ranks[None, :],
                      mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(dxa, a, acc, input_precision=UP_PRECISION)
    if HAS_DROPOUT:
        acc = tl.where(dropout_keep_mask(seed, row0 + lr, pid_k * BLOCK_K, p, BLOCK_K), acc * inv_keep_prob, 0.0)

    for n0 in range(0, N, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        slot_ok = slots < N
        chans = _channels(keep_ptr, slots, slot_ok, HAS_KEEP)
        g = tl.load(g_ptr + lr[:, None] * stride_gm + slots[None, :],
                    mask=row_ok[:, None] & slot_ok[None, :], other=0.0)
        w = tl.load(w_ptr + chans[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=slot_ok[:, None] & col_ok[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(g, w.to(g.dtype), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(g.to(tl.float32), w.to(tl.float32), acc)
    tl.store(dx_ptr + lr[:, None] * stride_dxm + cols[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------

def _native_dot() -> bool:
    """Feed storage-dtype tiles to tl.dot (tensor cores) on GPU; fp32 under the interpreter."""
    return not INTERPRETING


def _check_weight_addressable(weight: torch.Tensor) -> None:
    """Weights are addressed with int32 offsets inside the kernels."""
    span = sum((n - 1) * st for n, st in zip(weight.shape, weight.stride()) if n > 0) + 1
    if span >= 2**31:
        raise ValueError(f"weight spans {span} elements; the Triton kernels support < 2**31")


def _keep_args(keep: torch.Tensor | None, out_features: int):
    """(has_keep, keep pointer tensor, number of slots)."""
    if keep is None:
        return False, None, out_features
    return True, keep, keep.numel()


@on_tensor_device
def lora_down(x2d, lora_A, p: float, seed: int) -> torch.Tensor:
    """xa = drop(x) @ A^T in fp32, shape (M, r)."""
    M, K = x2d.shape
    R = lora_A.shape[0]
    xa = torch.empty((M, R), device=x2d.device, dtype=torch.float32)
    if M == 0:
        return xa
    if K == 0 or R == 0:
        return xa.zero_()
    meta, opts = split_launch_options(tile_config("lora_down", x2d.element_size(), block_r=rank_block(R)))
    grid = (triton.cdiv(M, meta["BLOCK_M"]),)
    lora_down_kernel[grid](
        x2d, lora_A, xa, M, K, R,
        x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0),
        seed, p, 1.0 / (1.0 - p) if p > 0 else 1.0,
        HAS_DROPOUT=p > 0, LORA_PRECISION=lora_dot_precision(), BLOCK_R=rank_block(R), **meta, **opts,
    )
    return xa


@on_tensor_device
def lora_linear_forward(x2d, weight, lora_A, lora_B, bias, keep, scaling: float, p: float, seed: int):
    """Returns (y2d, xa).  y is full width; channels not in ``keep`` are exact zeros."""
    M, K = x2d.shape
    out_features = weight.shape[0]
    R = lora_A.shape[0]
    _check_weight_addressable(weight)
    xa = lora_down(x2d, lora_A, p, seed)
    has_keep, keep_t, N = _keep_args(keep, out_features)
    alloc = torch.zeros if has_keep else torch.empty
    y = alloc((M, out_features), device=x2d.device, dtype=x2d.dtype)
    if M == 0 or N == 0:
        return y, xa
    meta, opts = split_launch_options(tile_config("lora_linear_fwd", x2d.element_size()))
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    lora_linear_fwd_kernel[grid](
        x2d, weight, lora_B, xa, bias if bias is not None else xa, keep_t if has_keep else xa, y,
        M, N, K, R,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        lora_B.stride(0), lora_B.stride(1), xa.stride(0), y.stride(0), y.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None, HAS_KEEP=has_keep,
        NATIVE_DOT=_native_dot(), DOT_PRECISION=main_dot_precision(x2d.dtype),
        UP_PRECISION=up_dot_precision(x2d.dtype), RANK_CHUNK=rank_chunk(R), **meta, **opts,
    )
    return y, xa


#: rows of the compact gradient start at multiples of this many elements.
COMPACT_ALIGN = 16


@on_tensor_device
def compact_grad(g2d: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The output gradient as the backward kernels read it: unit column stride,
    restricted to the kept columns (in ``keep`` order), rows 16-element aligned.

    Without ``keep`` a gradient that already has unit column stride is used as
    it is (a stride-0 or transposed one is made contiguous).  With ``keep`` the
    kept columns are gathered once into an (M, ceil16(N)) buffer, of which the
    first N columns are returned.
    """
    if keep is None:
        return g2d if g2d.stride(-1) == 1 else g2d.contiguous()
    M, N = g2d.shape[0], keep.numel()
    width = triton.cdiv(max(N, 1), COMPACT_ALIGN) * COMPACT_ALIGN
    out = torch.empty((M, width), device=g2d.device, dtype=g2d.dtype)[:, :N]
    if M == 0 or N == 0:
        return out
    meta, opts = split_launch_options(tile_config("gather_columns", g2d.element_size()))
    grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    gather_columns_kernel[grid](g2d, keep, out, M, N, g2d.stride(0), g2d.stride(1), out.stride(0),
                                **meta, **opts)
    return out


@on_tensor_device
def lora_linear_backward(g2d, x2d, weight, lora_A, lora_B, xa, keep, scaling: float, p: float, seed: int,
                         need_dx: bool = True, need_dA: bool = True, need_dB: bool = True):
    """(dx, dA, dB) of lora_linear; entries not needed are None."""
    M, K = x2d.shape
    out_features = weight.shape[0]
    R = lora_A.shape[0]
    has_keep, keep_t, N = _keep_args(keep, out_features)
    keep_arg = keep_t if has_keep else xa
    dev = x2d.device
    BR = rank_block(R)
    inv_keep_prob = 1.0 / (1.0 - p) if p > 0 else 1.0
    lora_prec = lora_dot_precision()
    dx = dA = dB = None

    if N == 0 or M == 0:  # nothing flows back through an all-skipped (or empty) layer
        if need_dx:
            dx = torch.zeros_like(x2d)
        if need_dA:
            dA = torch.zeros_like(lora_A)
        if need_dB:
            dB = torch.zeros_like(lora_B)
        return dx, dA, dB

    g = compact_grad(g2d, keep_t if has_keep else None)
    dxa = None
    if need_dx or need_dA:
        dxa = torch.empty((M, R), device=dev, dtype=torch.float32)
        meta, opts = split_launch_options(tile_config("lora_grad_xa", g.element_size(), block_r=BR))
        lora_grad_xa_kernel[(triton.cdiv(M, meta["BLOCK_M"]),)](
            g, lora_B, keep_arg, dxa, M, N, R,
            g.stride(0), lora_B.stride(0), lora_B.stride(1), dxa.stride(0),
            float(scaling), HAS_KEEP=has_keep, LORA_PRECISION=lora_prec, BLOCK_R=BR, **meta, **opts,
        )
    if need_dB:
        dB = torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
        meta, opts = split_launch_options(tile_config("lora_grad_b", g.element_size(), block_r=BR))
        lora_grad_b_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
            g, xa, keep_arg, dB, M, N, R,
            g.stride(0), xa.stride(0), dB.stride(0), dB.stride(1),
            float(scaling), HAS_KEEP=has_keep, LORA_PRECISION=lora_prec, BLOCK_R=BR, **meta, **opts,
        )
    if need_dA:
        dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
        meta, opts = split_launch_options(tile_config("lora_grad_a", x2d.element_size()))
        lora_grad_a_kernel[(triton.cdiv(K, meta["BLOCK_K"]),)](
            x2d, dxa, dA, M, K, R,
            x2d.stride(0), x2d.stride(1), dxa.stride(0), dA.stride(0), dA.stride(1),
            seed, p, inv_keep_prob, HAS_DROPOUT=p > 0, LORA_PRECISION=lora_prec, BLOCK_R=BR, **meta, **opts,
        )
    if need_dx:
        dx = torch.empty((M, K), device=dev, dtype=x2d.dtype)
        meta, opts = split_launch_options(tile_config("lora_grad_x", g.element_size()))
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
        lora_grad_x_kernel[grid](
            g, weight, lora_A, dxa, keep_arg, dx, M, N, K, R,
            g.stride(0), weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), dxa.stride(0), dx.stride(0), dx.stride(1),
            seed, p, inv_keep_prob,
            HAS_KEEP=has_keep, HAS_DROPOUT=p > 0,
            NATIVE_DOT=_native_dot(), DOT_PRECISION=main_dot_precision(g.dtype),
            UP_PRECISION=up_dot_precision(g.dtype),
            RANK_CHUNK=rank_chunk(R), **meta, **opts,
        )
    return dx, dA, dB


@triton.jit
def dropout_mask_kernel(out_ptr, M, K, stride_om, seed, p,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, k] = 1 where the LoRA input x[m, k] is kept by dropout (as the kernels draw it)."""
    row0 = tl.program_id(0) * BLOCK_M
    col0 = tl.program_id(1) * BLOCK_K
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = dropout_keep_mask(seed, rows, col0, p, BLOCK_K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], keep.to(tl.int8),
             mask=(rows < M)[:, None] & (cols < K)[None, :])


@on_tensor_device
def dropout_mask(M: int, K: int, p: float, seed: int, device) -> torch.Tensor:
    """The (M, K) bool keep-mask the Triton kernels apply for ``seed`` (tests, gpu_check)."""
    out = torch.empty((M, K), device=device, dtype=torch.int8)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        dropout_mask_kernel[grid](out, M, K, out.stride(0), seed, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
