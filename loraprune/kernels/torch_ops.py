"""Pure-torch twins of the Triton kernels (CPU path, and references for tests).

They compute exactly what the kernels compute, with the same memory discipline
where it matters on CPU:

* ``group_importance_torch`` walks W in row blocks and never forms G, BA or any
  out x in temporary; each block temporary is ~0.5% of W's fp32 bytes.
* ``merge_gather_torch`` forms B A only for the gathered rows, block by block.
* the lora_linear twins share the kernels' contract (fp32 ``xa`` saved, dropout
  mask a pure function of a seed, ``keep`` applied by gathering rows of W/B);
  the autograd Function saves the twin's mask (bool) where the kernels
  recompute theirs (see ``ops.LoRALinearFunction``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: fraction of W's element count one block temporary may hold (see module doc).
BLOCK_FRACTION = 0.0025
#: but never fewer elements than this per block (tiny weights: no point in slicing).
MIN_BLOCK_ELEMS = 1 << 16


def rows_per_block(n_rows: int, n_cols: int, fraction: float = BLOCK_FRACTION) -> int:
    """Rows per block so that a (rows x n_cols) temporary is ~``fraction`` of the matrix."""
    budget = max(int(fraction * n_rows * n_cols), MIN_BLOCK_ELEMS)
    return max(1, min(n_rows, budget // max(n_cols, 1)))


# ---------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------

def dropout_keep_mask_torch(shape, p: float, seed: int, device) -> torch.Tensor:
    """Boolean keep-mask of inverted dropout, a pure function of ``seed``.

    The seed itself is drawn from torch's global RNG by the caller, so
    ``torch.manual_seed`` makes a training step reproducible, and backward can
    recompute the mask instead of saving it.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.empty(shape, device=device, dtype=torch.float32).bernoulli_(1.0 - p, generator=gen).bool()


