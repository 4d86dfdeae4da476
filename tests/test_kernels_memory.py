"""CPU twin of group_importance: peak memory above its inputs <= 2% of the weight's bytes.

Each measurement runs in a fresh subprocess (``bench.kernel_memory_probe``),
which resets the kernel's RSS high-water mark after allocating the inputs and a
warm-up, so the number covers every allocation (torch, BLAS scratch, ...).
The eager computation (forms G and B A) is measured the same way and must blow
the bound, proving the probe can see temporaries.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # `python -m bench.…` runs from the repository root

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")]

OUT, IN, RANK = 11008, 4096, 8
BOUND = 0.02


def _probe(impl):
    res = subprocess.run(
        [sys.executable, "-m", "bench.kernel_memory_probe", "--impl", impl,
         "--out", str(OUT), "--in", str(IN), "--rank", str(RANK)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_importance_twin_peak_memory_within_two_percent():
    twin = _probe("twin")
    eager = _probe("eager")
    assert twin["weight_bytes"] == OUT * IN * 4
    assert twin["ratio_to_weight"] <= BOUND, twin
    assert eager["ratio_to_weight"] > 1.0, eager  # forms out x in temporaries: the probe sees them
    # same numbers from both (fp32 sums of ~45M terms)
    assert abs(twin["row_sum_total"] - eager["row_sum_total"]) <= 1e-4 * abs(eager["row_sum_total"])
