"""The ``loraprune`` command: prune, eval, inspect, bench.

``loraprune prune`` is built for long unattended runs: it checkpoints every
``--checkpoint-every`` steps into ``OUTPUT/checkpoints/``, ``--resume``
continues from the newest checkpoint with the same final masks and weights as
an uninterrupted run, and the final model replaces ``OUTPUT`` atomically (the
checkpoints go with it: a finished directory holds only the model, its
tokenizer, ``loraprune_report.json`` and ``loraprune_masks.json``).

Errors users can fix (bad options, data, directories, models) print one line
``loraprune: error: ...`` naming the fix and exit with status 2
(``LORAPRUNE_DEBUG=1`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUN_FILE = "run.json"  # inside OUTPUT/checkpoints: what the interrupted run was pruning
EXIT_USAGE = 2


class CLIError(Exception):
    """A user-fixable problem; the message names the fix."""


# ------------------------------------------------------------------------ tables
def format_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table (right-aligned numbers), readable in any terminal or log file."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in rows) and rows for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


# -------------------------------------------------------------------- arguments
def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1): pass the share of parameters to remove, e.g. 0.5")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _step_or_fraction(text: str) -> float | int:
    """``0.75`` = a fraction of --steps, ``150`` = a step number."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def _skip_layers(text: str):
    if text in ("", "none"):
        return None
    if text == "paper":
        return "paper"
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: pass 'paper', 'none' or comma-separated layer indices like 0,1,31")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="loraprune",
        description="LoRA-guided structured pruning of LLaMA-family models (llama, mistral, qwen2, qwen3).",
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prune", help="prune a model and save the smaller one", formatter_class=fmt,
                       description="Train LoRA on the frozen model, score KV-head groups and MLP channels with the "
                                   "LoRA gradients, remove the lowest on a cubic schedule, merge LoRA and save a "
                                   "smaller dense model.")
    p.add_argument("--model", required=True, help="local directory written by save_pretrained, or a hub model id")
    p.add_argument("--data", required=True,
                   help="calibration text: a .txt/.jsonl file (jsonl: one string or {'text': ...} per line), a folder "
                        "of them, or a hub dataset name ('name' or 'name:config', train split)")
    p.add_argument("--output", required=True, help="directory for the pruned model (checkpoints go to OUTPUT/checkpoints)")
    p.add_argument("--ratio", type=_ratio, default=0.5, help="share of decoder-projection parameters to remove, in (0, 1)")
    p.add_argument("--criterion", default="lora", choices=["lora", "grad", "magnitude", "random"],
                   help="group importance: lora = LoRA-gradient estimate (the method); grad needs full weight "
                        "gradients (memory-hungry baseline); magnitude and random are baselines")
    p.add_argument("--steps", type=_positive_int, default=200, help="optimiser steps of LoRA training")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of the LoRA factors")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence (at most the model's context)")
    p.add_argument("--lora-r", type=_positive_int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--prune-start", type=_step_or_fraction, default=0.0,
                   help="last step with nothing pruned: a fraction of --steps (0.1) or a step number (20)")
    p.add_argument("--prune-end", type=_step_or_fraction, default=0.75,
                   help="step at which the final masks are reached (fraction or step number); later steps recover")
    p.add_argument("--prune-every", type=_positive_int, default=None,
                   help="steps between mask updates (default: a tenth of the pruning window)")
    p.add_argument("--ema", type=float, default=0.9, help="EMA factor of the group scores")
    p.add_argument("--skip-layers", type=_skip_layers, default=None,
                   help="layers left dense: 'paper' (first and last few, as LoRAPrune), 'none', or indices 0,1,31")
    p.add_argument("--ranking", default="layer", choices=["layer", "global"],
                   help="rank groups within each layer (same ratio per layer) or across the model")
    p.add_argument("--round-to", type=_positive_int, default=1, help="keep MLP widths multiples of this (e.g. 64)")
    p.add_argument("--uniform", action="store_true",
                   help="prune every layer alike, so a stock from_pretrained reloads the result without remote code")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    p.add_argument("--max-bad-steps", type=_positive_int, default=5,
                   help="stop after this many steps in a row with NaN/inf loss or gradients (each one is skipped)")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA init, data order and dropout")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the frozen weights (LoRA factors always train in float32)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: --model)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="save the full pruning state every N steps to OUTPUT/checkpoints (0 disables)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUTPUT/checkpoints (starts anew if there is none), "
                        "giving the same result as an uninterrupted run")
    p.add_argument("--overwrite", action="store_true",
                   help="allow OUTPUT to hold other files; they are replaced, atomically, only when the run succeeds")
    p.add_argument("--eval-data", default=None,
                   help="optional text for perplexity before/after in the summary (as for 'loraprune eval --data')")
    p.add_argument("--eval-windows", type=_positive_int, default=32, help="windows of --seq-len tokens for --eval-data")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="perplexity of a (pruned) model", formatter_class=fmt,
                       description="Perplexity in the pruning papers' protocol: documents joined, tokenised once, "
                                   "non-overlapping windows, exp(mean NLL).")
    e.add_argument("--model", required=True, help="model directory (pruned or not) or hub id")
    e.add_argument("--data", required=True,
                   help="a .txt/.jsonl file or a folder of them, 'wikitext2' / 'ptb' / 'shakespeare' (local shared "
                        "copies when present), or a hub dataset name")
    e.add_argument("--split", default="test", help="split for named or hub datasets")
    e.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per window")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass")
    e.add_argument("--max-windows", type=_positive_int, default=None, help="only the first N windows (quick estimate)")
    e.add_argument("--baseline", default=None, help="also evaluate this (dense) model and report the ratio")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: --model)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="per-layer widths and parameter counts of a saved model", formatter_class=fmt,
                       description="Reads config.json and the safetensors headers only; no weights are loaded.")
    i.add_argument("dir", help="model directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")

    b = sub.add_parser("bench", help="run the benchmarks (python -m bench.run) from a source checkout",
                       formatter_class=fmt, description="Thin dispatcher: every further argument goes to bench.run.")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for bench.run ('loraprune bench --help-bench' "
                                                          "shows them)")
    return parser


