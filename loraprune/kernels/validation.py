"""Argument checks shared by the public ops: fail early, name the expected shapes."""
from __future__ import annotations

import weakref

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


def check_indices(name: str, idx: torch.Tensor, size: int, unique: bool, sync: bool) -> None:
    """Every index in [0, size) and, with ``unique``, no index twice.

    ``sync=True`` (CPU tensors) raises IndexError / ValueError with the values.
    ``sync=False`` (GPU tensors) never waits for the device: it queues
    ``torch._assert_async`` checks, which fail the stream (a device-side assert,
    reported at the next synchronisation) instead of letting the kernels read or
    write out of bounds or count a gradient twice.
    """
    if idx.numel() == 0:
        return
    if sync:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= size:
            raise IndexError(f"{name} indices must lie in [0, {size}), got range [{lo}, {hi}]")
        if unique and torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{name} holds duplicate indices; each index may appear once")
        return
    lo_hi = torch.aminmax(idx)
    torch._assert_async((lo_hi.min >= 0) & (lo_hi.max < size),
                        f"{name} indices must lie in [0, {size})")
    if unique and idx.numel() > 1:
        ordered = torch.sort(idx).values
        torch._assert_async(torch.all(ordered[1:] != ordered[:-1]), f"{name} holds duplicate indices")


# Validated device index tensors: id -> (weakref, version, size, unique).  The same
# ``keep`` tensor is passed on every step; its checks are queued once, not per call.
_VALIDATED: dict = {}


def _already_validated(idx: torch.Tensor, size: int, unique: bool) -> bool:
    hit = _VALIDATED.get(id(idx))
    if hit is None or hit[0]() is not idx:
        return False
    _, version, checked_size, checked_unique = hit
    return version == idx._version and checked_size == size and (checked_unique or not unique)


def _remember_validated(idx: torch.Tensor, size: int, unique: bool) -> None:
    key = id(idx)
    _VALIDATED[key] = (weakref.ref(idx, lambda _ref, key=key: _VALIDATED.pop(key, None)),
                       idx._version, size, unique)


def index_vector(name: str, idx, size: int, device, unique: bool = False) -> torch.Tensor | None:
    """Validate an index vector into a dimension of ``size``; return int64 on ``device``.

    ``unique=True`` also refuses repeated indices (``keep``: a repeated channel
    would have its gradient counted twice).  On GPU the checks are asynchronous
    (no host sync) and run once per tensor until it is modified in place.
    """
    if idx is None:
        return None
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(idx, dtype=torch.long)
    if idx.dim() != 1:
        raise ValueError(f"{name} must be a 1-D index tensor, got shape {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(f"{name} must hold integer indices, got {idx.dtype}")
    idx = idx.to(device=device, dtype=torch.long).contiguous()
    if idx.device.type == "cpu":
        check_indices(name, idx, size, unique, sync=True)
    elif not _already_validated(idx, size, unique):
        check_indices(name, idx, size, unique, sync=False)
        _remember_validated(idx, size, unique)
    return idx
