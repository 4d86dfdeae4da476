"""What the ``loraprune`` command reads: models (directories, GGUF files, hub ids), tokenizers, text.

Every problem a user can fix is a :class:`CLIError` (a
:class:`~loraprune.errors.LoRAPruneError`) whose message names the option and
the fix; paths are checked before any model is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LoRAPruneError

PATH_SUFFIXES = (".txt", ".jsonl", ".json", ".gguf", ".safetensors", ".bin")


class CLIError(LoRAPruneError):
    """A user-fixable problem with the command line; the message names the fix."""


def looks_like_path(text: str) -> bool:
    """A local path rather than a hub id or dataset name: exists, is absolute/relative-dotted, or has a file suffix."""
    return (os.path.exists(text) or text.startswith(("/", ".", "~"))
            or text.lower().endswith(PATH_SUFFIXES))


def check_path_exists(option: str, value: str | None, what: str) -> None:
    """Refuse a path-like ``value`` that does not exist, naming ``option``."""
    if value is None or not looks_like_path(value):
        return
    if not Path(value).expanduser().exists():
        raise CLIError(f"{option} {value} does not exist; pass {what}")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


# ------------------------------------------------------------------ device and dtype
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_HELP = ("where the model runs: cpu, cuda, cuda:N, or auto (device_map='auto': the layers spread over the "
               "visible GPUs, then CPU; needs accelerate). Default: cuda when a GPU is visible, else cpu")
DTYPE_HELP = ("dtype of the frozen weights: auto = bfloat16 on CUDA (float16 on GPUs without bf16), float32 on CPU; "
              "LoRA factors always train in float32")


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype the command loads the model (``--device``, ``--dtype``)."""

    device: str  # "cpu", "cuda", "cuda:N", or "auto" (device_map="auto")
    dtype: str  # float32 / bfloat16 / float16

    @property
    def device_map(self) -> str | None:
        return "auto" if self.device == "auto" else None

    def describe(self, model) -> str:
        """The device(s) the model's weights are on, e.g. ``cuda:0`` or ``auto: cuda:0, cuda:1``."""
        import torch

        if self.device == "auto":  # hf_device_map names GPUs by index
            placed = (getattr(model, "hf_device_map", None) or {}).values()
            used = sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed})
            return "auto: " + ", ".join(used or ["cpu"])

        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return str(device)


def resolve_placement(device: str | None, dtype: str = "auto") -> Placement:
    """Check ``--device``/``--dtype`` (before anything is loaded) and fill in the defaults."""
    import torch

    cuda = torch.cuda.is_available()
    if device is None:
        device = "cuda" if cuda else "cpu"
    device = device.strip().lower()
    if device == "auto":
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise CLIError("--device auto needs accelerate (pip install accelerate); or pass --device cuda / cpu")
    elif device != "cpu":
        kind, _, index = device.partition(":")
        if kind != "cuda" or (index and not index.isdigit()):
            raise CLIError(f"--device {device}: pass cpu, cuda, cuda:N or auto")
        if not cuda:
            raise CLIError(f"--device {device}: no CUDA GPU is visible (torch.cuda.is_available() is False); pass "
                           "--device cpu, or install a CUDA build of torch on a GPU machine")
        if index and int(index) >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pass one of them")
    if dtype not in DTYPES:
        raise CLIError(f"--dtype {dtype}: pass one of {', '.join(DTYPES)}")
    if dtype == "auto":
        on_gpu = device.startswith("cuda") or (device == "auto" and cuda)
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if on_gpu else "float32"
    return Placement(device, dtype)


def load_model_and_tokenizer(name: str, tokenizer_name: str | None = None, dtype: str = "float32",
                             need_tokenizer: bool = True, device: str = "cpu"):
    """``(model, tokenizer)`` for ``--model``: a saved directory (pruned ones included), a ``.gguf`` file, or a hub id.

    The model is loaded in ``dtype`` and put on ``device`` ("auto": ``device_map="auto"``).
    The tokenizer comes from ``--tokenizer`` if given, else from the same
    place as the model (a GGUF file carries its own).
    """
    from .gguf import is_gguf_file, load_gguf

    device_map = "auto" if device == "auto" else None
    if is_gguf_file(name) and Path(name).expanduser().is_file():
        if device_map:
            raise CLIError("--device auto does not apply to .gguf models (they load whole); pass --device cuda or cpu")
        model, tok = load_gguf(Path(name).expanduser(), dtype=_dtype(dtype), tokenizer=need_tokenizer and not tokenizer_name)
    else:
        model, tok = load_model(name, dtype, device_map=device_map), None
    if device_map is None and device != "cpu":
        model = model.to(device)
    if need_tokenizer and tok is None:
        tok = load_tokenizer(tokenizer_name or name)
    return model, tok


def load_model(name: str, dtype: str = "float32", device_map: str | None = None):
    """A causal LM from a directory (pruned ones included) or a hub id."""
    from transformers import AutoModelForCausalLM

    from .archs import ARCHS
    from .io import PrunedModelError, inspect_dir, load_pruned, read_config

    path = Path(name).expanduser()
    if path.is_dir():
        config = read_config(path)
        if config.get("loraprune"):
            return load_pruned(path, dtype=_dtype(dtype), device_map=device_map)
        if config.get("model_type") in ARCHS and any(path.glob("*.safetensors")):
            inspect_dir(path)  # header-level consistency: from_pretrained only warns about missing weights
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise PrunedModelError(f"{path} holds no model weights (*.safetensors); pass a directory written by "
                                   "save_pretrained")
    elif path.is_file():
        raise CLIError(f"--model {name} is a file, not a model directory; pass a directory written by "
                       "save_pretrained, a .gguf file, or a hub id")
    elif looks_like_path(name):
        raise CLIError(f"--model {name} does not exist; pass a model directory, a .gguf file, or a hub id")
    try:
        extra = {"device_map": device_map} if device_map else {}
        return AutoModelForCausalLM.from_pretrained(name, dtype=_dtype(dtype), **extra)
    except Exception as err:  # hub ids: offline, unknown, gated ... all fixed by passing another model
        raise CLIError(
            f"could not load model {name!r} ({type(err).__name__}: {err}); pass a local directory written by "
            "save_pretrained, a .gguf file, or a hub id reachable from this machine"
        ) from err


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # no tokenizer files, unknown hub id ...: the fix is --tokenizer
        raise CLIError(f"no tokenizer found at {name!r} ({type(err).__name__}); pass --tokenizer DIR_OR_HUB_ID") from err


def eval_texts(data: str, split: str = "test", option: str = "--data"):
    """Texts for perplexity: local files/folders via :mod:`loraprune.corpora`, else named/hub sets."""
    from .corpora import load_eval_text, load_texts

    check_path_exists(option, data, "a .txt/.jsonl file, a folder of them, or wikitext2 / ptb / shakespeare")
    if os.path.exists(data):
        p = Path(data)
        if p.is_dir() and (p / f"{split}.txt").is_file():
            return [load_eval_text(str(p), split)]
        return load_texts(data)
    try:
        return [load_eval_text(data, split)]
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"{option} {data}: {err}") from err
