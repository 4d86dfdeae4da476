"""The LoRA-guided criterion against a brute-force reference that forms G."""
from pathlib import Path

import pytest
import torch

from loraprune import LoRAPruner
from loraprune.method.criterion import score_module
from loraprune.model.lora import LoRALinear
from tiny import random_batches, tiny_model

ROOT = Path(__file__).resolve().parents[1]  # `python -m bench.…` runs from the repository root


def _layer_with_grads(out_f=37, in_f=53, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f)
    base.weight.data = torch.randn(out_f, in_f, generator=g)
    m = LoRALinear(base, r=r, alpha=8)
    m.lora_A.data = torch.randn(r, in_f, generator=g)
    m.lora_B.data = torch.randn(out_f, r, generator=g)
    x = torch.randn(5, in_f, generator=g)
    (m(x) ** 2).sum().backward()
    return m


@pytest.mark.parametrize("square", [False, True])
def test_lora_criterion_matches_explicit_G(square):
    m = _layer_with_grads()
    A, B, gA, gB, s = m.lora_A.data, m.lora_B.data, m.lora_A.grad, m.lora_B.grad, m.scaling
    G = gB @ A + B @ gA - gB @ gA  # paper Eq. 10, formed explicitly
    S = (G / s * (m.weight + s * B @ A)).abs()  # G estimates s * dL/dW: per unit of LoRA scale
    S = S**2 if square else S
    rows, cols = score_module(m, "lora", square=square)
    torch.testing.assert_close(rows, S.sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cols, S.sum(0), rtol=1e-5, atol=1e-4)


def test_grad_and_magnitude_criteria():
    m = _layer_with_grads()
    m.enable_weight_grad(True)
    m.zero_grad()
    x = torch.randn(5, m.in_features)
    (m(x) ** 2).sum().backward()
    merged = m.weight + m.scaling * m.lora_B @ m.lora_A
    S = (m.weight.grad * merged).abs()
    rows, cols = score_module(m, "grad")
    torch.testing.assert_close(rows, S.sum(1).detach(), rtol=1e-5, atol=1e-4)
    rows, cols = score_module(m, "magnitude")
    torch.testing.assert_close(cols, merged.abs().sum(0).detach(), rtol=1e-5, atol=1e-4)


def test_engine_group_scores_equal_brute_force_sums():
    """One step of the engine vs forming G for every projection and summing by hand."""
    model = tiny_model(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    pruner = LoRAPruner(model, ratio=0.5, criterion="lora", seed=0, ema=0.0)  # the EMA holds this step alone
    for mods in pruner.modules:  # non-zero B so that every term of G matters
        for mod in mods.values():
            torch.nn.init.normal_(mod.lora_B, std=0.1)
    model.train()
    batch = random_batches(n=1)[0]
    model(**batch, labels=batch["input_ids"]).loss.backward()
    pruner.score()

    def elem(mod):
        A, B, gA, gB = mod.lora_A.data, mod.lora_B.data, mod.lora_A.grad, mod.lora_B.grad
        return ((gB @ A + B @ gA - gB @ gA) / mod.scaling * (mod.weight + mod.scaling * B @ A)).abs()

    for lg, mods in zip(pruner.layers, pruner.modules):
        want_attn = torch.zeros(lg.n_kv)
        for g in range(lg.n_kv):
            q = slice(g * 16, (g + 1) * 16)
            kv = slice(g * 8, (g + 1) * 8)
            want_attn[g] = (elem(mods["q_proj"])[q].sum() + elem(mods["k_proj"])[kv].sum()
                            + elem(mods["v_proj"])[kv].sum() + elem(mods["o_proj"])[:, q].sum())
        want_mlp = elem(mods["gate_proj"]).sum(1) + elem(mods["up_proj"]).sum(1) + elem(mods["down_proj"]).sum(0)
        torch.testing.assert_close(pruner.state.attn_score[lg.layer], want_attn, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pruner.state.mlp_score[lg.layer], want_mlp, rtol=1e-4, atol=1e-6)


def test_ema_smoothing_closed_form():
    model = tiny_model()
    pruner = LoRAPruner(model, ratio=0.5, ema=0.9)
    n = pruner.layers[0].n_kv
    a1 = [torch.ones(lg.n_kv) for lg in pruner.layers]
    m1 = [torch.ones(lg.n_channels) for lg in pruner.layers]
    pruner.state.observe(a1, m1)
    pruner.state.observe([x * 11 for x in a1], [x * 11 for x in m1])
    # the EMA starts at zero (step 1 weighs no more than any other): 0.9 * (0.1 * 1) + 0.1 * 11 = 1.19
    assert torch.allclose(pruner.state.attn_score[0], torch.full((n,), 1.19))


@pytest.mark.slow
def test_lora_criterion_allocates_no_out_by_in_temporary():
    """Through the public path (score_module on a LoRALinear), on a 4096x4096
    fp32 layer (64 MiB): an out x in temporary would show as >= 100% of W."""
    import json
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the RSS high-water mark")

    def probe(impl):
        res = subprocess.run([sys.executable, "-m", "bench.kernel_memory_probe", "--impl", impl,
                              "--out", "4096", "--in", "4096", "--rank", "8"],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    ours, eager = probe("criterion"), probe("eager")
    assert ours["ratio_to_weight"] <= 0.05, ours
    assert eager["ratio_to_weight"] >= 1.0, eager  # the probe does see full-size temporaries
    # the public path reports scores per unit of LoRA scale (the probe's default scaling is 2)
    assert ours["row_sum_total"] * 2.0 == pytest.approx(eager["row_sum_total"], rel=1e-4)


def test_lora_criterion_without_any_gradient_refuses_to_score_blind():
    pruner = LoRAPruner(tiny_model("llama"), ratio=0.5, criterion="lora")
    with pytest.raises(RuntimeError, match="no LoRA gradient"):
        pruner.score()
    batch = random_batches(n=1)[0]
    pruner.model(**batch, labels=batch["input_ids"]).loss.backward()
    assert pruner.score()  # after backward it scores
