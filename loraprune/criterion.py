"""Importance criteria: per-row and per-column score sums of one projection.

Every criterion returns ``(row_sums, col_sums)`` in fp32 for a
:class:`~loraprune.lora.LoRALinear`; :mod:`loraprune.state` folds them into
head / channel groups. Element scores, with ``W' = W + s·B·A``:

* ``lora`` (default, paper Eq. 10): ``|G ⊙ W'|`` with the LoRA-guided gradient
  estimate ``G = ∇B·A + B·∇A − ∇B·∇A``. Needs only the LoRA gradients: the
  gradient of W is never formed, nor any out×in temporary (kernel
  :func:`loraprune.kernels.group_importance`).
* ``grad`` (LLM-Pruner Element-1, the full-gradient Taylor baseline):
  ``|∇W ⊙ W'|``. Needs ∇W, i.e. a weight-sized gradient per projection.
* ``magnitude``: ``|W'|``.
* ``random``: seeded random group scores (drawn once, see ``state``).

``square=True`` squares the element score (the paper's formula); the default
takes the absolute value, as the official LoRAPrune code does.
"""
from __future__ import annotations

import torch

from . import kernels
from .lora import LoRALinear

CRITERIA = ("lora", "grad", "magnitude", "random")

# Rows per block when a criterion walks a weight on the PyTorch side: the
# temporaries are block x in, never out x in.
_BLOCK_ROWS = 256


def check_criterion(name: str) -> str:
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return name


def needs_weight_grad(name: str) -> bool:
    return name == "grad"


def uses_gradients(name: str) -> bool:
    return name in ("lora", "grad")


def _blockwise_sums(module: LoRALinear, element_score) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of ``element_score(rows, W'_block)`` over row blocks."""
    W = module.base.weight
    A = module.lora_A.detach()
    B = module.lora_B.detach()
    out_f, in_f = W.shape
    row_sums = torch.empty(out_f, dtype=torch.float32, device=W.device)
    col_sums = torch.zeros(in_f, dtype=torch.float32, device=W.device)
    for start in range(0, out_f, _BLOCK_ROWS):
        rows = slice(start, min(start + _BLOCK_ROWS, out_f))
        merged = torch.addmm(W[rows].float(), B[rows], A, alpha=module.scaling)
        block = element_score(rows, merged)
        row_sums[rows] = block.sum(1)
        col_sums += block.sum(0)
    return row_sums, col_sums


def score_module(module: LoRALinear, criterion: str, square: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_sums, col_sums)`` of the element scores of one projection."""
    power = 2 if square else 1
    if criterion == "lora":
        A, B = module.lora_A, module.lora_B
        gA = A.grad if A.grad is not None else torch.zeros_like(A)
        gB = B.grad if B.grad is not None else torch.zeros_like(B)
        return kernels.group_importance(
            module.base.weight, A.detach(), B.detach(), gA, gB, module.scaling, square=square
        )
    if criterion == "grad":
        gW = module.base.weight.grad
        if gW is None:
            raise RuntimeError(
                "criterion='grad' needs the weight gradient, but it is missing: call "
                "enable_weight_grad(True) on the LoRA layers before backward"
            )
        return _blockwise_sums(module, lambda rows, m: (gW[rows].float() * m).abs().pow(power))
    if criterion == "magnitude":
        return _blockwise_sums(module, lambda rows, m: m.abs().pow(power))
    raise ValueError(f"criterion {criterion!r} has no per-weight score")
