"""The ``loraprune`` command: prune, eval, inspect, export, bench.

``loraprune prune`` (:mod:`loraprune.apps.cli_prune`) is built for long unattended
runs: it checkpoints into ``OUTPUT/checkpoints/``, ``--resume`` continues from
the newest checkpoint with the same final masks and weights as an
uninterrupted run, and the final model replaces ``OUTPUT`` atomically (the
checkpoints go with it: a finished directory holds only the model, its
tokenizer, ``loraprune_report.json`` and ``loraprune_masks.json``).

Errors users can fix (bad options, data, directories, models: every
:class:`~loraprune.errors.LoRAPruneError`, usage errors included) print one
line ``loraprune: error: ...`` naming the fix and exit with status 2
(``LORAPRUNE_DEBUG=1`` shows the traceback instead). Anything else is a bug
and shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import LoRAPruneError, UsageError
from ..export.gguf_write import DTYPES as GGUF_DTYPES
from ..utils.tables import format_table
from .cli_inputs import (
    DEVICE_HELP,
    DTYPE_HELP,
    DTYPES,
    CLIError,
    check_path_exists,
    eval_texts,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_placement,
)

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError` (one line, exit 2, like every user error)."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .cli_prune import add_prune_parser

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(
        prog="loraprune",
        description="Structured pruning of LLaMA-family models (llama, mistral, qwen2, qwen3) while LoRA recovers "
                    "the quality: whole KV groups and MLP channels go, the result is a smaller dense model.",
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_prune_parser(sub, fmt)

    e = sub.add_parser("eval", help="perplexity and/or zero-shot tasks (lm-eval) of a (pruned) model",
                       formatter_class=fmt,
                       description="Perplexity in the pruning papers' protocol (--data: documents joined, tokenised "
                                   "once, non-overlapping windows, exp(mean NLL)); zero-shot accuracy with "
                                   "lm-evaluation-harness (--tasks, needs pip install loraprune[eval]).")
    e.add_argument("--model", required=True, help="model directory (pruned or not), a .gguf file, or a hub id")
    e.add_argument("--data", default=None,
                   help="perplexity text: a .txt/.jsonl file or a folder of them, 'wikitext2' / 'ptb' / 'shakespeare' "
                        "(local shared copies when present), or a hub dataset name")
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks, e.g. boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge "
                        "(they download their data), or tasks of your own with --include-path")
    e.add_argument("--include-path", default=None, help="folder of lm-eval task YAML files of your own")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples (default: the task's, 0)")
    e.add_argument("--limit", type=_positive_int, default=None, help="lm-eval: only the first N examples per task")
    e.add_argument("--split", default="test", help="split for named or hub datasets")
    e.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per window")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass")
    e.add_argument("--max-windows", type=_positive_int, default=None, help="only the first N windows (quick estimate)")
    e.add_argument("--baseline", default=None, help="also evaluate this (dense) model and report the ratio")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: from --model)")
    e.add_argument("--device", default=None, help=DEVICE_HELP)
    e.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP.split(";")[0])
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="per-layer widths and parameter counts of a saved model", formatter_class=fmt,
                       description="Reads config.json and the safetensors headers only; no weights are loaded.")
    i.add_argument("dir", help="model directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")

    x = sub.add_parser("export", help="write a pruned model as one GGUF file for llama.cpp",
                       formatter_class=fmt,
                       description="Per-layer models become llama.cpp's 'deci' architecture (per-layer head counts "
                                   "and MLP widths), uniform LLaMA/Mistral ones the stock 'llama' architecture. "
                                   "For 4-bit k-quants, quantize the f16 file with llama.cpp's llama-quantize.")
    x.add_argument("output", help="the .gguf file to write")
    x.add_argument("--from", dest="source", required=True, help="directory of a pruned model (loraprune prune "
                                                                  "--output, or save_pruned)")
    x.add_argument("--dtype", default="f16", choices=GGUF_DTYPES, help="type of the 2-D weights (norms stay f32)")
    x.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, or a .gguf file whose tokenizer is copied (default: the one saved "
                        "with the model)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    b = sub.add_parser("bench", help="run the benchmarks (python -m bench.run) from a source checkout",
                       formatter_class=fmt, description="Thin dispatcher: every further argument goes to bench.run.")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for bench.run ('loraprune bench --help-bench' "
                                                          "shows them)")
    return parser


# ------------------------------------------------------------------------ commands
def cmd_eval(args) -> int:
    if args.data is None and args.tasks is None:
        raise CLIError("pass --data (perplexity) and/or --tasks (zero-shot accuracy with lm-eval)")
    placement = resolve_placement(args.device, args.dtype)
    for option in ("--model", "--baseline"):
        check_path_exists(option, getattr(args, option[2:]), "a model directory, a .gguf file, or a hub id")
    check_path_exists("--include-path", args.include_path, "a folder of lm-eval task YAML files")
    if args.tasks is not None:
        from ..eval import _lm_eval

        _lm_eval()  # the missing extra is named before any model loads
    if args.data is not None:
        _eval_perplexity(args, placement)
    if args.tasks is not None:
        _eval_tasks(args, placement)
    return 0


def _eval_tasks(args, placement) -> None:
    from ..eval import lm_eval_tasks

    rows = []
    for name in [args.model] + ([args.baseline] if args.baseline else []):
        model, tokenizer = load_model_and_tokenizer(name, args.tokenizer, placement.dtype, device=placement.device)
        results = lm_eval_tasks(model, tokenizer, args.tasks, batch_size=args.batch_size,
                                include_path=args.include_path, num_fewshot=args.num_fewshot, limit=args.limit)
        for task, metrics in results.items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and "stderr" not in metric and metric != "alias":
                    stderr = metrics.get(metric.replace(",", "_stderr,", 1))
                    rows.append([name, task, metric.split(",")[0], value,
                                 stderr if isinstance(stderr, (int, float)) else "-"])
    print(format_table(["model", "task", "metric", "value", "stderr"], rows,
                       title=f"lm-eval, {args.num_fewshot or 0}-shot"
                             f"{f', first {args.limit} examples' if args.limit else ''}"))


def _eval_perplexity(args, placement) -> None:
    from ..eval import perplexity

    texts = eval_texts(args.data, args.split)
    rows = []
    for name in [args.model] + ([args.baseline] if args.baseline else []):
        model, tokenizer = load_model_and_tokenizer(name, args.tokenizer, placement.dtype, device=placement.device)
        started = time.time()
        ppl = perplexity(model, texts, tokenizer, window=args.seq_len, batch_size=args.batch_size,
                         max_windows=args.max_windows, progress=not args.no_progress)
        params = sum(p.numel() for p in model.parameters())
        rows.append([name, params, ppl, round(time.time() - started, 1)])
    print(format_table(["model", "params", "perplexity", "seconds"], rows,
                       title=f"perplexity on {args.data} ({args.split}), windows of {args.seq_len} tokens, "
                             f"{placement.describe(model)} / {placement.dtype}"))
    if args.baseline:
        print(f"ratio pruned / baseline: {rows[0][2] / rows[1][2]:.4f}")


def cmd_inspect(args) -> int:
    from ..export.load import inspect_dir

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
        whole = info.get("achieved_ratio_model")
        lines.append(f"pruned: {info['achieved_ratio']:.2%} of decoder-projection parameters removed"
                     + (f", {whole:.2%} of all parameters" if whole is not None else "")
                     + f" (original widths {info['original']})")
    elif not info["pruned_by_loraprune"]:
        lines.append("not pruned by loraprune (config.json has no loraprune block)")
    print("\n".join(lines))
    return 0


#: Said whenever a per-layer GGUF is written: what is proven to run it, and what is not.
PER_LAYER_NOTICE = ("per-layer file: runs in llama.cpp and the tools built on it (llama-cli, llama-server, "
                    "llama-cpp-python); ollama is reported to fail on per-layer head counts, prune with --uniform for it")


def cmd_export(args) -> int:
    import torch

    from ..export.gguf_read import is_gguf_file
    from ..export.gguf_write import check_gguf_path, save_gguf
    from ..export.load import inspect_dir, load_pruned, read_config
    from ..structure.archs import ARCHS

    check_path_exists("--from", args.source, "the directory of a pruned model")
    check_path_exists("--tokenizer", args.tokenizer, "a tokenizer directory or a .gguf file")
    check_gguf_path(args.output, args.overwrite)  # before the model loads
    model_type = read_config(args.source).get("model_type")
    if not read_config(args.source).get("loraprune") and model_type not in ARCHS:
        raise CLIError(f"--from {args.source}: a {model_type!r} model, which loraprune cannot prune (it prunes "
                       f"{', '.join(sorted(ARCHS))}) and this export does not write unpruned; convert it as it is with "
                       "llama.cpp's convert_hf_to_gguf.py")
    info = inspect_dir(args.source)  # refuses a broken directory before anything loads
    if not info["pruned_by_loraprune"]:
        raise CLIError(f"--from {args.source}: the model was not pruned by loraprune (its config.json has no "
                       "loraprune block); prune it first (loraprune prune), or convert it with llama.cpp's "
                       "convert_hf_to_gguf.py")
    tok_name = args.tokenizer or args.source
    tokenizer = tok_name if is_gguf_file(tok_name) else load_tokenizer(tok_name)
    model = load_pruned(args.source, dtype=torch.float32)
    path = save_gguf(model, args.output, tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype}, "
          f"{'uniform' if info['uniform'] else 'per-layer widths'}); run it: llama-cli -m {path}")
    if not info["uniform"]:
        print(PER_LAYER_NOTICE)
    return 0


def bench_roots() -> list[Path]:
    """Where a source checkout's ``bench/`` may be: the working directory, then the package's parent."""
    return [Path.cwd(), Path(__file__).resolve().parent.parent]


def cmd_bench(args) -> int:
    """Run ``python -m bench.run`` from a loraprune source checkout (the cwd or the one the package is installed from).

    The benchmarks are not part of the installed package: they need the
    repository's ``bench/`` folder and its data, so outside a source checkout
    this is refused with the fix.
    """
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if rest[:1] == ["--help-bench"]:
        rest = ["--help"]
    root = next((c for c in bench_roots() if (c / "bench" / "run.py").is_file()), None)
    if root is None:
        raise CLIError("the benchmarks are not installed with the package: run 'loraprune bench' (or "
                       "'python -m bench.run') inside a loraprune source checkout, the folder holding bench/run.py "
                       "(git clone it and pip install -e . there)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.call([sys.executable, "-m", "bench.run", *rest], cwd=root, env=env)


def _cmd_prune(args) -> int:
    from .cli_prune import cmd_prune

    return cmd_prune(args)


COMMANDS = {"prune": _cmd_prune, "eval": cmd_eval, "inspect": cmd_inspect, "export": cmd_export, "bench": cmd_bench}


def print_error(err: LoRAPruneError) -> int:
    """Say a user error as every loraprune program does: one line ``loraprune: error: ...`` on stderr; the exit status."""
    print(f"loraprune: error: {' '.join(str(err).split())}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Run the command; user errors print ``loraprune: error: ...`` and return 2, bugs raise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    try:
        if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
            args = argparse.Namespace(command="bench", args=argv[1:])  # everything after 'bench' is bench.run's
        else:
            args = build_parser().parse_args(argv)
        command = args.command
        return COMMANDS[command](args)
    except LoRAPruneError as err:
        if os.environ.get("LORAPRUNE_DEBUG"):
            raise
        return print_error(err)
    except KeyboardInterrupt:
        hint = " (rerun with --resume to continue from the last checkpoint)" if command == "prune" else ""
        print(f"loraprune: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
