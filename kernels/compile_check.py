"""Ahead-of-time compile every Triton kernel for sm_80 and sm_90; report resources.

    python -m loraprune.kernels.compile_check [--json PATH] [--arch 80 90] [--dtype fp16 ...]

No GPU is needed: ``triton.compile`` with an explicit ``GPUTarget`` runs the full
pipeline down to a cubin with the ptxas bundled with triton.  For every kernel
x arch x storage dtype it prints registers, spills and shared memory, using
the same tile table (``triton_common``) the launchers use on those GPUs.

* registers / spills / stack: parsed from ptxas' own ``-v`` report (triton runs
  ptxas with ``-v``; ``TRITON_DUMP_PTXAS_LOG`` makes it print it, which we capture),
  registers cross-checked against ``cuobjdump --dump-resource-usage`` on the cubin.
* shared memory: ``compiled.metadata.shared`` (what triton requests at launch).

Exit status is non-zero when any kernel fails to compile or spills.
It needs real ``JITFunction``s, so it refuses the Triton interpreter: if
``TRITON_INTERPRET`` is set, the process re-executes itself without it.
"""
from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
    # @triton.jit decides interpreter-vs-compiler at decoration time: start over cleanly.
    _env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "loraprune.kernels.compile_check", *sys.argv[1:]], _env)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import triton_importance, triton_lora_linear, triton_merge_gather  # noqa: E402
from .triton_common import INTERPRETING, rank_block, tile_config  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
REPRESENTATIVE_RANK = 8  # LoRA rank -> BLOCK_R = BLOCK_R2 = 16
FLOAT_ARGS = ("scaling", "p", "inv_keep_prob")

D = "D"  # placeholder: the storage dtype being compiled


@dataclass
class KernelSpec:
    """How to type one kernel's arguments for an AOT compile.

    ``unit_strides`` are innermost strides that the JIT would specialise to 1;
    ``aligned`` ints are hinted divisible by 16 (as the JIT does for LLaMA sizes).
    Constexpr flags pick the heaviest variant (keep, bias, dropout on).
    """

    name: str
    fn: object
    config: str
    pointers: dict
    unit_strides: tuple = ()
    aligned: tuple = ()
    constexprs: dict = field(default_factory=dict)
    dtype_independent: bool = False


def _specs() -> list[KernelSpec]:
    ll, imp, mg = triton_lora_linear, triton_importance, triton_merge_gather
    br = rank_block(REPRESENTATIVE_RANK)
    return [
        KernelSpec("lora_down", ll.lora_down_kernel, "lora_down",
                   {"x_ptr": D, "a_ptr": D, "xa_ptr": "fp32"},
                   ("stride_xk", "stride_ak"), ("stride_xm", "stride_ar", "K"),
                   dict(HAS_DROPOUT=True, BLOCK_R=br)),
        KernelSpec("lora_linear_fwd", ll.lora_linear_fwd_kernel, "lora_linear_fwd",
                   {"x_ptr": D, "w_ptr": D, "lora_b_ptr": D, "xa_ptr": "fp32", "bias_ptr": D,
                    "keep_ptr": "i64", "y_ptr": D},
                   ("stride_xk", "stride_wk", "stride_br", "stride_yn"),
                   ("stride_xm", "stride_wn", "stride_ym", "K"),
                   dict(HAS_BIAS=True, HAS_KEEP=True, NATIVE_DOT=True, DOT_PRECISION="tf32", BLOCK_R=br)),
        KernelSpec("lora_grad_xa", ll.lora_grad_xa_kernel, "lora_grad_xa",
                   {"g_ptr": D, "lora_b_ptr": D, "keep_ptr": "i64", "dxa_ptr": "fp32"},
                   ("stride_gn", "stride_br"), ("stride_gm",),
                   dict(HAS_KEEP=True, BLOCK_R=br)),
        KernelSpec("lora_grad_b", ll.lora_grad_b_kernel, "lora_grad_b",
                   {"g_ptr": D, "xa_ptr": "fp32", "keep_ptr": "i64", "db_ptr": D},
                   ("stride_gn", "stride_dbr"), ("stride_gm",),
                   dict(HAS_KEEP=True, BLOCK_R=br)),
        KernelSpec("lora_grad_a", ll.lora_grad_a_kernel, "lora_grad_a",
                   {"x_ptr": D, "dxa_ptr": "fp32", "da_ptr": D},
                   ("stride_xk", "stride_dak"), ("stride_xm", "stride_dar", "K"),
                   dict(HAS_DROPOUT=True, BLOCK_R=br)),
        KernelSpec("lora_grad_x", ll.lora_grad_x_kernel, "lora_grad_x",
                   {"g_ptr": D, "w_ptr": D, "a_ptr": D, "dxa_ptr": "fp32", "keep_ptr": "i64", "dx_ptr": D},
                   ("stride_gn", "stride_wk", "stride_ak", "stride_dxk"),
                   ("stride_gm", "stride_wn", "stride_ar", "stride_dxm", "K"),
                   dict(HAS_KEEP=True, HAS_DROPOUT=True, NATIVE_DOT=True, DOT_PRECISION="tf32", BLOCK_R=br)),
        KernelSpec("importance_partials", imp.importance_partials_kernel, "importance_partials",
                   {"w_ptr": D, "a_ptr": D, "b_ptr": D, "ga_ptr": D, "gb_ptr": D,
                    "row_part_ptr": "fp32", "col_part_ptr": "fp32"},
                   ("stride_wi", "stride_ai", "stride_br", "stride_gai", "stride_gbr"),
                   ("stride_wo", "stride_ar", "stride_gar", "stride_row_part", "stride_col_part", "OUT", "IN"),
                   dict(SQUARE=False, DOT_PRECISION="tf32", BLOCK_R=br, BLOCK_R2=rank_block(2 * REPRESENTATIVE_RANK))),
        KernelSpec("sum_partials", imp.sum_partials_kernel, "sum_partials",
                   {"part_ptr": "fp32", "out_ptr": "fp32"}, (), ("stride_p", "N"), {},
                   dtype_independent=True),
        KernelSpec("merge_gather", mg.merge_gather_kernel, "merge_gather",
                   {"w_ptr": D, "a_ptr": D, "b_ptr": D, "rows_ptr": "i64", "cols_ptr": "i64", "out_ptr": D},
                   ("stride_wi", "stride_ai", "stride_br"), ("stride_wo", "stride_ar", "stride_om"),
                   dict(HAS_ROWS=True, HAS_COLS=True, HAS_LORA=True, BLOCK_R=br)),
    ]


