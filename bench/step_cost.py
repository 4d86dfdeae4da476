"""Cost of a default pruning step against a PEFT LoRA fine-tuning step, on SmolLM2-135M.

The floor a pruning step is held to is what a user would otherwise run: a PEFT
LoRA step (``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05)`` on the seven
projections, ``get_peft_model``, AdamW, Hugging Face's non-reentrant gradient
checkpointing) on the same model and the same batches (4 x 128 tokens of
WikiText-2 valid, ``bench/smollm2.py``'s windows). Both run in one process, one
PEFT step right after each pruning step (``prune``'s ``on_step``), so each
ratio compares two steps taken under the same load of this shared machine.

The pruning run is ``loraprune.prune(model, batches, ratio=0.5)`` with its
defaults except for a short schedule (``steps``, ``prune_start``, ``prune_end``,
``prune_every=1``), so that both phases fit in a few minutes:

* *before*: steps 2..``prune_start`` (dense student, scores gathered, LoRA trained;
  step 1, the warm-up of both, is left out);
* *after*: the steps after ``prune_end`` (the final 50 % mask, cut out of the
  computation by progressive compaction; recovery).

The figure is the median over those steps of (pruning step / PEFT step), in wall time
(``median_ratio``) and in the process's CPU time (``median_cpu_ratio``: with one thread on a
CPU shared with other jobs, the time this process actually computed, which other jobs' load
does not inflate as it does wall time; the headline on CPU since 2026-12-07).
``--profile`` also records the last step of each phase, and the PEFT step after it, with ``torch.profiler``
(``record_function`` ranges: teacher forward, student loss, backward, scoring,
mask update, optimiser) and writes the top operators and ranges.

    python -m bench.step_cost                    # bench/results/step_cost.json
    python -m bench.step_cost --profile          # + the profile tables
    python -m bench.step_cost --shape llama-3.2-1b --layers 8   # published widths, random weights, 2x128 tokens

``--shape`` (a ``bench/scale_models.py`` shape) replaces SmolLM2 by a random-initialised model at
published widths; the PEFT model then shares its frozen weights (``weight_sharing_twin``) and each
step's FLOP ideal (``scale_models.step_flops``, from the student's live widths) is recorded beside
the measured ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

from .common import RESULTS_DIR, result_payload, write_json

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_trainer(model, lr: float = 2e-4):
    """A PEFT LoRA fine-tuning step on ``model`` (changed in place): ``step(batch) -> seconds``."""
    import torch
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=PROJECTIONS,
                                                  task_type="CAUSAL_LM"))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    device = model.get_input_embeddings().weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch) -> float:
        ids = batch["input_ids"].to(device)
        sync()
        t0 = time.perf_counter()
        with torch.profiler.record_function("peft_step"):
            out = peft_model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0
    step.model = peft_model  # the PeftModel (its base: ``step.model.unload()``)
    return step


@contextlib.contextmanager
def labelled_ranges():
    """``record_function`` ranges around the parts of a pruning step (for the profile only)."""
    import importlib

    import torch

    engine = importlib.import_module("loraprune.run.engine")
    prune_mod = importlib.import_module("loraprune.run.prune")  # the module (loraprune.prune is the function)
    rf = torch.profiler.record_function
    saved = {}

    def wrap(owner, name, label):
        fn = getattr(owner, name)
        saved[(owner, name)] = fn

        def wrapped(*a, **k):
            with rf(label):
                return fn(*a, **k)
        setattr(owner, name, wrapped)

    orig_teacher = engine.LoRAPruner.dense_teacher

    @contextlib.contextmanager
    def teacher(self):
        with rf("teacher_forward"), orig_teacher(self) as m:
            yield m
    saved[(engine.LoRAPruner, "dense_teacher")] = orig_teacher
    engine.LoRAPruner.dense_teacher = teacher
    wrap(prune_mod, "training_loss", "forward_and_loss")
    wrap(engine.LoRAPruner, "score", "scoring")
    wrap(engine.LoRAPruner, "step_end", "mask_update")
    orig_micro = prune_mod.micro_step

    def micro(pruner, batch, config, scale):
        with rf("prune_step_fwd_bwd"):
            return orig_micro(pruner, batch, config, scale)
    saved[(prune_mod, "micro_step")] = orig_micro
    prune_mod.micro_step = micro
    try:
        yield
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


def profile_table(prof, rows: int = 25) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def live_widths(pruner) -> tuple[float, float]:
    """(projection multiply-adds per token, summed query width) of the student as it computes now
    (progressive compaction's live prefixes), summed over layers."""
    from loraprune.model.lora import LoRALinear

    macs = qw = 0.0
    for name, m in pruner.model.named_modules():
        if isinstance(m, LoRALinear):
            out_f = m.out_features if m.live_out is None else m.live_out
            in_f = m.in_features if m.live_in is None else m.live_in
            if m.keep is not None:
                out_f = min(out_f, m.keep.numel())
            macs += out_f * in_f
            if name.endswith("q_proj"):
                qw += out_f
    return macs, qw


def pair_steps(model, peft_step, batches, peft_batches, steps: int, start: int, end: int, profile: bool = False,
               sync=None, flops=None, **prune_kw) -> tuple[list[dict], dict, object]:
    """``loraprune.prune(model, batches, ratio=0.5)`` with a PEFT step right after each pruning step.

    Returns (per-step rows, profile tables, the pruned model). ``sync``: called before each clock
    read (``torch.cuda.synchronize`` on a GPU). ``flops(pruner) -> (prune_flops, peft_flops)``: the
    FLOP ideal of each pair, recorded beside its measured ratio."""
    import torch

    import loraprune

    sync = sync or (lambda: None)
    times: list[dict] = []
    profiles: dict[str, str] = {}
    last = [time.perf_counter()]
    last_cpu = [time.process_time()]
    prof_steps = {start: "before", steps: "after"} if profile else {}
    active = [None]
    peft_iter = iter(peft_batches)

    def on_step(step, pruner, loss):
        sync()
        prune_s = time.perf_counter() - last[0]
        prune_cpu = time.process_time() - last_cpu[0]
        cpu0 = time.process_time()
        if active[0] is not None:  # the profiled pruning step ends here; profile a PEFT step on its own
            active[0].__exit__(None, None, None)
            profiles[f"prune_{prof_steps[step]}"] = profile_table(active[0])
            active[0] = None
            with torch.profiler.profile() as p:
                peft_s = peft_step(next(peft_iter))
            profiles[f"peft_{prof_steps[step]}"] = profile_table(p)
        else:
            peft_s = peft_step(next(peft_iter))
        peft_cpu = time.process_time() - cpu0
        kept = 1 - pruner.removed_params() / pruner.total_params
        row = {"step": step, "prune_s": prune_s, "peft_s": peft_s, "kept": kept, "prune_cpu_s": prune_cpu,
               "peft_cpu_s": peft_cpu}
        if flops is not None:
            fp, fq = flops(pruner)
            row.update(prune_flops=fp, peft_flops=fq, ideal_ratio=fp / fq)
        times.append(row)
        print(f"step {step}: prune {prune_s:.2f} s, peft {peft_s:.2f} s, ratio {prune_s / peft_s:.3f}, "
              f"CPU time ratio {prune_cpu / peft_cpu:.3f}, kept {kept:.3f}"
              + (f", ideal {row['ideal_ratio']:.3f}" if flops else ""), flush=True)
        if step + 1 in prof_steps:
            active[0] = torch.profiler.profile()
            active[0].__enter__()
        sync()
        last[0] = time.perf_counter()
        last_cpu[0] = time.process_time()

    ctx = labelled_ranges() if profile else contextlib.nullcontext()
    with ctx:
        if 1 in prof_steps:
            active[0] = torch.profiler.profile()
            active[0].__enter__()
        sync()
        last[0] = time.perf_counter()
        last_cpu[0] = time.process_time()
        pruned = loraprune.prune(model, batches, ratio=0.5, steps=steps, prune_start=start, prune_end=end,
                                 prune_every=1, progress=False, on_step=on_step, **prune_kw)
    for t in times:
        t["profiled"] = t["step"] in prof_steps  # both steps of a profiled pair run under the profiler
    return times, profiles, pruned


def measure(steps: int, start: int, end: int, profile: bool, out: Path, shape_name: str | None = None,
            layers: int | None = None, tokens: tuple[int, int] = (4, 128)) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("LORAPRUNE_THREADS", os.cpu_count() or 1)))
    flops = None
    if shape_name is None:
        from .smollm2 import load_smollm2, train_batches

        model, tok = load_smollm2()
        peft_model = copy.deepcopy(model)
        batches = train_batches(tok, 128, 4, steps, seed=0)
        peft_batches = train_batches(tok, 128, 4, steps, seed=1)
        what = "SmolLM2-135M, 4x128 tokens"
    else:
        from . import scale_models as sm

        s = sm.shape(shape_name, layers)
        model = sm.build_model(s, torch.float32, "cpu")
        peft_model = sm.weight_sharing_twin(model)
        batches = sm.random_batches(s["vocab"], steps, *tokens, seed=0)
        peft_batches = sm.random_batches(s["vocab"], steps, *tokens, seed=1)
        what = f"{shape_name} widths, {s['layers']} layers, random weights, fp32, {tokens[0]}x{tokens[1]} tokens"

        def flops(pruner):
            macs, qw = live_widths(pruner)
            return (sm.step_flops(s, *tokens, kept_macs=macs, kept_q_width=qw),
                    sm.step_flops(s, *tokens, teacher=False))
    peft_step = peft_trainer(peft_model)
    times, profiles, _ = pair_steps(model, peft_step, batches, peft_batches, steps, start, end, profile,
                                    flops=flops)
    payload = result_payload(
        f"pruning step / PEFT LoRA step, {what}, r=8, checkpointing on both",
        {"steps": steps, "prune_start": start, "prune_end": end, "ratio": 0.5, "tokens": list(tokens),
         "shape": shape_name, "layers": layers, "threads": torch.get_num_threads()},
        {**phases(times, start, end), "per_step": times, "profiles": profiles})
    write_json(out, payload)
    return payload


