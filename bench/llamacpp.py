"""Prune + quantize, measured in llama.cpp itself: SmolLM2-135M dense vs pruned 20 % and 50 %.

Needs llama-cpp-python (``pip install llama-cpp-python``: builds llama.cpp from
source with the system compiler, 10-20 minutes once; pip caches the wheel;
prebuilt wheels need a newer glibc than Debian 12's).

    python -m bench.llamacpp prune     # the default method (bench/smollm2.py's batches; --steps, --batch-size), saved
    python -m bench.llamacpp run       # GGUF f16 / Q8_0 / Q4_K_M of each, measured in llama.cpp -> results/llamacpp.json
    python -m bench.llamacpp report    # markdown table
    python -m bench.llamacpp fidelity  # logits in llama.cpp vs transformers per model and dtype -> results/llamacpp_fidelity.json

Every GGUF is written by ``loraprune.save_gguf`` as f16 (the dense model by
the same writer, :func:`loraprune.save_gguf`: the dense model goes through it as a cut that keeps
every group, :func:`dense_as_pruned`), then quantized by
llama.cpp's own quantizer (``llama_model_quantize``, default parameters,
from the f16 file). Measured in llama.cpp through llama-cpp-python:

* file size;
* prompt processing (one 256-token batch) and generation (64 single-token
  steps) tokens/s, all models interleaved in each of ``--repeats`` rounds,
  medians; ratios to dense f16 in the same run (absolute figures depend on the
  machine and on what else runs on it);
* perplexity from llama.cpp's own logits (default f16 KV cache) on the same
  evenly spaced 512-token windows of WikiText-2 test and PTB test as
  bench/smollm2.py (transformers' f32 figure beside it for reference).

K-quants pack rows in blocks of 256 (QK_K); llama.cpp's quantizer falls back
per tensor where a row width is not a multiple of 256 (the per-layer MLP
widths of a pruned model usually are not): the tensor types actually written
are counted from each file and reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench.smollm2 import CACHE, EVALS, METHODS, eval_windows, evaluate, load_smollm2, train_batches

RESULTS = Path(__file__).resolve().parent / "results" / "llamacpp.json"
FIDELITY = RESULTS.with_name("llamacpp_fidelity.json")
PROMPTS = ["To be, or not to be, that is the question:", "The capital of France is", "def fibonacci(n):\n    "]
WORK = CACHE.parent / "llamacpp"
RATIOS = (0.2, 0.5)
QUANTS = {"Q8_0": 7, "Q4_K_M": 15}  # llama_ftype values of LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_K_M
EVAL_NAMES = ("wikitext2@512", "ptb@512")


def _require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        sys.exit("bench.llamacpp needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp, 10-20 min)")
    return llama_cpp


def _threads() -> int:
    return int(os.environ.get("LORAPRUNE_THREADS", os.cpu_count() or 1))


# ---------------------------------------------------------------------------- prune
def prune(steps: int, seed: int, lr: float | None, batch_size: int) -> None:
    """Prune SmolLM2 at each ratio with ``PruneConfig()``'s method (``lr=None``: its lr) and save it.

    A model already saved with the same settings is kept; one saved with other
    settings is pruned again, and the GGUF files made from it are removed so
    that ``run`` rebuilds them from the new model.
    """
    import torch

    import loraprune
    from loraprune.config import PruneConfig

    torch.set_num_threads(_threads())
    for ratio in RATIOS:
        out = WORK / f"default@{ratio:g}"
        cfg = PruneConfig.from_kwargs(ratio=ratio, steps=steps, seed=seed, batch_size=batch_size, progress=False,
                                      **({} if lr is None else {"lr": lr}), **METHODS["default"])
        want = {"steps": steps, "batch_size": batch_size, "lr": cfg.lr, "seed": seed}
        done = out / "bench_prune.json"
        if done.is_file() and {k: json.loads(done.read_text()).get(k) for k in want} == want:
            print(f"{out} exists with {want}, kept")
            continue
        for stale in WORK.glob(f"pruned-{int(ratio * 100)}-*.gguf"):
            stale.unlink()
        model, tok = load_smollm2()  # only when pruning: a kept model needs no load
        batches = train_batches(tok, cfg.seq_len, cfg.batch_size, steps * cfg.grad_accum, seed)
        t0 = time.time()
        pruned = loraprune.prune(model, batches, cfg)
        info = pruned.config.loraprune
        print(f"pruned {ratio:g} in {time.time() - t0:.0f} s: {info['achieved_ratio']:.4f}")
        loraprune.save_pruned(pruned, out, tokenizer=tok, overwrite=True,
                              extra_json={"bench_prune.json": {**want, "round_to": info["settings"]["round_to"],
                                                               "seconds": time.time() - t0}})


# ---------------------------------------------------------------------------- files
def dense_as_pruned(model):
    """The dense model as a cut that keeps every group (the same weights and logits), so that the
    dense baseline goes through the same writer as the pruned models: :func:`loraprune.save_gguf`."""
    import loraprune
    from loraprune.structure.groups import build_layer_groups
    from loraprune.structure.masks import Masks

    return loraprune.compact(model, Masks.full(build_layer_groups(model)))


def build_files(llama_cpp, ratios=RATIOS) -> dict:
    """``{label: path}``: dense and pruned, f16 and quantized (skipping files already written)."""
    import torch

    from loraprune.export.gguf_read import smollm2_path
    from loraprune.export.gguf_write import save_gguf
    from loraprune.export.load import load_pruned

    WORK.mkdir(parents=True, exist_ok=True)
    files = {}
    sources = {"dense": None, **{f"pruned {int(r * 100)}%": WORK / f"default@{r:g}" for r in ratios}}
    for name, src in sources.items():
        f16 = WORK / f"{name.replace(' ', '-').replace('%', '')}-f16.gguf"
        if not f16.is_file():
            if src is None:
                model, _ = load_smollm2()
                save_gguf(dense_as_pruned(model), f16, smollm2_path(), dtype="f16")
            else:
                save_gguf(load_pruned(src, dtype=torch.float32), f16, smollm2_path(), dtype="f16")
        files[(name, "f16")] = f16
        for quant, ftype in QUANTS.items():
            out = f16.with_name(f16.name.replace("-f16", f"-{quant.lower()}"))
            if not out.is_file():
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = ftype
                params.nthread = _threads()
                rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
                if rc != 0:
                    raise RuntimeError(f"llama_model_quantize({f16}, {quant}) returned {rc}")
            files[(name, quant)] = out
    return files


def tensor_types(path: Path) -> dict:
    """Weight tensors per type in a GGUF file (2-D tensors only: norms are always f32)."""
    import gguf

    counts: dict = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# ---------------------------------------------------------------------------- measurements
def _load(llama_cpp, path: Path, n_ctx: int, logits_all: bool = False):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=_threads(), logits_all=logits_all,
                           verbose=False, seed=0)


def speed_round(llama_cpp, path: Path, prompt: list[int], gen: int) -> tuple[float, float]:
    """``(prompt tokens/s, generation tokens/s)`` of one round."""
    llm = _load(llama_cpp, path, n_ctx=len(prompt) + gen + 8)
    try:
        llm.eval(prompt[:8])  # warm-up
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pp = len(prompt) / (time.perf_counter() - t)
        nxt = prompt[-1]
        t = time.perf_counter()
        for _ in range(gen):
            llm.eval([nxt])
            nxt = (nxt * 7 + 13) % 1000  # fixed token sequence: the cost does not depend on the ids
        tg = gen / (time.perf_counter() - t)
    finally:
        llm.close()
    return pp, tg


def engine_perplexity(llama_cpp, path: Path, rows) -> float:
    """exp(mean NLL) of next-token predictions from llama.cpp's logits, over windows (rows of token ids)."""
    import numpy as np

    window = rows.shape[1]
    llm = _load(llama_cpp, path, n_ctx=window, logits_all=True)
    nll, count = 0.0, 0
    try:
        for row in rows.tolist():
            llm.reset()
            llm.eval(row)
            scores = np.asarray(llm.scores[: window - 1], dtype=np.float64)
            top = scores.max(-1, keepdims=True)
            logz = (top[:, 0] + np.log(np.exp(scores - top).sum(-1)))
            nll += float((logz - scores[np.arange(window - 1), row[1:]]).sum())
            count += window - 1
    finally:
        llm.close()
    return float(np.exp(nll / count))


