"""Triton kernels of ``group_importance``: LoRA-guided importance, W read once.

With G = gB A + B gA - gB gA and W' = W + s B A, the per-element score is
S = |G * W'| (or (G * W')^2).  Both low-rank products are rebuilt per tile
from the rank-r factors, never stored:

* G  = gB (A - gA) + B gA        two ``tl.dot`` with K = r (padded to >= 16)
* BA = B @ A                      one ``tl.dot`` with K = r

The rank is walked in chunks of at most 16 (``BLOCK_RC``), so operand tiles stay
(BLOCK_M x 16) whatever r is; r <= 16 is one chunk, loaded once per program.

Stage 1 (``importance_partials_kernel``): each program owns BLOCK_M rows and
TILES_N * BLOCK_N columns of W.  It accumulates its rows' sums in registers and
writes one partial per (row, column chunk), and one partial column sum per
(row tile, column).  Stage 2 (``sum_partials_kernel``) adds the partials in a
fixed order.  No atomics: results are bit-for-bit reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    INTERPRETING,
    lora_dot_precision,
    on_tensor_device,
    rank_block,
    rank_chunk,
    split_launch_options,
    tile_config,
)


@triton.jit
def _left_factors(b_ptr, gb_ptr, rows64, row_ok, c0, R, stride_bo, stride_br, stride_gbo, stride_gbr,
                  scaling, BLOCK_RC: tl.constexpr):
    """Rank chunk c0 : c0 + BLOCK_RC of gB, B and s*B for ``rows`` (BLOCK_M x BLOCK_RC, fp32)."""
    jr = c0 + tl.arange(0, BLOCK_RC)
    m = row_ok[:, None] & (jr < R)[None, :]
    gb = tl.load(gb_ptr + rows64[:, None] * stride_gbo + jr[None, :] * stride_gbr, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows64[:, None] * stride_bo + jr[None, :] * stride_br, mask=m, other=0.0).to(tl.float32)
    return gb, b, b * scaling


@triton.jit
def _right_factors(a_ptr, ga_ptr, cols, col_ok, c0, R, stride_ar, stride_ai, stride_gar, stride_gai,
                   BLOCK_RC: tl.constexpr):
    """Rank chunk c0 : c0 + BLOCK_RC of A and gA for ``cols`` (BLOCK_RC x BLOCK_N, fp32)."""
    jr = c0 + tl.arange(0, BLOCK_RC)
    m = (jr < R)[:, None] & col_ok[None, :]
    a = tl.load(a_ptr + jr[:, None] * stride_ar + cols[None, :] * stride_ai, mask=m, other=0.0).to(tl.float32)
    ga = tl.load(ga_ptr + jr[:, None] * stride_gar + cols[None, :] * stride_gai, mask=m, other=0.0).to(tl.float32)
    return a, ga


@triton.jit
def _rank_chunk(g, w_merged, gb, b, sb, a, ga, DOT_PRECISION: tl.constexpr):
    """Add one rank chunk: G += gB (A - gA) + B gA and W' += s B A."""
    g = tl.dot(gb, a - ga, g, input_precision=DOT_PRECISION)
    g = tl.dot(b, ga, g, input_precision=DOT_PRECISION)
    w_merged = tl.dot(sb, a, w_merged, input_precision=DOT_PRECISION)
    return g, w_merged


