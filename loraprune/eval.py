"""Evaluation: perplexity in the paper's style, CPU throughput, lm-eval hook.

Perplexity follows the usual pruning-paper protocol (SparseGPT, LLM-Pruner,
LoRAPrune): join the documents with ``"\\n\\n"``, tokenize once, cut the stream
into non-overlapping windows and report ``exp(mean NLL)`` over every predicted
token.  Compare pruned / dense ratios on the same text and tokenizer.
The evaluation texts themselves come from :func:`loraprune.data.corpora.load_eval_text`.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import plain_value
from .data.windows import (
    check_context,
    check_token_ids,
    check_tokenizer_fits,
    require_tokens,
    token_stream,
    vocab_size_of,
)
from .errors import ConfigError, LoRAPruneError, MissingExtraError

__all__ = ["perplexity", "tokens_per_second", "lm_eval_tasks"]


# ------------------------------------------------------------------- the arguments
#: The lower bound of each count argument of the evaluation functions (None: the argument may be None).
_COUNTS = {"batch_size": 1, "max_windows": 1, "new_tokens": 1, "seq_len": 1, "repeats": 1, "warmup": 0,
           "prompt_len": 1, "window": 2, "stride": 1}
_MAY_BE_NONE = ("max_windows", "window", "stride")


def check_eval_args(model=None, **args: Any) -> dict:
    """The one argument check of :func:`perplexity`, :func:`tokens_per_second` and :func:`lm_eval_tasks`,
    before any work: counts are integers at or above their floor (``batch_size=0``, ``max_windows=0``,
    ``new_tokens=0`` are refused, not turned into one window or 0 tokens/s), ``device`` exists on this
    machine, and a sequence (``window``, ``seq_len``, ``prompt_len + new_tokens``) fits the model's context
    (the rule training applies: :func:`loraprune.data.windows.check_context`).

    Returns the arguments as plain Python values (numpy integers become ints)."""
    out = {}
    for name, value in args.items():
        value = plain_value(value)
        if name in _COUNTS and not (value is None and name in _MAY_BE_NONE):
            floor = _COUNTS[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer >= {floor}, got {value!r}")
            if value < floor:
                raise ConfigError(f"{name} must be >= {floor}, got {value}"
                                  + ("; pass None for all windows" if name == "max_windows" else ""))
        elif name == "device" and value is not None:
            value = _check_device(value)
        out[name] = value
    config = getattr(model, "config", None)
    for name in ("window", "seq_len"):
        if out.get(name) is not None:
            check_context(out[name], config, name)
    if "prompt_len" in out and "new_tokens" in out:
        check_context(out["prompt_len"] + out["new_tokens"], config, "prompt_len+new_tokens")
    return out


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={device!r} is not a device ({err}); pass 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                              "pass device='cpu' or leave device=None (the model's device)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


# ----------------------------------------------------------------------- perplexity
def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _context_length(model) -> int:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not n:
        raise LoRAPruneError("window=None needs model.config.max_position_embeddings; pass window=<int> explicitly.")
    return int(n)


def _window_plan(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(start, first_scored_position)`` for each window of the sliding evaluation.

    Windows are ``[start, start + window)`` for ``start = 0, stride, 2*stride, ...``
    while they fit.  The first window scores positions ``1..window-1``; each later
    one scores only its last ``stride`` positions, i.e. the tokens no earlier
    window predicted, so every token after the first is scored exactly once with
    at least ``window - stride`` tokens of context.  With ``stride == window``
    this is the plain non-overlapping evaluation.  The tail that does not fill a
    whole window is dropped, as in the reference protocol.
    """
    require_tokens(n_tokens, window)
    starts = range(0, n_tokens - window + 1, stride)
    return [(s, 1 if s == 0 else window - stride) for s in starts]


