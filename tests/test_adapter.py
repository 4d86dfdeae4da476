"""Pruned base + PEFT adapter export: PeftModel.from_pretrained(pruned base, adapter)
computes what the masked (and the merged) pruned model computes."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import loraprune
from loraprune import LoRAPruner, load_pruned, merge_lora, save_pruned
from loraprune.errors import PrunedModelError
from loraprune.export.adapter import export_adapter
from loraprune.model.lora import LoRALinear
from tiny import logits, random_batches, tiny_model

X = random_batches(n=1, batch=2, seq=10, seed=5)[0]["input_ids"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _logits(model):
    return logits(model, X)


def _randomise_lora(pruner, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mods in pruner.modules:
            for m in mods.values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def _pruned_unmerged(arch, uniform, model=None):
    """Masked logits and the ``finalize(merge=False)`` model, masks from random scores."""
    model = model if model is not None else tiny_model(arch, seed=2)
    pruner = LoRAPruner(model, ratio=0.3, lora_dropout=0.0, ranking="layer", skip_layers=None if uniform else [0])
    _randomise_lora(pruner)
    g = torch.Generator().manual_seed(1)
    pruner.state.observe([torch.rand(lg.n_kv, generator=g) for lg in pruner.layers],
                         [torch.rand(lg.n_channels, generator=g) for lg in pruner.layers])
    pruner.reach_target()
    masked = _logits(pruner.model)
    return masked, pruner.finalize(merge=False)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("uniform", [True, False])
def test_base_plus_adapter_equals_merged_pruned_model(arch, uniform, tmp_path):
    masked, model = _pruned_unmerged(arch, uniform)
    assert model.config.loraprune["uniform"] == uniform
    assert (_logits(model) - masked).abs().max() <= 1e-5  # unmerged, gathered LoRA == masked network
    base_dir, adapter_dir = export_adapter(model, tmp_path / "out")

    # the adapter's shapes match the pruned base, in PEFT's key layout
    base_w = load_file(str(base_dir / "model.safetensors"))
    lora_w = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert len(lora_w) == 2 * 7 * len(model.model.layers)
    for key, B in lora_w.items():
        if key.endswith("lora_B.weight"):
            module = key[len("base_model.model."):-len(".lora_B.weight")]
            A = lora_w[key.replace("lora_B", "lora_A")]
            assert B.shape[0] == base_w[module + ".weight"].shape[0]
            assert A.shape[1] == base_w[module + ".weight"].shape[1]

    base = load_pruned(base_dir)
    assert (_logits(base) - masked).abs().max() > 1e-3  # the adapter carries something
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    assert (_logits(peft_model) - masked).abs().max() <= 1e-5

    # the exported model is untouched: still unmerged, same function; merging it gives the same logits
    assert isinstance(model.model.layers[1].self_attn.q_proj, LoRALinear)
    merged = merge_lora(model)
    assert (_logits(merged) - masked).abs().max() <= 1e-5
    save_pruned(merged, tmp_path / "merged")
    assert (_logits(load_pruned(tmp_path / "merged")) - masked).abs().max() <= 1e-5


def test_existing_peft_adapter_is_continued_and_exported_with_its_rank(tmp_path):
    model = tiny_model("qwen2", seed=3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    masked, pruned = _pruned_unmerged("qwen2", True, model=peft_model)
    assert pruned.model.layers[0].self_attn.q_proj.r == 4 and pruned.model.layers[0].mlp.up_proj.r == 8
    base_dir, adapter_dir = export_adapter(pruned, tmp_path / "out")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["rank_pattern"] == {f"model.layers.{i}.self_attn.{p}": 4 for i in range(2) for p in ("q_proj", "v_proj")}
    assert set(cfg["alpha_pattern"].values()) == {4}  # scale 1.0 at r=4
    again = PeftModel.from_pretrained(load_pruned(base_dir), adapter_dir)
    assert again.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 4
    assert (_logits(again) - masked).abs().max() <= 1e-5


def test_prune_with_merge_false_exports_an_adapter(tmp_path):
    model = tiny_model(seed=4)
    pruned = loraprune.prune(model, random_batches(n=3), ratio=0.4, steps=3, lora_dropout=0.0, merge=False,
                             skip_layers=[0], progress=False)
    assert any(isinstance(m, LoRALinear) for m in pruned.modules())
    want = _logits(pruned)
    with pytest.raises(PrunedModelError, match="merge_lora"):
        save_pruned(pruned, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    base_dir, adapter_dir = export_adapter(pruned, tmp_path / "out")
    assert (base_dir / "modeling_loraprune.py").is_file()  # per-layer base, loadable with remote code too
    assert (_logits(PeftModel.from_pretrained(load_pruned(base_dir), adapter_dir)) - want).abs().max() <= 1e-5
    with pytest.raises(FileExistsError):
        export_adapter(pruned, tmp_path / "out")


def test_merged_model_has_no_adapter_to_export(tmp_path):
    pruned = loraprune.prune(tiny_model(), random_batches(n=2), ratio=0.4, steps=2, progress=False)
    with pytest.raises(PrunedModelError, match="merge=False"):
        export_adapter(pruned, tmp_path / "out")
    assert not (tmp_path / "out").exists()