def _dropped(x2d: torch.Tensor, p: float, seed: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """drop(x) in fp32 (inverted dropout); x itself when p == 0. ``mask``: the seed's mask, if already drawn."""
    xf = x2d.float()
    if p <= 0:
        return xf
    if mask is None:
        mask = dropout_keep_mask_torch(x2d.shape, p, seed, x2d.device)
    return xf.mul(mask).mul_(1.0 / (1.0 - p))


# ---------------------------------------------------------------------------
# lora_linear
# ---------------------------------------------------------------------------

def lora_linear_forward_torch(x2d, weight, lora_A, lora_B, bias, keep, scaling: float, p: float, seed: int,
                              mask: torch.Tensor | None = None):
    """Returns (y2d, xa): y full width with exact zeros outside ``keep``; xa = drop(x) A^T (fp32).
    ``mask``: the seed's dropout keep-mask if the caller drew it already (it is drawn here otherwise)."""
    M = x2d.shape[0]
    out_features = weight.shape[0]
    xa = _dropped(x2d, p, seed, mask) @ lora_A.float().t()
    if keep is None:
        w_k, b_k, bias_k = weight, lora_B, bias
    else:
        w_k = weight.index_select(0, keep)
        b_k = lora_B.index_select(0, keep)
        bias_k = None if bias is None else bias.index_select(0, keep)
    y_k = F.linear(x2d, w_k.to(x2d.dtype)).float()
    # mm + add_: in-place addmm_ with K = r takes a slow BLAS path on CPU
    y_k.add_(xa @ b_k.float().t(), alpha=float(scaling))
    if bias_k is not None:
        y_k += bias_k.float()
    if keep is None:
        return y_k.to(x2d.dtype), xa
    y = torch.zeros((M, out_features), device=x2d.device, dtype=x2d.dtype)
    y.index_copy_(1, keep, y_k.to(x2d.dtype))
    return y, xa


def lora_linear_backward_torch(g2d, x2d, weight, lora_A, lora_B, xa, keep, scaling: float, p: float, seed: int,
                               need_dx: bool = True, need_dA: bool = True, need_dB: bool = True,
                               mask: torch.Tensor | None = None):
    """(dx, dA, dB); weight and bias are frozen, so no dW/dbias is ever formed. ``mask``: the forward's
    dropout keep-mask, saved (else recomputed from ``seed``)."""
    if keep is None:
        g_k, w_k, b_k = g2d, weight, lora_B
    else:
        g_k = g2d.index_select(1, keep)
        w_k = weight.index_select(0, keep)
        b_k = lora_B.index_select(0, keep)
    gf = g_k.float()
    dx = dA = dB = None
    keep_mask = None
    if p > 0 and (need_dA or need_dx):
        keep_mask = mask if mask is not None else dropout_keep_mask_torch(x2d.shape, p, seed, x2d.device)
    dxa = (gf @ b_k.float()).mul_(float(scaling)) if (need_dx or need_dA) else None
    if need_dB:
        db_k = (gf.t() @ xa).mul_(float(scaling)).to(lora_B.dtype)
        if keep is None:
            dB = db_k
        else:
            dB = torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
            dB.index_copy_(0, keep, db_k)
    if need_dA:
        dA = (dxa.t() @ _dropped(x2d, p, seed, keep_mask)).to(lora_A.dtype)
    if need_dx:
        low_rank = dxa @ lora_A.float()
        if p > 0:
            low_rank.mul_(keep_mask).mul_(1.0 / (1.0 - p))
        main = g_k @ w_k.to(g_k.dtype)
        dx = (main.float() + low_rank).to(x2d.dtype)
    return dx, dA, dB


# ---------------------------------------------------------------------------
# group_importance
# ---------------------------------------------------------------------------

def group_importance_torch(weight, lora_A, lora_B, grad_A, grad_B, scaling: float, square: bool = False):
    """fp32 (row_sums, col_sums) of S = |G * (W + s B A)|, in row blocks.

    G = gB A + B gA - gB gA is rewritten G = [gB | B] @ [A - gA ; gA], so each
    block needs one rank-2r and one rank-r product.  Per block of b rows the
    only temporaries are two (b x in) fp32 tensors (merged weight, score), each
    ~0.25% of W's element count, plus vectors.
    """
    out_f, in_f = weight.shape
    A = lora_A.float()
    gA = grad_A.float()
    B = lora_B.float()
    gB = grad_B.float()
    v = torch.cat([A - gA, gA], dim=0)  # (2r, in): G = [gB | B] @ v
    s = float(scaling)
    row_sums = torch.empty(out_f, dtype=torch.float32, device=weight.device)
    col_sums = torch.zeros(in_f, dtype=torch.float32, device=weight.device)
    step = rows_per_block(out_f, in_f)
    for r0 in range(0, out_f, step):
        r1 = min(r0 + step, out_f)
        # plain mm + add_ (in-place addmm_ with K = r is a slow BLAS path on CPU)
        merged = torch.mm(B[r0:r1] * s, A).add_(weight[r0:r1])          # W' block, fp32
        score = torch.mm(torch.cat([gB[r0:r1], B[r0:r1]], dim=1), v)    # G block
        score.mul_(merged)
        del merged
        if square:
            score.square_()
        else:
            score.abs_()
        torch.sum(score, dim=1, out=row_sums[r0:r1])
        col_sums += score.sum(dim=0)
        del score
    return row_sums, col_sums


# ---------------------------------------------------------------------------
# merge_gather
# ---------------------------------------------------------------------------

def merge_gather_torch(weight, lora_A, lora_B, scaling: float, rows=None, cols=None):
    """(W + s B A)[rows][:, cols] in W's dtype, computing B A only for gathered rows."""
    out_f, in_f = weight.shape
    n_rows = out_f if rows is None else rows.numel()
    n_cols = in_f if cols is None else cols.numel()
    out = torch.empty((n_rows, n_cols), dtype=weight.dtype, device=weight.device)
    if n_rows == 0 or n_cols == 0:
        return out
    has_lora = lora_A is not None and lora_A.shape[0] > 0
    if has_lora:
        a_cols = lora_A.float() if cols is None else lora_A.index_select(1, cols).float()
    step = rows_per_block(n_rows, n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        if rows is None:
            w_blk = weight[r0:r1]
            b_blk = lora_B[r0:r1] if has_lora else None
        else:
            idx = rows[r0:r1]
            w_blk = weight.index_select(0, idx)
            b_blk = lora_B.index_select(0, idx) if has_lora else None
        if cols is not None:
            w_blk = w_blk.index_select(1, cols)
        if has_lora:
            merged = torch.mm(b_blk.float() * float(scaling), a_cols).add_(w_blk)
            out[r0:r1] = merged
        else:
            out[r0:r1] = w_blk
    return out
