"""Shared pieces of the Triton kernels: tile configurations, rank padding, dropout.

Tile configurations are a small fixed table per GPU generation (Ampere sm_8x,
Hopper sm_9x) rather than ``triton.autotune``: the Triton interpreter mishandles
multi-config autotuning, and a fixed table is exactly what ``compile_check``
compiles ahead of time, so the register/spill report describes what runs.
Under the interpreter one small configuration is used (it only proves maths).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

#: oldest Triton the kernels are written for: ``triton.knobs`` (3.4) and the
#: ``tl.dot(input_precision=...)`` / ``tl.join`` / ``tl.philox`` forms used below.
#: Tested with 3.9.  ``backend.triton_usable`` refuses older versions.
MIN_TRITON_VERSION = (3, 4)


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed triton, (0, 0) when unparsable."""
    try:
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except (AttributeError, ValueError):
        return (0, 0)


def _interpret_flag() -> bool:
    """What ``@triton.jit`` reads: ``triton.knobs`` on >= 3.4, the raw variable before."""
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4: @triton.jit reads the environment variable itself
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


#: decided once, at import, exactly like ``@triton.jit`` decides it.
INTERPRETING: bool = _interpret_flag()

#: smallest K of ``tl.dot`` real GPUs accept; the interpreter accepts less.
MIN_DOT_K = 16

TORCH_TO_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rank_block(rank: int) -> int:
    """Padded LoRA rank used as BLOCK_R: a power of two, at least 16."""
    return max(MIN_DOT_K, triton.next_power_of_2(max(int(rank), 1)))


#: rank epilogues / prologues of the big GEMM tiles walk the rank in chunks of
#: at most this many: a (128 x 64) fp32 operand pair next to a (128 x 128) fp32
#: accumulator would not fit in registers (it spilled on sm_80 at r = 64).
MAX_RANK_CHUNK = 16


def rank_chunk(rank: int, limit: int = MAX_RANK_CHUNK) -> int:
    """Chunk of the rank loop: the padded rank when it fits ``limit``, else ``limit``."""
    return min(rank_block(rank), limit)


# --------------------------------------------------------------------------
# tile tables.  Keys: kernel name -> {"interp" | 8 | 9 : config}.  Entries whose
# block sizes depend on the element size give a (2-byte, 4-byte) pair.
# --------------------------------------------------------------------------
_TABLE: dict[str, dict] = {
    # x (M, in) @ A^T (in, R): output only R wide, memory bound on x.
    "lora_down": {
        "interp": dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1),
        8: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
        9: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    },
    # y tile = x @ W[keep]^T + s * xa @ B[keep]^T + bias: the big GEMM.  The
    # scattered store into y[:, keep] costs registers: tiles are sized to not spill.
    "lora_linear_fwd": {
        "interp": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1),
        8: (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)),
        9: (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)),
    },
    # dxa = s * g[:, keep] @ B[keep]: reduction over kept channels, R wide out.
    "lora_grad_xa": {
        "interp": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
        8: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
        9: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    },
    # g[:, keep] packed once into a compact buffer for the backward kernels.
    "gather_columns": {
        "interp": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
        8: dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1),
        9: dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1),
    },
    # dB[keep] = s * g[:, keep]^T @ xa: reduction over tokens.
    "lora_grad_b": {
        "interp": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
        8: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
        9: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    },
    # dA = dxa^T @ drop(x): reduction over tokens (dropout mask recomputed).
    "lora_grad_a": {
        "interp": dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1),
        8: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
        9: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    },
    # dx tile = g[:, keep] @ W[keep] + mask * (dxa @ A): the big backward GEMM.
    "lora_grad_x": {
        "interp": dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, GROUP_M=4, num_warps=4, num_stages=1),
        8: dict(BLOCK_M=128, BLOCK_K=128, BLOCK_N=32, GROUP_M=8, num_warps=8, num_stages=3),
        9: dict(BLOCK_M=128, BLOCK_K=128, BLOCK_N=32, GROUP_M=8, num_warps=8, num_stages=3),
    },
    # importance stage 1: one pass over W in (BLOCK_M x BLOCK_N) tiles.
    "importance_partials": {
        "interp": dict(BLOCK_M=32, BLOCK_N=32, TILES_N=2, num_warps=4, num_stages=1),
        8: dict(BLOCK_M=128, BLOCK_N=64, TILES_N=4, num_warps=8, num_stages=2),
        9: dict(BLOCK_M=128, BLOCK_N=64, TILES_N=4, num_warps=8, num_stages=2),
    },
    # importance stage 2: deterministic column sums of the partials.
    "sum_partials": {
        "interp": dict(BLOCK=64, BLOCK_P=16, num_warps=4, num_stages=1),
        8: dict(BLOCK=256, BLOCK_P=8, num_warps=4, num_stages=2),
        9: dict(BLOCK=256, BLOCK_P=8, num_warps=4, num_stages=2),
    },
    "merge_gather": {
        "interp": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
        8: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
        9: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    },
}

KERNEL_CONFIG_NAMES = tuple(_TABLE)


