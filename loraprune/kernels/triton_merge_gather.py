"""Triton kernel of ``merge_gather``: (W + s B A)[rows][:, cols] in one pass.

Each program owns a (BLOCK_M x BLOCK_N) tile of the *output*: it gathers the
matching rows/columns of W by index, adds the low-rank term s * B[rows] @
A[:, cols] computed in fp32 (rank padded to >= 16, walked in chunks of 16), and writes the tile in W's
dtype.  W is read once (only its kept part) and the result written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import on_tensor_device, rank_chunk, split_launch_options, tile_config


@triton.jit
def merge_gather_kernel(
    w_ptr, a_ptr, b_ptr, rows_ptr, cols_ptr, out_ptr,
    NR, NC, R,
    stride_wo, stride_wi, stride_ar, stride_ai, stride_bo, stride_br, stride_om,
    scaling,
    HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_CHUNK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    out_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = out_rows < NR
    col_ok = out_cols < NC
    if HAS_ROWS:
        src_rows = tl.load(rows_ptr + out_rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src_rows = out_rows.to(tl.int64)
    if HAS_COLS:
        src_cols = tl.load(cols_ptr + out_cols, mask=col_ok, other=0).to(tl.int64)
    else:
        src_cols = out_cols.to(tl.int64)
    mask = row_ok[:, None] & col_ok[None, :]
    merged = tl.load(w_ptr + src_rows[:, None] * stride_wo + src_cols[None, :] * stride_wi,
                     mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        for c0 in range(0, R, RANK_CHUNK):
            ranks = c0 + tl.arange(0, RANK_CHUNK)
            rank_ok = ranks < R
            b = tl.load(b_ptr + src_rows[:, None] * stride_bo + ranks[None, :] * stride_br,
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptr + ranks[:, None] * stride_ar + src_cols[None, :] * stride_ai,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            merged = tl.dot(b * scaling, a, merged, input_precision="tf32x3")
    tl.store(out_ptr + out_rows.to(tl.int64)[:, None] * stride_om + out_cols[None, :],
             merged.to(out_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def merge_gather(weight, lora_A, lora_B, scaling: float, rows, cols):
    """Triton launcher; arguments already validated (rows/cols int64 on device or None)."""
    OUT, IN = weight.shape
    NR = OUT if rows is None else rows.numel()
    NC = IN if cols is None else cols.numel()
    out = torch.empty((NR, NC), device=weight.device, dtype=weight.dtype)
    if NR == 0 or NC == 0:
        return out
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 0
    if has_lora and R == 0:
        has_lora = False
    meta, opts = split_launch_options(tile_config("merge_gather", weight.element_size()))
    grid = (triton.cdiv(NR, meta["BLOCK_M"]), triton.cdiv(NC, meta["BLOCK_N"]))
    dummy = weight
    merge_gather_kernel[grid](
        weight, lora_A if has_lora else dummy, lora_B if has_lora else dummy,
        rows if rows is not None else dummy, cols if cols is not None else dummy, out,
        NR, NC, R,
        weight.stride(0), weight.stride(1),
        lora_A.stride(0) if has_lora else 0, lora_A.stride(1) if has_lora else 0,
        lora_B.stride(0) if has_lora else 0, lora_B.stride(1) if has_lora else 0,
        out.stride(0), float(scaling),
        HAS_ROWS=rows is not None, HAS_COLS=cols is not None, HAS_LORA=has_lora,
        RANK_CHUNK=rank_chunk(R), **meta, **opts,
    )
    return out
