"""Smoke-size run of every benchmark command (``python -m bench.run all --smoke``).

Keeps the benchmarks working; asserts the JSON schema and that every ratio is
finite and positive — never a timing or memory value (those depend on the
machine and its load; the real figures live in bench/results/).
"""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import run as bench_run  # noqa: E402

pytestmark = pytest.mark.slow  # trains, spawns subprocesses or compiles


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("bench")
    assert bench_run.main(["all", "--smoke", "--out", str(out), "--data", str(data_dir)]) == 0
    return out


def _load(out, name):
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["figure"] == name
    assert payload["command"] and payload["date"] and payload["settings"]
    assert payload["machine"]["nproc"] >= 1 and payload["machine"]["cpu"]
    return payload


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quality_json(results):
    q = _load(results, "quality")
    s = q["settings"]
    assert not q["partial"]
    expected = {(c, r, seed) for seed in s["seeds"] for r in s["ratios"] for c in s["criteria"]}
    expected |= {(f"oneshot-{m}", r, seed) for seed in s["seeds"] for r in s["ratios"] for m in s["oneshot"]}
    assert {(r["method"], r["ratio"], r["seed"]) for r in q["runs"]} == expected
    windows = q["reference"]["windows"]
    for run in q["runs"]:
        assert abs(run["achieved_ratio"] - run["ratio"]) < 0.05
        # WikiText-2/PTB are evaluated where their text exists (a bare clone offline has only Shakespeare)
        assert "shakespeare" in q["reference"]["dense"]
        for name in q["reference"]["dense"]:
            for w in windows:
                assert _positive(run["ratio_to_dense"][name][w])
                assert run["ratio_to_dense"][name][w] == pytest.approx(
                    run["perplexity"][name][w] / q["reference"]["dense"][name][w])
    cell = q["summary"]["lora"]["0.5"]["shakespeare"]["w128"]
    assert _positive(cell["mean"]) and cell["n"] == len(s["seeds"])
    assert "lora_over_grad" in q["targets"]["0.5"]["shakespeare/w128"]
    detail = q["details"][f"lora@0.5#{s['seeds'][0]}"]
    assert len(detail["mlp_scores"]) == q["reference"]["config"]["num_hidden_layers"]
    assert detail["trace"][-1][1] == pytest.approx(q["summary"]["lora"]["0.5"]["achieved_ratio"]["mean"])


def test_memory_json(results):
    m = _load(results, "memory")
    kinds = {c["case"]["kind"] for c in m["cases"]}
    assert kinds == {"criterion", "step"}
    by_case = {}
    for case in m["cases"]:
        c = case["case"]
        assert case["peak_total_bytes"] >= case["peak_extra_bytes"]  # the extra is part of the total
        by_case[(c["kind"], c.get("name", c.get("model")), c.get("impl", c.get("criterion")))] = case
    assert m["summary"]["criterion"] and m["summary"]["step"]
    for name, row in m["summary"]["criterion"].items():
        eager, ours = by_case[("criterion", name, "eager")], by_case[("criterion", name, "ours")]
        assert row["eager_extra_bytes"] == eager["peak_extra_bytes"]
        out_f, in_f = ours["case"]["shape"]
        assert row["weight_bytes"] == out_f * in_f * 4  # the fp32 weight the probe scored
        assert row["eager_over_ours"] == pytest.approx(eager["peak_extra_bytes"] / max(ours["peak_extra_bytes"], 1))
    for model, row in m["summary"]["step"].items():
        lo, gr = by_case[("step", model, "lora")], by_case[("step", model, "grad")]
        assert row["extra_lora_over_grad"] == pytest.approx(lo["peak_extra_bytes"] / max(gr["peak_extra_bytes"], 1))
        assert row["total_change_lora_vs_grad"] == pytest.approx(lo["peak_total_bytes"] / gr["peak_total_bytes"] - 1)


def test_speed_json(results):
    sp = _load(results, "speed")
    for mode in ("prefill", "decode"):
        models = sp[mode]["models"]
        assert set(models) == {"dense", "0.2", "0.5"}
        for row in models.values():
            assert _positive(row["speedup"]) and _positive(row["ideal_speedup"])
        assert models["dense"]["ideal_speedup"] == 1.0
        # fewer parameters must mean fewer FLOPs: the ideal ratio grows with the pruning ratio
        assert 1.0 < models["0.2"]["ideal_speedup"] < models["0.5"]["ideal_speedup"]
        assert models["0.5"]["params"] < models["0.2"]["params"] < models["dense"]["params"]
    for row in sp["pruning_step"].values():
        assert _positive(row["lora_over_grad"])


def test_plots_written(results):
    for name in ("kept_per_layer", "scores_per_layer", "schedule", "ppl_vs_ratio", "memory", "speed"):
        png = results / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_count_matches_hand_count():
    """The ideal-speed-up denominator against a count by hand on a tiny model."""
    from bench.speed import forward_flops
    from tiny import tiny_model

    model = tiny_model()  # hidden 32, 4 heads x 8, 2 KV heads, MLP 48, 2 layers, vocab 97
    per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * 32 * 48
    linear = 2 * per_layer + 32 * 97
    seq = 5
    attn = 2 * 4 * 32 * (seq * (seq + 1) / 2)
    assert forward_flops(model, 3, seq) == pytest.approx(3 * (2 * linear * seq + attn))
