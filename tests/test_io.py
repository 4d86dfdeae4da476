"""save -> load round trips: identical logits, uniform and per-layer."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import loraprune
from loraprune import load_pruned, save_pruned
from loraprune.errors import PrunedModelError
from loraprune.export.classes import attach_export
from loraprune.structure.masks import Masks
from test_compaction import masked_and_compacted
from tiny import logits, random_batches, tiny_model

X = random_batches(n=1, batch=2, seq=10, seed=3)[0]["input_ids"]


def _logits(model):
    return logits(model, X)


def _pruned(arch, uniform, **cfg):
    model, *_ = masked_and_compacted(arch, uniform, **cfg)
    return attach_export(model)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_uniform_reloads_with_stock_from_pretrained(arch, tmp_path):
    model = _pruned(arch, True)
    save_pruned(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["loraprune"]["uniform"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # no trust_remote_code
    assert type(again).__name__ == type(model).__name__
    assert (_logits(again) - _logits(model)).abs().max() <= 1e-5
    again2 = load_pruned(tmp_path / "m")
    assert (_logits(again2) - _logits(model)).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_per_layer_reloads_with_load_pruned_and_remote_code(arch, tmp_path):
    model = _pruned(arch, False)
    widths = model.config.loraprune["layers"]
    assert widths[0] != widths[1]
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "modeling_loraprune.py").is_file()
    again = load_pruned(tmp_path / "m")
    assert (_logits(again) - _logits(model)).abs().max() <= 1e-5
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert (_logits(remote) - _logits(model)).abs().max() <= 1e-5
    out = remote.generate(X[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_indivisible_llama_head_count(tmp_path):
    model = tiny_model(hidden_size=40, num_attention_heads=4, num_key_value_heads=4, head_dim=8, intermediate_size=24)
    masks = Masks([torch.tensor([True, True, True, False])] * 2, [torch.ones(24, dtype=torch.bool)] * 2)
    loraprune.compact(model, masks)  # 3 heads: 40 % 3 != 0, LlamaConfig would refuse to save
    want = _logits(model)
    exported = attach_export(model)
    assert type(exported).__name__ == "MistralForCausalLM"
    assert (_logits(exported) - want).abs().max() <= 1e-6
    save_pruned(exported, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (_logits(again) - want).abs().max() <= 1e-5


def test_save_refuses_non_empty_dir_and_leaves_nothing_partial(tmp_path, monkeypatch):
    model = _pruned("llama", True)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(model, target)
    assert (target / "keep.txt").read_text() == "mine"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind


def test_overwrite_replaces_atomically(tmp_path):
    model = _pruned("llama", True)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("x")
    save_pruned(model, target, overwrite=True)
    assert not (target / "old.txt").exists() and (target / "config.json").is_file()


def test_corrupted_directory_errors(tmp_path):
    model = _pruned("llama", False)
    save_pruned(model, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(PrunedModelError, match="corrupted"):
        load_pruned(tmp_path / "m")
    with pytest.raises(PrunedModelError, match="does not exist"):
        load_pruned(tmp_path / "nothing")


def test_mismatched_weights_error(tmp_path):
    model = _pruned("llama", False)
    save_pruned(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["loraprune"]["layers"][0]["intermediate_size"] += 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PrunedModelError, match="layer 0 weights have widths .*config.json says"):
        load_pruned(tmp_path / "m")


# ---- kept indices as JSON ----------------------------------------------------------
def test_masks_json_indexes_the_original_weights(tmp_path):
    """The saved kept indices, read with the geometry stored beside them, pick out exactly
    the rows/columns of the original weights that the pruned model holds (LoRA B = 0: no merge change)."""
    model = tiny_model("qwen2", seed=4)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = loraprune.prune(model, random_batches(n=2), ratio=0.4, steps=2, lr=1e-9, skip_layers=[0],
                             criterion="random", progress=False)
    save_pruned(pruned, tmp_path / "m")
    data = json.loads((tmp_path / "m" / "loraprune_masks.json").read_text())
    hd, qpk = data["head_dim"], data["q_per_kv"]
    assert (hd, qpk) == (8, 2)
    state = load_pruned(tmp_path / "m").state_dict()
    for i, layer in enumerate(data["layers"]):
        kv_rows = torch.tensor([g * hd + j for g in layer["kv_groups"] for j in range(hd)])
        q_rows = torch.tensor([g * qpk * hd + j for g in layer["kv_groups"] for j in range(qpk * hd)])
        ch = torch.tensor(layer["mlp_channels"])
        p = f"model.layers.{i}."
        expect = {
            "self_attn.q_proj.weight": original[p + "self_attn.q_proj.weight"][q_rows],
            "self_attn.q_proj.bias": original[p + "self_attn.q_proj.bias"][q_rows],
            "self_attn.k_proj.weight": original[p + "self_attn.k_proj.weight"][kv_rows],
            "self_attn.v_proj.bias": original[p + "self_attn.v_proj.bias"][kv_rows],
            "self_attn.o_proj.weight": original[p + "self_attn.o_proj.weight"][:, q_rows],
            "mlp.up_proj.weight": original[p + "mlp.up_proj.weight"][ch],
            "mlp.down_proj.weight": original[p + "mlp.down_proj.weight"][:, ch],
        }
        for name, want in expect.items():
            assert torch.allclose(state[p + name], want, atol=1e-6), (i, name)
    assert len(data["layers"][0]["mlp_channels"]) == 48 and len(data["layers"][1]["mlp_channels"]) < 48
    masks = load_pruned(tmp_path / "m").loraprune_masks  # reattached on load
    assert masks.kept_kv() == [w["num_key_value_heads"] for w in pruned.config.loraprune["layers"]]


# ---- reloading builds on the meta device ---------------------------------------------
def test_per_layer_reload_builds_on_meta_then_loads(tmp_path, monkeypatch):
    """load_pruned must not materialise a random-initialised copy of a per-layer model before
    reading the weights: when the per-layer widths are applied, every parameter is still on meta."""
    import loraprune.export.modeling_loraprune as ml

    model = _pruned("llama", False)
    save_pruned(model, tmp_path / "m")
    seen = []
    real = ml.apply_layer_widths

    def spy(m):
        seen.append({p.device.type for p in m.parameters()})
        real(m)
        seen.append({p.device.type for p in m.parameters()})

    monkeypatch.setattr(ml, "apply_layer_widths", spy)
    again = load_pruned(tmp_path / "m")
    assert seen == [{"meta"}, {"meta"}]
    assert {p.device.type for p in again.parameters()} == {"cpu"}
    assert (_logits(again) - _logits(model)).abs().max() <= 1e-5


def test_config_with_more_layers_than_the_weights_is_refused(tmp_path):
    """transformers would fill the missing layer randomly and only warn."""
    model = _pruned("llama", True)
    save_pruned(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PrunedModelError, match="says 3 layers, the weights hold 2"):
        load_pruned(tmp_path / "m")


def test_biased_llama_with_indivisible_head_count_goes_out_per_layer(tmp_path):
    """Neither LlamaConfig (hidden % heads) nor Mistral (no biases) can hold it."""
    model = tiny_model(hidden_size=40, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                       intermediate_size=24, attention_bias=True)
    masks = Masks([torch.tensor([True, True, True, False])] * 2, [torch.ones(24, dtype=torch.bool)] * 2)
    loraprune.compact(model, masks)
    want = _logits(model)
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    assert (_logits(again) - want).abs().max() <= 1e-5
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert (_logits(remote) - want).abs().max() <= 1e-5


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    import os

    from loraprune.utils.atomic import write_atomic, write_json

    write_json(tmp_path / "r.json", {"a": 1})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "r.json", "{}")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