def _scored_nll(logits: torch.Tensor, ids: torch.Tensor, first: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL over positions ``>= first`` of each row, and their count."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [b, L-1]; entry j predicts position j+1
    pos = torch.arange(1, ids.shape[1], device=ids.device)
    mask = pos[None, :] >= first[:, None]
    return float(nll[mask].double().sum()), int(mask.sum())


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    texts_or_dataset: Any,
    tokenizer: Any = None,
    window: int | None = 128,
    stride: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Perplexity ``exp(mean NLL over scored tokens)`` of a causal LM.

    Documents are joined by ``"\\n\\n"``, tokenized once without special tokens
    and cut into windows; the model's train/eval mode is restored afterwards.

    Args:
        model: a causal LM returning ``.logits`` (any ``transformers`` model).
        texts_or_dataset: a string, a list of strings, a path / list of paths to
            text files, a ``datasets.Dataset`` with a ``"text"`` column, or token
            ids as an integer tensor (1-D stream or 2-D rows, concatenated).
        tokenizer: needed for text; must not have more tokens than the model's embedding.
        window: tokens per window (``None`` = the model's full context).
        stride: ``None`` = ``window`` (non-overlapping, the paper's protocol);
            smaller = sliding evaluation that scores only the new tokens of each window.
        batch_size: windows per forward pass.
        max_windows: keep only the first N windows (quick estimates).
        device: where to run (default: the model's device).
        progress: show a tqdm bar over the batches.

    Raises:
        DataError: empty or too-short text, token ids outside the model's vocabulary,
            a tokenizer that is not the model's, float token tensors.
    """
    args = check_eval_args(model, window=window, stride=stride, batch_size=batch_size, max_windows=max_windows,
                           device=device)
    window = _context_length(model) if args["window"] is None else args["window"]
    stride = window if args["stride"] is None else args["stride"]
    batch_size, max_windows, device = args["batch_size"], args["max_windows"], args["device"]
    if not 1 <= stride <= window:
        raise LoRAPruneError(f"stride must be in [1, window={window}], got {stride}.")
    vocab = vocab_size_of(model)
    check_tokenizer_fits(tokenizer, vocab)
    ids = token_stream(tokenizer, texts_or_dataset)
    check_token_ids(ids, vocab, "the evaluation text")
    plan = _window_plan(ids.numel(), window, stride)
    if max_windows is not None:
        plan = plan[:max_windows]
    device = device if device is not None else _model_device(model)
    offsets = torch.arange(window)

    was_training = model.training
    model.eval()
    total_nll, total_count = 0.0, 0
    try:
        for i in tqdm(range(0, len(plan), batch_size), desc="perplexity", unit="batch", disable=not progress):
            chunk = plan[i : i + batch_size]
            starts = torch.tensor([s for s, _ in chunk])
            batch = ids[starts[:, None] + offsets].to(device)
            first = torch.tensor([f for _, f in chunk], device=device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll, count = _scored_nll(logits, batch, first)
            total_nll += nll
            total_count += count
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_count)


# ----------------------------------------------------------------------- throughput
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def tokens_per_second(
    model: torch.nn.Module,
    batch_size: int = 1,
    seq_len: int = 128,
    mode: str = "prefill",
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    prompt_len: int = 8,
    seed: int = 0,
) -> float:
    """Measured throughput in tokens/second (median over ``repeats`` after ``warmup`` runs).

    Intended for before/after ratios on the same machine, never for absolute claims.

    Args:
        model: a causal LM with ``config.vocab_size``.
        batch_size: sequences per forward pass.
        seq_len: prefill length (``mode="prefill"``).
        mode: ``"prefill"``: one forward pass over ``batch_size x seq_len`` random
            tokens, no KV cache. ``"decode"``: greedy generation of ``new_tokens``
            tokens with the KV cache after a ``prompt_len``-token prompt; only the
            decode steps are timed, so the figure is ``batch_size * new_tokens / decode time``.
        new_tokens: decode steps timed (``mode="decode"``).
        repeats: timed runs; the median is reported.
        warmup: untimed runs first.
        prompt_len: prompt length before decoding.
        seed: seeds the random token ids.
    """
    if mode not in ("prefill", "decode"):
        raise LoRAPruneError(f"mode must be 'prefill' or 'decode', got {mode!r}.")
    lengths = {"seq_len": seq_len} if mode == "prefill" else {"prompt_len": prompt_len, "new_tokens": new_tokens}
    args = check_eval_args(model, batch_size=batch_size, repeats=repeats, warmup=warmup, **lengths)
    batch_size, repeats, warmup = args["batch_size"], args["repeats"], args["warmup"]
    seq_len, prompt_len, new_tokens = (args.get(k, d) for k, d in (("seq_len", seq_len), ("prompt_len", prompt_len),
                                                                  ("new_tokens", new_tokens)))
    device = _model_device(model)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    length = seq_len if mode == "prefill" else prompt_len
    ids = torch.randint(0, vocab, (batch_size, length), generator=gen).to(device)
    run = _prefill_once if mode == "prefill" else _decode_once
    n_tokens = batch_size * (seq_len if mode == "prefill" else new_tokens)

    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            run(model, ids, new_tokens)
        times = sorted(run(model, ids, new_tokens) for _ in range(repeats))
    finally:
        model.train(was_training)
    return n_tokens / times[len(times) // 2]


def _prefill_once(model, ids, _new_tokens) -> float:
    _sync(ids.device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - t


def _cache_kwarg(model) -> str:
    """transformers >= 5.x names the KV-cache argument ``cache``; 4.x used ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _decode_once(model, ids, new_tokens) -> float:
    kwarg = _cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{kwarg: _out_cache(out)})
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return time.perf_counter() - t


# ------------------------------------------------------------------------ lm-eval
#: Zero-shot tasks of the pruning papers (LLM-Pruner, LoRAPrune), as lm-eval names them; they download their data.
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # optional dependency
        raise MissingExtraError(
            "lm_eval_tasks needs lm-evaluation-harness: pip install loraprune[eval]  (or pip install lm-eval)"
        ) from e
    return lm_eval, HFLM, TaskManager


def lm_eval_tasks(model: Any, tokenizer: Any = None, tasks: str | Sequence[str] = PAPER_TASKS, batch_size: int = 8,
                  include_path: str | None = None, **kw: Any) -> dict:
    """Run lm-evaluation-harness tasks on an in-memory model, or on a saved one (a directory or ``.gguf`` file).

    Needs the optional extra ``pip install loraprune[eval]``; hub tasks
    (``hellaswag``, ``piqa``, ``arc_easy``, ``winogrande``, ``boolq``, ...)
    download their data on first use, local tasks (``include_path``) need no network.

    Args:
        model: the (pruned) model, or the path of a saved one (per-layer pruned
            directories load with :func:`loraprune.load_pruned`), wrapped with
            ``lm_eval.models.huggingface.HFLM``.
        tokenizer: its tokenizer (default for a path: the one saved with it).
        tasks: task names (or one name); default :data:`PAPER_TASKS`.
        batch_size: HFLM's batch size.
        include_path: a folder of task YAML files of your own (``TaskManager(include_path=...)``).
        **kw: passed to ``lm_eval.simple_evaluate`` (``num_fewshot``, ``limit``, ...).

    Returns:
        The ``"results"`` dict (task -> metrics).
    """
    lm_eval, HFLM, TaskManager = _lm_eval()
    batch_size = check_eval_args(batch_size=batch_size)["batch_size"]
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise LoRAPruneError("no task given; pass task names, e.g. tasks=['piqa', 'boolq']")
    if include_path is not None and not os.path.isdir(include_path):
        raise LoRAPruneError(f"include_path={include_path!r} is not a folder; pass the folder holding the task YAML files")
    if isinstance(model, (str, os.PathLike)):
        from .export.loader import load_model_and_tokenizer

        model, loaded = load_model_and_tokenizer(str(model), None if tokenizer is None else str(tokenizer)
                                                 if isinstance(tokenizer, (str, os.PathLike)) else None)
        tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) else loaded
    if tokenizer is None:
        raise LoRAPruneError("lm_eval_tasks needs the model's tokenizer: pass tokenizer=")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    broken = _unparsable_task_files(include_path) if unknown and include_path is not None else []
    if broken:
        raise LoRAPruneError(f"unknown lm-eval task(s) {unknown}: the task file(s) in include_path failed to parse, "
                             "so lm-eval skipped them: " + "; ".join(f"{path}: {msg}" for path, msg in broken[:3])
                             + ". Fix the YAML")
    if unknown:
        raise LoRAPruneError(f"unknown lm-eval task(s) {unknown}; the paper tasks are {', '.join(PAPER_TASKS)} "
                             "(lm-eval --tasks list shows all), or pass include_path=<folder of your task YAMLs>")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, **kw)
    return results["results"]


def _unparsable_task_files(include_path: str) -> list[tuple[str, str]]:
    """``(file, the parser's message)`` for each task YAML under ``include_path`` that lm-eval's own loader
    cannot read (lm-eval skips such a file with a debug log, so its task would be called unknown).
    ``!function`` tags are not resolved: no code in the folder runs."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # another lm-eval layout: the plain safe loader says at least what YAML cannot read
        import yaml

        def load_yaml(path, **_):
            with open(path, "rb") as fh:
                return yaml.safe_load(fh)
    broken = []
    for root, _dirs, files in sorted(os.walk(include_path)):
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")):
                path = os.path.join(root, name)
                try:
                    load_yaml(path, resolve_func=False, recursive=True)
                except Exception as err:  # noqa: BLE001 - the parser's own message is what the user needs
                    broken.append((path, " ".join(str(err).split())))
    return broken
