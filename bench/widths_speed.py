"""CPU speed of SmolLM2-135M compacted to given per-layer widths, against its ideal FLOP speed-up.

Which groups a run keeps does not change speed, only the widths do; so each
compacted model here is the dense SmolLM2 cut to the per-layer widths a real
pruning run recorded (``bench/smollm2.py``'s run JSON, ``widths``), keeping the
first groups. ``--round R`` adds, for every run given, the same widths with each
layer's MLP width rounded to the nearest multiple of ``R`` (a stand-in where no
run with ``round_to=R`` exists; the row says so). Timings are interleaved
round-robin with the dense model in one process (``bench/speed.py``'s
``throughput``); *of ideal* is the measured speed-up over the FLOP ratio.

    python -m bench.widths_speed --runs bench/results/smollm2-sweep/runs/<run>.json ... --round 64
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

from .common import RESULTS_DIR, result_payload, write_json


def cut_to(model, widths):
    """``model`` (copied) compacted to ``widths`` = [(kv heads, MLP channels)] per layer, first groups kept."""
    import torch

    from loraprune.structure.archs import arch_for
    from loraprune.structure.groups import build_layer_groups
    from loraprune.structure.masks import Masks
    from loraprune.surgery.compaction import compact

    m = copy.deepcopy(model)
    spec = arch_for(m)
    layers = build_layer_groups(m, spec)
    masks = Masks([torch.arange(lg.n_kv) < kv for lg, (kv, _) in zip(layers, widths)],
                  [torch.arange(lg.n_channels) < ch for lg, (_, ch) in zip(layers, widths)])
    return compact(m, masks, spec).eval()


def rounded(widths, r: int, n: int):
    return [(kv, min(n, max(r, int(round(ch / r)) * r))) for kv, ch in widths]


def main(argv=None) -> int:
    import torch

    from .smollm2 import load_smollm2
    from .speed import full_settings, throughput

    p = argparse.ArgumentParser(prog="python -m bench.widths_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True)
    p.add_argument("--round", nargs="*", type=int, default=[])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill", nargs=2, type=int, default=[4, 256], metavar=("BATCH", "SEQ"))
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "widths_speed.json")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("LORAPRUNE_THREADS", os.cpu_count() or 1)))
    dense, _ = load_smollm2()
    dense.config.use_cache = True
    n = dense.config.intermediate_size
    models, about = {"dense": dense}, {}
    for path in a.runs:
        rec = json.loads(path.read_text())
        label = path.stem
        models[label] = cut_to(dense, rec["widths"])
        about[label] = {"run": str(path), "round_to": rec["config"].get("round_to", 1), "widths": rec["widths"],
                        "achieved_ratio": rec["achieved_ratio"], "stand_in": False}
        for r in a.round:
            w = rounded(rec["widths"], r, n)
            models[f"{label} rounded to {r}"] = cut_to(dense, w)
            about[f"{label} rounded to {r}"] = {"run": str(path), "round_to": r, "widths": w, "stand_in": True}
    settings = full_settings(prefill_batch=a.prefill[0], prefill_seq=a.prefill[1], decode_tokens=a.decode_tokens,
                             rounds=a.rounds)
    res = {mode: throughput(models, settings, mode) for mode in ("prefill", "decode")}
    for mode, r in res.items():
        for k, v in r["models"].items():
            about.setdefault(k, {})
            print(f"{mode:8s} {k:60s} speed-up {v['speedup']:.3f} ideal {v['ideal_speedup']:.3f} "
                  f"of ideal {v['speedup_over_ideal']:.3f}", flush=True)
    write_json(a.out, result_payload("compacted SmolLM2 at recorded widths: CPU speed vs ideal FLOP speed-up",
                                     dict(settings, threads=torch.get_num_threads()), {"models": about, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
