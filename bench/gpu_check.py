"""GPU check of the loraprune kernels in one command: correctness, determinism, speed.

    python bench/gpu_check.py [--out gpu_check.json]      # on one H100/H200, < 5 min
    python bench/gpu_check.py --smoke --out smoke.json    # CPU, Triton interpreter, seconds

Correctness (exit status 1 on any failure), against fp64 references:
  * ``lora_linear`` forward and backward (y, dx, dA, dB) on LLaMA-7B shapes
    (4096x4096, 4096->11008, 11008->4096) and shapes with tails, ranks 8/16/64,
    bf16/fp16/fp32 weights with fp32 LoRA factors (as LoRALinear keeps them),
    keep = none / 50% / unsorted / a count that is not a multiple of 16, dropout
    (the reference applies the kernels' own Philox mask);
  * more than 2**31 activation elements (rows at both ends checked in fp64);
  * bitwise determinism over two runs (lora_linear fwd+bwd, group_importance);
  * ``group_importance`` and ``merge_gather`` on the same shapes.
Speed (GPU only), bf16, r = 16, 4096 tokens: per-kernel µs from the profiler,
TFLOP/s and fraction of dense bf16 peak, against cuBLAS ``F.linear``, the
unsloth-style ``addmm_`` LoRA forward, eager PEFT forward/backward, and the
eager importance formula (GB/s and fraction of HBM bandwidth).
Pruning: a few steps of ``loraprune.prune`` on a small LLaMA on CUDA, counting
calls into the Triton launchers (and none into the torch twins).
Scale (``bench/scale.py``'s code, bf16): Llama-3-8B layers (hidden 4096, MLP 14336,
32/8 heads, vocabulary 128256, real embedding and head) at 2 and 4 layers, 4 x 512
tokens a step: the default pruning step against a PEFT LoRA step before pruning and
after the final 50 % mask (beside the FLOP ideal), peak memory of a short ``prune()``
call and its phases (``torch.cuda.max_memory_allocated``) against ``docs/memory.md``'s
formula, compacted prefill/decode against dense, and the extrapolation (stated as such)
to Llama-3-8B whole and 70B; written into the JSON (``scale``) and as a markdown table
beside it (``<out>.scale.md``) that ``bench/README.md`` can take as it is.

``--smoke`` runs the correctness part on tiny shapes under ``TRITON_INTERPRET=1``
(set before triton is imported), skips the >2**31 case and the speed part, runs
the pruning step on CPU through the interpreted kernels, and the scale part on
CPU in fp32 at the tiny shape (2 and 3 layers; the torch twin: same code, other
device and dtype).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv[1:]
if SMOKE and not torch.cuda.is_available():
    # @triton.jit picks interpreter vs compiler when the kernels are decorated
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench.common; the kernels' test oracles (tests/kernel_oracles.py)

import triton  # noqa: E402

from kernel_oracles import importance_ref, merge_gather_ref  # noqa: E402
from loraprune.kernels import group_importance, lora_linear, merge_gather, use_backend  # noqa: E402
from loraprune.kernels import ops as kops  # noqa: E402
from loraprune.kernels import triton_lora_linear as tll  # noqa: E402

#: max |err| / max |ref| per weight dtype: fp32 factors, fp32 accumulation.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
#: dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (GB/s) per device name.
PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0)}
LLAMA7B = [("qkvo", 4096, 4096), ("gate_up", 4096, 11008), ("down", 11008, 4096)]  # (name, in, out)


class Report:
    def __init__(self):
        self.checks: list[dict] = []

    def check(self, group: str, name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, **info) -> bool:
        got, ref = got.double(), ref.double()
        scale = ref.abs().max().item() if ref.numel() else 0.0
        err = (got - ref).abs().max().item() if ref.numel() else 0.0
        rel = err / max(scale, 1e-12)
        ok = bool(got.shape == ref.shape and math.isfinite(rel) and rel <= tol)
        self.checks.append({"group": group, "name": name, "rel_err": rel, "tol": tol, "ok": ok, **info})
        if not ok:
            print(f"FAIL {group}/{name}: rel err {rel:.3g} > {tol:g} {info}", flush=True)
        return ok

    def flag(self, group: str, name: str, ok: bool, **info) -> None:
        self.checks.append({"group": group, "name": name, "ok": bool(ok), **info})
        if not ok:
            print(f"FAIL {group}/{name} {info}", flush=True)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


# ---------------------------------------------------------------------------
# lora_linear correctness
# ---------------------------------------------------------------------------

def make_keep(kind: str | None, out_f: int, device, gen) -> torch.Tensor | None:
    if kind is None:
        return None
    perm = torch.randperm(out_f, generator=gen)
    if kind == "half":
        idx = perm[: out_f // 2].sort().values
    elif kind == "unsorted":
        idx = perm[: out_f // 2]
    elif kind == "odd":  # not a multiple of 16
        idx = perm[: max(1, (out_f // 3) | 1)]
        if idx.numel() % 16 == 0:
            idx = idx[:-1]
    else:
        raise ValueError(kind)
    return idx.to(device)


def lora_ref64(x, W, A, B, s, bias, keep, mask, p):
    """fp64 y of the kernels' contract; ``mask`` is the kernels' dropout keep-mask."""
    xd = x.double()
    xl = xd if mask is None else xd * mask.double() / (1.0 - p)
    y = xd @ W.double().t() + s * (xl @ A.double().t()) @ B.double().t()
    if bias is not None:
        y = y + bias.double()
    if keep is not None:
        sel = torch.zeros(W.shape[0], dtype=torch.float64, device=x.device)
        sel[keep] = 1.0
        y = y * sel
    return y


def run_lora_case(rep: Report, device, M, in_f, out_f, rank, dtype, keep_kind, p, seed=0, group="lora_linear"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, in_f, generator=gen).to(device=device, dtype=dtype)
    W = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(device=device, dtype=dtype)
    A = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(device)
    B = (torch.randn(out_f, rank, generator=gen) * 0.5).to(device)
    bias = (torch.randn(out_f, generator=gen) * 0.1).to(device=device, dtype=dtype)
    gy = torch.randn(M, out_f, generator=gen).to(device=device, dtype=dtype)
    keep = make_keep(keep_kind, out_f, device, gen)
    s = 2.0
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    torch.manual_seed(1234 + seed)
    with use_backend("triton"):
        y = lora_linear(xg, W, Ag, Bg, s, bias=bias, keep=keep, dropout=p)
    y.backward(gy)
    mask = None
    if p > 0:
        torch.manual_seed(1234 + seed)
        mask = tll.dropout_mask(M, in_f, p, kops._draw_seed(), device)
    xr, Ar, Br = (t.double().requires_grad_() for t in (x, A, B))
    yr = lora_ref64(xr, W, Ar, Br, s, bias, keep, mask, p)
    (yr * gy.double()).sum().backward()
    info = dict(M=M, in_f=in_f, out_f=out_f, rank=rank, dtype=str(dtype).replace("torch.", ""),
                keep=keep_kind, dropout=p)
    tol = TOL[dtype]
    name = f"{M}x{in_f}->{out_f} r{rank} {info['dtype']} keep={keep_kind} p={p}"
    rep.check(group, name + " y", y, yr, tol, **info)
    rep.check(group, name + " dx", xg.grad, xr.grad, tol, **info)
    rep.check(group, name + " dA", Ag.grad, Ar.grad, tol, **info)
    rep.check(group, name + " dB", Bg.grad, Br.grad, tol, **info)
    if keep is not None:
        skipped = torch.ones(out_f, dtype=torch.bool, device=device)
        skipped[keep] = False
        rep.flag(group, name + " skipped channels exact zero",
                 bool((y[:, skipped] == 0).all()) and bool((Bg.grad[skipped] == 0).all()), **info)


def lora_cases(smoke: bool):
    """(M, in, out, rank, dtype, keep, dropout) cases."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if smoke:
        return [
            (37, 53, 70, 8, fp32, None, 0.0),
            (37, 53, 70, 64, bf16, "half", 0.0),
            (33, 40, 61, 16, fp16, "unsorted", 0.0),
            (33, 40, 61, 8, fp32, "odd", 0.25),
            (20, 48, 35, 33, bf16, "odd", 0.1),
        ]
    M = 512
    cases = [(M, i, o, r, dt, None, 0.0) for _, i, o in LLAMA7B for dt in (bf16, fp16, fp32) for r in (8, 16, 64)]
    cases += [(M, 4096, 11008, 16, bf16, k, 0.0) for k in ("half", "unsorted", "odd")]
    cases += [(M, 11008, 4096, 64, fp16, "unsorted", 0.0)]
    cases += [(333, 4103, 11013, 16, bf16, "odd", 0.0), (333, 4103, 1000, 8, fp32, None, 0.0),
              (257, 11001, 4095, 64, bf16, "half", 0.0)]
    cases += [(M, 4096, 4096, 16, bf16, None, 0.05), (M, 4096, 11008, 64, bf16, "unsorted", 0.1),
              (333, 4103, 4097, 8, fp32, "odd", 0.1)]
    return cases


