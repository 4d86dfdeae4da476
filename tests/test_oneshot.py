"""One-shot baselines (FLAP, Wanda-sp) against hand computations on tiny models."""
import copy

import pytest
import torch

from loraprune import load_pruned, save_pruned
from loraprune.method.activation_scores import InputStats, column_scores
from loraprune.run.oneshot import collect_input_stats, oneshot_plan, oneshot_prune
from loraprune.structure.groups import layer_projection_params
from tiny import random_batches, tiny_model


def _model():
    return tiny_model(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4)


def _captured_inputs(model, batches):
    """Every o_proj / down_proj input of layer 0, concatenated over tokens (the hand reference)."""
    seen = {"o": [], "down": []}
    layer = model.model.layers[0]
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["o"].append(a[0].reshape(-1, a[0].shape[-1]))),
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0].reshape(-1, a[0].shape[-1]))),
    ]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).double() for k, v in seen.items()}


def test_input_stats_match_whole_matrix_statistics():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 5, generator=g) * 3 + 7 for n in (1, 4, 9, 2)]
    st = InputStats(5)
    for c in chunks:
        st.update(c[None])  # a leading batch dimension is flattened away
    x = torch.cat(chunks).double()
    assert st.count == 16
    torch.testing.assert_close(st.mean, x.mean(0))
    torch.testing.assert_close(st.variance, x.var(0, unbiased=True))
    torch.testing.assert_close(st.norm, x.norm(dim=0))


def test_scores_from_hooks_equal_hand_computation():
    model = _model()
    batches = random_batches(n=3, batch=2, seq=12)
    stats = collect_input_stats(model, batches)
    inputs = _captured_inputs(model, batches)
    layer = model.model.layers[0]
    W_o = layer.self_attn.o_proj.weight.double()
    W_d = layer.mlp.down_proj.weight.double()
    # FLAP: fluctuation x squared column norm; Wanda-sp: activation norm x column L1
    flap_o = inputs["o"].var(0) * (W_o ** 2).sum(0)
    wanda_d = inputs["down"].norm(dim=0) * W_d.abs().sum(0)
    torch.testing.assert_close(column_scores(layer.self_attn.o_proj.weight, stats[0][0], "flap"), flap_o)
    torch.testing.assert_close(column_scores(layer.mlp.down_proj.weight, stats[0][1], "wanda-sp"), wanda_d)


def _mean_substituted_logits(model, plan, x):
    """Dense model whose removed o_proj/down_proj inputs are replaced by their calibration mean (FLAP's
    closed form), computed without any of the bias code."""
    hooks = []
    for layer, lg, a_keep, m_keep, (o_st, d_st) in zip(
        model.model.layers, plan.layers, plan.masks.attn_keep, plan.masks.mlp_keep, plan.stats
    ):
        o_removed = torch.ones(layer.self_attn.o_proj.in_features, dtype=torch.bool)
        o_removed[lg.q_index(a_keep)] = False
        for module, removed, mean in ((layer.self_attn.o_proj, o_removed, o_st.mean), (layer.mlp.down_proj, ~m_keep, d_st.mean)):
            def sub(m, args, removed=removed, mean=mean):
                x = args[0].clone()
                x[..., removed] = mean[removed].to(x.dtype)
                return (x,)
            hooks.append(module.register_forward_pre_hook(sub))
    with torch.no_grad():
        out = model(input_ids=x).logits
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_flap_compacted_equals_mean_substitution_and_reloads(tmp_path, ratio):
    model = _model()
    calib = random_batches(n=4, batch=2, seq=16, seed=1)
    plan = oneshot_plan(copy.deepcopy(model), calib, ratio, method="flap", calib_batches=4)
    x = random_batches(n=1, seed=9)[0]["input_ids"]
    expected = _mean_substituted_logits(model, plan, x)

    before = sum(layer_projection_params(model))
    pruned = oneshot_prune(copy.deepcopy(model), calib, ratio, method="flap", calib_batches=4)
    rep = pruned.config.loraprune
    assert rep["settings"]["bias_compensation"] and pruned.config.mlp_bias and pruned.config.attention_bias
    assert abs(rep["achieved_ratio"] - ratio) < 0.02
    # parameters reached: weights removed exactly as reported; the added biases are counted apart
    assert before - rep["removed_params"] == sum(layer_projection_params(pruned)) - sum(
        m.bias.numel() for layer in pruned.model.layers for m in layer.modules()
        if isinstance(m, torch.nn.Linear) and m.bias is not None
    )
    with torch.no_grad():
        got = pruned(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # without compensation the cut model differs: the bias is doing the work
    plain = oneshot_prune(copy.deepcopy(model), calib, ratio, method="flap", calib_batches=4, bias_compensation=False)
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=x).logits, expected, atol=1e-3)

    if pruned.config.hidden_size % pruned.config.num_attention_heads:
        return  # LlamaConfig refuses such a stock config on reload (a documented export limitation)
    save_pruned(pruned, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, got)


def test_wanda_sp_keeps_highest_scores_and_adds_no_bias():
    model = _model()
    calib = random_batches(n=3, seed=2)
    plan = oneshot_plan(copy.deepcopy(model), calib, 0.4, method="wanda-sp", calib_batches=3)
    stats = collect_input_stats(copy.deepcopy(model), calib)
    for layer, keep, (_, d_st) in zip(model.model.layers, plan.masks.mlp_keep, stats):
        s = column_scores(layer.mlp.down_proj.weight, d_st, "wanda-sp")
        assert s[keep].min() >= s[~keep].max()  # per layer: the lowest-scoring channels go
    pruned = oneshot_prune(model, calib, 0.4, method="wanda-sp", calib_batches=3)
    assert pruned.model.layers[0].mlp.down_proj.bias is None
    assert not pruned.config.mlp_bias


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="one-shot method"):
        oneshot_prune(_model(), random_batches(n=1), 0.3, method="sparsegpt")
    with pytest.raises(ValueError, match="calib_batches"):
        oneshot_prune(_model(), random_batches(n=1), 0.3, calib_batches=0)
    with pytest.raises(ValueError, match="bias_compensation=False"):
        oneshot_prune(tiny_model("qwen2"), random_batches(n=1), 0.3, bias_compensation=True)


def test_report_block_round_trips_through_prune_report():
    from loraprune.run.report import PruneReport

    model = tiny_model("llama", seed=2)
    pruned = oneshot_prune(model, random_batches(n=2), ratio=0.4, method="wanda-sp", calib_batches=2)
    block = pruned.config.loraprune
    report = PruneReport.of(pruned)
    assert report.to_dict() == block  # nothing lost, nothing added
    assert report.achieved_ratio == block["removed_params"] / block["projection_params"]
    assert report.rounding_effect == pytest.approx(report.achieved_ratio - 0.4)
    assert report.extra["achieved_ratio_with_biases"] == block["achieved_ratio_with_biases"]
    assert report.layers == block["layers"] and report.steps == 0
