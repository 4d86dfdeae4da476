"""Memory: peak extra bytes of the criterion alone, and of one whole pruning step.

Each case runs in its own Python process (``python -m bench.memory --case
JSON``), so no case inherits another's allocations. Inside it, everything the
case needs (weights, LoRA factors, gradients, inputs) is built first, one
warm-up call runs the same code path on a small input (library start-up
allocations are paid there), then the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``) and the measured call runs. *Peak extra* =
peak RSS during the call minus RSS just before it.

(a) criterion alone, LLaMA-7B-shaped projections (fp32, CPU, r = 8): our
    estimator (``score_module(..., "lora")`` → ``kernels.group_importance``, row
    blocks, never an out x in temporary) against the eager LoRAPrune-style
    computation that forms ``G = ∇B·A + B·∇A − ∇B·∇A`` and ``B·A`` in full. The
    probe is the kernels' own (:mod:`bench.kernel_memory_probe`, also used by
    ``bench/bench_kernels.py``), run here beside the whole-step figures.
(b) one pruning step (forward, backward, scoring) with ``lora`` against
    ``grad`` on the reference model and on one LLaMA-7B-shaped decoder layer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

LLAMA7B_SHAPES = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096)}
SMOKE_SHAPES = {"smoke 256x128": (256, 128), "smoke 688x128": (688, 128)}
LLAMA7B_LAYER = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     head_dim=128, num_hidden_layers=1, vocab_size=512, max_position_embeddings=2048)
SMOKE_LAYER = dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
                   head_dim=32, num_hidden_layers=1, vocab_size=128, max_position_embeddings=256)


# --------------------------------------------------------------------- peaks
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:  # not Linux: psutil
        import psutil

        return psutil.Process().memory_info().rss
    return kib * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False if unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def measure(fn) -> dict:
    """Run ``fn`` once; peak extra RSS over the RSS just before, and wall time."""
    base = current_rss()
    exact = reset_peak()
    before_peak = peak_rss()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    peak = peak_rss()
    # Without a reset the counter holds the set-up's peak: only growth above it is visible.
    extra = peak - (base if exact else max(base, before_peak))
    return {"peak_extra_bytes": max(extra, 0), "peak_total_bytes": peak, "rss_before_bytes": base,
            "peak_reset": exact, "wall_s": wall}


MARK = "loraprune.bench.mark:"


#: on a GPU, inside a :func:`tensor_peak` call: (bytes live at its start, [(mark, peak of the segment before it)])
_CUDA_MARKS: tuple | None = None


def mark(name: str) -> None:
    """Inside a :func:`tensor_peak` call: the peak up to here is also reported, as ``marks[name]``, and
    the peak from here to the end of the call as ``after_marks[name]``."""
    if _CUDA_MARKS is not None:  # the allocator's peak of the segment that ends here, then restart it
        torch.cuda.synchronize()
        _CUDA_MARKS[1].append((name, torch.cuda.max_memory_allocated() - _CUDA_MARKS[0]))
        torch.cuda.reset_peak_memory_stats()
        return
    with torch.profiler.record_function(MARK + name):
        pass


def tensor_peak(fn) -> dict:
    """Run ``fn`` once: the peak of the tensor bytes the allocator has handed out during the call, above
    what was live when it started (on a GPU what ``torch.cuda.max_memory_allocated`` counts), and the
    peak up to each :func:`mark` ``fn`` made (``marks``: name -> bytes) and from it to the end of the
    call (``after_marks``).

    Peak RSS, the other probe, also counts what the C allocator keeps after a free (glibc keeps freed
    blocks of its heap for reuse; with many mid-sized tensors freed in a different order than they were
    made, RSS ends well above the live bytes) and non-tensor memory. On CPU this reads the allocator's
    own events through ``torch.profiler`` (``profile_memory``): every allocation and free, in order.
    """
    global _CUDA_MARKS
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        _CUDA_MARKS = (start, [])
        t = time.perf_counter()
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            segments = _CUDA_MARKS[1]
            _CUDA_MARKS = None
        segments = segments + [(None, torch.cuda.max_memory_allocated() - start)]  # the last segment
        peaks = [p for _, p in segments]
        marks = {n: max(peaks[: i + 1]) for i, (n, _) in enumerate(segments[:-1])}
        after = {n: max(peaks[i + 1:]) for i, (n, _) in enumerate(segments[:-1])}
        return {"tensor_peak_bytes": max(peaks), "device": "cuda", "marks": marks, "after_marks": after,
                "wall_s": time.perf_counter() - t}
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    wall = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    marks = [(e["ts"], e["name"][len(MARK):]) for e in events if e.get("name", "").startswith(MARK)]
    timeline = sorted([(e["ts"], 1, e["args"]["Bytes"]) for e in mem] + [(ts, 0, name) for ts, name in marks],
                      key=lambda x: (x[0], x[1]))
    live = peak = 0
    at_marks, after = {}, {}
    for _, kind, value in timeline:
        if kind == 0:
            at_marks.setdefault(value, peak)
            after.setdefault(value, live)
            continue
        live += value  # negative for a free (also of tensors made before the call)
        peak = max(peak, live)
        for name in after:
            after[name] = max(after[name], live)
    return {"tensor_peak_bytes": peak, "device": "cpu", "marks": at_marks, "after_marks": after, "wall_s": wall}


# ---------------------------------------------------------------- criterion
#: our name -> the probe's: the estimator itself (the kernel's CPU twin), the public criterion path
#: (``score_module`` on a LoRALinear built inside the measured call), the eager computation.
IMPLS = {"ours": "twin", "ours-public-path": "criterion", "eager": "eager"}

def case_criterion(impl: str, out_f: int, in_f: int, r: int = 8) -> dict:
    """The kernels' own probe (:mod:`bench.kernel_memory_probe`, same protocol as ``measure``):
    ``criterion`` = the public ``score_module(..., "lora")`` path, ``eager`` = G and B·A formed."""
    from bench import kernel_memory_probe as cpu_memory

    res = cpu_memory.measure(IMPLS[impl], out_f, in_f, r)
    res.update(shape=[out_f, in_f], r=r, impl=impl, peak_reset=True, peak_total_bytes=peak_rss())
    return res


# --------------------------------------------------------------------- step
def _model_for(which: str, smoke: bool, setup_kw: dict):
    if which == "reference":
        from .common import BenchSetup

        model, _, _ = BenchSetup.create(smoke=smoke, **setup_kw).reference()
        return model, 4, 128 if not smoke else 32
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(SMOKE_LAYER if smoke else LLAMA7B_LAYER))
    torch.manual_seed(0)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg)
    return model.eval(), 2, 128 if not smoke else 32


def case_step(which: str, criterion: str, smoke: bool = False, setup_kw: dict | None = None) -> dict:
    from loraprune import LoRAPruner

    model, batch, seq = _model_for(which, smoke, setup_kw or {})
    pruner = LoRAPruner(model, ratio=0.5, criterion=criterion, lora_dropout=0.0)
    model.config.use_cache = False
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    params = pruner.lora_parameters()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        pruner.score()
        for p in params:
            p.grad = None

    step()  # warm-up: the same step once
    res = measure(step)
    res.update(model=which, criterion=criterion, batch=[batch, seq],
               model_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
               projection_weight_bytes=sum(m.base.weight.numel() * m.base.weight.element_size()
                                           for mods in pruner.modules for m in mods.values()))
    return res


# ------------------------------------------------------------------- driver
def cases(smoke: bool) -> list[dict]:
    """Every case of the figure; the smoke run keeps one of each kind (each case pays a fresh interpreter)."""
    shapes = dict(list(SMOKE_SHAPES.items())[:1]) if smoke else LLAMA7B_SHAPES
    models = ("reference",) if smoke else ("reference", "llama7b-layer")
    out = [{"kind": "criterion", "impl": impl, "name": name, "shape": list(shape)}
           for name, shape in shapes.items() for impl in (("eager", "ours") if smoke else tuple(IMPLS))]
    out += [{"kind": "step", "model": m, "criterion": c} for m in models for c in ("lora", "grad")]
    return out


def run_case(case: dict, smoke: bool, setup_kw: dict) -> dict:
    """One case in a fresh interpreter; returns its JSON result."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.memory", "--case", json.dumps(case), "--setup", json.dumps(setup_kw)]
    if smoke:
        cmd.append("--smoke")
    proc = subprocess.run(cmd, cwd=os.getcwd(), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(setup, settings: dict | None = None, log=print, only: str | None = None) -> dict:
    """All cases, or only those of one kind (``only="criterion"|"step"``), the others kept from the
    existing memory.json."""
    from .common import read_json, result_payload, write_json

    setup_kw = {"out": str(setup.out), "preset": setup.preset,
                "data_dir": str(setup.data_dir) if setup.data_dir and not setup.smoke else None,
                "cache_dir": str(setup.cache_dir) if setup.cache_dir else None}
    results = []
    path = setup.out / "memory.json"
    if only and path.is_file():
        results = [r for r in read_json(path)["cases"] if r["case"]["kind"] != only]
    for case in cases(setup.smoke):
        if only and case["kind"] != only:
            continue
        res = run_case(case, setup.smoke, setup_kw)
        res["case"] = case
        results.append(res)
        log(f"memory: {json.dumps(case)}: peak extra {res['peak_extra_bytes'] / 2**20:.1f} MiB, "
            f"peak total {res['peak_total_bytes'] / 2**20:.0f} MiB")
    summary = summarize(results)
    payload = result_payload("memory", {"smoke": setup.smoke, "cases": cases(setup.smoke), "dtype": "float32",
                                        "lora_r": 8, "method": "peak RSS (VmHWM after clear_refs), one process per case"},
                             {"cases": results, "summary": summary,
                              "paper_anchor": {"lora_vs_grad_gpu_memory": -0.526}})
    write_json(setup.out / "memory.json", payload)
    return payload


def summarize(results: list[dict]) -> dict:
    crit = {}
    for r in results:
        c = r["case"]
        if c["kind"] == "criterion":
            crit.setdefault(c["name"], {})[c["impl"]] = r
    criterion = {}
    for name, d in crit.items():
        if "eager" in d and "ours" in d:
            ours = max(d["ours"]["peak_extra_bytes"], 1)
            criterion[name] = {
                "eager_extra_bytes": d["eager"]["peak_extra_bytes"], "ours_extra_bytes": d["ours"]["peak_extra_bytes"],
                "weight_bytes": d["ours"]["weight_bytes"],
                "eager_over_ours": d["eager"]["peak_extra_bytes"] / ours,
                "target_100x_met": d["eager"]["peak_extra_bytes"] / ours >= 100,
            }
            if "ours-public-path" in d:
                pub = d["ours-public-path"]["peak_extra_bytes"]
                criterion[name].update(public_path_extra_bytes=pub,
                                       eager_over_public_path=d["eager"]["peak_extra_bytes"] / max(pub, 1))
    steps = {}
    for r in results:
        c = r["case"]
        if c["kind"] == "step":
            steps.setdefault(c["model"], {})[c["criterion"]] = r
    step = {}
    for model, d in steps.items():
        if "lora" in d and "grad" in d:
            lo, gr = d["lora"], d["grad"]
            step[model] = {
                "lora_extra_bytes": lo["peak_extra_bytes"], "grad_extra_bytes": gr["peak_extra_bytes"],
                "lora_total_bytes": lo["peak_total_bytes"], "grad_total_bytes": gr["peak_total_bytes"],
                "extra_lora_over_grad": lo["peak_extra_bytes"] / max(gr["peak_extra_bytes"], 1),
                "total_change_lora_vs_grad": lo["peak_total_bytes"] / gr["peak_total_bytes"] - 1,
                "model_bytes": lo["model_bytes"],
            }
    return {"criterion": criterion, "step": step}


def main(argv=None):
    ap = argparse.ArgumentParser(description="one memory case (used by `python -m bench.run memory`)")
    ap.add_argument("--case", required=True, help="JSON description of the case")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--setup", default="{}", help="JSON keyword arguments of BenchSetup.create")
    args = ap.parse_args(argv)
    case = json.loads(args.case)
    if case["kind"] == "criterion":
        res = case_criterion(case["impl"], *case["shape"])
    elif case["kind"] == "step":
        res = case_step(case["model"], case["criterion"], smoke=args.smoke, setup_kw=json.loads(args.setup))
    else:
        raise SystemExit(f"unknown case kind {case['kind']!r}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