def phases(times: list[dict], start: int, end: int) -> dict:
    """Median ratios before pruning (steps 2..start) and after the final mask (steps > end); profiled
    steps are left out (the profiler's per-operator overhead is not the same for both kinds of step)."""
    def phase(rows):
        if not rows:
            return {"steps": [], "median_ratio": None, "ratios": []}
        ratios = [r["prune_s"] / r["peft_s"] for r in rows]
        ideal = [r["ideal_ratio"] for r in rows if "ideal_ratio" in r]
        cpu = [r["prune_cpu_s"] / r["peft_cpu_s"] for r in rows if r.get("peft_cpu_s")]
        return {"steps": [r["step"] for r in rows], "median_ratio": statistics.median(ratios), "ratios": ratios,
                "median_cpu_ratio": statistics.median(cpu) if cpu else None, "cpu_ratios": cpu,
                "ideal_ratio": statistics.median(ideal) if ideal else None,
                "median_prune_s": statistics.median(r["prune_s"] for r in rows),
                "median_prune_cpu_s": statistics.median(r.get("prune_cpu_s", 0.0) for r in rows),
                "median_peft_cpu_s": statistics.median(r.get("peft_cpu_s", 0.0) for r in rows),
                # the least disturbed sample of each (a shared machine only ever adds time)
                "min_prune_cpu_s": min(r.get("prune_cpu_s", 0.0) for r in rows),
                "min_peft_cpu_s": min(r.get("peft_cpu_s", 0.0) for r in rows),
                "median_peft_s": statistics.median(r["peft_s"] for r in rows)}

    timed = [t for t in times if not t.get("profiled")]
    return {"before": phase([t for t in timed if 2 <= t["step"] <= start]),
            "after": phase([t for t in timed if t["step"] > end])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prune-start", type=int, default=4)
    p.add_argument("--prune-end", type=int, default=6)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--shape", default=None, help="a bench.scale_models shape (random weights) instead of SmolLM2")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of --shape (default: the whole model)")
    p.add_argument("--tokens", type=int, nargs=2, default=None, metavar=("BATCH", "SEQ"),
                   help="tokens per step (default 4 128 on SmolLM2, 2 128 with --shape)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "step_cost.json")
    p.add_argument("--summarize", action="store_true", help="recompute the medians of --out from its steps")
    a = p.parse_args(argv)
    if a.summarize:
        res = json.loads(a.out.read_text())
        res.update(phases(res["per_step"], res["settings"]["prune_start"], res["settings"]["prune_end"]))
        write_json(a.out, res)
        print(json.dumps({k: res[k]["median_ratio"] for k in ("before", "after")}))
        return 0
    tokens = tuple(a.tokens) if a.tokens else ((2, 128) if a.shape else (4, 128))
    res = measure(a.steps, a.prune_start, a.prune_end, a.profile, a.out, a.shape, a.layers, tokens)
    for k in ("before", "after"):
        ph = res[k]
        if ph["median_ratio"] is not None:
            print(f"{k}: {ph['median_ratio']:.3f}x PEFT (CPU time {ph['median_cpu_ratio']:.3f}x)")
    print(f"-> {a.out}")
    for name, table in res["profiles"].items():
        print(f"\n== {name}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
