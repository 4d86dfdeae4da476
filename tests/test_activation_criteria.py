"""The FLAP / Wanda-sp criteria of the training loop against the one-shot path and a hand computation."""
import copy

import pytest
import torch

from loraprune import LoRAPruner
from loraprune.run.oneshot import collect_input_stats, group_scores
from loraprune.structure.groups import build_layer_groups
from tiny import random_batches, tiny_model


def _model():
    return tiny_model(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4)


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_fresh_lora_scores_equal_oneshot_group_scores(method):
    """B = 0: W' = W, so the scores of the training forwards are the one-shot scores of the dense model."""
    model = _model()
    dense = copy.deepcopy(model)
    batches = random_batches(n=3, batch=2, seq=12)
    ref_attn, ref_mlp = group_scores(dense, build_layer_groups(dense), collect_input_stats(dense, batches), method)

    pruner = LoRAPruner(model, ratio=0.5, criterion=method, distill=0.5)
    model.train()
    for b in batches:
        with torch.no_grad(), pruner.dense_teacher():  # a teacher forward: not counted
            model(input_ids=b["input_ids"][:, :5])
        model(input_ids=b["input_ids"])  # training forward (gradients enabled)
    with torch.no_grad():  # an evaluation forward: not counted
        model(input_ids=batches[0]["input_ids"][:, :7])
    attn, mlp = pruner.importance.scores(pruner)
    for got, want in zip(attn + mlp, ref_attn + ref_mlp):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert pruner.importance.scores(pruner) is None  # read once per step; nothing new since


def test_scores_use_merged_lora_weight():
    """Non-zero B: column scores use W + s·B·A and the inputs the LoRA model actually sees (hand computation)."""
    model = _model()
    pruner = LoRAPruner(model, ratio=0.5, criterion="wanda-sp", lora_dropout=0.0)
    g = torch.Generator().manual_seed(1)
    for mods in pruner.modules:
        for mod in mods.values():
            mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=g) * 0.3
    o = pruner.modules[1]["o_proj"]
    seen = []
    hook = o.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    model.train()
    for b in random_batches(n=2, batch=2, seq=10, seed=3):
        model(input_ids=b["input_ids"])
    hook.remove()
    attn, _ = pruner.importance.scores(pruner)
    x = torch.cat(seen)
    merged = (o.base.weight + o.scaling * o.lora_B @ o.lora_A).double()
    col = x.norm(dim=0) * merged.abs().sum(0)
    lg = pruner.layers[1]
    want = col.view(lg.n_kv, lg.q_per_kv * lg.head_dim).sum(1).float()
    torch.testing.assert_close(attn[1], want, rtol=1e-5, atol=1e-5)
    # and it is not the score of the frozen weight alone
    frozen = (x.norm(dim=0) * o.base.weight.double().abs().sum(0)).view(lg.n_kv, -1).sum(1).float()
    assert not torch.allclose(attn[1], frozen, rtol=1e-3)


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_prune_with_activation_criterion_reaches_target(method):
    import loraprune

    model = _model()
    out = loraprune.prune(model, random_batches(n=4), ratio=0.4, steps=4, criterion=method, ranking="layer",
                          prune_start=0, prune_end=2, progress=False)
    rep = out.config.loraprune
    assert abs(rep["achieved_ratio"] - 0.4) < 0.05
    assert rep["settings"]["criterion"] == method
