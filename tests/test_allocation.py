import pytest

from loraprune.method.allocation import allocate, resolve_skip
from loraprune.structure.groups import build_layer_groups, layer_projection_params
from tiny import tiny_model

SHAPES = [
    dict(),  # GQA
    dict(num_key_value_heads=4),  # MHA
    dict(hidden_size=64, intermediate_size=172, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=4),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5, 0.7])
def test_ratio_lands_within_one_percent(shape, ratio):
    model = tiny_model(**shape)
    layers = build_layer_groups(model)
    total = sum(layer_projection_params(model))
    alloc = allocate(layers, ratio, total)
    # independent count: parameters of the kept shapes, recomputed from widths
    removed = 0
    for lg, a, m in zip(layers, alloc.attn_remove, alloc.mlp_remove):
        removed += a * lg.attn_cost + m * lg.mlp_cost
    assert abs(removed / total - ratio) <= 0.01
    assert alloc.achieved_ratio(layers) == pytest.approx(removed / total)


def test_skipped_layers_keep_everything_and_others_compensate():
    model = tiny_model(hidden_size=64, intermediate_size=256, num_hidden_layers=5)
    layers = build_layer_groups(model)
    total = sum(layer_projection_params(model))
    skip = resolve_skip("paper", 5)
    assert skip == {0, 4}
    alloc = allocate(layers, 0.4, total, skip)
    assert alloc.attn_remove[0] == alloc.mlp_remove[0] == 0 == alloc.mlp_remove[4]
    assert abs(alloc.achieved_ratio(layers) - 0.4) <= 0.01


def test_unreachable_ratio_names_the_fix():
    model = tiny_model(num_hidden_layers=3)
    layers = build_layer_groups(model)
    total = sum(layer_projection_params(model))
    with pytest.raises(ValueError, match="skip fewer layers"):
        allocate(layers, 0.5, total, {0, 1})


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_bounds(ratio):
    model = tiny_model()
    layers = build_layer_groups(model)
    with pytest.raises(ValueError, match="ratio must be in"):
        allocate(layers, ratio, 1000)


def test_round_to_multiple():
    model = tiny_model(hidden_size=64, intermediate_size=256)
    layers = build_layer_groups(model)
    total = sum(layer_projection_params(model))
    alloc = allocate(layers, 0.37, total, round_to=64)
    for lg, m in zip(layers, alloc.mlp_remove):
        assert (lg.n_channels - m) % 64 == 0
