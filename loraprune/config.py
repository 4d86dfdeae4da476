"""Every option of a pruning run, in one place.

:class:`PruneConfig` is the single home of the options: each field carries its
type, default and help text, and :meth:`PruneConfig.validate` checks them all
before any work starts. :func:`loraprune.prune`, the CLI (whose flags are
generated from these fields), the Trainer callback, the demo, the checkpoint
compatibility check and the report all read it, so a new option is written
once. Modelled on PEFT's ``LoraConfig``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field, fields

from .errors import ConfigError
from .method.criterion import CRITERIA

NORMALIZE = (None, "module", "l2")
RANKINGS = ("layer", "global", "adaptive")
LR_SCHEDULES = ("constant", "linear", "cosine")


def _opt(default, help: str, *, cli: bool = True, choices=None, **kw):
    """A dataclass field with its help text (and CLI choices) as metadata."""
    meta = {"help": help, "cli": cli}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class PruneConfig:
    """Options of :func:`loraprune.prune` (see each field's ``help``).

    ``PruneConfig(ratio=0.3, steps=400)`` or ``prune(model, data, config, steps=50)``
    (keyword overrides win). :meth:`replace` returns a validated copy.
    """

    ratio: float = _opt(0.5, "fraction of the decoder layers' projection parameters (q, k, v, o, gate, up, down, "
                             "biases included) to remove; the result lands within 1%% (reported as achieved_ratio)")
    steps: int = _opt(200, "LoRA optimiser steps: pruning and recovery happen in the same run")
    lr: float = _opt(2e-3, "AdamW learning rate of the LoRA factors (chosen on SmolLM2 at 50 %%, by out-of-domain "
                           "perplexity: the best at the default 200 steps (against 4e-3) and at 100 (against 1e-3); "
                           "runs of about 30 steps do better with 4e-3: bench/README.md)")
    lr_schedule: str = _opt("linear", "learning-rate schedule over the run: constant, linear decay to 0, or cosine "
                                        "decay to 0", choices=LR_SCHEDULES)
    lora_r: int = _opt(8, "LoRA rank (ignored for layers that already carry a PEFT adapter: it is continued)")
    lora_alpha: float = _opt(16.0, "LoRA alpha: the update is scaled by alpha/r")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    criterion: str = _opt("fisher", "importance criterion: lora (paper Eq. 10, from LoRA gradients only), grad "
                                  "(full-gradient Taylor, needs the weight gradient: the memory baseline), fisher "
                                  "(per-sequence squared mask gradient of each whole group, from activations), taylor "
                                  "(its absolute batch sum), magnitude, random, flap / wanda-sp (the one-shot baselines' "
                                  "activation scores of o_proj/down_proj inputs, from the training forwards)",
                                  choices=CRITERIA)
    square: bool = _opt(False, "square the element score (the paper's formula) instead of the absolute value "
                               "(the official code's choice)")
    normalize: str | None = _opt(None, "per-projection normalisation of group scores before q/k/v/o (gate/up/down) "
                                       "are added: none, 'module' (divide by the sum) or 'l2' (divide by the L2 norm, "
                                       "as the official code)", choices=NORMALIZE)
    ema: float = _opt(0.9, "EMA factor of the group scores, I <- ema*I + (1-ema)*I_step")
    prune_start: float = _opt(0.1, "first step of the cubic schedule (a fraction of steps, or a step number); "
                                    "LoRA trains on the dense model before it (warm-up: with B = 0 the first LoRA "
                                    "gradients see little)")
    prune_end: float = _opt(0.75, "step at which the final mask is reached (fraction or step number); the steps "
                                  "after it are recovery on the final mask")
    prune_every: int | None = _opt(None, "steps between mask updates (default: a twentieth of the pruning span, "
                                         "so that each update removes a few percent)")
    skip_layers: object = _opt(None, "layers that keep everything: indices, or 'paper' (first 10%% and the last layer)")
    ranking: str = _opt("adaptive", "'layer': every layer removes the same share (uniform model); 'global': rank KV "
                                 "groups and channels across layers; 'adaptive': one ranking of all groups by score "
                                 "per parameter across layers and between attention and MLP (per-layer model)", choices=RANKINGS)
    round_to: int | None = _opt(None, "keep a multiple of this many MLP channels per layer, with every ranking "
                                      "('adaptive' and 'global' remove whole blocks of round_to channels, scored by the "
                                      "sum of theirs, and keep at least one per layer); default (none): 32 where every "
                                      "MLP width is a multiple of 32 and at least 512 channels (llama.cpp's quantization "
                                      "block; no measured perplexity cost on SmolLM2), else 1. 256 fits its k-quants, "
                                      "8/64/128 tensor cores")
    uniform: bool = _opt(False, "the same widths in every layer (a stock config that plain from_pretrained reloads); "
                                "implies ranking='layer'")
    progressive: bool = _opt(True, "cut removed groups out of the computation at every mask update (kept groups "
                                   "reordered in place into a dense prefix: smaller GEMMs and fewer heads for the rest "
                                   "of the run, the same result as masked training); False computes them as zeros until "
                                   "the end. Takes effect in prune(); the Trainer callback trains masked")
    repair: bool = _opt(False, "at every mask update, re-fit the kept columns of o_proj/down_proj by least squares to "
                               "what the cut groups contributed (second moments of their inputs over the step "
                               "before the update; the teacher keeps a copy of those weights). Not with "
                               "checkpoint_dir")
    repair_damp: float = _opt(0.1, "ridge damping of the repair, relative to the mean input power")
    seq_len: int = _opt(128, "tokens per training window cut from text data")
    batch_size: int = _opt(4, "windows per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimiser step (and per score observation)")
    distill: float = _opt(0.5, "weight of self-distillation: the loss is (1-distill)*LM + distill*KL(dense || pruned), "
                               "the dense teacher being the same frozen weights with LoRA and masks off")
    distill_temperature: float = _opt(1.0, "softmax temperature of the distillation loss")
    loss_chunk: int = _opt(64, "positions per chunk of the loss: the logits (student and teacher) and their "
                                "gradient are made a chunk at a time and never exist whole, and backward keeps only "
                                "the gradient of the final hidden states (same value and gradients); 0 uses the "
                                "model's own logits")
    weight_decay: float = _opt(0.0, "AdamW weight decay of the LoRA factors")
    max_grad_norm: float | None = _opt(1.0, "gradient clipping of the LoRA factors (0 or None: off)")
    max_bad_steps: int = _opt(5, "this many NaN/inf steps in a row stop the run with NonFiniteLossError")
    seed: int = _opt(0, "seed of everything (LoRA init, data order, dropout, random criterion)")
    gradient_checkpointing: bool | None = _opt(None, "recompute each decoder layer's activations during backward "
                                                      "instead of keeping them (non-reentrant, for the run only): far "
                                                      "less memory, one more forward pass per step, the same masks and "
                                                      "losses. None: on where the model supports it; False: off (faster "
                                                      "steps when memory allows)")
    merge: bool = _opt(True, "merge LoRA into the pruned weights (False keeps it, for export_adapter)")
    progress: bool = _opt(True, "show a progress bar", cli=False)
    checkpoint_dir: str | None = _opt(None, "save the pruning state here every checkpoint_every steps", cli=False)
    checkpoint_every: int | None = _opt(None, "steps between checkpoints (default a tenth of steps)")
    resume: bool = _opt(False, "continue from the newest checkpoint in checkpoint_dir", cli=False)
    force_resume: bool = _opt(False, "resume even if the checkpoints were written for another model, data or "
                                     "tokenizer", cli=False)

    def __post_init__(self):
        self._normalize()
        if self.uniform is True and self.ranking == "adaptive":
            self.ranking = "layer"  # uniform widths are what layer-wise ranking gives
        self.validate()

    # ---- validation -----------------------------------------------------------
    def _normalize(self) -> None:
        """Every option as a plain Python value, so nothing unserialisable reaches the report,
        a checkpoint or ``config.json``: numpy scalars and 0-d arrays or tensors
        (``np.float32(0.3)``, ``np.int64(3)``) become their Python number, bool or str;
        ``checkpoint_dir`` a ``str``; ``skip_layers`` a list (of plain values). A value of
        the wrong type is left as it is, for :meth:`validate` to refuse by name."""
        for f in fields(self):
            setattr(self, f.name, plain_value(getattr(self, f.name)))
        if isinstance(self.checkpoint_dir, os.PathLike):
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        skip = self.skip_layers
        if skip is not None and skip != "paper" and not isinstance(skip, (str, bytes, dict)) and hasattr(skip, "__iter__"):
            self.skip_layers = [plain_value(i) for i in skip]

    def validate(self) -> "PruneConfig":
        """Check every option; raise :class:`ConfigError` naming the fix."""
        def num(name, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            kind = numbers.Integral if integer else numbers.Real
            if isinstance(v, bool) or not isinstance(v, kind) or (not integer and not math.isfinite(v)):
                raise ConfigError(f"{name} must be {'an integer' if integer else 'a finite number'}, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and (v >= hi if hi_open else v > hi):
                raise ConfigError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")

        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, options))}; got {v!r}")

        num("ratio", 0, 1, lo_open=True, hi_open=True)
        num("steps", 1, integer=True)
        num("lr", 0, lo_open=True)
        choice("lr_schedule", LR_SCHEDULES)
        num("lora_r", 1, integer=True)
        num("lora_alpha", 0, lo_open=True)
        num("lora_dropout", 0, 1, hi_open=True)
        choice("criterion", CRITERIA)
        choice("normalize", NORMALIZE)
        num("ema", 0, 1, hi_open=True)
        for name in ("prune_start", "prune_end"):
            num(name, 0)
        num("prune_every", 1, integer=True, allow_none=True)
        choice("ranking", RANKINGS)
        num("round_to", 1, integer=True, allow_none=True)
        num("seq_len", 2, integer=True)
        num("batch_size", 1, integer=True)
        num("grad_accum", 1, integer=True)
        num("distill", 0, 1)
        num("distill_temperature", 0, lo_open=True)
        num("loss_chunk", 0, integer=True)
        num("weight_decay", 0)
        num("max_grad_norm", 0, allow_none=True)
        num("max_bad_steps", 1, integer=True)
        num("seed", 0, 2**64 - 1, integer=True)  # torch.manual_seed's range (a larger one overflows inside torch)
        num("checkpoint_every", 1, integer=True, allow_none=True)
        num("repair_damp", 0)
        for name in ("square", "uniform", "progressive", "repair", "gradient_checkpointing", "merge", "progress", "resume",
                     "force_resume"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "gradient_checkpointing" and value is None):
                raise ConfigError(f"{name} must be True or False{' (or None)' if name == 'gradient_checkpointing' else ''}, "
                                  f"got {value!r}")
        self._validate_paths_and_layers()
        self._validate_schedule()
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume=True needs checkpoint_dir=<the directory of the interrupted run>")
        if self.force_resume and not self.resume:
            raise ConfigError("force_resume=True only applies with resume=True (it resumes checkpoints written for "
                              "another model or data); pass resume=True too, or drop force_resume")
        if self.checkpoint_every is not None and not self.checkpoint_dir:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} does nothing without checkpoint_dir; "
                              "pass checkpoint_dir=<a directory> to checkpoint, or drop checkpoint_every")
        if self.repair and self.checkpoint_dir:
            raise ConfigError("repair=True changes the frozen weights during the run, which checkpoints do not hold; "
                              "drop checkpoint_dir, or pass repair=False")
        if self.uniform and (self.skip_layers or self.ranking != "layer"):
            raise ConfigError("uniform=True needs every layer pruned alike: drop skip_layers and use ranking='layer'")
        return self

    def _validate_paths_and_layers(self) -> None:
        v = self.checkpoint_dir
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"checkpoint_dir must be a directory path (str or pathlib.Path), got {v!r}")
        skip = self.skip_layers
        if skip is None or skip == "paper":
            return
        if not isinstance(skip, list) or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                 for i in skip):
            raise ConfigError(f"skip_layers must be None, 'paper' or a list of layer indices (e.g. [0, 1]), "
                              f"got {skip!r}")

    def _validate_schedule(self) -> None:
        """``prune_start``/``prune_end``: a float is a fraction of ``steps`` (at most 1), an int a step number
        (at most ``steps``); pruning must end after it starts."""
        ends = {}
        for name in ("prune_start", "prune_end"):
            v = getattr(self, name)
            if isinstance(v, float) and v > 1:
                raise ConfigError(f"{name}={v!r} is a float, i.e. a fraction of steps, and must be <= 1; pass an int "
                                  f"({int(v)}) for a step number")
            if isinstance(v, numbers.Integral) and v > self.steps:
                raise ConfigError(f"{name}={v} is after the last step (steps={self.steps}); pass a step number <= "
                                  "steps or a fraction of steps (a float)")
            ends[name] = v * self.steps if isinstance(v, float) else v
        if ends["prune_start"] >= ends["prune_end"]:
            raise ConfigError(f"prune_start={self.prune_start!r} is not before prune_end={self.prune_end!r} "
                              f"(steps={self.steps}): pruning must end after it starts")

    # ---- construction -----------------------------------------------------------
    @classmethod
    def from_kwargs(cls, config: "PruneConfig | float | None" = None, **overrides) -> "PruneConfig":
        """``config`` (or the defaults) with ``overrides`` applied; unknown names are refused.

        ``config`` may also be a number: the ratio (``prune(model, data, 0.3)``); a
        ``ratio=`` override that contradicts it is refused rather than one of them ignored."""
        if isinstance(plain_value(config), numbers.Real) and not isinstance(config, bool):
            if "ratio" in overrides and plain_value(overrides["ratio"]) != plain_value(config):
                raise ConfigError(f"the ratio is given twice, {config!r} (positional) and ratio={overrides['ratio']!r}; "
                                  "give it once")
            overrides["ratio"] = config
            config = None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            import difflib

            hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, known, 1)) else repr(u)
                     for u in unknown]
            raise ConfigError(f"unknown option(s) {', '.join(hints)}; see loraprune.PruneConfig for the options")
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a loraprune.PruneConfig, got {type(config).__name__}")
        if (config is not None and config.uniform and plain_value(overrides.get("uniform", True)) is False
                and "ranking" not in overrides):  # the config's ranking='layer' came with uniform=True
            raise ConfigError("uniform=False overrides a config with uniform=True, whose ranking='layer' came with "
                              "it; say the ranking too: uniform=False, ranking='adaptive' (the default) or "
                              "ranking='layer'")
        result = cls(**overrides) if config is None else dataclasses.replace(config, **overrides)
        if "ranking" in overrides and result.ranking != overrides["ranking"]:  # uniform=True turned it into 'layer'
            raise ConfigError(f"ranking={overrides['ranking']!r} contradicts uniform=True, which ranks per layer; "
                              "drop one of them")
        return result

    def replace(self, **overrides) -> "PruneConfig":
        return self.from_kwargs(self, **overrides)

    def to_dict(self) -> dict:
        """JSON-able options (for the report, checkpoints and ``config.loraprune``)."""
        out = dataclasses.asdict(self)
        if isinstance(out["skip_layers"], (set, tuple, frozenset)):
            out["skip_layers"] = sorted(out["skip_layers"])
        return out

    @classmethod
    def fields_help(cls) -> list[tuple[str, object, str]]:
        """``(name, default, help)`` of every option, in declaration order (README table, CLI)."""
        out = []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((f.name, default, f.metadata["help"].replace("%%", "%")))
        return out


def plain_value(value):
    """A numpy scalar or a 0-d array / tensor as its Python value; anything else unchanged."""
    if value is None or type(value) in (str, bytes, bool, int, float):  # np.float64 subclasses float: not here
        return value
    item = getattr(value, "item", None)
    if not (callable(item) and getattr(value, "ndim", None) == 0):
        return value
    out = item()
    if isinstance(out, float) and type(value).__module__ == "numpy" and value.dtype.itemsize < 8:
        out = float(str(value))  # np.float32(0.3) -> 0.3, the number the user wrote, not 0.30000001192092896
    return out


#: Options that change which groups are pruned or how LoRA trains: a checkpoint
#: written under other values cannot be resumed (progress/merge/checkpointing/gradient checkpointing can differ).
RUN_DEFINING = tuple(f.name for f in fields(PruneConfig)
                     if f.name not in ("progress", "merge", "checkpoint_dir", "checkpoint_every", "resume",
                                       "force_resume", "loss_chunk", "gradient_checkpointing"))


def options_markdown() -> str:
    """The options table of docs/options.md, generated from the fields (a test keeps the page in sync).
    A ``|`` in a help text is escaped: unescaped, it would split the table row."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for name, default, help_text in PruneConfig.fields_help():
        rows.append(f"| `{name}` | `{default!r}` | {help_text.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def cli_options_markdown() -> str:
    """The CLI doc's table of ``loraprune prune`` flags, generated from the fields (a test keeps it in sync).

    A field is a flag unless its metadata says ``cli=False``: ``--field-name`` as the CLI builds it
    (booleans also as ``--no-field-name``), its default (booleans on/off, None as ``none``) and its choices."""
    def typed(value):
        return "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else str(value)

    rows = ["| flag | default | choices |", "|---|---|---|"]
    for f in fields(PruneConfig):
        if f.metadata.get("cli", True):
            flag = f.name.replace("_", "-")
            flag = f"--[no-]{flag}" if str(f.type) in ("bool", "bool | None") else f"--{flag}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = ", ".join(f"`{typed(c)}`" for c in f.metadata.get("choices") or ())
            rows.append(f"| `{flag}` | `{typed(default)}` | {choices} |")
    return "\n".join(rows)
