"""``loraprune prune``: its options (generated from :class:`~loraprune.config.PruneConfig`), the
output-directory rules, the run, and its summary.

The pruning options are not written here: every field of ``PruneConfig``
whose metadata says ``cli`` becomes ``--field-name`` with the field's default,
help text and choices, so the command line cannot drift from the library.
Only what a command line adds (where the model, data and output are; dtype;
overwrite/resume; evaluation) is declared by hand.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import time
from pathlib import Path

from ..config import RUN_DEFINING, PruneConfig
from ..errors import ConfigError
from ..utils.paths import check_output_dir
from ..utils.tables import format_table
from .cli_inputs import (
    DEVICE_HELP,
    DTYPE_HELP,
    DTYPES,
    CLIError,
    check_path_exists,
    eval_texts,
    load_model_and_tokenizer,
    resolve_placement,
)

CHECKPOINTS = "checkpoints"


# -------------------------------------------------------------------- option types
def step_or_fraction(text: str) -> float | int:
    """``0.75`` = a fraction of --steps, ``150`` = a step number."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: pass a step number (150) or a fraction of --steps (0.75)") from None


def skip_layers(text: str):
    if text in ("", "none"):
        return None
    if text == "paper":
        return "paper"
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: pass 'paper', 'none' or comma-separated layer indices like 0,1,31") from None


def _optional(kind):
    """``kind``, or None for 'none'."""
    def parse(text: str):
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'} or 'none'") from None
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


#: Options whose values need more than the annotation says.
SPECIAL_TYPES = {"skip_layers": skip_layers, "prune_start": step_or_fraction, "prune_end": step_or_fraction}
_BY_ANNOTATION = {"int": int, "float": float, "str": str, "int | None": _optional(int),
                  "float | None": _optional(float), "str | None": _optional(str)}