def check_huge(rep: Report, device):
    """M * in > 2**31: int64 row bases.  Rows at both ends of y and dx against fp64."""
    M, in_f, out_f, r = (2**31 // 4096) + 4096, 4096, 4096, 16
    dt = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(5)
    x = torch.randn(M, in_f, device=device, dtype=dt, generator=gen)
    W = torch.randn(out_f, in_f, device=device, dtype=dt, generator=gen) / 64
    A = torch.randn(r, in_f, device=device, generator=gen) / 64
    B = torch.randn(out_f, r, device=device, generator=gen)
    gy = torch.randn(M, out_f, device=device, dtype=dt, generator=gen)
    keep = torch.randperm(out_f, device=device)[: out_f // 2]
    xg = x.requires_grad_()
    with use_backend("triton"):
        y = lora_linear(xg, W, A, B, 2.0, keep=keep)
    y.backward(gy)
    for lo, hi in ((0, 64), (M - 64, M)):
        xs = x.detach()[lo:hi]
        ref = lora_ref64(xs, W, A, B, 2.0, None, keep, None, 0.0)
        rep.check("huge", f"y rows {lo}:{hi}", y[lo:hi], ref, TOL[dt], M=M, elements=M * in_f)
        sel = torch.zeros(out_f, device=device, dtype=torch.float64)
        sel[keep] = 1
        gk = gy[lo:hi].double() * sel
        dx_ref = gk @ W.double() + 2.0 * (gk @ B.double()) @ A.double()
        rep.check("huge", f"dx rows {lo}:{hi}", xg.grad[lo:hi], dx_ref, TOL[dt], M=M)
    del x, xg, y, gy


def check_determinism(rep: Report, device, smoke: bool):
    M, in_f, out_f, r = (41, 53, 70, 8) if smoke else (2048, 4096, 11008, 16)
    gen = torch.Generator().manual_seed(9)
    dt = torch.bfloat16
    x = torch.randn(M, in_f, generator=gen).to(device, dt)
    W = torch.randn(out_f, in_f, generator=gen).to(device, dt)
    A, gA = (torch.randn(r, in_f, generator=gen).to(device) for _ in range(2))
    B, gB = (torch.randn(out_f, r, generator=gen).to(device) for _ in range(2))
    gy = torch.randn(M, out_f, generator=gen).to(device, dt)
    keep = torch.randperm(out_f, generator=gen)[: out_f // 2 + 3].to(device)

    def once():
        xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
        torch.manual_seed(7)
        with use_backend("triton"):
            y = lora_linear(xg, W, Ag, Bg, 2.0, keep=keep, dropout=0.1)
            y.backward(gy)
            rs, cs = group_importance(W, A, B, gA, gB, 2.0)
        return [y, xg.grad, Ag.grad, Bg.grad, rs, cs]

    a, b = once(), once()
    names = ["y", "dx", "dA", "dB", "importance rows", "importance cols"]
    for n, u, v in zip(names, a, b):
        rep.flag("determinism", n, torch.equal(u, v))


def check_importance_merge(rep: Report, device, smoke: bool):
    shapes = [(70, 53, 8), (61, 40, 64)] if smoke else [(o, i, r) for _, i, o in LLAMA7B for r in (8, 64)]
    for dt in (torch.bfloat16, torch.float32):
        for out_f, in_f, r in shapes:
            gen = torch.Generator().manual_seed(out_f + r)
            W = torch.randn(out_f, in_f, generator=gen).to(device, dt)
            A, gA = (torch.randn(r, in_f, generator=gen).to(device) for _ in range(2))
            B, gB = (torch.randn(out_f, r, generator=gen).to(device) for _ in range(2))
            with use_backend("triton"):
                rows, cols = group_importance(W, A, B, gA, gB, 0.5)
                keep = torch.randperm(out_f, generator=gen)[: out_f // 2].to(device)
                Wm = merge_gather(W, A, B, 0.5, rows=keep)
            rr, cr = importance_ref(W, A, B, gA, gB, 0.5)
            name = f"{out_f}x{in_f} r{r} {str(dt).replace('torch.', '')}"
            tol = 2e-5 if not torch.backends.cuda.matmul.allow_tf32 else 3e-3
            rep.check("importance", name + " rows", rows, rr, tol)
            rep.check("importance", name + " cols", cols, cr, tol)
            rep.check("merge_gather", name, Wm, merge_gather_ref(W, A, B, 0.5, rows=keep), TOL[dt])


# ---------------------------------------------------------------------------
# pruning step
# ---------------------------------------------------------------------------

def check_prune(rep: Report, device, smoke: bool):
    import transformers

    import loraprune
    from loraprune.kernels import torch_ops

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32 if smoke else 256, intermediate_size=48 if smoke else 688,
        num_hidden_layers=1 if smoke else 2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device)
    gen = torch.Generator().manual_seed(0)
    seq = 8 if smoke else 64
    batches = [{"input_ids": torch.randint(0, 128, (2, seq), generator=gen)} for _ in range(2 if smoke else 3)]
    calls = {"triton": 0, "twin": 0, "importance_triton": 0}
    patched = []

    def spy(mod, name, key):
        real = getattr(mod, name)

        def wrapper(*a, **k):
            calls[key] += 1
            return real(*a, **k)

        setattr(mod, name, wrapper)
        patched.append((mod, name, real))

    from loraprune.kernels import triton_importance
    spy(tll, "lora_linear_forward", "triton")
    spy(torch_ops, "lora_linear_forward_torch", "twin")
    spy(triton_importance, "group_importance", "importance_triton")
    t0 = time.time()
    try:
        with use_backend("triton" if smoke else "auto"):
            # the lora criterion: it is the one that runs the Triton importance kernel
            pruned = loraprune.prune(model, batches, ratio=0.5, criterion="lora", steps=2 if smoke else 8,
                                     lora_dropout=0.05, seq_len=seq, batch_size=2, progress=False)
    finally:
        for mod, name, real in patched:
            setattr(mod, name, real)
    ok = calls["triton"] > 0 and calls["twin"] == 0 and calls["importance_triton"] > 0
    rep.flag("prune", "small LLaMA pruning step runs the Triton paths", ok, calls=calls,
             achieved_ratio=pruned.config.loraprune.get("achieved_ratio"), seconds=round(time.time() - t0, 2))


# ---------------------------------------------------------------------------
# scale: bench/scale.py at Llama-3-8B layer shapes
# ---------------------------------------------------------------------------

def scale_settings(smoke: bool) -> dict:
    if smoke:
        return dict(cases=[("tiny", 2), ("tiny", 3)], dtype=torch.float32, tokens=(2, 32),
                    kw=dict(steps=5, start=2, end=3, mem_steps=3,
                            speed=dict(prefill_batch=1, prefill_seq=16, decode_prompt=4, decode_tokens=2, rounds=2)))
    return dict(cases=[("llama-3-8b", 2), ("llama-3-8b", 4)], dtype=torch.bfloat16, tokens=(4, 512),
                kw=dict(steps=10, start=4, end=5, mem_steps=3,
                        speed=dict(prefill_batch=4, prefill_seq=512, decode_prompt=16, decode_tokens=32, rounds=5)))


def check_scale(rep: Report, device, smoke: bool, results: dict) -> None:
    """bench/scale.py's cases; fills ``results`` (``cases``, ``extrapolation``, ``markdown``)."""
    from bench import scale

    st = scale_settings(smoke)
    cases = []
    for name, layers in st["cases"]:
        c = scale.run_case(name, layers, device, st["dtype"], st["tokens"], **st["kw"])
        cases.append(c)
        label = f"{name}:{layers}"
        sc, mem = c["step_cost"], c["memory"]["measured"]
        ratios = [sc["before"]["median_ratio"], sc["after"]["median_ratio"],
                  c["prefill"]["models"]["compacted 50%"]["speedup"], c["decode"]["models"]["compacted 50%"]["speedup"]]
        rep.flag("scale", f"{label} measured", all(r is not None and math.isfinite(r) and r > 0 for r in ratios)
                 and mem["training_steps"] > 0 and abs(c["achieved_ratio"] - 0.5) < 0.05,
                 step_before=ratios[0], step_after=ratios[1], prefill=ratios[2], decode=ratios[3],
                 achieved_ratio=c["achieved_ratio"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["cases"] = cases
    results["extrapolation"] = scale.extrapolate(cases)
    results["markdown"] = scale.markdown(cases, results["extrapolation"])
    print(results["markdown"], flush=True)


# ---------------------------------------------------------------------------
# speed (GPU only)
# ---------------------------------------------------------------------------

def _peaks():
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), (None, None))


def _kernel_times(fn, iters=5) -> dict:
    """Mean device µs per call of every CUDA kernel ``fn`` launches (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            out[ev.key[:60]] = round(t / iters, 2)
    return out


def bench_speed(device) -> list[dict]:
    import torch.nn.functional as F
    from triton.testing import do_bench

    peak_tf, hbm = _peaks()
    rows = []
    M, r, s, dt = 4096, 16, 2.0, torch.bfloat16
    for name, in_f, out_f in LLAMA7B:
        x = torch.randn(M, in_f, device=device, dtype=dt)
        W = torch.randn(out_f, in_f, device=device, dtype=dt) / 64
        A = torch.randn(r, in_f, device=device) / 64
        B = torch.randn(out_f, r, device=device)
        gy = torch.randn(M, out_f, device=device, dtype=dt)
        keep = torch.randperm(out_f, device=device)[: out_f // 2].sort().values
        flops = 2 * M * in_f * out_f

        def cublas():
            return F.linear(x, W)

        def unsloth_fwd():
            out = F.linear(x, W)
            xa = x @ A.to(dt).t()
            return out.addmm_(xa, B.to(dt).t(), alpha=s)

        def peft_fwd():
            return F.linear(x, W) + s * F.linear(F.linear(x.float(), A), B).to(dt)

        def fused_fwd(k=None):
            with use_backend("triton"):
                return lora_linear(x, W, A, B, s, keep=k)

        xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))

        def fused_step(k=None):
            with use_backend("triton"):
                lora_linear(xg, W, Ag, Bg, s, keep=k, dropout=0.05).backward(gy)

        drop = torch.nn.Dropout(0.05)

        def peft_step():
            y = F.linear(xg, W) + s * F.linear(F.linear(drop(xg).float(), Ag), Bg).to(dt)
            y.backward(gy)

        def masked_peft_step():
            y = F.linear(xg, W) + s * F.linear(F.linear(drop(xg).float(), Ag), Bg).to(dt)
            sel = torch.zeros(out_f, device=device, dtype=dt)
            sel[keep] = 1
            (y * sel).backward(gy)

        t = {k: do_bench(f) * 1e3 for k, f in (
            ("cublas_linear_fwd", cublas), ("unsloth_addmm_fwd", unsloth_fwd), ("peft_fwd", peft_fwd),
            ("fused_fwd", fused_fwd), ("fused_fwd_keep50", lambda: fused_fwd(keep)),
            ("peft_fwd_bwd", peft_step), ("fused_fwd_bwd", fused_step),
            ("peft_masked_fwd_bwd", masked_peft_step), ("fused_fwd_bwd_keep50", lambda: fused_step(keep)))}
        row = {"layer": name, "M": M, "in": in_f, "out": out_f, "rank": r, "us": t,
               "fused_fwd_TFLOPs": flops / t["fused_fwd"] / 1e6,
               "cublas_fwd_TFLOPs": flops / t["cublas_linear_fwd"] / 1e6,
               "fused_over_unsloth_fwd": t["unsloth_addmm_fwd"] / t["fused_fwd"],
               "fused_over_peft_step": t["peft_fwd_bwd"] / t["fused_fwd_bwd"],
               "keep50_per_kept_flop_vs_dense": (t["fused_fwd_bwd"] / 2) / t["fused_fwd_bwd_keep50"],
               "kernels_fwd_bwd_keep50_us": _kernel_times(lambda: fused_step(keep))}
        if peak_tf:
            row["fused_fwd_frac_peak"] = row["fused_fwd_TFLOPs"] / peak_tf
            row["cublas_fwd_frac_peak"] = row["cublas_fwd_TFLOPs"] / peak_tf

        gA, gB = torch.randn_like(A), torch.randn_like(B)
        with use_backend("triton"):
            t_imp = do_bench(lambda: group_importance(W, A, B, gA, gB, s)) * 1e3
        from bench.common import importance_eager_fp32
        t_eager = do_bench(lambda: importance_eager_fp32(W, A, B, gA, gB, s)) * 1e3
        w_bytes = W.numel() * W.element_size()
        row.update(importance_us=t_imp, importance_eager_us=t_eager, importance_GBps=w_bytes / t_imp / 1e3,
                   importance_speedup=t_eager / t_imp)
        if hbm:
            row["importance_frac_hbm"] = row["importance_GBps"] / hbm
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels_fwd_bwd_keep50_us"}), flush=True)
        x = W = gy = xg = None  # free this layer's tensors before the next one's
    return rows


# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; CPU under the Triton interpreter")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--no-speed", action="store_true", help="skip the speed part")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device; run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    rep = Report()
    t0 = time.time()
    timings = {}
    scale_results: dict = {}
    for label, fn in (
        ("lora_linear", lambda: [run_lora_case(rep, device, *c) for c in lora_cases(args.smoke)]),
        ("huge", (lambda: check_huge(rep, device)) if cuda and not args.smoke else None),
        ("determinism", lambda: check_determinism(rep, device, args.smoke)),
        ("importance_merge", lambda: check_importance_merge(rep, device, args.smoke)),
        ("prune", lambda: check_prune(rep, device, args.smoke)),
        ("scale", lambda: check_scale(rep, device, args.smoke, scale_results)),
    ):
        t1 = time.time()
        if fn is None:
            timings[label] = "skipped (needs a GPU, not --smoke)"
            continue
        try:
            fn()
        except Exception as exc:  # a crash is a correctness failure, recorded and reported
            rep.flag(label, "raised", False, error=f"{type(exc).__name__}: {exc}"[:500])
        timings[label] = round(time.time() - t1, 2)
        if cuda:
            torch.cuda.empty_cache()
    speed = []
    if cuda and not args.smoke and not args.no_speed:
        t1 = time.time()
        speed = bench_speed(device)
        timings["speed"] = round(time.time() - t1, 2)
    result = {
        "mode": "smoke" if args.smoke else "full",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}), Triton interpreter",
        "triton": triton.__version__, "torch": torch.__version__,
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "ok": rep.ok, "n_checks": len(rep.checks), "n_failed": sum(not c["ok"] for c in rep.checks),
        "seconds": round(time.time() - t0, 1), "seconds_per_part": timings,
        "checks": rep.checks, "speed": speed, "scale": scale_results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    if scale_results.get("markdown"):
        md = Path(str(args.out) + ".scale.md")  # the table bench/README.md takes as it is
        md.write_text(f"`python bench/gpu_check.py{' --smoke' if args.smoke else ''}` — {result['device']}, "
                      f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n\n" + scale_results["markdown"])
    print(f"gpu_check ({result['mode']}, {result['device']}): {result['n_checks']} checks, "
          f"{result['n_failed']} failed, {result['seconds']}s -> {args.out}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
