"""One command per figure: ``python -m bench.run {quality,memory,speed,plots,report,all} [--smoke]``.

Run from the repository root (the data folder defaults to ``../shared/data``;
``--data`` or ``LORAPRUNE_DATA`` point elsewhere). Results go to
``bench/results/`` (``--out`` to change): one JSON per figure with the
command, machine and date, PNG plots beside them. ``--smoke`` runs every
benchmark at toy size in seconds (what the test suite does); its numbers mean
nothing. ``report`` renders the JSON into markdown tables (``tables.md``, and
the README's marked blocks when writing to bench/results).
"""
from __future__ import annotations

import argparse
import sys
import time

FIGURES = ("quality", "memory", "speed", "plots", "report")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("figure", choices=FIGURES + ("all",))
    ap.add_argument("--smoke", action="store_true", help="toy sizes, seconds; for the test suite")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--data", default=None, help="shared data folder (default ../shared/data or $LORAPRUNE_DATA)")
    ap.add_argument("--cache", default=None, help="reference-model cache root (default ~/.cache/loraprune/reference)")
    ap.add_argument("--preset", default="default", help="reference-model preset: default (~4M params) or bench")
    q = ap.add_argument_group("quality")
    q.add_argument("--steps", type=int, default=None, help="LoRA steps per run")
    q.add_argument("--seeds", type=int, nargs="+", default=None)
    q.add_argument("--ratios", type=float, nargs="+", default=None)
    q.add_argument("--criteria", nargs="+", default=None, help="iterative criteria (lora grad magnitude random)")
    q.add_argument("--oneshot", nargs="*", default=None, help="one-shot methods (flap wanda-sp)")
    q.add_argument("--eval-windows", type=int, default=None,
                   help="evaluation windows per set and window size (evenly spaced; 0 = the whole text)")
    q.add_argument("--lr", type=float, default=None)
    q.add_argument("--no-resume", action="store_true", help="re-measure runs already in quality.json")
    ap.add_argument("--only", choices=("criterion", "step"), default=None,
                    help="memory: re-measure only these cases, keeping the others in memory.json")
    s = ap.add_argument_group("speed")
    s.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 avoids OpenMP spin-waits on a shared machine")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up in logs as they happen
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from . import memory, plots, quality, report, speed
    from .common import BenchSetup

    setup = BenchSetup.create(out=args.out, smoke=args.smoke, preset=args.preset, data_dir=args.data,
                              cache_dir=args.cache)
    figures = FIGURES if args.figure == "all" else (args.figure,)
    for fig in figures:
        t = time.perf_counter()
        if fig == "quality":
            pick = quality.smoke_settings if args.smoke else quality.full_settings
            ew = args.eval_windows
            settings = pick(steps=args.steps, seeds=args.seeds, ratios=args.ratios, criteria=args.criteria,
                            oneshot=args.oneshot, lr=args.lr)
            if ew is not None:
                settings["eval_windows"] = ew or None
            settings["preset"] = "smoke" if args.smoke else args.preset
            quality.run(setup, settings, resume=not args.no_resume)
        elif fig == "memory":
            memory.run(setup, only=args.only)
        elif fig == "speed":
            pick = speed.smoke_settings if args.smoke else speed.full_settings
            settings = pick(rounds=args.rounds, threads=args.threads)
            settings["preset"] = "smoke" if args.smoke else args.preset
            speed.run(setup, settings)
        elif fig == "plots":
            plots.run(setup)
        else:
            report.run(setup)
        print(f"bench {fig}: done in {time.perf_counter() - t:.0f}s -> {setup.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
