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
    # the scale part (bench/scale.py's code at tiny shapes): two depths, every figure, the extrapolation
    scale = data["scale"]
    assert [c["shape"]["layers"] for c in scale["cases"]] == [2, 3]
    for c in scale["cases"]:
        assert c["step_cost"]["before"]["median_ratio"] > 0 and c["step_cost"]["after"]["median_ratio"] > 0
        assert c["step_cost"]["before"]["ideal_ratio"] > c["step_cost"]["after"]["ideal_ratio"] > 0
        assert c["memory"]["measured"]["training_steps"] > 0 and c["memory"]["formula"]["training_extra"] > 0
        assert c["prefill"]["models"]["compacted 50%"]["ideal_speedup"] > 1
        assert abs(c["achieved_ratio"] - 0.5) < 0.05
    (src, ex), = scale["extrapolation"].items()
    assert set(ex["targets"]) == {"llama-3-8b", "llama-3-70b"} and ex["from_layers"] == [2, 3]
    assert ex["targets"]["llama-3-70b"]["per_gpu_bytes"] > ex["targets"]["llama-3-8b"]["per_gpu_bytes"] > 0
    md = Path(str(out) + ".scale.md").read_text()
    assert "step / PEFT before" in md and "Extrapolated (not measured)" in md
