"""bench/gpu_check.py --smoke: the one-command GPU check, run on CPU under the Triton interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains, spawns subprocesses or compiles

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "smoke" and data["ok"] and data["n_failed"] == 0
    groups = {c["group"] for c in data["checks"]}
    assert {"lora_linear", "determinism", "importance", "merge_gather", "prune"} <= groups
    lora = [c for c in data["checks"] if c["group"] == "lora_linear" and "rank" in c]
    assert {c["keep"] for c in lora} >= {None, "half", "unsorted", "odd"}
    assert any(c["dropout"] > 0 for c in lora) and any(c["rank"] == 64 for c in lora)
    assert {c["dtype"] for c in lora} == {"float32", "float16", "bfloat16"}
    prune = next(c for c in data["checks"] if c["group"] == "prune")
    assert prune["calls"]["triton"] > 0 and prune["calls"]["twin"] == 0
