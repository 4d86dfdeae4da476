"""Loading a model to prune or evaluate: a saved directory (pruned ones included), a ``.gguf`` file, or a hub id.

The one loader behind the command line, the demo and :func:`loraprune.eval.lm_eval_tasks`.
It raises :class:`~loraprune.errors.ModelLoadError` in library terms (``model='x' does not
exist; ...``); the command line renders the same error under its flag (``--model x does not
exist; ...``), so a Python caller is never told about a flag it did not pass.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError, PrunedModelError
from ..structure.archs import ARCHS
from ..utils.paths import looks_like_path
from .gguf_read import is_gguf_file, load_gguf
from .load import inspect_dir, load_pruned, read_config


def torch_dtype(name: str):
    """``"float32"`` -> ``torch.float32`` (names as the command line spells them)."""
    import torch

    return getattr(torch, name)


def load_model_and_tokenizer(name: str, tokenizer_name: str | None = None, dtype: str = "float32",
                             need_tokenizer: bool = True, device: str = "cpu"):
    """``(model, tokenizer)``: the model from a saved directory, a ``.gguf`` file or a hub id.

    The model is loaded in ``dtype`` and put on ``device`` ("auto": ``device_map="auto"``).
    The tokenizer comes from ``tokenizer_name`` if given, else from the same
    place as the model (a GGUF file carries its own).
    """
    device_map = "auto" if device == "auto" else None
    if is_gguf_file(name) and Path(name).expanduser().is_file():
        if device_map:
            raise ModelLoadError("device", "auto", "does not apply to .gguf models (they load whole); pass cuda or cpu")
        model, tok = load_gguf(Path(name).expanduser(), dtype=torch_dtype(dtype),
                               tokenizer=need_tokenizer and not tokenizer_name)
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

    path = Path(name).expanduser()
    if path.is_dir():
        config = read_config(path)
        if config.get("loraprune"):
            return load_pruned(path, dtype=torch_dtype(dtype), device_map=device_map)
        if config.get("model_type") in ARCHS and any(path.glob("*.safetensors")):
            inspect_dir(path)  # header-level consistency: from_pretrained only warns about missing weights
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise PrunedModelError(f"{path} holds no model weights (*.safetensors); pass a directory written by "
                                   "save_pretrained")
    elif path.is_file():
        raise ModelLoadError("model", name, "is a file, not a model directory; pass a directory written by "
                             "save_pretrained, a .gguf file, or a hub id")
    elif looks_like_path(name):
        raise ModelLoadError("model", name, "does not exist; pass a model directory, a .gguf file, or a hub id")
    try:
        extra = {"device_map": device_map} if device_map else {}
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype(dtype), **extra)
    except Exception as err:  # hub ids: offline, unknown, gated ... all fixed by passing another model
        raise ModelLoadError("model", name, f"could not be loaded ({type(err).__name__}: {err}); pass a local "
                             "directory written by save_pretrained, a .gguf file, or a hub id reachable from this "
                             "machine") from err


def load_tokenizer(name: str):
    """The tokenizer saved in a directory, or a hub id's."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # no tokenizer files, unknown hub id ...: the fix is another tokenizer
        raise ModelLoadError("tokenizer", name, f"holds no tokenizer ({type(err).__name__}); pass the directory or "
                             "hub id of the model's tokenizer") from err