# ------------------------------------------------------------------------ loading
def _dtype(name: str):
    import torch

    return getattr(torch, name)


def load_model(name: str, dtype: str = "float32"):
    """A causal LM from a directory (pruned ones included) or a hub id."""
    from transformers import AutoModelForCausalLM

    from .archs import ARCHS
    from .io import PrunedModelError, inspect_dir, load_pruned, read_config

    path = Path(name)
    if path.is_dir():
        config = read_config(path)
        if config.get("model_type") in ARCHS and any(path.glob("*.safetensors")):
            inspect_dir(path)  # header-level consistency: from_pretrained only warns about missing weights
        if config.get("loraprune"):
            return load_pruned(path, dtype=_dtype(dtype))
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise PrunedModelError(f"{path} holds no model weights (*.safetensors); pass a directory written by save_pretrained")
    elif path.exists() or name.startswith((".", "/", "~")):
        raise CLIError(f"--model {name}: not a directory; pass a model directory or a hub id")
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=_dtype(dtype))
    except Exception as err:
        raise CLIError(
            f"could not load model {name!r} ({type(err).__name__}: {err}); pass a local directory written by "
            "save_pretrained or a hub id reachable from this machine"
        ) from err


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise CLIError(
            f"no tokenizer found at {name!r} ({type(err).__name__}); pass --tokenizer DIR_OR_HUB_ID"
        ) from err


def eval_texts(data: str, split: str = "test"):
    """Texts for perplexity: local files/folders via :mod:`loraprune.data`, else named/hub sets."""
    from .data import load_texts
    from .eval import load_eval_text

    if os.path.exists(data):
        p = Path(data)
        if p.is_dir() and (p / f"{split}.txt").is_file():
            return [load_eval_text(str(p), split)]
        return load_texts(data)
    try:
        return [load_eval_text(data, split)]
    except FileNotFoundError as err:
        raise CLIError(str(err)) from err


