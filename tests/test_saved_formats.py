"""What users saved with earlier code still loads, resumes and exports.

``tests/fixtures/`` was written by ``tests/fixtures/make_fixtures.py`` with the code
of b849416, before the package moved into stage subpackages (issue 25): a per-layer
model (it carries its own ``modeling_loraprune.py``, named by ``auto_map``), a
uniform model, a GGUF file and the checkpoints of a run interrupted at step 5.
``expected.json`` holds what that code computed from them.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import loraprune
from gguf_export_cases import gpt2_tokenizer
from tiny import random_batches, tiny_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
IDS = torch.tensor(EXPECTED["input_ids"])


def last_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits[:, -3:].reshape(-1, model.config.vocab_size).double()


def want(name) -> torch.Tensor:
    return torch.tensor(EXPECTED[name], dtype=torch.float64)


@pytest.mark.parametrize("name", ["per_layer", "uniform"])
def test_saved_models_load_with_the_logits_they_had(name, tmp_path):
    model = loraprune.load_pruned(FIXTURES / name)
    torch.testing.assert_close(last_logits(model), want(name), atol=2e-5, rtol=0)
    # and through transformers alone: the per-layer folder carries its own modeling file
    copy = shutil.copytree(FIXTURES / name, tmp_path / name)
    again = AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=(name == "per_layer"))
    torch.testing.assert_close(last_logits(again), want(name), atol=2e-5, rtol=0)


def test_the_per_layer_folder_names_its_own_modeling_file():
    config = json.loads((FIXTURES / "per_layer" / "config.json").read_text(encoding="utf-8"))
    module = config["auto_map"]["AutoModelForCausalLM"].split(".")[0]
    assert (FIXTURES / "per_layer" / f"{module}.py").is_file()
    assert config["loraprune"]["uniform"] is False


def _gguf_contents(path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if k != "general.name"}  # the name is the folder's
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def test_a_saved_model_exports_to_the_gguf_file_the_old_code_wrote(tmp_path):
    """The per-layer GGUF written by the old code and the one today's code writes from the saved model
    agree in every key (the file name aside) and every tensor, bit for bit. (transformers cannot load
    a per-layer ``deci`` file; llama.cpp runs it: tests/test_gguf_llamacpp.py.)"""
    pytest.importorskip("gguf")
    pruned = loraprune.load_pruned(FIXTURES / "per_layer")
    path = loraprune.save_gguf(pruned, tmp_path / "again.gguf", gpt2_tokenizer(), dtype="f32")
    old_fields, old_tensors = _gguf_contents(FIXTURES / "per_layer.gguf")
    new_fields, new_tensors = _gguf_contents(path)
    assert new_fields == old_fields
    assert old_fields["deci.attention.head_count"] == [4, 4]  # per-layer arrays, as the old code wrote them
    assert sorted(new_tensors) == sorted(old_tensors)
    assert all(np.array_equal(new_tensors[k], old_tensors[k]) for k in old_tensors)


@pytest.mark.slow
def test_an_old_checkpoint_resumes_to_where_the_old_code_ended(tmp_path):
    """The run interrupted at step 5 (checkpoint at step 4), resumed by today's code, ends where
    the old code's resumed run ended: the same widths and logits."""
    ckpt = shutil.copytree(FIXTURES / "checkpoint", tmp_path / "checkpoint")
    tok = gpt2_tokenizer()
    model = tiny_model("llama", seed=3, vocab_size=len(tok), intermediate_size=64)
    batches = random_batches(vocab=len(tok), n=4, batch=2, seq=16, seed=1)
    resumed = loraprune.prune(model, batches, steps=8, ratio=0.5, prune_every=1, progress=False, seed=0,
                              checkpoint_dir=str(ckpt), checkpoint_every=2, resume=True)
    assert resumed.config.loraprune["layers"] == EXPECTED["resumed_layers"]
    torch.testing.assert_close(last_logits(resumed), want("resumed"), atol=2e-4, rtol=0)
