"""Peak-RSS probe of group_importance on CPU (used by the memory test and the benchmark).

    python -m bench.kernel_memory_probe --impl twin|eager|criterion --out 11008 --in 4096 --rank 8

Run it in a *fresh* process per measurement.  It allocates the inputs, warms
up the implementation on a small problem (so library code pages, thread pools
and allocator arenas are already resident), then resets the kernel's RSS
high-water mark (``echo 5 > /proc/self/clear_refs``, Linux) and runs the real
problem once.  ``peak_extra_bytes`` = VmHWM after the run - VmRSS before it:
every byte the computation touched beyond its inputs, from torch's allocator,
MKL/OpenMP scratch or anything else.  Prints one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _make_inputs(out_f, in_f, rank, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g, dtype=torch.float32).to(dtype)
    lora_A = torch.randn(rank, in_f, generator=g) * 0.01
    lora_B = torch.randn(out_f, rank, generator=g) * 0.01
    grad_A = torch.randn(rank, in_f, generator=g) * 1e-3
    grad_B = torch.randn(out_f, rank, generator=g) * 1e-3
    return weight, lora_A, lora_B, grad_A, grad_B


def _impl(name):
    if name == "twin":
        from loraprune.kernels.torch_ops import group_importance_torch

        return group_importance_torch
    if name == "eager":
        from bench.common import importance_eager_fp32

        return importance_eager_fp32
    if name == "criterion":
        return _criterion_lora
    raise ValueError(f"unknown impl {name!r}; expected 'twin', 'eager' or 'criterion'")


def _criterion_lora(weight, lora_A, lora_B, grad_A, grad_B, scaling):
    """The public path loraprune.prune takes: score_module on a LoRALinear (criterion "lora")."""
    import torch

    from loraprune.method.criterion import score_module
    from loraprune.model.lora import LoRALinear

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    base.weight = torch.nn.Parameter(weight, requires_grad=False)  # shares the input, no copy
    module = LoRALinear(base, r=lora_A.shape[0], lora_A=lora_A, lora_B=lora_B, scaling=scaling)
    module.lora_A.grad, module.lora_B.grad = grad_A, grad_B
    return score_module(module, "lora")


def measure(impl: str, out_f: int, in_f: int, rank: int = 8, scaling: float = 2.0, dtype_name: str = "float32"):
    import torch

    dtype = getattr(torch, dtype_name)
    fn = _impl(impl)
    fn(*_make_inputs(256, 512, rank, dtype, seed=1), scaling)  # warm-up: libraries, threads
    inputs = _make_inputs(out_f, in_f, rank, dtype)
    gc.collect()
    _reset_peak()
    before_kb = _status_kb("VmRSS")
    row_sums, col_sums = fn(*inputs, scaling)
    peak_kb = _status_kb("VmHWM")
    weight_bytes = inputs[0].numel() * inputs[0].element_size()
    extra = max(0, peak_kb - before_kb) * 1024
    return {
        "impl": impl, "out": out_f, "in": in_f, "rank": rank, "dtype": dtype_name,
        "threads": torch.get_num_threads(),
        "weight_bytes": weight_bytes, "peak_extra_bytes": extra, "ratio_to_weight": extra / weight_bytes,
        "row_sum_total": float(row_sums.double().sum()), "col_sum_total": float(col_sums.double().sum()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("twin", "eager", "criterion"), required=True)
    parser.add_argument("--out", type=int, default=11008)
    parser.add_argument("--in", dest="in_f", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("cpu_memory needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    print(json.dumps(measure(args.impl, args.out, args.in_f, args.rank, dtype_name=args.dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
