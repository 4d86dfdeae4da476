"""Progressive compaction against masked training: time of a pruning step and of a run.

Two measurements on SmolLM2-135M (CPU), each a ratio taken in one process:

* **step**: one optimiser step of :func:`loraprune.prune` (the distillation
  teacher's forward, the student's forward and backward, scoring, AdamW), at
  the final 50 % masks, for the dense start (nothing removed yet), masked
  training and progressive compaction, interleaved round-robin so load from
  other processes hits all alike; the median per-round ratio is reported,
  next to the *ideal* ratio of FLOPs (three student passes — forward and two
  backward GEMMs — plus one dense teacher forward).
* **run**: the wall time of a whole ``prune(ratio=0.5)`` run with
  ``progressive=True`` and ``False`` (same data, seed and steps), run
  alternately ``--run-repeats`` times.

    python -m bench.progressive --steps 20 --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _pruner_at_target(model, progressive: bool, distill: float, ratio: float):
    from loraprune import LoRAPruner

    m = copy.deepcopy(model)
    m.config.use_cache = False
    pruner = LoRAPruner(m, ratio=ratio, criterion="fisher", ranking="layer", lora_dropout=0.05, distill=distill)
    opt = torch.optim.AdamW(pruner.lora_parameters(), lr=1e-4)
    if progressive:
        pruner.bind_optimizer(opt)
    if ratio > 0:
        gen = torch.Generator().manual_seed(0)  # which groups go does not change speed, only the widths do
        pruner.state.observe([torch.rand(lg.n_kv, generator=gen) for lg in pruner.layers],
                             [torch.rand(lg.n_channels, generator=gen) for lg in pruner.layers])
        pruner.state.update(1.0)
        pruner.apply_masks()
    m.train()
    return pruner, opt


def step_times(model, batch: dict, rounds: int, distill: float) -> dict:
    from loraprune.run.prune import micro_step

    from .speed import forward_flops, interleaved

    batch = {**batch, "labels": batch.get("labels", batch["input_ids"])}
    runners, flops = {}, {}
    for name, progressive, ratio in (("dense", False, 0.0), ("masked", False, 0.5), ("progressive", True, 0.5)):
        if ratio == 0.0:
            from loraprune import LoRAPruner

            m = copy.deepcopy(model)
            m.config.use_cache = False
            pruner = LoRAPruner(m, ratio=0.5, criterion="fisher", lora_dropout=0.05, distill=distill)
            opt = torch.optim.AdamW(pruner.lora_parameters(), lr=1e-4)
            m.train()
        else:
            pruner, opt = _pruner_at_target(model, progressive, distill, ratio)

        def one(pruner=pruner, opt=opt):
            t = time.perf_counter()
            micro_step(pruner, batch, pruner.config, 1.0)
            pruner.score()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        one()  # warm-up
        runners[name] = one
        if name != "masked":
            with torch.no_grad():
                small = copy.deepcopy(pruner).finalize() if ratio else model
            flops[name] = forward_flops(small, *batch["input_ids"].shape)
    dense_f = flops["dense"]
    teacher = dense_f if distill > 0 else 0.0
    ideal = (3 * dense_f + teacher) / (3 * flops["progressive"] + teacher)
    times = interleaved(runners, rounds)
    ratio = {k: statistics.median(d / t for d, t in zip(times["dense"], times[k])) for k in ("masked", "progressive")}
    prog_vs_masked = statistics.median(m / p for m, p in zip(times["masked"], times["progressive"]))
    return {"distill": distill, "seconds": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "speedup_over_dense": ratio, "progressive_over_masked_speedup": prog_vs_masked,
            "ideal_speedup_over_dense": ideal}


def run_times(model, batches: list, steps: int, repeats: int) -> dict:
    import loraprune

    out = {"masked": [], "progressive": []}
    for _ in range(repeats):
        for name, progressive in (("masked", False), ("progressive", True)):
            m = copy.deepcopy(model)
            t = time.perf_counter()
            loraprune.prune(m, batches, ratio=0.5, steps=steps, progressive=progressive, progress=False)
            out[name].append(time.perf_counter() - t)
            del m
    speedup = statistics.median(m / p for m, p in zip(out["masked"], out["progressive"]))
    return {"steps": steps, "seconds": out, "progressive_over_masked_speedup": speedup}


def main(argv=None) -> int:
    from .common import RESULTS_DIR, result_payload, write_json
    from .smollm2 import load_smollm2, train_batches

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="steps of each whole run")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the step timing")
    p.add_argument("--run-repeats", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR / "progressive.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    batches = train_batches(tok, args.seq_len, args.batch_size, args.steps, seed=0)
    res = {"step": {}}
    for distill in (0.5, 0.0):
        r = step_times(model, batches[0], args.rounds, distill)
        res["step"][f"distill={distill:g}"] = r
        print(f"step (distill={distill:g}): over dense masked x{r['speedup_over_dense']['masked']:.2f}, progressive "
              f"x{r['speedup_over_dense']['progressive']:.2f} (ideal x{r['ideal_speedup_over_dense']:.2f}); "
              f"progressive over masked x{r['progressive_over_masked_speedup']:.2f}", flush=True)
    if args.steps:
        r = run_times(model, batches, args.steps, args.run_repeats)
        res["run"] = r
        print(f"run of {args.steps} steps at 50%: masked {r['seconds']['masked']} s, progressive "
              f"{r['seconds']['progressive']} s: x{r['progressive_over_masked_speedup']:.2f}", flush=True)
    settings = dict(vars(args), model="SmolLM2-135M-Instruct", ratio=0.5)
    write_json(__import__("pathlib").Path(args.out), result_payload("progressive", settings, res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
