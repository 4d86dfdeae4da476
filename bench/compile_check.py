"""Ahead-of-time compile every Triton kernel for sm_80 and sm_90; report resources.

    python -m bench.compile_check [--json PATH] [--arch 80 90] [--dtype fp16 ...]

No GPU is needed: ``triton.compile`` with an explicit ``GPUTarget`` runs the full
pipeline down to a cubin with the ptxas bundled with triton.  It compiles the
variants that launch: weights fp16/bf16/fp32 with fp32 LoRA factors (LoRALinear
keeps A/B in fp32), ranks 8/16/32/64 (ranks with the same padded BLOCK_R share a
compile), with and without ``keep``, dropout and bias on, LoRA dots at torch's
default precision (TF32 off -> tf32x3).  For each it prints registers, spills,
shared memory and the CTAs that fit per SM (and the resource that limits
them), using the same tile table (``triton_common``) the launchers use.

* registers / spills / stack: parsed from ptxas' own ``-v`` report (triton runs
  ptxas with ``-v``; ``TRITON_DUMP_PTXAS_LOG`` makes it print it, which we capture),
  registers cross-checked against ``cuobjdump --dump-resource-usage`` on the cubin.
* shared memory: ``compiled.metadata.shared`` (what triton requests at launch).

Exit status is non-zero when any variant fails to compile, spills registers,
or asks for more shared memory per block than its target has (sm_80: 163 KiB,
sm_90: 227 KiB).
It needs real ``JITFunction``s, so it refuses the Triton interpreter: if
``TRITON_INTERPRET`` is set, the process re-executes itself without it.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
    # @triton.jit decides interpreter-vs-compiler at decoration time: start over cleanly.
    _env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "bench.compile_check", *sys.argv[1:]], _env)

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

from loraprune.kernels import triton_importance, triton_lora_linear, triton_merge_gather  # noqa: E402
from loraprune.kernels.triton_common import INTERPRETING, rank_block, rank_chunk, tile_config  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
#: LoRA ranks compiled; ranks with the same padded BLOCK_R share one compile.
RANKS = (8, 16, 32, 64)
#: LoRALinear keeps A/B (and so dA/dB) in fp32 whatever the weight dtype.
FACTOR_DTYPE = "fp32"
FLOAT_ARGS = ("scaling", "p", "inv_keep_prob")

D = "D"  # placeholder: the weight / activation dtype being compiled
F = "F"  # placeholder: the LoRA factor dtype (FACTOR_DTYPE)

#: per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)
#: and per-SM shared memory / registers / threads, for the occupancy estimate.
ARCH_LIMITS = {
    80: dict(smem_block=166912, smem_sm=167936, regs_sm=65536, threads_sm=2048, ctas_sm=32),
    90: dict(smem_block=232448, smem_sm=233472, regs_sm=65536, threads_sm=2048, ctas_sm=32),
}
#: sm_86 / sm_89 (RTX 30xx/40xx, A10, L4, L40) run the sm_8x tile table with 99 KiB per block.
SM86_SMEM_BLOCK = 101376
#: shared memory the driver reserves per CTA on sm_80+.
CTA_RESERVED_SMEM = 1024


def ctas_per_sm(arch: int, regs: int, num_warps: int, shared: int) -> dict:
    """CTAs of one kernel that fit on an SM, and which resource limits them."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated in 256-register units per warp
    by_regs = (lim["regs_sm"] // regs_per_warp) // num_warps
    by_smem = lim["smem_sm"] // (shared + CTA_RESERVED_SMEM)
    by_threads = lim["threads_sm"] // (32 * num_warps)
    limits = {"regs": by_regs, "smem": by_smem, "threads": by_threads, "hw": lim["ctas_sm"]}
    n = min(limits.values())
    return {"ctas_per_sm": n, "occupancy_limit": min(limits, key=limits.get)}


@dataclass
class KernelSpec:
    """How to type one kernel's arguments for an AOT compile.

    ``unit_strides`` are innermost strides that the JIT would specialise to 1;
    ``aligned`` ints are hinted divisible by 16 (as the JIT does for LLaMA sizes).
    ``flags``: constexprs fixed to the heaviest setting (bias, dropout on);
    ``keep_flag``: the constexpr compiled both on and off; ``ranked``: whether
    BLOCK_R (and BLOCK_RC) vary with the rank.
    """

    name: str
    fn: object
    config: str
    pointers: dict
    unit_strides: tuple = ()
    aligned: tuple = ()
    flags: dict = field(default_factory=dict)
    keep_flag: str | None = None
    ranked: bool = True
    dtype_independent: bool = False


def _specs() -> list[KernelSpec]:
    ll, imp, mg = triton_lora_linear, triton_importance, triton_merge_gather
    lora = {"LORA_PRECISION": "tf32x3"}  # torch's default: allow_tf32 off
    return [
        KernelSpec("lora_down", ll.lora_down_kernel, "lora_down",
                   {"x_ptr": D, "a_ptr": F, "xa_ptr": "fp32"},
                   ("stride_xk", "stride_ak"), ("stride_xm", "stride_ar", "K"),
                   dict(HAS_DROPOUT=True, **lora)),
        KernelSpec("lora_linear_fwd", ll.lora_linear_fwd_kernel, "lora_linear_fwd",
                   {"x_ptr": D, "w_ptr": D, "lora_b_ptr": F, "xa_ptr": "fp32", "bias_ptr": D,
                    "keep_ptr": "i64", "y_ptr": D},
                   ("stride_xk", "stride_wk", "stride_br", "stride_yn"),
                   ("stride_xm", "stride_wn", "stride_ym", "K"),
                   dict(HAS_BIAS=True, NATIVE_DOT=True), keep_flag="HAS_KEEP"),
        KernelSpec("gather_columns", ll.gather_columns_kernel, "gather_columns",
                   {"src_ptr": D, "idx_ptr": "i64", "dst_ptr": D},
                   ("stride_sn",), ("stride_sm", "stride_dm"), ranked=False),
        KernelSpec("lora_grad_xa", ll.lora_grad_xa_kernel, "lora_grad_xa",
                   {"g_ptr": D, "lora_b_ptr": F, "keep_ptr": "i64", "dxa_ptr": "fp32"},
                   ("stride_br",), ("stride_gm",), dict(lora), keep_flag="HAS_KEEP"),
        KernelSpec("lora_grad_b", ll.lora_grad_b_kernel, "lora_grad_b",
                   {"g_ptr": D, "xa_ptr": "fp32", "keep_ptr": "i64", "db_ptr": F},
                   ("stride_dbr",), ("stride_gm",), dict(lora), keep_flag="HAS_KEEP"),
        KernelSpec("lora_grad_a", ll.lora_grad_a_kernel, "lora_grad_a",
                   {"x_ptr": D, "dxa_ptr": "fp32", "da_ptr": F},
                   ("stride_xk", "stride_dak"), ("stride_xm", "stride_dar", "K"),
                   dict(HAS_DROPOUT=True, **lora)),
        KernelSpec("lora_grad_x", ll.lora_grad_x_kernel, "lora_grad_x",
                   {"g_ptr": D, "w_ptr": D, "a_ptr": F, "dxa_ptr": "fp32", "keep_ptr": "i64", "dx_ptr": D},
                   ("stride_wk", "stride_ak", "stride_dxk"),
                   ("stride_gm", "stride_wn", "stride_ar", "stride_dxm", "K"),
                   dict(HAS_DROPOUT=True, NATIVE_DOT=True), keep_flag="HAS_KEEP"),
        KernelSpec("importance_partials", imp.importance_partials_kernel, "importance_partials",
                   {"w_ptr": D, "a_ptr": F, "b_ptr": F, "ga_ptr": F, "gb_ptr": F,
                    "row_part_ptr": "fp32", "col_part_ptr": "fp32"},
                   ("stride_wi", "stride_ai", "stride_br", "stride_gai", "stride_gbr"),
                   ("stride_wo", "stride_ar", "stride_gar", "stride_row_part", "stride_col_part", "OUT", "IN"),
                   dict(SQUARE=False, DOT_PRECISION="tf32x3")),
        KernelSpec("sum_partials", imp.sum_partials_kernel, "sum_partials",
                   {"part_ptr": "fp32", "out_ptr": "fp32"}, (), ("stride_p", "N"), {},
                   ranked=False, dtype_independent=True),
        KernelSpec("merge_gather", mg.merge_gather_kernel, "merge_gather",
                   {"w_ptr": D, "a_ptr": F, "b_ptr": F, "rows_ptr": "i64", "cols_ptr": "i64", "out_ptr": D},
                   ("stride_wi", "stride_ai", "stride_br"), ("stride_wo", "stride_ar", "stride_om"),
                   dict(HAS_ROWS=True, HAS_COLS=True, HAS_LORA=True)),
    ]


def rank_constexprs(spec: KernelSpec, rank: int) -> dict:
    """BLOCK_R (and the importance kernel's BLOCK_RC) for ``rank``."""
    if not spec.ranked:
        return {}
    values = {"BLOCK_R": rank_block(rank), "BLOCK_RC": rank_chunk(rank), "RANK_CHUNK": rank_chunk(rank)}
    return {k: v for k, v in values.items() if k in spec.fn.arg_names}


def main_precision(spec: KernelSpec, dtype: str) -> dict:
    """Precisions as launched with torch's defaults (TF32 off): the weight GEMM
    (fp32: IEEE) and the rank-r term of a y / dx tile (fp32: tf32x3, else tf32)."""
    out = {}
    if "DOT_PRECISION" in spec.fn.arg_names and "DOT_PRECISION" not in spec.flags:
        out["DOT_PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
    if "UP_PRECISION" in spec.fn.arg_names:
        out["UP_PRECISION"] = "tf32x3" if dtype == "fp32" else "tf32"
    return out


def build_source(spec: KernelSpec, dtype: str, arch: int, rank: int = 8, keep: bool = True):
    """(ASTSource, launch options) for ``spec`` with weight ``dtype``, fp32 factors, on ``arch``."""
    elem_size = 4 if dtype == "fp32" else 2
    config = tile_config(spec.config, elem_size, arch // 10, block_r=rank_block(rank))
    options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
    constexprs = {**spec.flags, **main_precision(spec, dtype), **rank_constexprs(spec, rank), **config}
    if spec.keep_flag:
        constexprs[spec.keep_flag] = bool(keep)
    for name in spec.unit_strides:
        constexprs[name] = 1
    signature, attrs = {}, {}
    for i, name in enumerate(spec.fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in spec.pointers:
            ptr = {D: dtype, F: FACTOR_DTYPE}.get(spec.pointers[name], spec.pointers[name])
            signature[name] = "*" + ptr
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


def variants(spec: KernelSpec, dtypes, ranks, keeps=(True, False), arch: int = 90) -> list[tuple]:
    """(dtype, ranks sharing one compile, keep) of ``spec`` to compile on ``arch``.
    Ranks share a compile when their rank constexprs and tile configuration agree."""
    out = []
    for dtype in (["fp32"] if spec.dtype_independent else dtypes):
        by_block: dict = {}
        for rank in (ranks if spec.ranked else ranks[:1]):
            tiles = tile_config(spec.config, 4 if dtype == "fp32" else 2, arch // 10, block_r=rank_block(rank))
            key = (tuple(sorted(rank_constexprs(spec, rank).items())), tuple(sorted(tiles.items())))
            by_block.setdefault(key, []).append(rank)
        for group in by_block.values():
            for keep in (keeps if spec.keep_flag else (None,)):
                out.append((dtype, tuple(group) if spec.ranked else (), keep))
    return out


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


def compile_one(spec: KernelSpec, dtype: str, arch: int, ranks: tuple = (8,), keep: bool | None = None) -> dict:
    row = {"kernel": spec.name, "arch": f"sm_{arch}", "dtype": dtype,
           "factors": FACTOR_DTYPE if spec.ranked else "-", "ranks": list(ranks), "keep": keep}
    try:
        src, options = build_source(spec, dtype, arch, ranks[0] if ranks else 8, bool(keep))
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
        row.update(ctas_per_sm(arch, row["regs"], row["num_warps"], row["shared"]))
        row["smem_limit"] = ARCH_LIMITS[arch]["smem_block"]
        row["fits_sm86"] = row["shared"] <= SM86_SMEM_BLOCK if arch == 80 else None
    except Exception as exc:  # report and keep going: the table shows every failure
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    return row


def _init_worker() -> None:
    knobs.nvidia.dump_ptxas_log = True  # triton prints ptxas -v output, captured per compile
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report


def _compile_by_name(job: tuple) -> dict:
    name, dtype, arch, ranks, keep = job
    _init_worker()
    spec = next(s for s in _specs() if s.name == name)
    return compile_one(spec, dtype, arch, ranks, keep)


def problems(row: dict) -> list[str]:
    """Why a compiled variant would fail or run badly on its target: empty when fine."""
    if not row["ok"]:
        return ["compile failed"]
    out = []
    if row["spills"] > 0:
        out.append(f"spills {row['spills']} B")
    if row["shared"] > row["smem_limit"]:
        out.append(f"smem {row['shared']} B > {row['smem_limit']} B")
    if row["ctas_per_sm"] < 1:
        out.append("0 CTAs fit per SM")
    return out


def _format(rows: list[dict]) -> str:
    head = (f"{'kernel':<20}{'arch':<6}{'dtype':<6}{'ranks':<9}{'keep':<5}{'regs':>5}{'spills':>7}{'smem(B)':>8}"
            f"{'CTA/SM':>7}{'limit':>8}{'w/s':>5}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        ranks = "/".join(map(str, r["ranks"])) or "-"
        keep = "-" if r["keep"] is None else ("yes" if r["keep"] else "no")
        lead = f"{r['kernel']:<20}{r['arch']:<6}{r['dtype']:<6}{ranks:<9}{keep:<5}"
        if r["ok"]:
            bad = problems(r)
            status = "OK" if not bad else "FAIL: " + "; ".join(bad)
            lines.append(f"{lead}{r['regs']:>5}{r['spills']:>7}{r['shared']:>8}{r['ctas_per_sm']:>7}"
                         f"{r['occupancy_limit']:>8}{r['num_warps']:>3}/{r['num_stages']}  {status}")
        else:
            lines.append(f"{lead}  FAILED: {r['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--rank", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--keep", choices=("both", "on", "off"), default="both",
                        help="variants of the kernels with a keep flag")
    parser.add_argument("--kernel", nargs="+", default=None, help="subset of kernel names")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    args = parser.parse_args(argv)
    if INTERPRETING:  # only possible if the env var sneaked in some other way
        print("compile_check: kernels were decorated under TRITON_INTERPRET; unset it", file=sys.stderr)
        return 2

    specs = [s for s in _specs() if args.kernel is None or s.name in args.kernel]
    keeps = {"both": (True, False), "on": (True,), "off": (False,)}[args.keep]
    jobs = [(spec.name, dtype, arch, ranks, keep) for spec in specs for arch in args.arch
            for dtype, ranks, keep in variants(spec, args.dtype, args.rank, keeps, arch)]
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
    bad = [r for r in rows if r["ok"] and problems(r)]
    print(f"\n{len(rows)} compilations in {time.time() - t0:.1f}s: {len(failed)} failed to compile, "
          f"{len(bad)} spill or exceed shared memory (triton {triton.__version__}; factors {FACTOR_DTYPE})")
    over86 = sorted({(r["kernel"], r["dtype"]) for r in rows if r.get("fits_sm86") is False})
    if over86:
        print(f"note: over the 99 KiB per block of sm_86/sm_89: {over86}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "factors": FACTOR_DTYPE, "limits": ARCH_LIMITS,
                       "rows": rows}, f, indent=1)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
