"""Triton kernels of ``group_importance``: LoRA-guided importance, W read once.

With G = gB A + B gA - gB gA and W' = W + s B A, the per-element score is
S = |G * W'| (or (G * W')^2).  Both low-rank products are rebuilt per tile
from the rank-r factors, never stored:

* G  = [gB | B] @ [A - gA ; gA]   one ``tl.dot`` with K = 2r (padded to >= 16)
* BA = B @ A                      one ``tl.dot`` with K = r  (padded to >= 16)

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

from .triton_common import INTERPRETING, rank_block, split_launch_options, tile_config


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
    BLOCK_R: tl.constexpr, BLOCK_R2: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < OUT
    rows64 = rows.to(tl.int64)

    # left factors, loaded once per program: U = [gB | B] (BLOCK_M x 2r), s*B (BLOCK_M x r)
    j2 = tl.arange(0, BLOCK_R2)
    in_first = j2 < R
    in_second = (j2 >= R) & (j2 < 2 * R)
    u = tl.load(gb_ptr + rows64[:, None] * stride_gbo + j2[None, :] * stride_gbr,
                mask=row_ok[:, None] & in_first[None, :], other=0.0).to(tl.float32)
    u += tl.load(b_ptr + rows64[:, None] * stride_bo + (j2 - R)[None, :] * stride_br,
                 mask=row_ok[:, None] & in_second[None, :], other=0.0).to(tl.float32)
    jr = tl.arange(0, BLOCK_R)
    jr_ok = jr < R
    sb = tl.load(b_ptr + rows64[:, None] * stride_bo + jr[None, :] * stride_br,
                 mask=row_ok[:, None] & jr_ok[None, :], other=0.0).to(tl.float32) * scaling

    row_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(TILES_N):
        cols = (pid_c * TILES_N + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < IN
        # right factors: V = [A - gA ; gA] (2r x BLOCK_N) and A (r x BLOCK_N)
        a = tl.load(a_ptr + jr[:, None] * stride_ar + cols[None, :] * stride_ai,
                    mask=jr_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(a_ptr + j2[:, None] * stride_ar + cols[None, :] * stride_ai,
                    mask=in_first[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v -= tl.load(ga_ptr + j2[:, None] * stride_gar + cols[None, :] * stride_gai,
                     mask=in_first[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        v += tl.load(ga_ptr + (j2 - R)[:, None] * stride_gar + cols[None, :] * stride_gai,
                     mask=in_second[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows64[:, None] * stride_wo + cols[None, :] * stride_wi,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)

        g = tl.dot(u, v, input_precision=DOT_PRECISION)
        w_merged = tl.dot(sb, a, w, input_precision=DOT_PRECISION)
        score = g * w_merged
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
    """tf32 on GPU: the 2 rank-16 dots per element would make fp32-FMA compute bound."""
    return "ieee" if INTERPRETING else "tf32"


def group_importance(weight, lora_A, lora_B, grad_A, grad_B, scaling: float, square: bool = False):
    """Triton launcher; arguments already validated.  Returns fp32 (row_sums, col_sums)."""
    OUT, IN = weight.shape
    R = lora_A.shape[0]
    dev = weight.device
    if OUT == 0 or IN == 0 or R == 0:
        return (torch.zeros(OUT, device=dev, dtype=torch.float32),
                torch.zeros(IN, device=dev, dtype=torch.float32))
    meta, opts = split_launch_options(tile_config("importance_partials", weight.element_size()))
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
        BLOCK_R=rank_block(R), BLOCK_R2=rank_block(2 * R), **meta, **opts,
    )
    return _sum_partials(row_part), _sum_partials(col_part)