def cli_fields() -> list[dataclasses.Field]:
    """The fields of :class:`PruneConfig` that are command-line options."""
    return [f for f in dataclasses.fields(PruneConfig) if f.metadata.get("cli", True)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


GIVEN = "_config_flags_given"  # the namespace attribute naming the PruneConfig options the command line set


def _remember(action_class):
    """``action_class`` that also records its dest in the namespace (see :func:`config_from_args`)."""
    class Given(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            given = set(getattr(namespace, GIVEN, ()))
            given.add(self.dest)
            setattr(namespace, GIVEN, given)
    return Given


_GIVEN_STORE, _GIVEN_BOOL = _remember(argparse._StoreAction), _remember(argparse.BooleanOptionalAction)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per CLI field of :class:`PruneConfig`: ``--field-name``, its default, help and choices."""
    group = parser.add_argument_group("pruning options (loraprune.PruneConfig)")
    parser.set_defaults(**{GIVEN: frozenset()})
    for f in cli_fields():
        kwargs = {"dest": f.name, "default": _default(f), "help": f.metadata["help"], "action": _GIVEN_STORE}
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        choices = f.metadata.get("choices")
        if annotation in ("bool", "bool | None"):
            kwargs["action"] = _GIVEN_BOOL
        elif f.name in SPECIAL_TYPES:
            kwargs["type"] = SPECIAL_TYPES[f.name]
        elif choices is not None:
            kwargs["type"] = _optional(str) if None in choices else str
            kwargs["choices"] = list(choices)
            kwargs["metavar"] = "{" + ",".join("none" if c is None else c for c in choices) + "}"
        else:
            kwargs["type"] = _BY_ANNOTATION.get(annotation, str)
        group.add_argument(flag(f.name), **kwargs)


def config_from_args(args, checkpoint_dir: str | None = None) -> PruneConfig:
    """The validated :class:`PruneConfig` of the command line; a bad value names its flag.

    ``checkpoint_dir``: where the command checkpoints (``loraprune prune``: its --output); None for a
    command that does not (the demo), where --checkpoint-every is then refused rather than ignored."""
    # what the command line says: the flags given, and defaults the command moved off the library's (the demo's);
    # built through PruneConfig.from_kwargs, so the command line refuses exactly what the API refuses
    # (--uniform --ranking adaptive: a contradiction, not ranking='layer' in silence)
    given = getattr(args, GIVEN, None)
    values = {f.name: getattr(args, f.name) for f in cli_fields()
              if (given is None or f.name in given or getattr(args, f.name) != _default(f))}
    if values.get("checkpoint_every") == 0:
        values["checkpoint_every"] = None  # 0 = no checkpoints (see checkpoints_off); not a PruneConfig value
    elif checkpoint_dir is not None:
        values["checkpoint_dir"] = checkpoint_dir  # where the CLI checkpoints (see cmd_prune)
    try:
        return PruneConfig.from_kwargs(None, **values)
    except ConfigError as err:
        name = re.match(r"\w*", str(err)).group(0)
        hint = f" ({flag(name)})" if name in values else ""
        raise CLIError(f"{err}{hint}") from err


def add_prune_parser(sub, formatter) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help="prune a model and save the smaller one", formatter_class=formatter,
                       description="Train LoRA on the frozen model (LM loss plus self-distillation from the dense "
                                   "model), score whole KV groups and MLP channels (default --criterion fisher: the "
                                   "per-sequence squared gradient of a mask on each group, read from the activations "
                                   "entering o_proj/down_proj), rank them by score per parameter across layers, remove "
                                   "the lowest on a cubic schedule, merge LoRA and save a smaller dense model.",
                       epilog="Checkpoints go to OUTPUT/checkpoints every --checkpoint-every steps (default: a tenth "
                              "of --steps; 0 turns them off). --no-merge saves OUTPUT/base and OUTPUT/adapter (PEFT).")
    p.add_argument("--model", required=True,
                   help="local directory written by save_pretrained, a .gguf file (dequantized; its tokenizer is "
                        "used), or a hub model id")
    p.add_argument("--data", required=True,
                   help="calibration text: a .txt/.jsonl file (jsonl: one string or {'text': ...} per line), a folder "
                        "of them, or a hub dataset name ('name' or 'name:config', train split)")
    p.add_argument("--output", required=True, help="directory for the pruned model (checkpoints go to OUTPUT/checkpoints)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (None: the tokenizer of --model)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUTPUT/checkpoints (starts anew if OUTPUT is missing "
                        "or empty), giving the same result as an uninterrupted run")
    p.add_argument("--force-resume", action="store_true",
                   help="with --resume: resume even if the checkpoints were written for another model, other data "
                        "or other options")
    p.add_argument("--overwrite", action="store_true",
                   help="allow OUTPUT to hold other files; they are replaced, atomically, only when the run succeeds")
    p.add_argument("--eval-data", default=None,
                   help="optional text for perplexity before/after in the summary (as for 'loraprune eval --data')")
    p.add_argument("--eval-windows", type=int, default=32, help="windows of --seq-len tokens for --eval-data")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_options(p)
    return p


# -------------------------------------------------------------------- output dir
def resume_identity(args, cfg: PruneConfig) -> tuple[dict, dict]:
    """What the command line knows of its run before loading the model: the run-defining options
    (those the model resolves excepted) and the data's fingerprint, for
    :func:`loraprune.run.checkpoint.check_same_run` (the library checks the rest at restore)."""
    from ..run.checkpoint import MODEL_RESOLVED, data_fingerprint

    settings = {k: v for k, v in cfg.to_dict().items() if k in RUN_DEFINING and k not in MODEL_RESOLVED}
    return settings, {"data": data_fingerprint(args.data)}


def check_output(out: Path, resume: bool, overwrite: bool, run: tuple[dict, dict] | None = None,
                 force: bool = False) -> None:
    """Decide what an existing ``--output`` may hold, before anything is loaded or written.

    * missing or empty: fine;
    * ``--resume``: ``checkpoints/`` (and nothing else unless ``--overwrite``);
      the checkpoints must come from the same run: the options and the data are checked
      here by :func:`loraprune.run.checkpoint.check_same_run`, the model and tokenizer when
      the library restores (``--force-resume`` resumes on other data or another model anyway);
      with no checkpoint the run starts anew;
    * ``--overwrite`` without ``--resume``: anything; it is replaced when the run succeeds;
    * otherwise: refused.

    A ``checkpoints/`` folder without a complete checkpoint (a run killed
    before its first one) counts as absent.
    """
    from ..run.checkpoint import Checkpointer

    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {out} exists and is not a directory; choose another --output")
    check_output_dir(out, "--output")  # a file on the way, a read-only disk: refused before training
    has_checkpoints = bool(Checkpointer(out).complete())
    contents = [p for p in sorted(out.iterdir()) if has_checkpoints or p.name != CHECKPOINTS] if out.is_dir() else []
    if contents and not (resume or overwrite):
        raise CLIError(
            f"--output {out} exists and is not empty; pass --overwrite to replace it, --resume to continue an "
            "interrupted run saved there, or choose another --output"
        )
    others = [p.name for p in contents if p.name != CHECKPOINTS]
    if resume and others and not overwrite:
        hint = " (it holds a finished model)" if "config.json" in others else ""
        raise CLIError(
            f"--output {out} holds {', '.join(others[:5])} besides checkpoints/{hint}: nothing to resume there. "
            "Pass --overwrite to replace it, or choose another --output"
        )
    if resume and has_checkpoints and run is not None:  # the library's policy, on what is known before loading
        from ..run.checkpoint import check_same_run, newest_meta

        path, meta = newest_meta(out)
        check_same_run(path, meta, *run, allow_mismatch=force)


def claim_output(out: Path, resume: bool) -> None:
    """After the model loaded: drop checkpoints this run will not resume."""
    from ..run.checkpoint import Checkpointer

    ckpt_dir = out / CHECKPOINTS
    if ckpt_dir.is_dir() and not (resume and Checkpointer(out).complete()):
        shutil.rmtree(ckpt_dir)  # stale state of an earlier run must never be mixed into this one


def release_output(out: Path, created: bool) -> None:
    """After a failed run: keep complete checkpoints (for --resume), remove what :func:`claim_output` added otherwise."""
    from ..run.checkpoint import Checkpointer

    if Checkpointer(out).complete():
        return
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


# ------------------------------------------------------------------------ the command
def _perplexity(model, tokenizer, args, cfg) -> float:
    from ..eval import perplexity

    return perplexity(model, eval_texts(args.eval_data, option="--eval-data"), tokenizer, window=cfg.seq_len,
                      max_windows=args.eval_windows, progress=not args.no_progress)


def checkpoints_off(args) -> bool:
    """``--checkpoint-every 0``: the CLI's way to switch checkpoints off (it checkpoints by default)."""
    return args.checkpoint_every == 0


def cmd_prune(args) -> int:
    from ..model.recompute import resolve as resolve_checkpointing
    from ..run.prune import prune
    from ..run.report import PruneReport
    from ..structure.groups import layer_projection_params

    cfg = config_from_args(args, checkpoint_dir=str(args.output))  # every option checked before anything is loaded
    if args.force_resume and not args.resume:
        raise CLIError("--force-resume only applies with --resume")
    if args.resume and checkpoints_off(args):
        raise CLIError("--resume needs checkpoints: drop --checkpoint-every 0")
    if args.eval_windows < 1:
        raise CLIError(f"--eval-windows must be >= 1, got {args.eval_windows}")
    placement = resolve_placement(args.device, args.dtype)
    check_path_exists("--model", args.model, "a model directory, a .gguf file, or a hub id")
    check_path_exists("--data", args.data, "a .txt/.jsonl file, a folder of them, or a hub dataset name")
    check_path_exists("--tokenizer", args.tokenizer, "a tokenizer directory or a hub id")
    check_path_exists("--eval-data", args.eval_data, "a .txt/.jsonl file, a folder of them, or wikitext2/ptb/shakespeare")
    out = Path(args.output)
    check_output(out, args.resume, args.overwrite, resume_identity(args, cfg), force=args.force_resume)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, placement.dtype, device=placement.device)
    cfg = dataclasses.replace(cfg, gradient_checkpointing=resolve_checkpointing(cfg.gradient_checkpointing, model))
    dense_layers = layer_projection_params(model)
    dense_total = sum(p.numel() for p in model.parameters())
    ppl_before = _perplexity(model, tokenizer, args, cfg) if args.eval_data else None

    created = not out.exists()
    claim_output(out, args.resume)
    started = time.time()
    try:
        pruned = prune(model, args.data, cfg, tokenizer=tokenizer, progress=not args.no_progress,
                       checkpoint_dir=None if checkpoints_off(args) else str(out), resume=args.resume,
                       force_resume=args.force_resume)
    except BaseException:
        release_output(out, created)
        raise
    seconds = time.time() - started
    ppl_after = _perplexity(pruned, tokenizer, args, cfg) if args.eval_data else None

    result = PruneReport.of(pruned)
    after_layers = layer_projection_params(pruned)
    report = {
        "model": args.model, "data": args.data, "output": str(out), "options": cfg.to_dict(),
        "device": placement.describe(pruned), "dtype": placement.dtype, "seconds": round(seconds, 2),
        "params_before": dense_total, "params_after": sum(p.numel() for p in pruned.parameters()),
        "projection_params_before": sum(dense_layers), "projection_params_after": sum(after_layers),
        **result.to_dict(),
    }
    if ppl_before is not None:
        report["eval"] = {"data": args.eval_data, "windows": args.eval_windows, "seq_len": cfg.seq_len,
                          "ppl_before": ppl_before, "ppl_after": ppl_after}
    save_result(pruned, out, tokenizer, report, merged=cfg.merge)
    print_summary(args, cfg, result, report, dense_layers, after_layers)
    return 0


def save_result(pruned, out: Path, tokenizer, report: dict, merged: bool) -> None:
    """The model (and ``loraprune_report.json``) into ``out``, replacing it atomically.

    ``--no-merge`` keeps LoRA apart: ``out/base`` (the pruned model) and
    ``out/adapter`` (PEFT), as :func:`loraprune.export_adapter` writes them.
    """
    from ..export.adapter import export_adapter
    from ..export.save import save_pruned
    from ..utils.atomic import write_json

    if merged:
        # loraprune_masks.json is written by save_pruned itself (kept indices with their geometry)
        save_pruned(pruned, out, overwrite=True, tokenizer=tokenizer, extra_json={"loraprune_report.json": report})
    else:
        export_adapter(pruned, out, overwrite=True, tokenizer=tokenizer)
        write_json(out / "loraprune_report.json", report, indent=2)


def print_summary(args, cfg: PruneConfig, result, report: dict, dense_layers: list[int], after_layers: list[int]):
    original = result.original or {}
    rows = [[idx, f"{original.get('num_key_value_heads', '?')} -> {w['num_key_value_heads']}",
             f"{original.get('intermediate_size', '?')} -> {w['intermediate_size']}", before, after,
             f"{1 - after / before:.1%}"]
            for idx, (w, before, after) in enumerate(zip(result.layers, dense_layers, after_layers))]
    print(format_table(["layer", "kv heads", "mlp width", "params before", "params after", "removed"], rows,
                       title=f"\nloraprune: {args.model} -> {args.output}"))
    summary = [
        ["decoder projections", f"{report['projection_params_before']:,} -> {report['projection_params_after']:,} "
                                f"({result.achieved_ratio:.2%} removed, target {cfg.ratio:.2%})"],
        ["all parameters", f"{report['params_before']:,} -> {report['params_after']:,} "
                           f"({1 - report['params_after'] / report['params_before']:.2%} removed)"],
        ["steps / time", f"{result.steps} steps in {report['seconds']:.1f} s"],
        ["device / dtype", f"{report['device']} / {report['dtype']}"
                           + (" / gradient checkpointing" if cfg.gradient_checkpointing else "")],
    ]
    if "eval" in report:
        e = report["eval"]
        summary.append([f"perplexity ({args.eval_data})", f"{e['ppl_before']:.3f} -> {e['ppl_after']:.3f} "
                                                           f"(x{e['ppl_after'] / e['ppl_before']:.3f})"])
    summary.append(["saved", f"{args.output} (reload: loraprune.load_pruned)"])
    print(format_table(["", ""], summary))
