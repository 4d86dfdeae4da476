"""The main job: prune a small LLaMA by 50% with the default method, offline.

``python -m loraprune.demo`` trains (or reuses the cached) reference LLaMA
with GQA on the Shakespeare training split, prunes ``--ratio`` of its
decoder-projection parameters, compacts it, saves it, and prints parameters,
held-out perplexity and tokens/s before and after. ``--model`` and ``--data``
run the same on a user's own local model directory and text files.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from .cli_prune import add_config_options, config_from_args
from .corpora import load_texts
from .eval import perplexity, tokens_per_second
from .groups import layer_projection_params
from .io import save_pruned
from .prune import prune


def _measure(model, tokenizer, heldout, args) -> dict:
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "projection_params": sum(layer_projection_params(model)),
        "heldout_ppl": perplexity(model, heldout, tokenizer=tokenizer, window=args.seq_len,
                                  max_windows=args.eval_windows, progress=True),
        "prefill_tok_s": tokens_per_second(model, batch_size=4, seq_len=args.seq_len, mode="prefill", repeats=5),
        "decode_tok_s": tokens_per_second(model, batch_size=1, mode="decode", new_tokens=32, repeats=3),
    }


def _table(before: dict, after: dict) -> str:
    rows = [
        ("parameters (all)", "params", "{:,.0f}"),
        ("decoder-projection parameters", "projection_params", "{:,.0f}"),
        ("held-out perplexity", "heldout_ppl", "{:.2f}"),
        ("prefill tokens/s (batch 4)", "prefill_tok_s", "{:,.0f}"),
        ("decode tokens/s (batch 1)", "decode_tok_s", "{:,.1f}"),
    ]
    lines = [f"{'':32s} {'dense':>14s} {'pruned':>14s} {'pruned/dense':>13s}"]
    for label, key, fmt in rows:
        lines.append(f"{label:32s} {fmt.format(before[key]):>14s} {fmt.format(after[key]):>14s} {after[key] / before[key]:>13.3f}")
    return "\n".join(lines)


def _load_user_model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loraprune.demo", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="local model directory (default: the cached Shakespeare reference LLaMA, trained if missing)")
    ap.add_argument("--data", nargs="+", help="training text: .txt/.jsonl files or folders (default: Shakespeare train split)")
    ap.add_argument("--eval-data", nargs="+", help="held-out text (default: Shakespeare held-out split)")
    ap.add_argument("--data-dir", help="the shared data folder (default: ../shared/data or $LORAPRUNE_DATA)")
    add_config_options(ap)  # every PruneConfig option (--ratio, --criterion, --steps, --seq-len, ...)
    ap.set_defaults(lr=1e-3, batch_size=8)  # the demo's small model trains faster than the library default
    ap.add_argument("--eval-windows", type=int, default=200, help="held-out windows evaluated")
    ap.add_argument("--output", default="out/demo", help="where the pruned model is saved")
    args = ap.parse_args(argv)
    t0 = time.time()
    config = config_from_args(args)  # checked before any work
    torch.manual_seed(args.seed)

    if args.model:
        model, tokenizer = _load_user_model(args.model)
    else:
        from .reference import load_or_train_reference

        model, tokenizer = load_or_train_reference(data_dir=args.data_dir)
    if args.data and args.eval_data:
        train_src, heldout_src = args.data, args.eval_data
    else:
        from .corpora import shakespeare_split

        train_paths, heldout_paths = shakespeare_split(args.data_dir)
        train_src = args.data or [str(p) for p in train_paths]
        heldout_src = args.eval_data or [str(p) for p in heldout_paths]
    heldout = load_texts(heldout_src)

    print(f"model: {args.model or 'reference LLaMA (GQA), Shakespeare'} | "
          f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads, "
          f"{getattr(model.config, 'num_key_value_heads', None)} KV heads, intermediate {model.config.intermediate_size}")
    before = _measure(model, tokenizer, heldout, args)
    pruned = prune(copy.deepcopy(model) if args.model is None else model, train_src, config, tokenizer=tokenizer)
    after = _measure(pruned, tokenizer, heldout, args)
    rep = pruned.config.loraprune
    out = Path(args.output)
    previous_demo = (out / "config.json").is_file() and "loraprune" in json.loads((out / "config.json").read_text())
    save_pruned(pruned, out, overwrite=previous_demo, tokenizer=tokenizer,
                extra_json={"loraprune_demo.json": {"before": before, "after": after}})
    print()
    print(f"pruned {rep['achieved_ratio']:.2%} of decoder-projection parameters (target {args.ratio:.0%}), "
          f"criterion={args.criterion}, {rep['steps']} LoRA steps; widths per layer: "
          f"{rep['layers'][0]['num_attention_heads']} heads / {rep['layers'][0]['num_key_value_heads']} KV heads / "
          f"{rep['layers'][0]['intermediate_size']} channels" + ("" if rep["uniform"] else " (layer 0; non-uniform)"))
    print(_table(before, after))
    stock = "AutoModelForCausalLM.from_pretrained" + ("" if rep["uniform"] else " with trust_remote_code=True")
    print(f"\nsaved to {out} (reload: loraprune.load_pruned('{out}') or {stock})"
          f" | total {time.time() - t0:.0f}s")
    return {"before": before, "after": after, "report": rep}


if __name__ == "__main__":
    main()
