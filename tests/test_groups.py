import pytest
import torch

from loraprune import ModuleLayoutError, UnsupportedArchitectureError, arch_for, build_layer_groups
from tiny import tiny_model


@pytest.mark.parametrize("heads,kv,head_dim", [(4, 4, 8), (4, 2, 8), (8, 2, 4), (8, 1, 8)])
def test_group_geometry_from_config(heads, kv, head_dim):
    model = tiny_model(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)
    layers = build_layer_groups(model)
    hidden = model.config.hidden_size
    assert len(layers) == model.config.num_hidden_layers
    for lg in layers:
        assert lg.n_kv == kv and lg.q_per_kv == heads // kv and lg.head_dim == head_dim
        assert lg.n_channels == model.config.intermediate_size
        q_rows = heads // kv * head_dim
        assert lg.attn_cost == 2 * q_rows * hidden + 2 * head_dim * hidden
        assert lg.mlp_cost == 3 * hidden
        # every projection parameter belongs to exactly one group (no biases here)
        n_params = sum(p.numel() for n, p in model.named_parameters() if f"layers.{lg.layer}." in n and "proj" in n)
        assert lg.params == n_params


def test_gqa_index_maps_cover_whole_kv_groups():
    model = tiny_model(num_attention_heads=8, num_key_value_heads=2, head_dim=4)
    lg = build_layer_groups(model)[0]
    keep = torch.tensor([False, True])
    # KV group 1 owns q heads 4..7 (repeat_kv puts q head h on kv head h // 4)
    assert lg.q_index(keep).tolist() == list(range(16, 32))
    assert lg.kv_index(keep).tolist() == list(range(4, 8))


def test_bias_is_counted_in_group_cost():
    model = tiny_model("qwen2")  # q/k/v biases
    lg = build_layer_groups(model)[0]
    hidden, hd, qk = 32, 8, 2
    assert lg.attn_cost == 2 * qk * hd * hidden + 2 * hd * hidden + qk * hd + 2 * hd


def test_group_sums_match_explicit_loops():
    model = tiny_model(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    lg = build_layer_groups(model)[0]
    q, k, v = torch.rand(32), torch.rand(16), torch.rand(16)
    o = torch.rand(32)
    got = lg.attn_group_sums(q, k, v, o)
    for g in range(2):
        want = q[g * 16:(g + 1) * 16].sum() + k[g * 8:(g + 1) * 8].sum() + v[g * 8:(g + 1) * 8].sum() + o[g * 16:(g + 1) * 16].sum()
        assert torch.allclose(got[g], want)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2, qwen3"):
        arch_for("gpt2")


def test_missing_module_is_reported():
    model = tiny_model()
    del model.model.layers[0].mlp.up_proj
    with pytest.raises(ModuleLayoutError, match="up_proj"):
        build_layer_groups(model)
