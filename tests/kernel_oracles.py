"""The kernels' test oracles: the plain formulas in fp64, forming G and B A (no tricks).

Independent ground truth for the tests and for ``bench/gpu_check.py``'s checks
on a GPU. The eager fp32 baseline the benchmarks time lives in ``bench/common.py``.
"""
import torch

from bench.common import importance_eager_fp32  # the plain formula, here in fp64

# max |got - ref| allowed, relative to max |ref|, per storage dtype
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close_rel(got, ref, dtype, what=""):
    got = got.double()
    ref = ref.double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= REL_TOL[dtype] * max(scale, 1e-6) + 1e-7, f"{what}: max err {err:.3g} vs scale {scale:.3g} ({dtype})"


def lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias=None, keep=None):
    xd = x.double()
    y = xd @ weight.double().t() + scaling * (xd @ lora_A.double().t()) @ lora_B.double().t()
    if bias is not None:
        y = y + bias.double()
    if keep is not None:
        mask = torch.zeros(weight.shape[0], dtype=torch.float64)
        mask[keep] = 1.0
        y = y * mask
    return y


def importance_ref(weight, lora_A, lora_B, grad_A, grad_B, scaling, square=False):
    return importance_eager_fp32(weight, lora_A, lora_B, grad_A, grad_B, scaling, square, dtype=torch.float64)


def merge_gather_ref(weight, lora_A, lora_B, scaling, rows=None, cols=None):
    W = weight.double()
    if lora_A is not None:
        W = W + scaling * (lora_B.double() @ lora_A.double())
    if rows is not None:
        W = W[rows]
    if cols is not None:
        W = W[:, cols]
    return W