def ideal_speedups(models: dict, prompt_len: int, gen: int) -> dict:
    """``{name: (prompt, generation)}`` FLOP ratio dense / model for what :func:`speed_round` times.

    As :mod:`bench.speed` counts FLOPs, except that llama.cpp computes the LM
    head for the last prompt token only (no ``logits_all``).
    """
    from bench.speed import decode_flops, forward_flops

    def flops(m):
        head = m.lm_head.in_features * m.lm_head.out_features
        return forward_flops(m, 1, prompt_len) - 2 * head * (prompt_len - 1), decode_flops(m, prompt_len, gen)

    f = {k: flops(m) for k, m in models.items()}
    return {k: (f["dense"][0] / v[0], f["dense"][1] / v[1]) for k, v in f.items()}


def run(repeats: int, prompt_len: int, gen: int, n_windows: int, ratios=RATIOS, out: Path = RESULTS) -> dict:
    llama_cpp = _require_llama_cpp()
    import torch

    from loraprune.export.load import load_pruned

    files = build_files(llama_cpp, ratios)
    dense, tok = load_smollm2()
    windows = {k: v[torch.linspace(0, len(v) - 1, n_windows).long()] for k, v in eval_windows(tok).items()
               if k in EVAL_NAMES}
    prompt = windows["wikitext2@512"][0, :prompt_len].tolist()
    rounds: dict = {key: [] for key in files}
    for _ in range(repeats):
        for key, path in files.items():
            rounds[key].append(speed_round(llama_cpp, path, prompt, gen))
    models = {"dense": dense, **{f"pruned {int(r * 100)}%": load_pruned(WORK / f"default@{r:g}", dtype=torch.float32)
                                 for r in ratios}}
    hf_ppl = {k: evaluate(m, windows) for k, m in models.items()}
    ideal = ideal_speedups(models, prompt_len, gen)
    total = sum(p.numel() for p in dense.parameters())  # the tied embedding once
    removed = {k: {"projections": getattr(m.config, "loraprune", {}).get("achieved_ratio", 0.0),
                   "model": 1 - sum(p.numel() for p in m.parameters()) / total} for k, m in models.items()}
    del models
    base = rounds[("dense", "f16")]
    base_pp = statistics.median(p for p, _ in base)
    base_tg = statistics.median(g for _, g in base)
    rows = []
    for (name, quant), path in files.items():
        pp = statistics.median(p for p, _ in rounds[(name, quant)])
        tg = statistics.median(g for _, g in rounds[(name, quant)])
        rows.append({
            "model": name, "type": quant, "file_mib": path.stat().st_size / 2**20, "tensor_types": tensor_types(path),
            "pp_tok_s": pp, "tg_tok_s": tg, "pp_ratio": pp / base_pp, "tg_ratio": tg / base_tg,
            "pp_ideal": ideal[name][0], "tg_ideal": ideal[name][1], "removed": removed[name],
            "pp_rounds": [p for p, _ in rounds[(name, quant)]], "tg_rounds": [g for _, g in rounds[(name, quant)]],
            "ppl": {k: engine_perplexity(llama_cpp, path, v) for k, v in windows.items()},
            "ppl_transformers_f32": hf_ppl[name],
        })
        print(json.dumps(rows[-1]), flush=True)
    record = {
        "command": "python -m bench.llamacpp " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
                   f"{_threads()} llama.cpp threads",
        "llama_cpp_python": llama_cpp.__version__,
        "prune": {r: json.loads((WORK / f"default@{r:g}" / "bench_prune.json").read_text()) for r in ratios},
        "speed": f"prompt {prompt_len} tokens in one batch, {gen} generated tokens one by one; median of {repeats} "
                 "rounds, all files interleaved in each round",
        "perplexity": {k: f"{n_windows} of bench/smollm2.py's {EVALS[k][2]} evenly spaced windows of "
                          f"{EVALS[k][1]} tokens" for k in windows},
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def fidelity(gen: int) -> dict:
    """Max |logit difference| llama.cpp vs transformers (f32 KV cache, no flash attention) per model and dtype.

    Also whether the next-token argmax agrees at every prompt position, and
    whether ``gen`` greedy tokens after the first prompt are identical.
    """
    llama_cpp = _require_llama_cpp()
    import numpy as np
    import torch

    from loraprune.export.gguf_read import smollm2_path
    from loraprune.export.gguf_write import DTYPES, save_gguf
    from loraprune.export.load import load_pruned

    dense, tok = load_smollm2()
    models = {"dense": dense_as_pruned(dense), **{f"pruned {int(r * 100)}%": load_pruned(WORK / f"default@{r:g}", dtype=torch.float32)
                                 for r in RATIOS}}
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    rows = []
    for name, model in models.items():
        with torch.no_grad():
            ref = [model(torch.tensor([x])).logits[0].float() for x in ids]
            want, seq = [], list(ids[0])
            for _ in range(gen):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            want = seq[len(ids[0]):]
        for dtype in DTYPES:
            path = WORK / f"fidelity-{name.replace(' ', '-').replace('%', '')}-{dtype}.gguf"
            save_gguf(model, path, smollm2_path(), dtype=dtype, overwrite=True)
            llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_batch=128, n_threads=_threads(),
                                  type_k=0, type_v=0, flash_attn=False, verbose=False, seed=0)
            diff, agree = 0.0, True
            for x, r in zip(ids, ref):
                llm.reset()
                llm.eval(x)
                got = torch.from_numpy(np.array(llm.scores[: len(x)], dtype=np.float32))
                diff = max(diff, float((got - r).abs().max()))
                agree &= bool((got.argmax(-1) == r.argmax(-1)).all())
            llm.reset()
            llm.eval(ids[0])
            out = []
            for _ in range(gen):
                out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([out[-1]])
            llm.close()
            path.unlink()
            rows.append({"model": name, "dtype": dtype, "max_abs_logit_diff": diff, "argmax_agrees": agree,
                         f"greedy_{gen}_identical": out == want,
                         "logit_scale": max(float(r.abs().max()) for r in ref)})
            print(json.dumps(rows[-1]), flush=True)
    record = {"command": "python -m bench.llamacpp " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "llama_cpp_python": llama_cpp.__version__, "prompts": PROMPTS,
              "setup": "llama.cpp f32 KV cache, flash attention off; transformers f32 on CPU", "rows": rows}
    FIDELITY.write_text(json.dumps(record, indent=1) + "\n")
    return record


