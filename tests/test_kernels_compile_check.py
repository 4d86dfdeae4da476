"""AOT compile of the Triton kernels for sm_80 and sm_90 (no GPU needed).

The full matrix (every kernel x fp16/bf16/fp32 weights x ranks 8-64 x keep on/off,
fp32 factors, both archs) runs as ``python -m bench.compile_check``
(minutes; its table is in loraprune/kernels/README.md).  Here: the variant set itself,
the failure rules, and the heaviest rank (64, keep on) compiled for both archs.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compile_check as cc

pytestmark = pytest.mark.slow  # trains, spawns subprocesses or compiles

ROOT = Path(__file__).resolve().parents[1]  # `python -m bench.…` runs from the repository root

KERNELS = ["lora_down", "lora_linear_fwd", "gather_columns", "lora_grad_xa", "lora_grad_b", "lora_grad_a",
           "lora_grad_x", "importance_partials", "sum_partials", "merge_gather"]


def test_variants_cover_what_launches():
    specs = {s.name: s for s in cc._specs()}
    assert sorted(specs) == sorted(KERNELS)
    # the forward walks the rank in chunks of 16: one compile serves ranks 8-64; keep on and off
    fwd = cc.variants(specs["lora_linear_fwd"], cc.DTYPES, cc.RANKS, arch=90)
    assert set(fwd) == {(d, (8, 16, 32, 64), k) for d in cc.DTYPES for k in (True, False)}
    # importance: BLOCK_R 16 (ranks 8, 16), 32 and 64 each compile
    imp = cc.variants(specs["importance_partials"], ["bf16"], cc.RANKS, arch=80)
    assert [r for _, r, _ in imp] == [(8, 16), (32,), (64,)]
    src, _ = cc.build_source(specs["lora_linear_fwd"], "bf16", 90, rank=64, keep=False)
    assert src.signature["lora_b_ptr"] == "*fp32" and src.signature["w_ptr"] == "*bf16"
    imp, _ = cc.build_source(specs["importance_partials"], "fp16", 80, rank=64)
    assert all(imp.signature[p] == "*fp32" for p in ("a_ptr", "b_ptr", "ga_ptr", "gb_ptr"))


def test_limits_fail_the_check():
    row = dict(ok=True, spills=0, shared=100_000, smem_limit=cc.ARCH_LIMITS[80]["smem_block"], ctas_per_sm=1)
    assert cc.problems(row) == []
    assert cc.problems({**row, "shared": 272 * 1024})  # the old r = 64 importance tile
    assert cc.problems({**row, "spills": 8})
    assert cc.problems({**row, "ctas_per_sm": 0})
    assert cc.ARCH_LIMITS[80]["smem_block"] < 272 * 1024 and cc.ARCH_LIMITS[90]["smem_block"] < 272 * 1024


def test_ctas_per_sm():
    # 255 regs x 256 threads uses the whole register file: 1 CTA, limited by registers
    assert cc.ctas_per_sm(90, 255, 8, 49152) == {"ctas_per_sm": 1, "occupancy_limit": "regs"}
    # 128 regs x 128 threads: 4 by registers; 100 KiB smem: 2 by shared memory on sm_90, 1 on sm_80
    assert cc.ctas_per_sm(90, 128, 4, 100 * 1024)["ctas_per_sm"] == 2
    assert cc.ctas_per_sm(80, 128, 4, 100 * 1024) == {"ctas_per_sm": 1, "occupancy_limit": "smem"}


def test_rank64_with_keep_compiles_for_both_archs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "bench.compile_check", "--rank", "64", "--dtype", "bf16",
                          "--keep", "on", "--kernel", "lora_linear_fwd", "importance_partials", "lora_grad_x"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] and line.split()[0] in KERNELS]
    assert len(rows) == 6
    assert all(r[-1] == "OK" for r in rows), rows