def build_source(spec: KernelSpec, dtype: str, arch: int):
    """(ASTSource, launch options) for ``spec`` compiled with storage ``dtype`` on ``arch``."""
    elem_size = 4 if dtype == "fp32" else 2
    config = tile_config(spec.config, elem_size, arch // 10)
    options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
    constexprs = {**spec.constexprs, **config}
    for name in spec.unit_strides:
        constexprs[name] = 1
    signature, attrs = {}, {}
    for i, name in enumerate(spec.fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in spec.pointers:
            ptr = spec.pointers[name]
            signature[name] = "*" + (dtype if ptr == D else ptr)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in spec.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [n for n in constexprs if n not in spec.fn.arg_names]
    if missing:
        raise KeyError(f"{spec.name}: unknown constexpr(s) {missing}")
    return ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs), options


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_CUOBJ = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump_usage(cubin: bytes) -> dict:
    """Resource usage of the cubin per cuobjdump (shipped with triton)."""
    tool = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = _CUOBJ.search(out)
    if not m:
        return {}
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups())))


def compile_one(spec: KernelSpec, dtype: str, arch: int) -> dict:
    row = {"kernel": spec.name, "arch": f"sm_{arch}", "dtype": dtype}
    try:
        src, options = build_source(spec, dtype, arch)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        text = log.getvalue()
        regs = _PTXAS_REGS.search(text)
        spill = _PTXAS_SPILL.search(text)
        stack = _PTXAS_STACK.search(text)
        usage = _cuobjdump_usage(compiled.asm["cubin"])
        if regs is None and "regs" not in usage:
            raise RuntimeError("no register count from ptxas log nor cuobjdump")
        row.update(
            regs=int(regs.group(1)) if regs else usage["regs"],
            spill_stores=int(spill.group(1)) if spill else usage.get("local", 0),
            spill_loads=int(spill.group(2)) if spill else 0,
            stack=int(stack.group(1)) if stack else usage.get("stack", 0),
            shared=int(compiled.metadata.shared),
            num_warps=options["num_warps"], num_stages=options["num_stages"],
            cuobjdump_regs=usage.get("regs"), ok=True,
        )
        row["spills"] = row["spill_stores"] + row["spill_loads"]
    except Exception as exc:  # report and keep going: the table shows every failure
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    return row


def _init_worker() -> None:
    knobs.nvidia.dump_ptxas_log = True  # triton prints ptxas -v output, captured per compile
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report


def _compile_by_name(job: tuple) -> dict:
    name, dtype, arch = job
    _init_worker()
    spec = next(s for s in _specs() if s.name == name)
    return compile_one(spec, dtype, arch)


def _format(rows: list[dict]) -> str:
    head = f"{'kernel':<22}{'arch':<7}{'dtype':<6}{'regs':>5}{'spills':>8}{'stack':>7}{'smem(B)':>9}{'warps':>6}{'stages':>7}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["ok"]:
            status = "OK" if r["spills"] == 0 else "SPILL"
            lines.append(f"{r['kernel']:<22}{r['arch']:<7}{r['dtype']:<6}{r['regs']:>5}{r['spills']:>8}"
                         f"{r['stack']:>7}{r['shared']:>9}{r['num_warps']:>6}{r['num_stages']:>7}  {status}")
        else:
            lines.append(f"{r['kernel']:<22}{r['arch']:<7}{r['dtype']:<6}  FAILED: {r['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--kernel", nargs="+", default=None, help="subset of kernel names")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    args = parser.parse_args(argv)
    if INTERPRETING:  # only possible if the env var sneaked in some other way
        print("compile_check: kernels were decorated under TRITON_INTERPRET; unset it", file=sys.stderr)
        return 2

    specs = [s for s in _specs() if args.kernel is None or s.name in args.kernel]
    jobs = [(spec.name, dtype, arch) for spec in specs for arch in args.arch
            for dtype in (["fp32"] if spec.dtype_independent else args.dtype)]
    t0 = time.time()
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # fresh interpreters, no forked torch state
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            rows = list(pool.map(_compile_by_name, jobs))
    else:
        rows = [_compile_by_name(job) for job in jobs]
    print(_format(rows))
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and r["spills"] > 0]
    print(f"\n{len(rows)} compilations in {time.time() - t0:.1f}s: "
          f"{len(failed)} failed, {len(spilled)} spilled (triton {triton.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
