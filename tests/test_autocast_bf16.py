"""Mixed precision and devices on CPU: lora_linear under autocast computes what F.linear would
(bf16 inputs, fp32 LoRA maths, same gradients wherever backward is called); prune() under
autocast; a bf16 model pruned end to end and reloaded; the device helpers."""
import contextlib

import pytest
import torch
import torch.nn as nn

import loraprune
from kernel_oracles import assert_close_rel, lora_linear_ref
from loraprune.kernels import group_importance, lora_linear, merge_gather, triton_interpreting, use_backend
from tiny import logits, random_batches, tiny_model

BACKENDS = ["torch", "triton"] if triton_interpreting() else ["torch"]
BF16 = torch.bfloat16
IN, OUT, RANK, SCALE = 37, 53, 8, 2.0


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, IN, generator=g)
    W = torch.randn(OUT, IN, generator=g) / IN ** 0.5
    A = torch.randn(RANK, IN, generator=g) / IN ** 0.5
    B = torch.randn(OUT, RANK, generator=g)
    bias = torch.randn(OUT, generator=g)
    G = torch.randn(3, 5, OUT, generator=g)
    keep = torch.randperm(OUT, generator=g)[: OUT // 2]
    return x, W, A, B, bias, G, keep


def _autocast_run(backend, backward_inside: bool):
    x, W, A, B, bias, G, keep = _inputs()
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    with use_backend(backend):
        with torch.autocast("cpu", dtype=BF16):
            y = lora_linear(x, W, A, B, SCALE, bias=bias, keep=keep)
            loss = (y.float() * G).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
    return y, x.grad, A.grad, B.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_under_cpu_autocast_matches_the_autocast_reference(backend):
    x, W, A, B, bias, G, keep = _inputs()
    y, dx, dA, dB = _autocast_run(backend, backward_inside=False)
    assert y.dtype == BF16 and dx.dtype == torch.float32  # like F.linear under autocast; dx in x's dtype
    assert dA.dtype == dB.dtype == torch.float32
    # the reference: what autocast feeds F.linear (x, W, bias in bf16), LoRA factors in fp32, maths in fp64
    xb, Wb, bb = x.to(BF16), W.to(BF16), bias.to(BF16)
    A64 = A.double().requires_grad_(True)
    B64 = B.double().requires_grad_(True)
    ref = lora_linear_ref(xb, Wb, A64, B64, SCALE, bb, keep)
    assert_close_rel(y, ref.detach(), BF16, "y")
    # the gradient reaching lora_linear is the bf16 output's gradient: G rounded to bf16
    (ref * G.to(BF16).double()).sum().backward()
    # the LoRA gradients are fp32 maths on bf16 inputs: far tighter than bf16 rounding (autocast
    # reaching the twin's matmuls would cost ~1e-2)
    assert_close_rel(dA, A64.grad, torch.float32, "dA")
    assert_close_rel(dB, B64.grad, torch.float32, "dB")
    Gk = torch.zeros(OUT, dtype=torch.float64)
    Gk[keep] = 1.0
    Gk = G.to(BF16).double() * Gk  # skipped channels receive no gradient
    dx_ref = Gk @ Wb.double() + SCALE * (Gk @ B.double()) @ A.double()
    assert_close_rel(dx, dx_ref, BF16, "dx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_inside_the_autocast_region_gives_the_same_gradients(backend):
    outside = _autocast_run(backend, backward_inside=False)
    inside = _autocast_run(backend, backward_inside=True)
    for a, b in zip(outside, inside):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_fp32_ops_stay_fp32_inside_autocast():
    x, W, A, B, bias, G, keep = _inputs()
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    plain = group_importance(W, A, B, gA, gB, SCALE) + (merge_gather(W, A, B, SCALE, rows=keep),)
    with torch.autocast("cpu", dtype=BF16):
        amp = group_importance(W, A, B, gA, gB, SCALE) + (merge_gather(W, A, B, SCALE, rows=keep),)
    for a, b in zip(plain, amp):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_prune_under_cpu_autocast_completes():
    model = tiny_model()
    with torch.autocast("cpu", dtype=BF16):
        out = loraprune.prune(model, random_batches(n=2), ratio=0.5, steps=3, progress=False)
    assert out.config.loraprune["achieved_ratio"] > 0.3
    assert all(p.dtype == torch.float32 for p in out.parameters())  # autocast computes in bf16, stores nothing
    assert torch.isfinite(logits(out, random_batches(n=1)[0]["input_ids"])).all()


@pytest.mark.parametrize("criterion", ["fisher", "lora"])
def test_bf16_model_pruned_on_cpu_saves_and_reloads_with_equal_logits(tmp_path, criterion):
    from transformers import AutoModelForCausalLM

    # a bf16 model as users get one (from_pretrained(dtype=...), as the CLI loads it); model.to(bf16)
    # would also round the fp32 rotary inv_freq buffer, which no reload reproduces (transformers' doing)
    tiny_model().save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=BF16)
    out = loraprune.prune(model, random_batches(n=2), ratio=0.5, steps=3, criterion=criterion, progress=False)
    assert all(p.dtype == BF16 for p in out.parameters())
    assert out.config.loraprune["achieved_ratio"] > 0.3
    ids = random_batches(n=1)[0]["input_ids"]
    want = logits(out, ids)
    assert torch.isfinite(want).all()
    loraprune.save_pruned(out, tmp_path / "m")
    back = loraprune.load_pruned(tmp_path / "m")
    assert all(p.dtype == BF16 for p in back.parameters())
    torch.testing.assert_close(logits(back, ids), want, rtol=0, atol=0)


# ---- devices -------------------------------------------------------------------------------
def test_batches_go_to_the_input_embeddings_device():
    from loraprune.run.prune import input_device

    class Sharded(nn.Module):  # first parameter elsewhere, as a device_map model's may be
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2, device="meta")
            self.embed = nn.Embedding(5, 2)

        def get_input_embeddings(self):
            return self.embed

    model = Sharded()
    assert next(model.parameters()).device.type == "meta"
    assert input_device(model) == torch.device("cpu")


def test_triton_launchers_enter_their_tensors_gpu(monkeypatch):
    from loraprune.kernels.triton_common import on_tensor_device

    entered = []

    @contextlib.contextmanager
    def record(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", record)

    @on_tensor_device
    def launcher(M, K, p, seed, device):
        return "launched"

    assert launcher(4, 4, 0.1, 0, torch.device("cuda", 1)) == "launched"
    assert launcher(4, 4, 0.1, 0, device="cuda:1") == "launched"
    assert launcher(4, 4, 0.1, 0, torch.device("cpu")) == "launched"  # no guard on CPU
    assert entered == [torch.device("cuda", 1)] * 2
