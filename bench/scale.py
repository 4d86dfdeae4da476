"""Pruning measured at the sizes users prune: LLaMA-family shapes, random weights, ratios in one process.

For each case (a ``bench/scale_models.py`` shape, a number of decoder layers, a device and dtype),
one process measures, in this order:

1. **memory**: a short ``prune()`` call (``--mem-steps`` steps, the mask reaching 50 % at its last
   update) under :func:`bench.memory.tensor_peak`: the peak of live tensor bytes above those live
   before the call (on CUDA ``torch.cuda.max_memory_allocated``; on CPU the allocator's events
   through ``torch.profiler``), for the training steps and for the final compaction, and on CPU
   the peak RSS too; each against ``docs/memory.md``'s formula (``scale_models.memory_formula``)
   for the same shape, tokens and dtype;
2. **step cost**: ``prune()`` again on a fresh model, each pruning step timed against a PEFT LoRA
   step taken right after it on the same frozen weights (``bench.step_cost.pair_steps``), before
   pruning starts and after the final 50 % mask, beside each step's FLOP ideal
   (``scale_models.step_flops``: frozen weights, so a backward forms dx only);
3. **speed**: the compacted model of 2 against the dense one (the PEFT model's base), prefill and
   decode, interleaved round-robin (``bench.speed.throughput``), against the FLOP ideal.

``--extrapolate`` (run by ``report``) fits the per-layer slope of the cases that share widths
(e.g. Llama-3-8B at 2 and 4 layers) and extrapolates, *stated as such*, to the whole model and
to Llama-3-70B: memory above the weights, and the time of a 200-step run.

    python -m bench.scale run --case llama-3.2-1b:16 --device cpu --dtype float32
    python -m bench.scale run --case llama-3-8b:2 --case llama-3-8b:4 --dtype float32
    python -m bench.scale report       # results/scale/*.json -> results/scale/scale.md
    python -m bench.scale run --smoke  # tiny shapes, seconds (the code path of bench/gpu_check.py)

Results: one JSON per case under ``bench/results/scale/`` and ``scale.md`` beside them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import scale_models as sm
from .common import RESULTS_DIR, result_payload, write_json

OUT_DIR = RESULTS_DIR / "scale"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ memory
def measure_memory(s: dict, device, dtype, tokens: tuple[int, int], steps: int, seed: int = 0) -> dict:
    """Peak memory of one whole short ``prune()`` call and of its phases, against the formula."""
    import loraprune

    from .memory import current_rss, mark, peak_rss, reset_peak, tensor_peak

    out = {"model": sm.build_model(s, dtype, device, seed=seed)}
    batches = sm.random_batches(s["vocab"], steps, *tokens, seed=seed)
    _free(device)
    rss = {"before": current_rss()}

    def on_step(step, pruner, loss):
        if step == steps:  # training over; what follows is the final compaction
            rss["training_peak"] = peak_rss()
            reset_peak()
            mark("training")

    def run():
        out["model"] = loraprune.prune(out["model"], batches, ratio=0.5, steps=steps, prune_start=max(1, steps - 2),
                                       prune_end=steps - 1, prune_every=1, progress=False, on_step=on_step)

    reset_peak()
    t0 = time.perf_counter()
    peak = tensor_peak(run)
    wall = time.perf_counter() - t0
    rss["compaction_peak"] = peak_rss()
    achieved = out.pop("model").config.loraprune["achieved_ratio"]
    batches.clear()
    _free(device)
    train = peak["marks"].get("training", peak["tensor_peak_bytes"])
    compaction = peak["after_marks"].get("training", peak["tensor_peak_bytes"])
    res = {
        "steps": steps, "tokens": list(tokens), "achieved_ratio": achieved, "wall_s": wall,
        "measured": {"whole_call": peak["tensor_peak_bytes"], "training_steps": train, "final_compaction": compaction,
                     "probe": "torch.cuda.max_memory_allocated" if peak["device"] == "cuda"
                     else "live tensor bytes (torch.profiler allocator events)"},
    }
    compare_memory(res, s, dtype, device.type)
    if device.type == "cpu":
        res["rss"] = {"before": rss["before"], "training_peak_extra": rss["training_peak"] - rss["before"],
                      "compaction_peak_extra": rss["compaction_peak"] - rss["before"]}
    return res


def compare_memory(res: dict, s: dict, dtype: torch.dtype, device_type: str) -> dict:
    """Put the formula's figures for this case, and measured / formula, into ``res`` (a ``memory`` record);
    ``report`` re-runs it on stored results, so a corrected formula is compared with old measurements."""
    e = torch.finfo(dtype).bits // 8
    f = sm.memory_formula(s, res["tokens"][0] * res["tokens"][1], dtype_bytes=e, ratio=0.5,
                          saved_dropout_masks=device_type != "cuda",  # the CPU twin saves its masks
                          parked=device_type == "cuda")  # compaction parks the originals on the host
    res["formula"] = {k: f[k] for k in ("base", "lora_adam", "activations", "logits", "fisher", "compaction",
                                        "compaction_phase", "training_extra", "training_extra_sum",
                                        "projection_bytes")}
    m = res["measured"]
    res["measured_over_formula"] = {
        "training_steps": m["training_steps"] / f["training_extra"],
        "final_compaction": m["final_compaction"] / f["compaction_phase"],
        "training_steps_vs_the_first_formula": m["training_steps"] / f["training_extra_sum"],
    }
    return res


# ------------------------------------------------------------------------------------------ steps, speed
def measure_steps_and_speed(s: dict, device, dtype, tokens, steps: int, start: int, end: int, speed: dict,
                            seed: int = 0) -> dict:
    from .speed import throughput
    from .step_cost import live_widths, pair_steps, peft_trainer, phases

    model = sm.build_model(s, dtype, device, seed=seed)
    twin = sm.weight_sharing_twin(model)
    peft_step = peft_trainer(twin)
    batches = sm.random_batches(s["vocab"], steps, *tokens, seed=seed)
    peft_batches = sm.random_batches(s["vocab"], steps, *tokens, seed=seed + 1)

    def flops(pruner):
        macs, qw = live_widths(pruner)
        return (sm.step_flops(s, *tokens, kept_macs=macs, kept_q_width=qw), sm.step_flops(s, *tokens, teacher=False))

    times, _, pruned = pair_steps(model, peft_step, batches, peft_batches, steps, start, end, sync=_sync(device),
                                  flops=flops)
    step = {**phases(times, start, end), "per_step": times}
    cpu = device.type == "cpu"  # one thread on a shared CPU: the process's CPU time; on a GPU: wall, synchronised
    step["clock"] = "process CPU time" if cpu else "wall time (synchronised)"
    for k in ("before", "after"):
        ph = step[k]
        if ph["median_ratio"] is None:
            continue
        ph["ratio"] = ph["median_cpu_ratio"] if cpu else ph["median_ratio"]
        ph["prune_step_s"] = ph["min_prune_cpu_s"] if cpu else ph["median_prune_s"]
        ph["peft_step_s"] = ph["min_peft_cpu_s"] if cpu else ph["median_peft_s"]
        if ph.get("ideal_ratio"):
            ph["measured_over_ideal"] = ph["ratio"] / ph["ideal_ratio"]
    # the dense model for the speed comparison: the PEFT model's base (the original weight tensors;
    # progressive compaction permuted them in place, which changes values, not cost)
    dense = peft_step.model.unload()
    del twin, peft_step, model
    _free(device)
    dense.eval()
    pruned.eval()
    models = {"dense": dense, "compacted 50%": pruned}
    res = {"step_cost": step, "achieved_ratio": pruned.config.loraprune["achieved_ratio"],
           "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}}
    for mode in ("prefill", "decode"):
        r = throughput(models, speed, mode)
        res[mode] = r
        c = r["models"]["compacted 50%"]
        print(f"{mode}: speed-up {c['speedup']:.3f}, ideal {c['ideal_speedup']:.3f}, of ideal "
              f"{c['speedup_over_ideal']:.3f}; dense {r['models']['dense']['median_tokens_per_s']:.1f} tok/s",
              flush=True)
    del models, dense, pruned
    _free(device)
    return res


def run_case(name: str, layers: int | None, device: torch.device, dtype: torch.dtype, tokens=(2, 128),
             steps: int = 8, start: int = 3, end: int = 4, mem_steps: int = 3, speed: dict | None = None,
             parts=("memory", "steps")) -> dict:
    s = sm.shape(name, layers)
    speed = speed or dict(prefill_batch=1, prefill_seq=tokens[1], decode_prompt=8, decode_tokens=8, rounds=3)
    out = {"shape": s, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "tokens": list(tokens),
           "params": sm.model_params(s), "ideal": {}}
    out["ideal"]["before"] = sm.step_flops(s, *tokens) / sm.step_flops(s, *tokens, teacher=False)
    pr, pe = sm.step_flops_2x_convention(s, *tokens)
    out["ideal"]["before_2x_backward_convention"] = pr / pe
    pr, pe = sm.step_flops_2x_convention(s, *tokens, kept_fraction=0.5)
    out["ideal"]["after_2x_backward_convention"] = pr / pe
    t0 = time.perf_counter()
    if "memory" in parts:
        out["memory"] = measure_memory(s, device, dtype, tokens, mem_steps)
        m = out["memory"]
        print(f"{name}:{s['layers']} memory: training {m['measured']['training_steps'] / MIB:.0f} MiB "
              f"(formula {m['formula']['training_extra'] / MIB:.0f}), compaction "
              f"{m['measured']['final_compaction'] / MIB:.0f} MiB (formula {m['formula']['compaction_phase'] / MIB:.0f})",
              flush=True)
    if "steps" in parts:
        out.update(measure_steps_and_speed(s, device, dtype, tokens, steps, start, end, speed))
        st = out["step_cost"]
        print(f"{name}:{s['layers']} step vs PEFT ({st['clock']}): before {st['before']['ratio']:.3f} (ideal "
              f"{st['before'].get('ideal_ratio') or float('nan'):.3f}), after {st['after']['ratio']:.3f} "
              f"(ideal {st['after'].get('ideal_ratio') or float('nan'):.3f})", flush=True)
    out["seconds"] = time.perf_counter() - t0
    out["settings"] = dict(steps=steps, prune_start=start, prune_end=end, mem_steps=mem_steps, speed=speed,
                           parts=list(parts))
    return out


# ------------------------------------------------------------------------------------------ extrapolation
def run_seconds(step_before: float, step_after: float, steps: int = 200, start: float = 0.1, end: float = 0.75) -> float:
    """Time of a ``steps``-step run with the default cubic schedule, each step's time interpolated
    between the dense-step and final-mask-step times by the share of the final removal reached."""
    from loraprune.method.schedule import CubicSchedule

    sched = CubicSchedule.for_run(steps, start, end)
    return sum(step_before + (step_after - step_before) * sched.fraction(k - 1) for k in range(1, steps + 1))


def _per_layer_bytes(s: dict, tokens: int, e: int) -> float:
    """The formula's memory per decoder layer with checkpointing: the layer's input, LoRA + AdamW."""
    return e * s["hidden"] * tokens + 16 * sm.lora_macs(s)


def extrapolate(cases: list[dict], targets=("llama-3-8b", "llama-3-70b")) -> dict | None:
    """Per-layer slope of the cases sharing widths (two depths at least), extrapolated, *stated as such*.

    Memory above the weights during the training steps and time per step are fitted as
    ``fixed + per_layer x L`` on the measured depths (on CPU the step time is the least disturbed
    sample's CPU time: a shared machine only ever adds time). For the whole model of the measured widths only
    L changes. For another shape (70B), the per-layer part is scaled by the formula's per-layer bytes
    (layer input, LoRA + AdamW) or projection multiply-adds (time), the fixed part by the formula's
    fixed bytes (max(loss chunk, one layer's activations + fisher)) or the head's size (time)."""
    groups: dict = {}
    for c in cases:
        if "memory" in c and "step_cost" in c:
            key = (c["shape"]["name"], c["device"], c["dtype"], tuple(c["tokens"]))
            groups.setdefault(key, []).append(c)
    out = {}
    for (name, device, dtype, tokens), cs in groups.items():
        cs = sorted(cs, key=lambda c: c["shape"]["layers"])
        if len({c["shape"]["layers"] for c in cs}) < 2:
            continue
        lo, hi = cs[0], cs[-1]
        dl = hi["shape"]["layers"] - lo["shape"]["layers"]

        def fit(get):
            slope = (get(hi) - get(lo)) / dl
            return get(lo) - slope * lo["shape"]["layers"], slope

        mem = fit(lambda c: c["memory"]["measured"]["training_steps"])
        tb = fit(lambda c: c["step_cost"]["before"]["prune_step_s"])
        ta = fit(lambda c: c["step_cost"]["after"]["prune_step_s"])
        pb = fit(lambda c: c["step_cost"]["before"]["peft_step_s"])
        base_shape = sm.shape(name)
        e = torch.finfo(DTYPES[dtype]).bits // 8
        T = tokens[0] * tokens[1]
        rows = {}
        for target in targets:
            t = sm.shape(target)
            f_t = sm.memory_formula(t, T, dtype_bytes=e)
            f_b = sm.memory_formula(base_shape, T, dtype_bytes=e)
            layer_mem = _per_layer_bytes(t, T, e) / _per_layer_bytes(base_shape, T, e)
            fixed_mem = (f_t["training_extra"] - _per_layer_bytes(t, T, e) * t["layers"]) / \
                (f_b["training_extra"] - _per_layer_bytes(base_shape, T, e) * base_shape["layers"])
            layer_t = sm.projection_macs(t) / sm.projection_macs(base_shape)
            fixed_t = (t["vocab"] * t["hidden"]) / (base_shape["vocab"] * base_shape["hidden"])
            L = t["layers"]

            def at(fitted, lf=layer_t, ff=fixed_t):
                return fitted[0] * ff + fitted[1] * lf * L
            extra = mem[0] * fixed_mem + mem[1] * layer_mem * L
            before, after = at(tb), at(ta)
            rows[target] = {
                "layers": L, "weights_bytes": f_t["base"], "training_extra_bytes": extra,
                "per_gpu_bytes": f_t["base"] + max(extra, f_t["compaction_phase"]),
                "formula_per_gpu_bytes": f_t["peak"],
                "final_compaction_bytes_formula": f_t["compaction"],
                "step_s_before": before, "step_s_after": after, "peft_step_s": at(pb),
                "run_200_steps_s": run_seconds(before, after),
            }
        out[f"{name} on {device}, {dtype}, {tokens[0]}x{tokens[1]} tokens"] = {
            "from_layers": [c["shape"]["layers"] for c in cs], "memory_fit_bytes": mem,
            "step_before_fit_s": tb, "step_after_fit_s": ta, "peft_step_fit_s": pb, "targets": rows,
            "note": "extrapolated, not measured: a straight line through two measured depths; 70B scaled by shape",
        }
    return out or None


# ------------------------------------------------------------------------------------------ tables
def _mib(b):
    return f"{b / MIB:,.0f}"


def markdown(cases: list[dict], extra: dict | None = None) -> str:
    lines = ["| shape | device, dtype | tokens | step / PEFT before (ideal) | after 50 % (ideal) | "
             "peak MiB training: measured / formula | compaction: measured / formula | "
             "prefill speed-up (ideal, of ideal) | decode speed-up (ideal, of ideal) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        s = c["shape"]
        label = f"{s['name']}, {s['layers']} layers (h {s['hidden']}, MLP {s['mlp']}, {s['heads']}/{s['kv_heads']} " \
                f"heads, V {s['vocab']}{', tied' if s['tied'] else ''})"
        cells = [label, f"{c['device']}, {c['dtype']}", "×".join(map(str, c["tokens"]))]
        st = c.get("step_cost")
        for k in ("before", "after"):
            if st and st[k].get("ratio") is not None:
                cells.append(f"{st[k]['ratio']:.2f}× ({st[k].get('ideal_ratio') or float('nan'):.2f}×)")
            else:
                cells.append("—")
        m = c.get("memory")
        if m:
            cells.append(f"{_mib(m['measured']['training_steps'])} / {_mib(m['formula']['training_extra'])}"
                         f" ({m['measured_over_formula']['training_steps']:.2f})")
            cells.append(f"{_mib(m['measured']['final_compaction'])} / {_mib(m['formula']['compaction_phase'])}"
                         f" ({m['measured_over_formula']['final_compaction']:.2f})")
        else:
            cells += ["—", "—"]
        for mode in ("prefill", "decode"):
            r = c.get(mode, {}).get("models", {}).get("compacted 50%")
            cells.append(f"{r['speedup']:.2f}× ({r['ideal_speedup']:.2f}×, {r['speedup_over_ideal']:.2f})" if r
                         else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if extra:
        lines += ["", "Extrapolated (not measured), from the per-layer slope of the rows above:", "",
                  "| fitted on | target | layers | weights GiB | above the weights GiB | per device GiB "
                  "(formula) | pruning step s before / after | PEFT step s | 200-step run h |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for src, ex in extra.items():
            for tgt, r in ex["targets"].items():
                lines.append(
                    f"| {src} (layers {', '.join(map(str, ex['from_layers']))}) | {tgt} | {r['layers']} | "
                    f"{r['weights_bytes'] / 2**30:.1f} | {r['training_extra_bytes'] / 2**30:.2f} | "
                    f"{r['per_gpu_bytes'] / 2**30:.1f} ({r['formula_per_gpu_bytes'] / 2**30:.1f}) | "
                    f"{r['step_s_before']:.2f} / {r['step_s_after']:.2f} | {r['peft_step_s']:.2f} | "
                    f"{r['run_200_steps_s'] / 3600:.2f} |")
    return "\n".join(lines) + "\n"


def load_cases(out_dir: Path) -> list[dict]:
    cases = []
    for p in sorted(out_dir.glob("*.json")):
        d = json.loads(p.read_text())
        if d.get("figure", "").startswith("scale:") and "case" in d:
            c = {**d["case"], "file": p.name}
            if "memory" in c:  # the formula as it is now
                compare_memory(c["memory"], c["shape"], DTYPES[c["dtype"]], torch.device(c["device"]).type)
            for k in ("before", "after"):  # the step seconds of the extrapolation: least disturbed on CPU
                ph = c.get("step_cost", {}).get(k)
                rows = [r for r in c.get("step_cost", {}).get("per_step", []) if ph and r["step"] in ph["steps"]]
                if rows and c["device"] == "cpu":
                    ph["prune_step_s"] = min(r["prune_cpu_s"] for r in rows)
                    ph["peft_step_s"] = min(r["peft_cpu_s"] for r in rows)
            cases.append(c)
    return cases


# ------------------------------------------------------------------------------------------ CLI
def parse_case(text: str) -> tuple[str, int | None]:
    name, _, layers = text.partition(":")
    return name, (int(layers) if layers else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure cases (one JSON each)")
    r.add_argument("--case", action="append", default=None, help="SHAPE[:LAYERS], e.g. llama-3-8b:2 (repeatable)")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    r.add_argument("--tokens", type=int, nargs=2, default=[2, 128], metavar=("BATCH", "SEQ"))
    r.add_argument("--steps", type=int, default=8, help="steps of the timed run (masks at --prune-start..end)")
    r.add_argument("--prune-start", type=int, default=3)
    r.add_argument("--prune-end", type=int, default=4)
    r.add_argument("--mem-steps", type=int, default=3)
    r.add_argument("--parts", nargs="+", default=["memory", "steps"], choices=["memory", "steps"])
    r.add_argument("--smoke", action="store_true", help="the tiny shape, a few steps: the code path in seconds")
    r.add_argument("--out", type=Path, default=OUT_DIR)
    rep = sub.add_parser("report", help="results/scale/*.json -> scale.md (with the extrapolation)")
    rep.add_argument("--out", type=Path, default=OUT_DIR)
    a = p.parse_args(argv)
    if a.cmd == "report":
        cases = load_cases(a.out)
        extra = extrapolate(cases)
        text = markdown(cases, extra)
        (a.out / "scale.md").write_text(text)
        if extra:
            write_json(a.out / "extrapolation.json", result_payload("scale: extrapolation (not measured)", {}, extra))
        print(text)
        return 0
    torch.set_num_threads(int(os.environ.get("LORAPRUNE_THREADS", os.cpu_count() or 1)))
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cases = [parse_case(c) for c in (a.case or (["tiny"] if a.smoke else ["llama-3.2-1b"]))]
    for name, layers in cases:
        kw = dict(steps=a.steps, start=a.prune_start, end=a.prune_end, mem_steps=a.mem_steps)
        if a.smoke:
            kw = dict(steps=5, start=2, end=3, mem_steps=3,
                      speed=dict(prefill_batch=1, prefill_seq=16, decode_prompt=4, decode_tokens=2, rounds=2))
        case = run_case(name, layers, device, dtype, tuple(a.tokens), parts=tuple(a.parts), **kw)
        tag = f"{name}-{case['shape']['layers']}L-{device.type}-{case['dtype']}"
        write_json(a.out / f"{tag}.json", result_payload(f"scale: {tag}", {"case": [name, layers]}, {"case": case}))
        print(f"-> {a.out / (tag + '.json')} ({case['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
