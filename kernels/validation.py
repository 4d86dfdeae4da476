"""Argument checks shared by the public ops: fail early, name the expected shapes."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def check_lora_factors(weight, lora_A, lora_B, prefix: str = "lora_") -> int:
    """Check (out, in) weight against A (r, in), B (out, r); return r."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    check_float(f"{prefix}A", lora_A)
    check_float(f"{prefix}B", lora_B)
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"{prefix}A must have shape (r, in) = (r, {in_f}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    check_shape(f"{prefix}B", lora_B, (out_f, r), "(out, r)")
    return r


def index_vector(name: str, idx, size: int, device) -> torch.Tensor | None:
    """Validate an index vector into a dimension of ``size``; return int64 on ``device``."""
    if idx is None:
        return None
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(idx, dtype=torch.long)
    if idx.dim() != 1:
        raise ValueError(f"{name} must be a 1-D index tensor, got shape {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(f"{name} must hold integer indices, got {idx.dtype}")
    idx = idx.to(device=device, dtype=torch.long).contiguous()
    # range check costs a device sync on GPU, so it is done on CPU tensors only
    if idx.numel() and idx.device.type == "cpu":
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= size:
            raise IndexError(f"{name} indices must lie in [0, {size}), got range [{lo}, {hi}]")
    return idx
