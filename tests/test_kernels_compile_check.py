"""AOT compile of every Triton kernel for sm_80 and sm_90 (no GPU needed)."""
import os
import subprocess
import sys

KERNELS = ["lora_down", "lora_linear_fwd", "lora_grad_xa", "lora_grad_b", "lora_grad_a", "lora_grad_x",
           "importance_partials", "sum_partials", "merge_gather"]


def test_compile_check_all_kernels_both_archs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "loraprune.kernels.compile_check"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] and line.split()[0] in KERNELS]
    for kernel in KERNELS:
        for arch in ("sm_80", "sm_90"):
            hits = [r for r in rows if r[0] == kernel and r[1] == arch]
            assert hits, f"{kernel} on {arch} missing from the table"
            assert all(r[-1] == "OK" for r in hits), hits
    assert len(rows) == 2 * (3 * (len(KERNELS) - 1) + 1)
