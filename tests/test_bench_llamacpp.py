"""bench/llamacpp.py's ideal speed-ups and report, without llama.cpp (hand counts and a hand-written record)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import llamacpp  # noqa: E402


def _count(hidden, q, kv, mlp, layers, vocab, prompt, gen):
    """FLOPs by hand: prompt with the LM head on its last token only, then ``gen`` single-token steps."""
    block = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * mlp
    pairs = prompt * (prompt + 1) / 2
    pre = 2 * layers * block * prompt + 2 * hidden * vocab + layers * 4 * q * pairs
    dec = sum(2 * (layers * block + hidden * vocab) + layers * 4 * q * (prompt + t + 1) for t in range(gen))
    return pre, dec


def test_ideal_speedups_match_hand_count():
    from tiny import tiny_model

    dense = tiny_model()  # hidden 32, 4 heads x 8, 2 KV heads, MLP 48, 2 layers, vocab 97
    narrow = tiny_model(intermediate_size=16)
    got = llamacpp.ideal_speedups({"dense": dense, "narrow": narrow}, prompt_len=7, gen=3)
    d = _count(32, 32, 16, 48, 2, 97, 7, 3)
    n = _count(32, 32, 16, 16, 2, 97, 7, 3)
    assert got["dense"] == pytest.approx((1.0, 1.0))
    assert got["narrow"] == pytest.approx((d[0] / n[0], d[1] / n[1]))
    assert got["narrow"][0] > got["narrow"][1] > 1  # the full-vocabulary head weighs more per decoded token


def _row(model, typ, pp, tg, ideal=None):
    r = {"model": model, "type": typ, "file_mib": 100.0, "tensor_types": {typ.upper(): 3}, "pp_tok_s": pp,
         "tg_tok_s": tg, "pp_ratio": pp / 100.0, "tg_ratio": tg / 10.0, "ppl": {"ptb@512": 60.0}}
    if ideal:
        r["pp_ideal"], r["tg_ideal"] = ideal
    return r


def test_report_compares_pruned_with_dense_of_the_same_type():
    record = {"command": "python -m bench.llamacpp run", "date": "2026-12-07", "machine": "m",
              "llama_cpp_python": "0.3", "rows": [
                  _row("dense", "f16", 100.0, 10.0), _row("dense", "Q8_0", 150.0, 20.0),
                  {**_row("pruned 50%", "Q8_0", 270.0, 30.0, ideal=(2.0, 1.6)),
                   "removed": {"projections": 0.5002, "model": 0.3951}}]}
    table = llamacpp.report(record)
    pruned = [line for line in table.splitlines() if line.startswith("| pruned 50% (50.0 % / 39.5 %) | Q8_0 |")][0]
    # 270/150 = 1.80× of an ideal 2.00× (0.90); 30/20 = 1.50× of 1.60× (0.94); × dense f16: 2.70× and 3.00×
    assert "| 270 (2.70×) | 30 (3.00×) | 1.80× (2.00×: 0.90 of ideal) | 1.50× (1.60×: 0.94 of ideal) |" in pruned
    assert "| 10 (1.00×) | – | – | 60.00 |" in table.splitlines()[2]  # dense rows have no pruning speed-up


def test_report_takes_the_median_of_per_round_ratios():
    dense = {**_row("dense", "f16", 100.0, 10.0), "pp_rounds": [100.0, 50.0, 100.0], "tg_rounds": [10.0, 10.0, 5.0]}
    pruned = {**_row("pruned 20%", "f16", 150.0, 12.0, ideal=(1.25, 1.2)),
              "pp_rounds": [120.0, 65.0, 150.0], "tg_rounds": [12.0, 12.0, 6.5]}
    table = llamacpp.report({"command": "c", "date": "d", "machine": "m", "llama_cpp_python": "0.3",
                             "rows": [dense, pruned]})
    # per-round ratios: prompt 1.2, 1.3, 1.5 -> 1.30; generation 1.2, 1.2, 1.3 -> 1.20 (a load spike in one
    # round hits both files of that round)
    assert "| 1.30× (1.25×: 1.04 of ideal) | 1.20× (1.20×: 1.00 of ideal) |" in table
