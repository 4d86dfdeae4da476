"""Backend selection: Triton kernels or their pure-torch twins.

The choice is global (``set_backend`` / ``get_backend``) or scoped
(``with use_backend("torch"): ...``).  Its initial value comes from the
environment variable ``LORAPRUNE_KERNELS`` (default ``"auto"``):

* ``"auto"``   - CUDA tensors run the Triton kernels where they can run (triton
  importable and >= ``MIN_TRITON_VERSION``, GPU of compute capability >= 8.0);
  everything else, CPU tensors included, runs the torch twins.
* ``"triton"`` - always Triton.  On CPU tensors this only works under the Triton
  interpreter, i.e. with ``TRITON_INTERPRET=1`` set *before* this package is
  imported (``@triton.jit`` reads it when the kernels are decorated).
* ``"torch"``  - always the torch twins.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LORAPRUNE_KERNELS"

_state = threading.local()


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    return name.lower()


_DEFAULT_BACKEND = _validate(os.environ.get(ENV_VAR, "auto") or "auto")


def get_backend() -> str:
    """The backend in force in this thread ("auto", "triton" or "torch")."""
    return getattr(_state, "backend", _DEFAULT_BACKEND)


def set_backend(name: str) -> None:
    """Select the backend for this thread until changed again."""
    _state.backend = _validate(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager selecting a backend for the enclosed block."""
    previous = get_backend()
    set_backend(name)
    try:
        yield name
    finally:
        _state.backend = previous


#: the tile tables and bf16 tensor-core dots need Ampere or newer.
MIN_CAPABILITY = (8, 0)


def triton_available() -> bool:
    """triton importable and recent enough for these kernels."""
    return triton_unusable_reason() is None


def triton_unusable_reason(device: torch.device | None = None) -> str | None:
    """Why the Triton kernels cannot run (on ``device`` when a CUDA device is given); None if they can."""
    try:
        from .triton_common import MIN_TRITON_VERSION, triton_version
    except Exception as exc:  # triton missing or broken
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if triton_version() < MIN_TRITON_VERSION:
        import triton

        want = ".".join(map(str, MIN_TRITON_VERSION))
        return f"triton {triton.__version__} is older than {want}, the oldest these kernels support"
    if device is not None and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < MIN_CAPABILITY:
            return (f"GPU compute capability {cap[0]}.{cap[1]} is below "
                    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (the kernels' tiles and bf16 dots need Ampere+)")
    return None


def triton_interpreting() -> bool:
    """True when our kernels were decorated under the Triton interpreter."""
    if not triton_available():
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from .triton_merge_gather import merge_gather_kernel

    return isinstance(merge_gather_kernel, InterpretedFunction)


def resolve_backend(*tensors: torch.Tensor | None) -> str:
    """Decide "triton" or "torch" for a call on ``tensors``; raise if impossible."""
    choice = get_backend()
    cuda_dev = next((t.device for t in tensors if t is not None and t.is_cuda), None)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if cuda_dev is not None and triton_unusable_reason(cuda_dev) is None else "torch"
    # choice == "triton"
    reason = triton_unusable_reason(cuda_dev)
    if reason is not None:
        raise RuntimeError(f"kernel backend 'triton' selected but {reason}; use backend 'torch' or 'auto'")
    on_cuda = cuda_dev is not None
    if not on_cuda and not triton_interpreting():
        raise RuntimeError(
            "kernel backend 'triton' on CPU tensors needs the Triton interpreter: set the "
            "environment variable TRITON_INTERPRET=1 before importing loraprune.kernels "
            "(it is read when the kernels are decorated), or use backend 'torch'/'auto'."
        )
    return "triton"