@triton.jit
def importance_partials_kernel(
    w_ptr, a_ptr, b_ptr, ga_ptr, gb_ptr, row_part_ptr, col_part_ptr,
    OUT, IN, R,
    stride_wo, stride_wi, stride_ar, stride_ai, stride_bo, stride_br,
    stride_gar, stride_gai, stride_gbo, stride_gbr,
    stride_row_part, stride_col_part,
    scaling,
    SQUARE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RC: tl.constexpr,
):
    """Rank handled in chunks of BLOCK_RC (<= 16): a rank-64 adapter costs four
    passes of rank-16 dots instead of rank-128 operand tiles that would not fit
    in shared memory (272 KiB at r = 64 before).  With one chunk (r <= BLOCK_RC) the row factors are loaded
    once per program, otherwise once per (column tile, chunk)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < OUT
    rows64 = rows.to(tl.int64)
    ONE_CHUNK: tl.constexpr = BLOCK_R <= BLOCK_RC
    if ONE_CHUNK:
        gb, b, sb = _left_factors(b_ptr, gb_ptr, rows64, row_ok, 0, R, stride_bo, stride_br,
                                  stride_gbo, stride_gbr, scaling, BLOCK_RC)

    row_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(TILES_N):
        cols = (pid_c * TILES_N + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < IN
        w = tl.load(w_ptr + rows64[:, None] * stride_wo + cols[None, :] * stride_wi,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ONE_CHUNK:
            a, ga = _right_factors(a_ptr, ga_ptr, cols, col_ok, 0, R, stride_ar, stride_ai,
                                   stride_gar, stride_gai, BLOCK_RC)
            g, w = _rank_chunk(g, w, gb, b, sb, a, ga, DOT_PRECISION)
        else:
            for c0 in range(0, R, BLOCK_RC):
                gb_c, b_c, sb_c = _left_factors(b_ptr, gb_ptr, rows64, row_ok, c0, R, stride_bo, stride_br,
                                                stride_gbo, stride_gbr, scaling, BLOCK_RC)
                a, ga = _right_factors(a_ptr, ga_ptr, cols, col_ok, c0, R, stride_ar, stride_ai,
                                       stride_gar, stride_gai, BLOCK_RC)
                g, w = _rank_chunk(g, w, gb_c, b_c, sb_c, a, ga, DOT_PRECISION)
        score = g * w
        if SQUARE:
            score = score * score
        else:
            score = tl.abs(score)
        row_acc += tl.sum(score, axis=1)
        tl.store(col_part_ptr + pid_m * stride_col_part + cols, tl.sum(score, axis=0), mask=col_ok)
    tl.store(row_part_ptr + pid_c * stride_row_part + rows, row_acc, mask=row_ok)


@triton.jit
def sum_partials_kernel(
    part_ptr, out_ptr, P, N, stride_p,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[j] = sum_i part[i, j] over P partial rows, in a fixed order."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_P, BLOCK), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + parts[:, None].to(tl.int64) * stride_p + cols[None, :],
                       mask=(parts < P)[:, None] & col_ok[None, :], other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=col_ok)


def _sum_partials(part: torch.Tensor) -> torch.Tensor:
    P, N = part.shape
    out = torch.empty(N, device=part.device, dtype=torch.float32)
    meta, opts = split_launch_options(tile_config("sum_partials", 4))
    sum_partials_kernel[(triton.cdiv(N, meta["BLOCK"]),)](part, out, P, N, part.stride(0), **meta, **opts)
    return out


def importance_dot_precision() -> str:
    """Follows torch's TF32 switch on GPU (tf32, or fp32-accurate tf32x3); exact fp32 when interpreted."""
    return "ieee" if INTERPRETING else lora_dot_precision()


@on_tensor_device
def group_importance(weight, lora_A, lora_B, grad_A, grad_B, scaling: float, square: bool = False):
    """Triton launcher; arguments already validated.  Returns fp32 (row_sums, col_sums)."""
    OUT, IN = weight.shape
    R = lora_A.shape[0]
    dev = weight.device
    if OUT == 0 or IN == 0 or R == 0:
        return (torch.zeros(OUT, device=dev, dtype=torch.float32),
                torch.zeros(IN, device=dev, dtype=torch.float32))
    meta, opts = split_launch_options(tile_config("importance_partials", weight.element_size(), block_r=rank_block(R)))
    row_tiles = triton.cdiv(OUT, meta["BLOCK_M"])
    col_chunks = triton.cdiv(IN, meta["BLOCK_N"] * meta["TILES_N"])
    row_part = torch.empty((col_chunks, OUT), device=dev, dtype=torch.float32)
    col_part = torch.empty((row_tiles, IN), device=dev, dtype=torch.float32)
    importance_partials_kernel[(row_tiles, col_chunks)](
        weight, lora_A, lora_B, grad_A, grad_B, row_part, col_part,
        OUT, IN, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), grad_A.stride(0), grad_A.stride(1),
        grad_B.stride(0), grad_B.stride(1), row_part.stride(0), col_part.stride(0),
        float(scaling),
        SQUARE=bool(square), DOT_PRECISION=importance_dot_precision(),
        BLOCK_R=rank_block(R), BLOCK_RC=rank_chunk(R), **meta, **opts,
    )
    return _sum_partials(row_part), _sum_partials(col_part)
