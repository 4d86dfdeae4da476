"""Every supported architecture through ``loraprune.prune`` -> save -> reload.

Uniform models must come back as stock models (no remote code, explicit
``head_dim``); per-layer models through ``load_pruned`` and through
``trust_remote_code``. Logits match to 1e-5 and greedy ``generate`` gives the
same tokens as the in-memory pruned model.
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import loraprune
from loraprune.structure.archs import ModuleLayoutError
from loraprune.structure.groups import layer_projection_params
from tiny import random_batches, tiny_model

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama-mha", {}),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral": ("mistral", {}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qk-norm": ("qwen3", {}),
}
STOCK_CLASS = {"llama": "LlamaForCausalLM", "llama-mha": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
X = random_batches(n=1, batch=2, seq=10, seed=7)[0]["input_ids"]


def _prune(arch, uniform, **cfg):
    model = tiny_model(arch, seed=1, **cfg)
    # 0.25: whole KV groups of layer 1 alone land within 1 % of it on every architecture here (0.3 does not on
    # llama-mha, and is refused: tests/cases_surfaces.py)
    kwargs = dict(uniform=True, ratio=0.5) if uniform else dict(skip_layers=[0], ratio=0.25)
    return loraprune.prune(model, random_batches(n=3, seq=12), steps=3, lora_dropout=0.0, progress=False, **kwargs)


def _same_behaviour(again, pruned):
    with torch.no_grad():
        assert (again(X).logits - pruned(X).logits).abs().max() <= 1e-5
    prompt = X[:1, :4]
    want = pruned.generate(prompt, max_new_tokens=6, do_sample=False)
    got = again.generate(prompt, max_new_tokens=6, do_sample=False)
    assert got.shape == (1, 10) and torch.equal(got, want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_uniform_round_trip_is_a_stock_model(case, tmp_path):
    arch, cfg = CASES[case]
    pruned = _prune(arch, True, **cfg)
    rep = pruned.config.loraprune
    assert rep["uniform"] and pruned.config.num_key_value_heads < tiny_model(arch, **cfg).config.num_key_value_heads
    loraprune.save_pruned(pruned, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in saved and saved["architectures"] == [STOCK_CLASS[arch]]
    assert saved["head_dim"] == 8 and saved["num_key_value_heads"] == rep["layers"][0]["num_key_value_heads"]
    assert saved["intermediate_size"] == rep["layers"][0]["intermediate_size"]
    if "rope_parameters" in cfg:
        assert saved["rope_parameters"]["rope_type"] == "llama3"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # no trust_remote_code
    assert type(again).__name__ == STOCK_CLASS[arch]
    _same_behaviour(again, pruned)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_per_layer_round_trip(case, tmp_path):
    arch, cfg = CASES[case]
    pruned = _prune(arch, False, **cfg)
    widths = pruned.config.loraprune["layers"]
    assert not pruned.config.loraprune["uniform"] and widths[0] != widths[1]
    loraprune.save_pruned(pruned, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["auto_map"]
    _same_behaviour(loraprune.load_pruned(tmp_path / "m"), pruned)
    _same_behaviour(AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True), pruned)


def test_uniform_llama_with_indivisible_head_count_reloads_as_stock_mistral(tmp_path):
    # 4 MHA heads of 8 on hidden 40; removing one KV group leaves 3 heads: 40 % 3 != 0, which LlamaConfig refuses
    model = tiny_model(hidden_size=40, num_attention_heads=4, num_key_value_heads=4, head_dim=8, intermediate_size=48)
    pruned = loraprune.prune(model, random_batches(n=3), ratio=0.3, steps=3, uniform=True, progress=False)
    assert pruned.config.num_attention_heads == 3
    loraprune.save_pruned(pruned, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(again).__name__ == "MistralForCausalLM" and again.config.sliding_window is None
    _same_behaviour(again, pruned)


# ---- hardware-friendly widths ----------------------------------------------------
@pytest.mark.slow
def test_round_to_reports_its_cost_on_the_parameter_target():
    def run(round_to):
        model = tiny_model(hidden_size=32, intermediate_size=200, num_hidden_layers=2)
        before = sum(layer_projection_params(model))
        pruned = loraprune.prune(model, random_batches(n=2), ratio=0.5, steps=2, round_to=round_to, ranking="layer",
                                 progress=False)
        rep = pruned.config.loraprune
        assert rep["achieved_ratio"] == pytest.approx(1 - sum(layer_projection_params(pruned)) / before)
        assert rep["target_ratio"] == 0.5
        assert rep["rounding_effect"] == pytest.approx(rep["achieved_ratio"] - 0.5)
        return rep

    exact = run(1)
    assert abs(exact["rounding_effect"]) < 0.01
    # 64-multiples of 200 channels cannot land on 50 %: refused before training, with where they land and a fix
    with pytest.raises(ValueError, match=r"ratio=0\.5 cannot be reached within 0\.01.*round_to=64.*land at 0\.586 .*"
                                         r"pass ratio=0\.586.*round_to=1"):
        run(64)
    with pytest.raises(ValueError, match=r"round_to=128.*land at 0\.\d+"):  # 200 channels: only 128 could be kept
        run(128)
    rep = run(4)  # a block that reaches it (round_to=8 lands at 0.517): multiples, rounding effect within 1 %
    assert all(w["intermediate_size"] % 4 == 0 for w in rep["layers"]) and abs(rep["rounding_effect"]) <= 0.01


# ---- clear errors ------------------------------------------------------------------
def test_unexpected_module_layout_names_what_was_found():
    model = tiny_model()
    mlp = model.model.layers[1].mlp
    mlp.fc_in = mlp.gate_proj  # a renamed projection: not the LLaMA layout
    del mlp.gate_proj
    with pytest.raises(ModuleLayoutError) as err:
        loraprune.prune(model, random_batches(n=1), ratio=0.5, steps=1, progress=False)
    msg = str(err.value)
    assert "'gate_proj'" in msg and "fc_in" in msg and "up_proj" in msg
