"""One-shot pruning with and without the least-squares repair on SmolLM2-135M (issue 28).

Each variant runs in a fresh process (its peak RSS is its own), calibrates on
windows of WikiText-2 *valid* (4 x 128 tokens per batch, drawn as
``bench.smollm2`` draws its training batches) and is scored on PTB *test* and
held-out Shakespeare (16 evenly spaced 512-token windows each, as
``bench.smollm2``). ``seconds`` is the whole ``oneshot_prune`` call (wall clock;
``cpu_seconds`` its CPU time, the figure to read on a shared machine);
``peak_rss_mib`` the process's peak RSS (model loaded included),
``peak_extra_mib`` that minus the RSS with the model loaded.

    python -m bench.repair all --ratios 0.2 0.5 --variants flap fisher fisher-repair
    python -m bench.repair report
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

#: name -> oneshot_prune keyword arguments (besides ratio, the batches and seed).
VARIANTS: dict[str, dict] = {
    # today's FLAP row: FLAP scores, layer ranking, mean bias, 32 batches
    "flap": dict(method="flap", calib_batches=32),
    # the default criterion's score from 8 backward passes, adaptive ranking, plain cut
    "fisher": dict(method="fisher", calib_batches=8),
    "fisher-repair": dict(method="fisher", calib_batches=8, repair=True, repair_batches=32),
    "fisher-repair-nobias": dict(method="fisher", calib_batches=8, repair=True, repair_batches=32,
                                 bias_compensation=False),
    "fisher-repair-parallel": dict(method="fisher", calib_batches=8, repair=True, repair_batches=32,
                                   sequential=False),
    "fisher-repair-64": dict(method="fisher", calib_batches=8, repair=True, repair_batches=64),
    "fisher-repair-damp0.1": dict(method="fisher", calib_batches=8, repair=True, repair_batches=32, damp=0.1),
    "fisher-repair-damp0.001": dict(method="fisher", calib_batches=8, repair=True, repair_batches=32, damp=0.001),
    "fisher32": dict(method="fisher", calib_batches=32),
    "flap-repair": dict(method="flap", calib_batches=32, repair=True),
    "flap-adaptive-repair": dict(method="flap", calib_batches=32, repair=True, ranking="adaptive"),
}
EVALS = ("ptb@512", "shakespeare@512")
OUT = Path(__file__).resolve().parent / "results" / "repair"


def run_one(variant: str, ratio: float, seed: int, out: Path) -> dict:
    import torch

    import loraprune

    from .smollm2 import _peak_mib, _reset_peak, _rss_mib, eval_windows, evaluate, load_smollm2, train_batches

    torch.set_num_threads(int(os.environ.get("LORAPRUNE_THREADS", os.cpu_count() or 1)))
    model, tok = load_smollm2()
    kw = dict(VARIANTS[variant])
    n = max(kw.get("calib_batches", 32), kw.get("repair_batches") or 0)
    batches = train_batches(tok, 128, 4, n, seed)
    windows = eval_windows(tok, EVALS)
    base = _rss_mib()
    _reset_peak()
    t0, c0 = time.time(), time.process_time()
    pruned = loraprune.oneshot_prune(model, batches, ratio, seq_len=128, batch_size=4, seed=seed, **kw)
    seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    peak = _peak_mib()
    rep = pruned.config.loraprune
    rec = {"variant": variant, "ratio": ratio, "seed": seed, "kwargs": kw, "settings": rep["settings"],
           "achieved_ratio": rep["achieved_ratio"], "seconds": seconds, "cpu_seconds": cpu_seconds,
           "peak_rss_mib": peak,
           "model_rss_mib": base, "peak_extra_mib": peak - base, "ppl": evaluate(pruned, windows),
           "widths": [(w["num_key_value_heads"], w["intermediate_size"]) for w in rep["layers"]]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out)
    return rec


def dense_ppl() -> dict:
    """The dense model on the same windows (bench/results/smollm2-sweep/dense.json has both)."""
    path = Path(__file__).resolve().parent / "results" / "smollm2-sweep" / "dense.json"
    return json.loads(path.read_text())["ppl"]


def report(out: Path) -> str:
    d = dense_ppl()
    lines = ["| variant | ratio | seed | " + " | ".join(f"{e} (× dense {d[e]:.2f})" for e in EVALS)
             + " | seconds wall (CPU) | peak RSS MiB (extra) |", "|---|---|---|" + "---|" * (len(EVALS) + 2)]
    recs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    for r in sorted(recs, key=lambda r: (r["ratio"], list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS
                                         else 99, r["seed"])):
        cells = " | ".join(f"{r['ppl'][e]:.2f} ({r['ppl'][e] / d[e]:.2f}×)" for e in EVALS)
        cpu = f" ({r['cpu_seconds']:.0f})" if "cpu_seconds" in r else ""
        lines.append(f"| {r['variant']} | {r['ratio']:g} | {r['seed']} | {cells} | {r['seconds']:.0f}{cpu} | "
                     f"{r['peak_rss_mib']:.0f} ({r['peak_extra_mib']:.0f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.repair", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "all", "report"])
    p.add_argument("--variants", nargs="+", default=["flap", "fisher", "fisher-repair"], choices=list(VARIANTS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    if a.what == "report":
        print(report(a.out))
        return 0
    if a.what == "run":
        v, r, s = a.variants[0], a.ratios[0], a.seeds[0]
        rec = run_one(v, r, s, a.out / f"{v}@{r:g}-seed{s}.json")
        print(json.dumps({k: rec[k] for k in ("variant", "ratio", "ppl", "seconds", "peak_rss_mib")}))
        return 0
    from .common import run_fresh  # here, not at the top: bench.common imports torch
    for ratio in a.ratios:
        for seed in a.seeds:
            for v in a.variants:
                path = a.out / f"{v}@{ratio:g}-seed{seed}.json"
                if path.is_file():
                    continue
                cmd = [sys.executable, "-m", "bench.repair", "run", "--variants", v, "--ratios", str(ratio),
                       "--seeds", str(seed), "--out", str(a.out)]
                run_fresh(cmd)
    print(report(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
