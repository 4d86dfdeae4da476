"""The LoRA layer that pruning trains and scores.

A frozen ``nn.Linear`` plus low-rank factors ``lora_A`` (r x in) and
``lora_B`` (out x r) with scale ``alpha / r``, laid out as in PEFT so adapters
move in and out of PEFT unchanged. The forward pass goes through
:func:`loraprune.kernels.lora_linear`, which skips pruned output channels
(Triton on CUDA, a PyTorch twin on CPU). Only the ``grad`` baseline criterion,
which needs the gradient of the frozen weight, takes a plain PyTorch path.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        lora_A: torch.Tensor | None = None,
        lora_B: torch.Tensor | None = None,
        scaling: float | None = None,
    ):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got r={r}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        out_f, in_f = base.weight.shape
        dev = base.weight.device
        # LoRA factors live in fp32 whatever the base dtype: they are small and
        # their optimiser needs the precision; kernels compute in fp32 anyway.
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=dev, dtype=torch.float32))
        if lora_A is None:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        else:
            self.lora_A.data.copy_(lora_A)
        if lora_B is not None:
            self.lora_B.data.copy_(lora_B)
        self.r = r
        self.scaling = float(alpha) / r if scaling is None else float(scaling)
        self.dropout = float(dropout)
        self.keep: torch.Tensor | None = None  # kept output channels, None = all (masked training)
        # progressive compaction (loraprune.surgery.progressive): the student computes only the first
        # live_out rows / live_in columns (None = all); *_order record the in-place permutation
        self.live_out: int | None = None
        self.live_in: int | None = None
        self.out_order: torch.Tensor | None = None
        self.in_order: torch.Tensor | None = None
        self.weight_grad = False  # True only for the "grad" baseline criterion
        self.bypass = False  # True: compute the frozen dense layer alone (the distillation teacher)
        self.teacher_weight: torch.Tensor | None = None  # the dense weight, once a repair changed base (repair_run)

    # nn.Linear look-alike attributes, so shape-reading code treats both alike
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_keep(self, keep: torch.Tensor | None) -> None:
        """Compute only these output channels; the rest of the output is exactly zero."""
        if keep is not None:
            keep = keep.to(device=self.base.weight.device, dtype=torch.long)
            if keep.numel() == self.out_features:
                keep = None
        self.keep = keep

    def enable_weight_grad(self, on: bool) -> None:
        """Let the frozen weight receive a gradient (``grad`` criterion only)."""
        self.weight_grad = on
        self.base.weight.requires_grad_(on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            W = self.base.weight if self.teacher_weight is None else self.teacher_weight
            return F.linear(x, W, self.base.bias)
        p = self.dropout if self.training else 0.0
        W, bias, A, B = self.base.weight, self.base.bias, self.lora_A, self.lora_B
        if self.live_out is not None:  # the kept prefix: views, no copy
            W, B = W[: self.live_out], B[: self.live_out]
            bias = None if bias is None else bias[: self.live_out]
        if self.live_in is not None:
            W, A = W[:, : self.live_in], A[:, : self.live_in]
        if not self.weight_grad:
            return kernels.lora_linear(x, W, A, B, self.scaling, bias=bias, keep=self.keep, dropout=p)
        y = F.linear(x, W, bias)
        lora_in = F.dropout(x, p) if p else x
        y = y + self.scaling * F.linear(F.linear(lora_in.to(A.dtype), A), B).to(y.dtype)
        if self.keep is not None:
            mask = torch.zeros(self.out_features, dtype=y.dtype, device=y.device)
            mask[self.keep] = 1
            y = y * mask
        return y

    def extra_repr(self) -> str:
        kept = self.out_features if self.keep is None else self.keep.numel()
        if self.live_out is not None:
            kept = self.live_out
        live_in = self.in_features if self.live_in is None else self.live_in
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
                f"kept_out={kept}, kept_in={live_in}")


def _peft_lora_parts(module: nn.Module):
    """(base, A, B, scaling, dropout_p, r) from a PEFT LoRA Linear, or None."""
    if not is_peft_lora_layer(module):
        return None
    adapters = list(getattr(module, "active_adapters", None) or module.lora_A.keys())
    if len(adapters) != 1:
        raise ValueError(
            f"expected exactly one active LoRA adapter on {type(module).__name__}, found {adapters}; "
            "merge or delete the others before pruning"
        )
    name = adapters[0]
    if getattr(module, "use_dora", {}).get(name, False):
        raise ValueError("DoRA adapters are not supported; merge them (merge_and_unload) before pruning")
    lora_bias = getattr(module, "lora_bias", {})
    if (isinstance(lora_bias, dict) and lora_bias.get(name)) or getattr(module.lora_B[name], "bias", None) is not None:
        raise ValueError("LoRA adapters with a bias (lora_bias=True) are not supported; merge them first "
                         "(model = model.merge_and_unload()) and prune the merged model")
    A = module.lora_A[name].weight.detach()
    B = module.lora_B[name].weight.detach()
    drop = module.lora_dropout[name]
    p = float(getattr(drop, "p", 0.0))
    base = module.base_layer
    if not isinstance(base, nn.Linear):
        raise ValueError(f"expected the PEFT LoRA layer to wrap nn.Linear, found {type(base).__name__}")
    return base, A, B, float(module.scaling[name]), p, A.shape[0]


def wrap_linear(module: nn.Module, r: int, alpha: float, dropout: float) -> LoRALinear:
    """A :class:`LoRALinear` around ``module``: a plain ``nn.Linear`` gets fresh
    factors; a PEFT LoRA layer hands over its trained factors and scale."""
    if isinstance(module, LoRALinear):
        return module
    parts = _peft_lora_parts(module)
    if parts is not None:
        base, A, B, scaling, p, rank = parts
        return LoRALinear(base, r=rank, dropout=p, lora_A=A, lora_B=B, scaling=scaling)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"expected nn.Linear or a PEFT LoRA layer, found {type(module).__name__}")
    return LoRALinear(module, r=r, alpha=alpha, dropout=dropout)


def is_peft_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs; anything else unchanged.

    Pruning changes shapes, so it works on the module itself: the compiled
    wrapper would recompile (or be refused by :func:`loraprune.export.classes.attach_export`)."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return model


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (adapters stay in place), and inside a
    ``torch.compile`` wrapper (:func:`unwrap_compiled`) around either."""
    model = unwrap_compiled(model)
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model
