"""Triton kernels of loraprune (installed as ``loraprune.kernels``).

Public API::

    y = lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, keep=None, dropout=0.0)
    row_sums, col_sums = group_importance(weight, lora_A, lora_B, grad_A, grad_B, scaling, square=False)
    Wm = merge_gather(weight, lora_A, lora_B, scaling, rows=None, cols=None)
    with use_backend("torch" | "triton" | "auto"): ...
    set_backend(name); get_backend()

Each op has a pure-torch twin (``torch_ops``, ``*_torch``) used on CPU under the
"auto" backend and as a reference in tests.  See README.md in this folder.
"""
from . import torch_ops
from .backend import BACKENDS, get_backend, set_backend, triton_interpreting, use_backend
from .ops import (
    LoRALinearFunction,
    group_importance,
    lora_linear,
    lora_linear_torch,
    lora_linear_triton,
    merge_gather,
)
from .torch_ops import group_importance_torch, merge_gather_torch

__all__ = [
    "BACKENDS",
    "LoRALinearFunction",
    "get_backend",
    "group_importance",
    "group_importance_torch",
    "lora_linear",
    "lora_linear_torch",
    "lora_linear_triton",
    "merge_gather",
    "merge_gather_torch",
    "set_backend",
    "torch_ops",
    "triton_interpreting",
    "use_backend",
]
