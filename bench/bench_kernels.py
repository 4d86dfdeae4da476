"""Benchmark the loraprune Triton kernels against the eager ops a PEFT user runs today.

    python bench/bench_kernels.py [--out bench/results]

* On CUDA (``triton.testing.do_bench``), LLaMA-7B shapes, bf16:
  - group_importance: GB/s vs the GPU's HBM bandwidth (W read once), and vs the
    eager computation that forms G and B A;
  - lora_linear fwd+bwd (fp32 LoRA factors as LoRALinear keeps them, a real
    random grad_y, without and with an unsorted 50% ``keep``): TFLOP/s per kept
    FLOP and peak memory vs PEFT-style eager (F.linear + dropout + two fp32
    matmuls, masked output for ``keep``) with autograd;
  - merge_gather: GB/s vs eager (W + s B@A)[rows][:, cols].
  Written to ``results/kernels_cuda.json``.
* On CPU (what CI has): peak memory of the importance twin vs the eager
  computation, on 4096x4096 and 11008x4096 (r=8, fp32), each case in its own
  subprocess (``bench.kernel_memory_probe``).  Written to
  ``results/kernels_cpu.json`` and printed as ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

CPU_SHAPES = [(4096, 4096), (11008, 4096)]
RANK = 8
# (name, out, in) of LLaMA-7B linear layers
LLAMA7B = [("q/k/v/o_proj", 4096, 4096), ("gate/up_proj", 11008, 4096), ("down_proj", 4096, 11008)]
HBM_GBPS = {"H100": 3350.0, "A100": 2039.0}


def _probe(impl: str, out_f: int, in_f: int) -> dict:
    res = subprocess.run(
        [sys.executable, "-m", "bench.kernel_memory_probe", "--impl", impl,
         "--out", str(out_f), "--in", str(in_f), "--rank", str(RANK)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_cpu(out_dir: str) -> dict:
    cases = []
    for out_f, in_f in CPU_SHAPES:
        t0 = time.time()
        twin = _probe("twin", out_f, in_f)
        eager = _probe("eager", out_f, in_f)
        case = {
            "shape": [out_f, in_f], "rank": RANK, "dtype": "float32",
            "weight_bytes": twin["weight_bytes"],
            "twin_peak_extra_bytes": twin["peak_extra_bytes"],
            "eager_peak_extra_bytes": eager["peak_extra_bytes"],
            "twin_ratio_to_weight": twin["ratio_to_weight"],
            "eager_ratio_to_weight": eager["ratio_to_weight"],
            "eager_over_twin": eager["peak_extra_bytes"] / max(twin["peak_extra_bytes"], 1),
            "sums_agree_rel": abs(twin["row_sum_total"] - eager["row_sum_total"]) / abs(eager["row_sum_total"]),
            "threads": twin["threads"],
        }
        cases.append(case)
        print(f"importance {out_f}x{in_f} r={RANK} fp32: twin peak +{case['twin_peak_extra_bytes'] / 2**20:.2f} MiB "
              f"({100 * case['twin_ratio_to_weight']:.2f}% of W), eager +{case['eager_peak_extra_bytes'] / 2**20:.1f} MiB "
              f"({100 * case['eager_ratio_to_weight']:.0f}% of W): eager/twin = {case['eager_over_twin']:.0f}x "
              f"[{time.time() - t0:.0f}s]")
    result = {
        "what": "extra peak RSS of group_importance above its inputs (fresh subprocess per case)",
        "machine": platform.machine(), "torch": torch.__version__, "cases": cases,
    }
    path = os.path.join(out_dir, "kernels_cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


# ---------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------

def _hbm_gbps() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_GBPS.items() if k in name), None)


def _peak_mem(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_cuda(out_dir: str) -> dict:  # pragma: no cover - needs a GPU
    from triton.testing import do_bench

    from bench.common import importance_eager_fp32
    from loraprune.kernels import group_importance, lora_linear, merge_gather, use_backend

    dev, dt, s = "cuda", torch.bfloat16, 2.0
    hbm = _hbm_gbps()
    rows = []
    for name, out_f, in_f in LLAMA7B:
        W = torch.randn(out_f, in_f, device=dev, dtype=dt)
        # LoRALinear keeps its factors in fp32 whatever the weight dtype: bench what runs
        A = torch.randn(RANK, in_f, device=dev, dtype=torch.float32) * 0.01
        B = torch.randn(out_f, RANK, device=dev, dtype=torch.float32) * 0.01
        gA, gB = torch.randn_like(A) * 1e-3, torch.randn_like(B) * 1e-3
        w_bytes = W.numel() * W.element_size()

        with use_backend("triton"):
            ms = do_bench(lambda: group_importance(W, A, B, gA, gB, s))
        ms_eager = do_bench(lambda: importance_eager_fp32(W, A, B, gA, gB, s))
        rows.append({"kernel": "group_importance", "layer": name, "ms": ms, "eager_ms": ms_eager,
                     "GBps": w_bytes / ms / 1e6, "hbm_GBps": hbm,
                     "peak_bytes": _peak_mem(lambda: group_importance(W, A, B, gA, gB, s)),
                     "eager_peak_bytes": _peak_mem(lambda: importance_eager_fp32(W, A, B, gA, gB, s))})

        keep = torch.randperm(out_f, device=dev)[: out_f // 2].sort().values
        with use_backend("triton"):
            ms = do_bench(lambda: merge_gather(W, A, B, s, rows=keep))
        ms_eager = do_bench(lambda: (W + s * (B @ A))[keep].contiguous())
        moved = w_bytes // 2 * 2  # read kept half, write it
        rows.append({"kernel": "merge_gather", "layer": name, "ms": ms, "eager_ms": ms_eager,
                     "GBps": moved / ms / 1e6, "hbm_GBps": hbm})

        M = 4096  # tokens per step
        x = torch.randn(M, in_f, device=dev, dtype=dt, requires_grad=True)
        Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()
        gy = torch.randn(M, out_f, device=dev, dtype=dt)  # a real output gradient, not a stride-0 one
        drop = torch.nn.Dropout(0.05)
        keep_u = torch.randperm(out_f, device=dev)[: out_f // 2]  # unsorted, as masks produce it
        sel = torch.zeros(out_f, device=dev, dtype=dt)
        sel[keep_u] = 1

        def fused(k=None):
            with use_backend("triton"):
                lora_linear(x, W, Ar, Br, s, keep=k, dropout=0.05).backward(gy)

        def peft(masked=False):
            y = torch.nn.functional.linear(x, W) + s * (drop(x).float() @ Ar.t() @ Br.t()).to(dt)
            (y * sel if masked else y).backward(gy)

        for label, f_fused, f_eager, kept in (("", fused, peft, out_f),
                                              (" keep50", lambda: fused(keep_u), lambda: peft(True), out_f // 2)):
            flops = 2 * 2 * M * kept * in_f  # fwd + dx over kept channels (dW skipped); LoRA terms negligible
            ms, ms_eager = do_bench(f_fused), do_bench(f_eager)
            rows.append({"kernel": "lora_linear fwd+bwd" + label, "layer": name, "ms": ms, "eager_ms": ms_eager,
                         "kept": kept, "TFLOPs_per_kept": flops / ms / 1e9,
                         "eager_TFLOPs_per_kept": flops / ms_eager / 1e9,
                         "peak_bytes": _peak_mem(f_fused), "eager_peak_bytes": _peak_mem(f_eager)})
        for r in rows[-4:]:
            print(json.dumps(r))
    result = {"device": torch.cuda.get_device_name(), "rank": RANK, "dtype": "bfloat16", "factors": "float32",
              "rows": rows}
    path = os.path.join(out_dir, "kernels_cuda.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--cpu", action="store_true", help="run the CPU memory benchmark even with a GPU")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if torch.cuda.is_available() and not args.cpu:
        bench_cuda(args.out)
    else:
        bench_cpu(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
