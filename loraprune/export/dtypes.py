"""The ``dtype`` a model is loaded in (:func:`loraprune.load_pruned`, :func:`loraprune.load_gguf`): checked once.

A loaded model must be floating point: its weights are dequantized or stored as
floats, and an integer or boolean ``dtype`` would make ``from_pretrained`` cast
(or fail to cast) every weight, which reads as a corrupted file. A string names
a torch dtype (``"bfloat16"``); llama.cpp's and others' short names (``"bf16"``,
``"f16"``) are answered with the torch dtype they mean.
"""
from __future__ import annotations

import torch

from ..errors import LoRAPruneError

ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16", "fp32": "float32",
           "f32": "float32", "float": "float32", "fp64": "float64", "f64": "float64", "double": "float64"}
EXAMPLES = "torch.float32, torch.bfloat16 or torch.float16"


def check_load_dtype(dtype, allow_auto: bool = True, error: type = LoRAPruneError):
    """``dtype`` as a ``torch.dtype`` (or ``None`` / ``"auto"`` where allowed); anything else raises ``error``."""
    if dtype is None or (allow_auto and isinstance(dtype, str) and dtype == "auto"):
        return dtype
    resolved = dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None) if not dtype.startswith("_") else None
    if not isinstance(resolved, torch.dtype):
        hint = f" (did you mean torch.{ALIASES[dtype]}?)" if isinstance(dtype, str) and dtype in ALIASES else ""
        auto = " or 'auto'" if allow_auto else ""
        raise error(f"dtype={dtype!r} is not a torch dtype{hint}; pass e.g. {EXAMPLES}, 'bfloat16'{auto}")
    if not resolved.is_floating_point:
        raise error(f"dtype={dtype!r} is not a floating-point dtype: loraprune loads model weights as floats; pass "
                    f"{EXAMPLES} (quantize the model after loading if you need integer weights)")
    return resolved