# -------------------------------------------------------------------- output dir
def prepare_output(out: Path, resume: bool, overwrite: bool, run: dict) -> None:
    """Decide what an existing ``--output`` may hold, before any model is loaded.

    * missing or empty: fine;
    * ``--resume``: ``checkpoints/`` (and nothing else unless ``--overwrite``);
      the checkpoints must come from the same model and data;
    * ``--overwrite`` without ``--resume``: anything; stale checkpoints are
      removed now, the rest is replaced when the run succeeds;
    * otherwise: refused.
    """
    from .checkpoint import Checkpointer

    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {out} exists and is not a directory; choose another --output")
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.is_dir() and not Checkpointer(out).complete():
        shutil.rmtree(ckpt_dir)  # a run that stopped before its first checkpoint left nothing to resume
    contents = sorted(out.iterdir()) if out.is_dir() else []
    if contents and not (resume or overwrite):
        raise CLIError(
            f"--output {out} exists and is not empty; pass --overwrite to replace it, --resume to continue an "
            "interrupted run saved there, or choose another --output"
        )
    others = [p.name for p in contents if p.name != "checkpoints"]
    if resume and others and not overwrite:
        hint = " (it holds a finished model)" if "config.json" in others else ""
        raise CLIError(
            f"--output {out} holds {', '.join(others[:5])} besides checkpoints/{hint}: nothing to resume there. "
            "Pass --overwrite to replace it, or choose another --output"
        )
    if not resume and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # stale state of an earlier run must never be mixed into this one
    saved = ckpt_dir / RUN_FILE
    if resume and saved.is_file():
        before = json.loads(saved.read_text(encoding="utf-8"))
        diff = {k: (before.get(k), run.get(k)) for k in set(before) | set(run) if before.get(k) != run.get(k)}
        if diff:
            raise CLIError(
                f"the checkpoints in {ckpt_dir} belong to another run {diff} (saved, now); resume with the same "
                "--model/--data, or pass --overwrite without --resume to start anew"
            )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1), encoding="utf-8")
    os.replace(tmp, saved)


# ------------------------------------------------------------------------ commands
def cmd_prune(args) -> int:
    from .groups import layer_projection_params
    from .io import save_pruned
    from .prune import prune

    out = Path(args.output)
    prepare_output(out, args.resume, args.overwrite, {"model": args.model, "data": args.data,
                                                        "tokenizer": args.tokenizer})
    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    dense_layers = layer_projection_params(model)
    dense_total = sum(p.numel() for p in model.parameters())
    progress = not args.no_progress
    ppl_before = _perplexity(model, tokenizer, args) if args.eval_data else None

    started = time.time()
    pruned = prune(
        model, args.data, ratio=args.ratio, tokenizer=tokenizer, steps=args.steps, lr=args.lr,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, criterion=args.criterion,
        ema=args.ema, prune_start=args.prune_start, prune_end=args.prune_end, prune_every=args.prune_every,
        skip_layers=args.skip_layers, ranking=args.ranking, round_to=args.round_to, uniform=args.uniform,
        seq_len=args.seq_len, batch_size=args.batch_size, max_grad_norm=args.max_grad_norm or None,
        max_bad_steps=args.max_bad_steps, seed=args.seed, progress=progress,
        checkpoint_dir=out, checkpoint_every=args.checkpoint_every or None, resume=args.resume,
    )
    seconds = time.time() - started
    ppl_after = _perplexity(pruned, tokenizer, args) if args.eval_data else None

    block = dict(pruned.config.loraprune)
    report = {
        "model": args.model, "data": args.data, "output": str(out),
        "ratio": args.ratio, "achieved_ratio": block["achieved_ratio"], "steps": args.steps,
        "seconds": round(seconds, 2),
        "params_before": dense_total, "params_after": sum(p.numel() for p in pruned.parameters()),
        "projection_params_before": sum(dense_layers),
        "projection_params_after": sum(layer_projection_params(pruned)),
        "layers": block["layers"], "settings": block["settings"],
    }
    if ppl_before is not None:
        report["eval"] = {"data": args.eval_data, "windows": args.eval_windows, "seq_len": args.seq_len,
                          "ppl_before": ppl_before, "ppl_after": ppl_after}
    extra = {"loraprune_report.json": report}  # loraprune_masks.json: written by save_pruned itself
    save_pruned(pruned, out, overwrite=True, tokenizer=tokenizer, extra_json=extra)

    rows = []
    after_layers = layer_projection_params(pruned)
    original = block.get("original", {})
    for idx, (w, before, after) in enumerate(zip(block["layers"], dense_layers, after_layers)):
        rows.append([idx, f"{original.get('num_key_value_heads', '?')} -> {w['num_key_value_heads']}",
                     f"{original.get('intermediate_size', '?')} -> {w['intermediate_size']}", before, after,
                     f"{1 - after / before:.1%}"])
    print(format_table(["layer", "kv heads", "mlp width", "params before", "params after", "removed"], rows,
                       title=f"\nloraprune: {args.model} -> {out}"))
    summary = [
        ["decoder projections", f"{report['projection_params_before']:,} -> {report['projection_params_after']:,} "
                                f"({block['achieved_ratio']:.2%} removed, target {args.ratio:.2%})"],
        ["all parameters", f"{dense_total:,} -> {report['params_after']:,}"],
        ["steps / time", f"{args.steps} steps in {seconds:.1f} s"],
    ]
    if ppl_before is not None:
        summary.append([f"perplexity ({args.eval_data})", f"{ppl_before:.3f} -> {ppl_after:.3f} "
                                                           f"(x{ppl_after / ppl_before:.3f})"])
    summary.append(["saved", f"{out} (reload: loraprune.load_pruned)"])
    print(format_table(["", ""], summary))
    return 0


