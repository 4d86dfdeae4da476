"""Compacted model == masked model (fp32, max abs diff <= 1e-5)."""
import pytest
import torch

from loraprune import LoRAPruner, compact
from loraprune.structure.masks import Masks
from tiny import random_batches, tiny_model


def _random_masks(pruner, seed, uniform):
    g = torch.Generator().manual_seed(seed)
    attn, mlp = [], []
    for i, lg in enumerate(pruner.layers):
        if uniform and i:
            attn.append(attn[0].clone())
            mlp.append(mlp[0].clone())
            continue
        a = torch.rand(lg.n_kv, generator=g) < 0.5
        a[torch.randint(lg.n_kv, (1,), generator=g)] = True
        m = torch.rand(lg.n_channels, generator=g) < 0.6
        m[0] = True
        attn.append(a)
        mlp.append(m)
    return Masks(attn, mlp)


def masked_and_compacted(arch, uniform, seed=0, **cfg):
    model = tiny_model(arch, seed=seed, **cfg)
    pruner = LoRAPruner(model, ratio=0.5, lora_dropout=0.0, seed=seed)
    with torch.no_grad():
        for mods in pruner.modules:
            for mod in mods.values():
                mod.lora_B.normal_(0, 0.2)
    pruner.state.masks = _random_masks(pruner, seed, uniform)
    pruner.apply_masks()
    x = random_batches(n=1, batch=2, seq=12, seed=seed)[0]["input_ids"]
    model.eval()
    with torch.no_grad():
        masked = model(x).logits
    compact(model, pruner.state.masks)
    with torch.no_grad():
        compacted = model(x).logits
    return model, pruner, masked, compacted


@pytest.mark.parametrize("arch", ["llama", "llama-mha", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("uniform", [True, False])
def test_compacted_equals_masked(arch, uniform):
    model, pruner, masked, compacted = masked_and_compacted(arch, uniform)
    assert (masked - compacted).abs().max().item() <= 1e-5
    # physically smaller, and the config says by how much
    widths = model.config.loraprune["layers"]
    for layer, w, kv in zip(model.model.layers, widths, pruner.state.masks.kept_kv()):
        assert layer.self_attn.k_proj.weight.shape[0] == kv * 8
        assert layer.mlp.gate_proj.weight.shape[0] == w["intermediate_size"]
    assert model.config.loraprune["uniform"] == uniform or len(set(map(str, widths))) == 1


def test_masked_forward_is_not_the_dense_forward():
    """Guard: the masks really change the function (else the test above proves nothing)."""
    model = tiny_model()
    pruner = LoRAPruner(model, ratio=0.5, lora_dropout=0.0)
    x = random_batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        dense = model(x).logits
    pruner.state.masks = _random_masks(pruner, 0, True)
    pruner.apply_masks()
    with torch.no_grad():
        masked = model(x).logits
    assert (dense - masked).abs().max() > 1e-3


def test_uniform_compaction_updates_stock_config():
    model, pruner, _, _ = masked_and_compacted("llama", True)
    kv = pruner.state.masks.kept_kv()[0]
    assert model.config.num_key_value_heads == kv
    assert model.config.num_attention_heads == 2 * kv
    assert model.config.intermediate_size == pruner.state.masks.kept_channels()[0]
    assert model.config.head_dim == 8


def test_mask_of_wrong_shape_is_rejected():
    model = tiny_model()
    masks = Masks([torch.ones(3, dtype=torch.bool)] * 2, [torch.ones(48, dtype=torch.bool)] * 2)
    with pytest.raises(ValueError, match="KV groups"):
        compact(model, masks)
