import pytest
import torch

from loraprune.structure.archs import ModuleLayoutError, UnsupportedArchitectureError, arch_for
from loraprune.structure.groups import build_layer_groups
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


def test_kept_slices_name_the_rows_and_columns_each_projection_keeps():
    model = tiny_model(num_attention_heads=8, num_key_value_heads=2, head_dim=4, intermediate_size=6)
    spec = arch_for(model)
    lg = build_layer_groups(model)[0]
    kv_keep, mlp_keep = torch.tensor([False, True]), torch.tensor([True, False, True, False, False, True])
    s = {k: tuple(None if t is None else t.tolist() for t in v) for k, v in lg.kept_slices(spec, kv_keep, mlp_keep).items()}
    q_rows, kv_rows, ch = list(range(16, 32)), list(range(4, 8)), [0, 2, 5]  # KV group 1: q heads 4..7, k/v head 1
    assert s == {"q_proj": (q_rows, None), "k_proj": (kv_rows, None), "v_proj": (kv_rows, None),
                 "o_proj": (None, q_rows), "gate_proj": (ch, None), "up_proj": (ch, None), "down_proj": (None, ch)}
    full = lg.kept_slices(spec, torch.ones(2, dtype=torch.bool), torch.ones(6, dtype=torch.bool))
    assert all(v == (None, None) for v in full.values())


def test_removed_params_counts_the_parameters_compaction_removes():
    from loraprune import compact
    from loraprune.structure.groups import layer_projection_params, removed_params
    from loraprune.structure.masks import Masks

    model = tiny_model(attention_bias=True)
    groups = build_layer_groups(model)
    masks = Masks([torch.tensor([True, False]), torch.tensor([True, True])],
                  [torch.arange(48) < 20, torch.arange(48) % 3 == 0])
    before = sum(layer_projection_params(model))
    compact(model, masks)
    assert removed_params(groups, masks) == before - sum(layer_projection_params(model))