#: smaller tiles for large ranks: kernel -> (from BLOCK_R, overrides).  The
#: r-wide kernels' (tile x 64) fp32 operands and accumulator, and the importance
#: kernel's fp32-accurate (tf32x3) rank-chunk dots, spilled registers on sm_80
#: with the default tiles.
_WIDE_RANK = {
    "lora_down": (32, {8: dict(BLOCK_K=32), 9: dict(BLOCK_K=32)}),
    "lora_grad_xa": (32, {8: dict(BLOCK_N=32), 9: dict(BLOCK_N=32)}),
    "lora_grad_b": (64, {8: dict(BLOCK_M=32), 9: dict(BLOCK_M=32)}),
    "importance_partials": (32, {8: dict(BLOCK_M=32, num_warps=4), 9: dict(BLOCK_M=64)}),
}


def tile_config(kernel: str, elem_size: int = 2, arch: int | str | None = None, block_r: int = 16) -> dict:
    """Launch configuration of ``kernel``.

    ``arch``: "interp", a compute-capability major (8, 9, ...) or None to use the
    interpreter / the current CUDA device.  Newer GPUs fall back to the Hopper
    entry, older ones to the Ampere entry.  ``block_r``: the padded LoRA rank
    (kernels with an r-wide tile take smaller tiles from BLOCK_R = 64 on).
    """
    entries = _TABLE[kernel]
    if arch is None:
        if INTERPRETING or not torch.cuda.is_available():
            arch = "interp"
        else:
            arch = torch.cuda.get_device_capability()[0]
    if arch != "interp":
        arch = 9 if int(arch) >= 9 else 8
    entry = entries[arch]
    if isinstance(entry, tuple):
        entry = entry[0] if elem_size <= 2 else entry[1]
    entry = dict(entry)
    threshold, overrides = _WIDE_RANK.get(kernel, (None, {}))
    if arch != "interp" and threshold is not None and block_r >= threshold:
        entry.update(overrides[arch])
    return entry


def split_launch_options(config: dict) -> tuple[dict, dict]:
    """Split a config into (kernel constexprs, launch options)."""
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    if INTERPRETING:
        options = {}
    return meta, options


def main_dot_precision(dtype: torch.dtype) -> str:
    """Input precision of the weight GEMM: fp32 follows torch's TF32 switch
    (fp16/bf16 tiles ignore it: they run on the tensor cores as they are)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def lora_dot_precision() -> str:
    """Input precision of the fp32 LoRA-side dots (rank-r factors, xa, dxa, importance).

    ``torch.backends.cuda.matmul.allow_tf32`` on: plain TF32 (what cuBLAS does).
    Off (torch's default): ``tf32x3``, three TF32 products that recover fp32
    accuracy on the tensor cores, instead of TF32's ~1e-3 relative error.
    """
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def up_dot_precision(dtype: torch.dtype) -> str:
    """Precision of the rank-r term folded into a y / dx tile of storage ``dtype``.

    fp32 outputs follow the TF32 switch (``lora_dot_precision``).  For fp16/bf16
    outputs TF32 is used: its operand rounding (2^-11 relative) is already below
    the 16-bit rounding of the tile it is added to, and tf32x3 there would cost
    the big GEMM kernels the registers of two more operand tiles (they spilled).
    """
    return lora_dot_precision() if dtype == torch.float32 else "tf32"


@triton.jit
def dropout_keep_mask(seed, rows, col0, p, BLOCK_K: tl.constexpr):
    """Boolean keep-mask of inverted dropout for x[rows, col0 : col0 + BLOCK_K].

    A pure function of (seed, row, column): forward and backward kernels with
    different tilings recompute the very same mask, so it is never stored.
    One Philox-4x32 call yields 4 uniforms, used for 4 adjacent columns (this
    quarters the random-number work and its register pressure); counters are
    (column // 4, row) in separate 32-bit words, so large activations cannot
    overflow them.  ``col0`` must be a multiple of 4 (tiles start at multiples
    of BLOCK_K, itself a multiple of 4).
    """
    quads = col0 // 4 + tl.arange(0, BLOCK_K // 4)
    zero = tl.zeros((rows.shape[0], BLOCK_K // 4), dtype=tl.uint32)
    c0 = zero + quads[None, :].to(tl.uint32)
    c1 = zero + rows[:, None].to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    bits = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # [..., i, j] = r_{2i+j}: column 4q + 2i + j
    bits = tl.reshape(bits, (rows.shape[0], BLOCK_K))
    return tl.uint_to_uniform_float(bits) >= p


# ---------------------------------------------------------------------------
# device guard
# ---------------------------------------------------------------------------

def _first_device(args, kwargs) -> torch.device | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, torch.device):
            return a
        if isinstance(a, str) and a.startswith(("cuda", "cpu")):
            return torch.device(a)
    return None


def on_tensor_device(launcher):
    """Run a launcher with its first tensor's GPU as the current CUDA device.

    Triton launches on ``torch.cuda.current_device()``, not on the device of
    the pointers it is given: without the guard, tensors on ``cuda:1`` (a
    ``device_map``-sharded model) would be read by a kernel running on
    ``cuda:0``. CPU tensors (the interpreter) need no guard.
    """
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        device = _first_device(args, kwargs)
        guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)
    return guarded
