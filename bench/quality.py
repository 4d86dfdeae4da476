"""Quality table: perplexity ratios to dense, per criterion, ratio and seed.

Every iterative criterion (``lora``, ``grad``, ``magnitude``, ``random``) gets
the same LoRA steps on the same batches under the same seed; the one-shot
baselines (FLAP, Wanda-sp) calibrate on those same batches and are not tuned.
Perplexity is measured on held-out Shakespeare, WikiText-2 test and PTB test,
with 128-token windows and with the model's full context, on the same
evenly spaced windows for the dense and every pruned model, and reported as
pruned / dense.
"""
from __future__ import annotations

import copy
import itertools
import time

import torch

from .common import BenchSetup, PruneRecorder, read_json, result_payload, stats_summary, write_json

EVAL_SETS = ("shakespeare", "wikitext2", "ptb")
CRITERIA = ("lora", "grad", "magnitude", "random")
ONESHOT = ("flap", "wanda-sp")

#: LoRAPrune paper, Table 1 (LLaMA-7B, WikiText-2, 128-token windows): perplexity / dense 12.62.
PAPER_ANCHORS = {
    "dense_wikitext2": 12.62,
    "0.2": {"LoRAPrune": 16.80 / 12.62, "LLM-Pruner": 1.39, "FLAP (no tuning)": 1.16},
    "0.5": {"LoRAPrune": 30.12 / 12.62, "LLM-Pruner": 3.02, "FLAP (no tuning)": 2.52},
}


def full_settings(**over) -> dict:
    s = dict(ratios=[0.2, 0.5], criteria=list(CRITERIA), oneshot=list(ONESHOT), seeds=[0, 1], steps=60,
             lr=1e-3, batch_size=4, seq_len=128, eval_windows=64, windows=None, ema=0.9, prune_end=0.75)
    s.update({k: v for k, v in over.items() if v is not None})
    return s


def smoke_settings(**over) -> dict:
    s = full_settings(ratios=[0.2, 0.5], seeds=[0], steps=4, batch_size=2, seq_len=32, eval_windows=4)
    s.update({k: v for k, v in over.items() if v is not None})
    return s


def eval_streams(setup: BenchSetup, tokenizer, windows: dict[str, int], max_windows: int | None) -> dict:
    """``{set: {window name: token ids}}``: the evenly spaced windows every model is scored on.

    A set whose text cannot be found (a clone without ``../shared`` and offline: only the
    Shakespeare sample ships with the package) is left out, with a note."""
    from loraprune.data.windows import token_stream
    from loraprune.errors import DataError

    from .common import evenly_spaced_windows

    out = {}
    for name in EVAL_SETS:
        try:
            text = setup.eval_text(name)
        except DataError as err:
            print(f"quality: {name} left out ({err})", flush=True)
            continue
        stream = token_stream(tokenizer, text)
        out[name] = {w: evenly_spaced_windows(stream, n, max_windows) for w, n in windows.items()}
    return out


def evaluate(model, streams: dict, windows: dict[str, int]) -> dict:
    from loraprune.eval import perplexity

    return {
        name: {w: perplexity(model, per_window[w], window=windows[w], batch_size=16) for w in windows}
        for name, per_window in streams.items()
    }


def _ratios_to(ppl: dict, dense: dict) -> dict:
    return {s: {w: ppl[s][w] / dense[s][w] for w in ppl[s]} for s in ppl}


def _details(recorder) -> dict:
    """Per-layer final EMA scores, kept indices and the removal trace of one iterative run."""
    engine = recorder.pruner
    st = engine.state
    return {
        "attn_scores": [s.tolist() for s in st.attn_score],
        "mlp_scores": [s.tolist() for s in st.mlp_score],
        "masks": st.masks.to_dict(),
        "trace": recorder.trace,
        "schedule": {"start": engine.schedule.start, "end": engine.schedule.end, "every": engine.schedule.every},
    }


def _run_key(method: str, ratio: float, seed: int) -> str:
    return f"{method}@{ratio:g}#{seed}"


def _log(msg: str) -> None:
    print(msg, flush=True)


