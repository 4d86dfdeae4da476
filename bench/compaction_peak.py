"""Peak memory of the final compaction (``LoRAPruner.finalize``) on SmolLM2-135M.

Each measurement runs in its own process (``--child``): SmolLM2 loaded in fp32
(:func:`bench.smollm2.load_smollm2`), a :class:`loraprune.LoRAPruner` at
``--ratio`` with random LoRA factors (so the merge does real work), the target
masks reached; then the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``) and ``finalize()`` runs. *Peak extra* = peak RSS
during finalize minus RSS just before it. Beside it, the bytes held at the
peak by construction: the original projections (still held, for the rollback)
and the new ones.

    python -m bench.compaction_peak --label after --reps 3     # -> bench/results/compaction_peak_after.json

Run it from a checkout of the code to measure (the ``before`` figures come from
the same script run in a worktree of the base commit).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _child(ratio: float) -> dict:
    import torch

    import loraprune
    from bench.smollm2 import _peak_mib, _reset_peak, _rss_mib, load_smollm2

    model, _ = load_smollm2()
    model.eval()
    pruner = loraprune.LoRAPruner(model, ratio=ratio)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in pruner.lora_modules():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.01)
    pruner.reach_target()
    proj_bytes = sum(m.base.weight.numel() * m.base.weight.element_size() for m in pruner.lora_modules())
    kept = 1 - pruner.removed_params() / pruner.total_params
    import gc

    gc.collect()
    before = _rss_mib()
    _reset_peak()
    t0 = time.perf_counter()
    small = pruner.finalize()
    seconds = time.perf_counter() - t0
    peak = _peak_mib()
    after = _rss_mib()
    new_bytes = sum(p.numel() * p.element_size() for layer in small.model.layers
                    for mod in (layer.self_attn, layer.mlp) for n, p in mod.named_parameters())
    return {
        "rss_before_mib": round(before, 1), "peak_rss_mib": round(peak, 1), "rss_after_mib": round(after, 1),
        "peak_extra_mib": round(peak - before, 1), "seconds": round(seconds, 3),
        "projection_mib": round(proj_bytes / 2**20, 1), "kept_fraction": round(kept, 4),
        "new_projection_mib": round(new_bytes / 2**20, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="before | after (names the JSON file)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.ratio)))
        return
    runs = []
    for _ in range(args.reps):
        out = subprocess.run([sys.executable, "-m", "bench.compaction_peak", "--label", args.label, "--child",
                              "--ratio", str(args.ratio)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    from bench.common import machine_info, write_json

    payload = {"figure": "final compaction peak (LoRAPruner.finalize) on SmolLM2-135M, fp32, CPU",
               "label": args.label, "commit": commit, "ratio": args.ratio,
               "command": f"python -m bench.compaction_peak --label {args.label} --ratio {args.ratio} --reps {args.reps}",
               "machine": machine_info(), "runs": runs}
    path = write_json(RESULTS / f"compaction_peak_{args.label}.json", payload)
    print(path)


if __name__ == "__main__":
    main()
