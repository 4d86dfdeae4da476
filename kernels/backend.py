"""Backend selection: Triton kernels or their pure-torch twins.

The choice is global (``set_backend`` / ``get_backend``) or scoped
(``with use_backend("torch"): ...``).  Its initial value comes from the
environment variable ``LORAPRUNE_KERNELS`` (default ``"auto"``):

* ``"auto"``   - CUDA tensors run the Triton kernels, CPU tensors the torch twins.
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


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is an install requirement
        return False
    return True


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
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    # choice == "triton"
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' selected but triton is not importable")
    if not on_cuda and not triton_interpreting():
        raise RuntimeError(
            "kernel backend 'triton' on CPU tensors needs the Triton interpreter: set the "
            "environment variable TRITON_INTERPRET=1 before importing loraprune.kernels "
            "(it is read when the kernels are decorated), or use backend 'torch'/'auto'."
        )
    return "triton"
