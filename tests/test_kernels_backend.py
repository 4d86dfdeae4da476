"""Backend selection: context manager, setter, env default, clear errors."""
import os
import subprocess
import sys

import pytest
import torch

from loraprune.kernels import get_backend, lora_linear, set_backend, triton_interpreting, use_backend


def test_use_backend_restores_previous():
    before = get_backend()
    with use_backend("torch"):
        assert get_backend() == "torch"
        with use_backend("triton"):
            assert get_backend() == "triton"
        assert get_backend() == "torch"
    assert get_backend() == before


def test_set_backend_and_validation():
    before = get_backend()
    try:
        set_backend("TORCH")
        assert get_backend() == "torch"
        with pytest.raises(ValueError, match="unknown kernel backend"):
            set_backend("cuda")
    finally:
        set_backend(before)


def test_tests_interpret_only_without_gpu():
    if torch.cuda.is_available():
        assert not triton_interpreting(), "with a GPU the tests must run the native kernels"
    else:
        assert triton_interpreting(), "conftest must set TRITON_INTERPRET=1 before triton is imported"


def test_old_triton_or_old_gpu_not_picked(monkeypatch):
    """'auto' never picks Triton where it cannot run; 'triton' says why."""
    import triton

    from loraprune.kernels import backend

    assert backend.triton_unusable_reason() is None  # the installed triton is supported
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    reason = backend.triton_unusable_reason()
    assert reason and "3.2.0" in reason and "3.4" in reason
    assert not backend.triton_available()
    with use_backend("triton"), pytest.raises(RuntimeError, match="older than 3.4"):
        lora_linear(torch.randn(2, 8), torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 2), 1.0)
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    reason = backend.triton_unusable_reason(torch.device("cuda", 0))
    assert reason and "7.5" in reason


def test_interpret_flag_without_knobs(monkeypatch):
    """Triton < 3.4 has no triton.knobs: the flag falls back to the environment variable."""
    import triton

    from loraprune.kernels import triton_common

    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.setitem(sys.modules, "triton.knobs", None)  # makes `from triton import knobs` fail
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_common._interpret_flag() is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_common._interpret_flag() is False


def _run(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORAPRUNE_KERNELS")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_env_default_and_triton_on_cpu_needs_interpreter():
    code = (
        "import torch\n"
        "from loraprune.kernels import get_backend, lora_linear, use_backend\n"
        "print(get_backend())\n"
        "x, W, A, B = torch.randn(2, 16), torch.randn(4, 16), torch.randn(2, 16), torch.randn(4, 2)\n"
        "print(lora_linear(x, W, A, B, 1.0).shape)\n"  # torch env var -> twin works
        "with use_backend('triton'):\n"
        "    try:\n"
        "        lora_linear(x, W, A, B, 1.0)\n"
        "    except RuntimeError as e:\n"
        "        print('ERR', e)\n"
    )
    res = _run(code, LORAPRUNE_KERNELS="torch")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "torch"
    assert lines[1] == "torch.Size([2, 4])"
    assert lines[2].startswith("ERR") and "TRITON_INTERPRET=1" in lines[2]


def test_auto_uses_twin_on_cpu(monkeypatch):
    import loraprune.kernels.ops as ops

    called = []
    real = ops.torch_ops.lora_linear_forward_torch
    monkeypatch.setattr(ops.torch_ops, "lora_linear_forward_torch", lambda *a: called.append(1) or real(*a))
    with use_backend("auto"):
        lora_linear(torch.randn(2, 8), torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 2), 1.0)
    assert called == [1]