def _perplexity(model, tokenizer, args) -> float:
    from .eval import perplexity

    return perplexity(model, eval_texts(args.eval_data), tokenizer, window=args.seq_len,
                      max_windows=args.eval_windows, progress=True)


def cmd_eval(args) -> int:
    from .eval import perplexity

    texts = eval_texts(args.data, args.split)
    rows = []
    for name in [args.model] + ([args.baseline] if args.baseline else []):
        model = load_model(name, args.dtype)
        tokenizer = load_tokenizer(args.tokenizer or name)
        started = time.time()
        ppl = perplexity(model, texts, tokenizer, window=args.seq_len, batch_size=args.batch_size,
                         max_windows=args.max_windows, progress=True)
        params = sum(p.numel() for p in model.parameters())
        rows.append([name, params, ppl, round(time.time() - started, 1)])
    print(format_table(["model", "params", "perplexity", "seconds"], rows,
                       title=f"perplexity on {args.data} ({args.split}), windows of {args.seq_len} tokens"))
    if args.baseline:
        print(f"ratio pruned / baseline: {rows[0][2] / rows[1][2]:.4f}")
    return 0


def cmd_inspect(args) -> int:
    from .io import inspect_dir

    info = inspect_dir(args.dir)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    rows = [[d["layer"], d.get("num_attention_heads", "?"), d.get("num_key_value_heads", "?"),
             d.get("intermediate_size", "?"), d["params"]] for d in info["layers"]]
    print(format_table(["layer", "q heads", "kv heads", "mlp width", "params"], rows,
                       title=f"{info['path']} ({info['model_type']}, head_dim {info['head_dim']}, "
                             f"{'uniform' if info['uniform'] else 'per-layer widths'})"))
    lines = [f"total parameters: {info['total_params']:,} (outside decoder layers: {info['other_params']:,})"]
    if info["achieved_ratio"] is not None:
        lines.append(f"pruned: {info['achieved_ratio']:.2%} of decoder-projection parameters removed "
                     f"(original widths {info['original']})")
    print("\n".join(lines))
    return 0


def bench_roots() -> list[Path]:
    """Where a source checkout's ``bench/`` may be: the working directory, then the package's parent."""
    return [Path.cwd(), Path(__file__).resolve().parent.parent]


def cmd_bench(args) -> int:
    """Run ``python -m bench.run`` from the source checkout the package was installed from (or the cwd)."""
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if rest[:1] == ["--help-bench"]:
        rest = ["--help"]
    root = next((c for c in bench_roots() if (c / "bench" / "run.py").is_file()), None)
    if root is None:
        raise CLIError("the benchmarks are not installed with the package: run 'loraprune bench' from a loraprune "
                       "source checkout (the folder holding bench/run.py)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.call([sys.executable, "-m", "bench.run", *rest], cwd=root, env=env)


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "inspect": cmd_inspect, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    from .archs import ModuleLayoutError, UnsupportedArchitectureError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .io import PrunedModelError
    from .prune import NonFiniteLossError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        args = argparse.Namespace(command="bench", args=argv[1:])  # everything after 'bench' is bench.run's
    else:
        args = parser.parse_args(argv)
    fixable = (CLIError, DataError, PrunedModelError, CheckpointError, UnsupportedArchitectureError,
               ModuleLayoutError, NonFiniteLossError, FileExistsError, ValueError)
    try:
        return COMMANDS[args.command](args)
    except fixable as err:
        if os.environ.get("LORAPRUNE_DEBUG"):
            raise
        print(f"loraprune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = " (rerun with --resume to continue from the last checkpoint)" if args.command == "prune" else ""
        print(f"loraprune: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