def report(record: dict | None = None, path: Path = RESULTS) -> str:
    """Markdown table. Speed is tokens/s and × dense f16; for pruned rows also × dense of the same GGUF type
    against the ideal (FLOP) speed-up, which is what pruning alone can give."""
    record = record or json.loads(path.read_text())
    names = list(record["rows"][0]["ppl"])
    dense = {r["type"]: r for r in record["rows"] if r["model"] == "dense"}
    lines = ["| model (removed: projections / all parameters) | GGUF | MiB | weight tensors | prompt tok/s | gen tok/s | prompt × dense same type (ideal) | "
             "gen × dense same type (ideal) | " + " | ".join(f"{n} (llama.cpp)" for n in names) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(names)]

    def vs_dense(r, k):
        """Median of the per-round ratios (load from other processes hits both files of a round alike)."""
        d = dense.get(r["type"])
        if r["model"] == "dense" or d is None or f"{k}_ideal" not in r:
            return "–"
        got = (statistics.median(a / b for a, b in zip(r[f"{k}_rounds"], d[f"{k}_rounds"]))
               if f"{k}_rounds" in r else r[f"{k}_tok_s"] / d[f"{k}_tok_s"])
        return f"{got:.2f}× ({r[f'{k}_ideal']:.2f}×: {got / r[f'{k}_ideal']:.2f} of ideal)"

    for r in record["rows"]:
        types = ", ".join(f"{v} {k}" for k, v in sorted(r["tensor_types"].items(), key=lambda kv: -kv[1]))
        share = r.get("removed")
        label = r["model"] if not share or r["model"] == "dense" else (
            f"{r['model']} ({100 * share['projections']:.1f} % / {100 * share['model']:.1f} %)")
        lines.append(f"| {label} | {r['type']} | {r['file_mib']:.0f} | {types} | {r['pp_tok_s']:.0f} "
                     f"({r['pp_ratio']:.2f}×) | {r['tg_tok_s']:.0f} ({r['tg_ratio']:.2f}×) | "
                     f"{vs_dense(r, 'pp')} | {vs_dense(r, 'tg')} | "
                     + " | ".join(f"{r['ppl'][n]:.2f}" for n in names) + " |")
    lines.append(f"\n{record['command']}; {record['date']}; {record['machine']}; llama-cpp-python "
                 f"{record['llama_cpp_python']}. Ratios: medians of interleaved rounds, same run.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prune")
    pr.add_argument("--steps", type=int, default=30)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--lr", type=float, default=None, help="default: PruneConfig().lr")
    pr.add_argument("--batch-size", type=int, default=4)
    r = sub.add_parser("run")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--prompt", type=int, default=256)
    r.add_argument("--gen", type=int, default=64)
    r.add_argument("--windows", type=int, default=16, help="perplexity windows per text (at most 16)")
    r.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    r.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    rp = sub.add_parser("report")
    rp.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    f = sub.add_parser("fidelity")
    f.add_argument("--gen", type=int, default=32)
    args = p.parse_args(argv)
    if args.cmd == "prune":
        prune(args.steps, args.seed, args.lr, args.batch_size)
    elif args.cmd == "run":
        print(report(run(args.repeats, args.prompt, args.gen, args.windows, tuple(args.ratios), args.out)))
    elif args.cmd == "fidelity":
        for r in fidelity(args.gen)["rows"]:
            print(f"{r['model']:12s} {r['dtype']:5s} max |diff| {r['max_abs_logit_diff']:.2e}  argmax agrees "
                  f"{r['argmax_agrees']}  greedy identical {r[f'greedy_{args.gen}_identical']}")
    else:
        print(report(path=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
