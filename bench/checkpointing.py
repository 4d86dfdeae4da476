"""Memory of a few pruning steps per method, with and without gradient checkpointing.

SmolLM2-135M (``bench/smollm2.py``'s model and batches: windows of WikiText-2
*valid*), batch 4, ``--seq-len`` 512 (long enough for the activations of the 30
decoder layers to dominate) or 128 (the SmolLM2 table's setting). Each
(method, checkpointing) pair runs :func:`loraprune.prune` for a few steps
(masks updated every step) in a fresh process. Two probes (``--probe``):

- ``tensors``: the peak of the tensor bytes the allocator handed out during
  ``prune()``, above what was live before (:func:`bench.memory.tensor_peak`;
  on a GPU this is ``torch.cuda.max_memory_allocated``). The memory a method
  needs.
- ``rss``: peak RSS during ``prune()`` minus the RSS with the model loaded (as
  ``bench/smollm2.py`` measures it: ``VmHWM`` after ``clear_refs``). Adds what
  glibc keeps of freed blocks and non-tensor memory; on this machine it ends
  2-5x above the tensor peak, in a way that depends on allocation order.

The per-step losses are recorded too: checkpointing must not change them.

    python -m bench.checkpointing                     # all cases, writes results/checkpointing.json
    python -m bench.checkpointing --methods default grad-adaptive-kd --steps 2
    python -m bench.checkpointing --probe tensors --seq-len 128 --steps 2 --out bench/results/memory_tensors.json
    python -m bench.checkpointing --case '{"method": "default", "checkpointing": true}'   # one case, prints JSON
    python -m bench.checkpointing --report            # the markdown table of the results file
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SEQ_LEN, BATCH, STEPS = 512, 4, 3
#: methods of bench/smollm2.py compared here: the default, full-gradient Taylor with the default's
#: ranking and distillation (only the criterion differs), and plain ``grad`` (the memory baseline row there).
DEFAULT_METHODS = ("default", "grad-adaptive-kd", "grad")


def run_case(method: str, checkpointing: bool, steps: int = STEPS, seq_len: int = SEQ_LEN,
             batch_size: int = BATCH, probe: str = "rss") -> dict:
    """One pruning run in this process: peak extra memory (``probe``), seconds, per-step losses."""
    import torch

    import loraprune
    from loraprune.config import PruneConfig

    from .memory import mark, tensor_peak
    from .smollm2 import METHODS, _peak_mib, _reset_peak, _rss_mib, load_smollm2, train_batches

    torch.set_num_threads(int(os.environ.get("LORAPRUNE_THREADS", os.cpu_count() or 1)))
    model, tok = load_smollm2()
    cfg = PruneConfig.from_kwargs(ratio=0.5, steps=steps, seed=0, progress=False, seq_len=seq_len,
                                  batch_size=batch_size, prune_start=1, prune_end=steps, prune_every=1,
                                  gradient_checkpointing=checkpointing, **METHODS[method])
    batches = train_batches(tok, cfg.seq_len, cfg.batch_size, steps, seed=0)
    losses = []

    def on_step(step, pruner, loss):
        losses.append(loss)
        if step == steps:
            mark("steps")  # the peak of the training steps, before the final compaction

    def run():
        loraprune.prune(model, batches, cfg, on_step=on_step)

    base = _rss_mib()
    t0 = time.time()
    steps_peak = None
    if probe == "tensors":
        res = tensor_peak(run)
        extra = res["tensor_peak_bytes"] / 2**20
        steps_peak = res["marks"].get("steps", res["tensor_peak_bytes"]) / 2**20
    else:
        _reset_peak()
        run()
        extra = _peak_mib() - base
    seconds = time.time() - t0
    return {"method": method, "checkpointing": checkpointing, "config": cfg.to_dict(), "steps": steps,
            "batch": [batch_size, seq_len], "seq_len": seq_len, "probe": probe, "peak_extra_mib": extra,
            "steps_peak_extra_mib": steps_peak,
            "model_rss_mib": base, "seconds": seconds, "losses": losses}


def _subprocess(case: dict) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.checkpointing", "--case", json.dumps(case)], cwd=root,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"checkpointing case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(results: list[dict]) -> dict:
    """Per method: peak extra off/on and on/off; across methods: the default over each ``grad*`` method
    at equal checkpointing (whole call and, where measured, the training steps alone)."""
    by = {(r["method"], r["checkpointing"]): r for r in results}
    methods = sorted({r["method"] for r in results}, key=lambda m: list(DEFAULT_METHODS).index(m)
                     if m in DEFAULT_METHODS else 99)
    per_method = {}
    for m in methods:
        off, on = by.get((m, False)), by.get((m, True))
        row = {"off_mib": off and off["peak_extra_mib"], "on_mib": on and on["peak_extra_mib"],
               "steps_off_mib": off and off.get("steps_peak_extra_mib"),
               "steps_on_mib": on and on.get("steps_peak_extra_mib")}
        if off and on:
            row["on_over_off"] = on["peak_extra_mib"] / off["peak_extra_mib"]
            row["same_losses"] = off["losses"] == on["losses"]
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(off["losses"], on["losses"]))
            row["seconds_on_over_off"] = on["seconds"] / off["seconds"]
        per_method[m] = row
    versus = {}
    for base in ("grad-adaptive-kd", "grad"):
        for ckpt in (False, True):
            d, g = by.get(("default", ckpt)), by.get((base, ckpt))
            if not (d and g):
                continue
            tag = f"default/{base}" + (" (checkpointing)" if ckpt else "")
            versus[tag] = d["peak_extra_mib"] / g["peak_extra_mib"]
            if d.get("steps_peak_extra_mib") and g.get("steps_peak_extra_mib"):
                versus[tag + ", training steps"] = d["steps_peak_extra_mib"] / g["steps_peak_extra_mib"]
    return {"per_method": per_method, "default_over_grad": versus}


def markdown(payload: dict) -> str:
    st = payload.get("settings", {})
    steps = any(r.get("steps_on_mib") is not None for r in payload["summary"]["per_method"].values())
    extra = (" training steps, plain | training steps, checkpointing |" if steps else "")
    rows = [f"{st.get('batch_size', BATCH)} x {st.get('seq_len', SEQ_LEN)} tokens, probe: {st.get('probe', 'rss')}", "",
            "| method | peak extra MiB, plain | peak extra MiB, checkpointing |" + extra
            + " checkpointing / plain | same losses | time checkpointing / plain |",
            "|---|---|---|" + ("---|---|" if steps else "") + "---|---|---|"]
    def mib(x):
        return "—" if x is None else f"{x:.0f}"

    for m, r in payload["summary"]["per_method"].items():
        cells = f"| {m} | {mib(r['off_mib'])} | {mib(r['on_mib'])} |"
        if steps:
            cells += f" {mib(r['steps_off_mib'])} | {mib(r['steps_on_mib'])} |"
        if "same_losses" not in r:  # one of the two cases only
            rows.append(cells + " — | — | — |")
            continue
        same = "yes" if r["same_losses"] else "no (max diff %.2g)" % r["max_loss_diff"]
        rows.append(cells + f" {r['on_over_off']:.2f} | {same} | {r['seconds_on_over_off']:.2f} |")
    rows.append("")
    rows += [f"- {k}: {v:.2f}×" for k, v in payload["summary"]["default_over_grad"].items()]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default=None, help="run one case (JSON: method, checkpointing) and print its JSON")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods of bench/smollm2.py")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per window (batch of %d)" % BATCH)
    ap.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                    help="which of the two cases to run per method")
    ap.add_argument("--probe", choices=("rss", "tensors"), default="rss",
                    help="peak RSS, or the allocator's peak of live tensor bytes (see the module doc)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "checkpointing.json"))
    ap.add_argument("--report", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args(argv)
    if args.report:
        from .common import read_json

        print(markdown(read_json(Path(args.out))))
        return 0
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(run_case(case["method"], case["checkpointing"], case.get("steps", args.steps),
                                  case.get("seq_len", args.seq_len), probe=case.get("probe", args.probe))))
        return 0
    from .common import read_json, result_payload, write_json

    out = Path(args.out)
    method = ("peak RSS (VmHWM after clear_refs) during prune() minus RSS with the model loaded"
              if args.probe == "rss" else "peak of live tensor bytes during prune() above those live before it "
                                          "(allocator events, bench.memory.tensor_peak)")
    settings = {"model": "SmolLM2-135M (fp32, CPU)", "seq_len": args.seq_len, "batch_size": BATCH,
                "steps": args.steps, "ratio": 0.5, "probe": args.probe, "method": method + "; one process per case"}

    def payload_of(results):
        payload = result_payload("checkpointing", settings, {"cases": results})
        payload["summary"] = summarize(results)
        return payload

    # cases already in the results file (same steps, probe, length) are kept: a cut run resumes where it stopped
    results = [r for r in (read_json(out)["cases"] if out.is_file() else [])
               if (r["steps"], r.get("probe", "rss"), r.get("seq_len", SEQ_LEN)) == (args.steps, args.probe, args.seq_len)]
    for method in args.methods:
        for ckpt in {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]:
            if any(r["method"] == method and r["checkpointing"] == ckpt for r in results):
                continue
            res = _subprocess({"method": method, "checkpointing": ckpt, "steps": args.steps, "seq_len": args.seq_len,
                               "probe": args.probe})
            results.append(res)
            print(f"checkpointing: {method} {'on ' if ckpt else 'off'}: peak extra {res['peak_extra_mib']:.0f} MiB, "
                  f"{res['seconds']:.0f} s, losses {[round(x, 4) for x in res['losses']]}", flush=True)
            write_json(out, payload_of(results))  # after every case
    print(markdown(payload_of(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