def run(setup: BenchSetup, settings: dict, resume: bool = True, log=_log) -> dict:
    from loraprune import prune
    from loraprune.data.batches import text_batches
    from loraprune.data.windows import cut_windows, token_stream
    from loraprune.run.oneshot import oneshot_prune

    out_path = setup.out / "quality.json"
    torch.manual_seed(0)
    dense_model, tokenizer, ref_stats = setup.reference()
    n_params = sum(p.numel() for p in dense_model.parameters())
    context = int(dense_model.config.max_position_embeddings)
    windows = {"w128": min(128, context), "full": context}
    if settings.get("windows"):
        windows = dict(settings["windows"])
    streams = eval_streams(setup, tokenizer, windows, settings["eval_windows"])
    log(f"quality: reference {n_params / 1e6:.2f}M params; evaluating dense")
    dense = evaluate(dense_model, streams, windows)
    train_rows = cut_windows(token_stream(tokenizer, setup.train_texts()), settings["seq_len"])

    previous = {}
    if resume and out_path.is_file():
        old = read_json(out_path)
        if old.get("settings") == settings and old.get("reference", {}).get("dense") == dense:
            previous = {r["key"]: r for r in old.get("runs", [])}
            log(f"quality: resuming, {len(previous)} runs already measured")

    reference = {
        "num_parameters": n_params,
        "config": {k: getattr(dense_model.config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")},
        "training": {k: ref_stats.get(k) for k in (
            "heldout_perplexity", "heldout_bits_per_byte", "heldout_tokens", "train_wall_time_s",
            "final_train_loss", "tokens_seen", "num_threads")},
        "dense": dense,
        "eval_tokens": {s: {w: int(t.numel()) for w, t in per.items()} for s, per in streams.items()},
        "windows": windows,
    }
    runs: list[dict] = []
    details: dict = {}

    def save(partial: bool):
        payload = result_payload("quality", settings, {
            "partial": partial, "reference": reference, "runs": runs,
            "summary": summarize(runs), "targets": quality_targets(runs), "paper_anchors": PAPER_ANCHORS,
            "details": details,
        })
        write_json(out_path, payload)

    for seed in settings["seeds"]:
        batches = list(itertools.islice(text_batches(train_rows, settings["batch_size"], seed), settings["steps"]))
        jobs = [(c, r) for r in settings["ratios"] for c in settings["criteria"]]
        jobs += [(f"oneshot-{m}", r) for r in settings["ratios"] for m in settings["oneshot"]]
        for method, ratio in jobs:
            key = _run_key(method, ratio, seed)
            if key in previous:
                runs.append(previous[key])
                continue
            model = copy.deepcopy(dense_model)
            t0 = time.perf_counter()
            if method.startswith("oneshot-"):
                pruned = oneshot_prune(model, batches, ratio, method=method.split("-", 1)[1],
                                       calib_batches=len(batches), seed=seed)
                pruner = None
            else:
                pruner = PruneRecorder()
                pruned = prune(model, batches, ratio, steps=settings["steps"], lr=settings["lr"], criterion=method,
                               seed=seed, ema=settings["ema"], prune_end=settings["prune_end"], progress=False,
                               on_step=pruner)
            prune_s = time.perf_counter() - t0
            ppl = evaluate(pruned, streams, windows)
            rep = pruned.config.loraprune
            entry = {
                "key": key, "method": method, "ratio": ratio, "seed": seed,
                "achieved_ratio": rep["achieved_ratio"],
                "achieved_ratio_with_biases": rep.get("achieved_ratio_with_biases", rep["achieved_ratio"]),
                "num_parameters": sum(p.numel() for p in pruned.parameters()),
                "widths": rep["layers"], "perplexity": ppl, "ratio_to_dense": _ratios_to(ppl, dense),
                "prune_wall_s": prune_s,
            }
            runs.append(entry)
            if pruner is not None and seed == settings["seeds"][0]:
                details[key] = _details(pruner)
            shown = "  ".join(f"{name} x{r['w128']:.3f}" for name, r in entry["ratio_to_dense"].items() if "w128" in r)
            log(f"quality: {key:>24}  achieved {entry['achieved_ratio']:.3f}  {shown}  ({prune_s:.0f}s)")
            save(partial=True)
            del model, pruned
    save(partial=False)
    return read_json(out_path)


def summarize(runs: list[dict]) -> dict:
    """``{method: {ratio: {set: {window: mean/std/min/max/n of ratio_to_dense}}, achieved...}}``."""
    out: dict = {}
    keyf = lambda r: (r["method"], r["ratio"])  # noqa: E731
    for (method, ratio), group in itertools.groupby(sorted(runs, key=keyf), key=keyf):
        group = list(group)
        first = group[0]["ratio_to_dense"]
        cell = {
            s: {w: stats_summary([g["ratio_to_dense"][s][w] for g in group]) for w in first[s]}
            for s in first
        }
        cell["achieved_ratio"] = stats_summary([g["achieved_ratio"] for g in group])
        cell["achieved_ratio_with_biases"] = stats_summary([g["achieved_ratio_with_biases"] for g in group])
        out.setdefault(method, {})[f"{ratio:g}"] = cell
    return out


def quality_targets(runs: list[dict], tolerance: float = 0.10) -> dict:
    """The issue's quality targets, per ratio, on every eval set and window."""
    summ = summarize(runs)
    lora = summ.get("lora", {})
    out = {}
    for ratio, cell in lora.items():
        per = {}
        for s in EVAL_SETS:
            if s not in cell:
                continue
            for w, st in cell[s].items():
                entry = {"lora": st["mean"]}
                for other in ("grad", "magnitude", "random"):
                    o = summ.get(other, {}).get(ratio, {}).get(s, {}).get(w)
                    if o:
                        entry[other] = o["mean"]
                if "grad" in entry:
                    entry["lora_over_grad"] = entry["lora"] / entry["grad"]
                    entry["within_10pct_of_grad"] = entry["lora_over_grad"] <= 1 + tolerance
                # "clearly better": lora's worst seed beats the other criterion's best seed
                for other in ("magnitude", "random"):
                    o = summ.get(other, {}).get(ratio, {}).get(s, {}).get(w)
                    if o:
                        entry[f"clearly_better_than_{other}"] = st["max"] < o["min"]
                per[f"{s}/{w}"] = entry
        out[ratio] = per
    return out
