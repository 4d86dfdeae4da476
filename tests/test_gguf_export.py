"""save_gguf / ``loraprune export``: the file's layout against transformers' own GGUF reader, and bad input.

The proof in llama.cpp itself is tests/test_gguf_llamacpp.py (slow, needs llama-cpp-python).
"""
import numpy as np
import pytest
import torch

import loraprune
from gguf_export_cases import gpt2_tokenizer, logits, per_layer_llama, spm_tokenizer, uniform
from loraprune.errors import OutputExistsError, PrunedModelError
from loraprune.export.gguf_write import GGUFExportError
from loraprune.structure.masks import Masks
from tiny import tiny_model

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_uniform_llama_reloads_in_transformers_with_the_same_logits(arch, tok, tmp_path):
    """transformers' GGUF reader undoes llama.cpp's q/k order itself: an independent check of the layout."""
    from loraprune.export.gguf_read import load_gguf

    model = uniform(arch, len(tok))
    path = loraprune.save_gguf(model, tmp_path / "m.gguf", tok, dtype="f32")
    fields, _ = _fields(path)
    assert fields["general.architecture"] == "llama"
    again, tok2 = load_gguf(path)
    ids = tok("the quick brown fox, or not to be 1999")["input_ids"]
    assert tok2("the quick brown fox, or not to be 1999")["input_ids"] == ids
    assert (logits(again, ids) - logits(model, ids)).abs().max() <= 1e-5
    half = load_gguf(loraprune.save_gguf(model, tmp_path / "h.gguf", tok), tokenizer=False)[0]  # f16
    assert (logits(half, ids) - logits(model, ids)).abs().max() <= 2e-2


def test_per_layer_file_holds_the_widths_and_weights_in_llama_cpp_layout(tok, tmp_path):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    model = per_layer_llama(len(tok))
    path = loraprune.save_gguf(model, tmp_path / "m.gguf", tok, dtype="f32")
    fields, reader = _fields(path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [2, 4, 2, 2]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 1, 1]
    assert fields["deci.feed_forward_length"] == [5, 48, 1, 16]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 8
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    unpermute = LlamaTensorProcessor()._reverse_permute_weights  # transformers' inverse of llama.cpp's order
    for i, layer in enumerate(model.model.layers):
        n_head, n_kv = fields["deci.attention.head_count"][i], fields["deci.attention.head_count_kv"][i]
        attn = layer.self_attn
        assert np.array_equal(unpermute(tensors[f"blk.{i}.attn_q.weight"], n_head, n_head), attn.q_proj.weight.numpy())
        assert np.array_equal(unpermute(tensors[f"blk.{i}.attn_k.weight"], n_head, n_kv), attn.k_proj.weight.numpy())
        assert np.array_equal(tensors[f"blk.{i}.attn_v.weight"], attn.v_proj.weight.numpy())
        assert np.array_equal(tensors[f"blk.{i}.attn_output.weight"], attn.o_proj.weight.numpy())
    assert np.array_equal(tensors["blk.2.ffn_down.weight"], model.model.layers[2].mlp.down_proj.weight.numpy())
    assert "output.weight" in tensors  # tiny_model does not tie


@pytest.mark.parametrize("dtype, kind", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_dtypes_keep_weights_within_their_precision(dtype, kind, tok, tmp_path):
    model = uniform("llama", len(tok))
    _, reader = _fields(loraprune.save_gguf(model, tmp_path / "m.gguf", tok, dtype=dtype))
    by_name = {t.name: t for t in reader.tensors}
    t = by_name["blk.0.ffn_gate.weight"]
    assert t.tensor_type.name == kind and by_name["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(model.model.layers[0].mlp.gate_proj.weight.shape)
    err = np.abs(back - model.model.layers[0].mlp.gate_proj.weight.numpy()).max()
    assert 0 < err < {"F16": 1e-3, "BF16": 4e-3, "Q8_0": 4e-3}[kind]


def test_q8_0_keeps_rows_it_cannot_pack_in_f16(tok, tmp_path):
    model = per_layer_llama(len(tok))  # layer 0's down_proj rows are 5 wide: no Q8_0 block fits
    _, reader = _fields(loraprune.save_gguf(model, tmp_path / "m.gguf", tok, dtype="q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_gate.weight"] == "Q8_0"


def test_hf_tokenizers_are_converted(tok, tmp_path):
    model = uniform("llama", len(tok) + 3)  # embedding rows beyond the tokenizer: padded with unused tokens
    fields, _ = _fields(loraprune.save_gguf(model, tmp_path / "m.gguf", tok))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert fields["tokenizer.ggml.token_type"][len(tok):] == [5, 5, 5]
    assert fields["tokenizer.ggml.token_type"][0] == 3  # <s>: special -> control
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert len(fields["tokenizer.ggml.merges"]) > 0

    spm = spm_tokenizer()
    model = uniform("llama", len(spm))
    fields, _ = _fields(loraprune.save_gguf(model, tmp_path / "s.gguf", spm))
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # unknown, control, control, byte
    assert fields["tokenizer.ggml.add_space_prefix"] is True


def test_tokenizer_keys_are_copied_from_the_source_gguf(tmp_path):
    from gguf_file import write_tiny_gguf
    from loraprune.export.gguf_read import load_gguf

    write_tiny_gguf(tmp_path / "src.gguf")
    model, _ = load_gguf(tmp_path / "src.gguf")
    n = model.config.num_hidden_layers
    model = loraprune.compact(model, Masks([torch.tensor([True, False])] * n,
                                                     [torch.arange(48) < 20] * n))
    path = loraprune.save_gguf(model, tmp_path / "out.gguf")  # no tokenizer: the source file's
    src, _ = _fields(tmp_path / "src.gguf")
    out, _ = _fields(path)
    assert {k: v for k, v in out.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in src.items() if k.startswith("tokenizer.")}
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}  # tied embeddings


def test_refuses_what_save_pruned_refuses(tok, tmp_path):
    with pytest.raises(PrunedModelError, match="not pruned by loraprune"):
        loraprune.save_gguf(tiny_model(vocab_size=len(tok)), tmp_path / "m.gguf", tok)
    model = tiny_model(vocab_size=len(tok))
    pruner = loraprune.LoRAPruner(model, ratio=0.5)
    unmerged = pruner.finalize(merge=False)
    with pytest.raises(PrunedModelError, match="LoRA layers.*merge_lora"):
        loraprune.save_gguf(unmerged, tmp_path / "m.gguf", tok)
    assert not list(tmp_path.iterdir())


def test_bad_arguments_fail_before_writing(tok, tmp_path):
    model = uniform("llama", len(tok))
    with pytest.raises(GGUFExportError, match="f32, f16, bf16, q8_0"):
        loraprune.save_gguf(model, tmp_path / "m.gguf", tok, dtype="q4_k")
    with pytest.raises(GGUFExportError, match="end in .gguf"):
        loraprune.save_gguf(model, tmp_path / "m.bin", tok)
    with pytest.raises(GGUFExportError, match="pass tokenizer="):
        loraprune.save_gguf(model, tmp_path / "m.gguf")
    (tmp_path / "old.gguf").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        loraprune.save_gguf(model, tmp_path / "old.gguf", tok)
    assert (tmp_path / "old.gguf").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]


def test_per_layer_qwen3_is_refused_naming_uniform(tok, tmp_path):
    model = per_layer_llama(len(tok), arch="qwen3")
    with pytest.raises(GGUFExportError, match="uniform=True"):
        loraprune.save_gguf(model, tmp_path / "m.gguf", tok)
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tok, tmp_path, monkeypatch):
    import loraprune.export.gguf_write as ge

    model = uniform("llama", len(tok))
    (tmp_path / "m.gguf").write_bytes(b"old")

    def broken(*args):
        yield "token_embd.weight", torch.zeros(2, 2)
        raise RuntimeError("disk full")

    monkeypatch.setattr(ge, "iter_tensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        loraprune.save_gguf(model, tmp_path / "m.gguf", tok, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert (tmp_path / "m.gguf").read_bytes() == b"old"


def test_cli_export_writes_the_saved_model(tok, tmp_path, capsys):
    from loraprune.apps.cli import main

    model = per_layer_llama(len(tok))
    loraprune.save_pruned(model, tmp_path / "pruned", tokenizer=tok)
    assert main(["export", str(tmp_path / "m.gguf"), "--from", str(tmp_path / "pruned"), "--dtype", "f32"]) == 0
    fields, _ = _fields(tmp_path / "m.gguf")
    assert fields["deci.feed_forward_length"] == [5, 48, 1, 16]
    said = capsys.readouterr().out  # a per-layer file: what runs it, and the choice for ollama
    assert "llama.cpp" in said and "ollama" in said and "--uniform" in said
    loraprune.save_pruned(uniform("llama", len(tok)), tmp_path / "uniform", tokenizer=tok)
    assert main(["export", str(tmp_path / "u.gguf"), "--from", str(tmp_path / "uniform"), "--dtype", "f32"]) == 0
    assert "ollama" not in capsys.readouterr().out  # a uniform file needs no warning
    assert main(["export", str(tmp_path / "m.gguf"), "--from", str(tmp_path / "pruned")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    tiny_model(vocab_size=len(tok)).save_pretrained(tmp_path / "dense")
    assert main(["export", str(tmp_path / "d.gguf"), "--from", str(tmp_path / "dense")]) == 2
    assert "not pruned by loraprune" in capsys.readouterr().err


def test_unwritable_paths_are_refused_before_anything_is_converted(tok, tmp_path, monkeypatch, capsys):
    import loraprune.export.gguf_write as ge
    from loraprune.apps.cli import main
    from loraprune.errors import OutputPathError

    def no_conversion(*args):
        raise AssertionError("tensors converted before the path was checked")

    model = uniform("llama", len(tok))
    (tmp_path / "f").write_text("a file")
    monkeypatch.setattr(ge, "iter_tensors", no_conversion)
    with pytest.raises(OutputPathError, match=r"f is a file, not a directory; choose another path"):
        loraprune.save_gguf(model, tmp_path / "f" / "sub" / "m.gguf", tok)
    with pytest.raises(TypeError, match="must be a path"):
        loraprune.save_gguf(model, 3, tok)
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(OutputExistsError, match="is a directory"):
        loraprune.save_gguf(model, tmp_path / "d.gguf", tok)
    # the CLI refuses before the model loads
    loraprune.save_pruned(per_layer_llama(len(tok)), tmp_path / "pruned", tokenizer=tok)
    monkeypatch.setattr("loraprune.export.load.load_pruned", lambda *a, **k: pytest.fail("model loaded before the check"))
    assert main(["export", str(tmp_path / "f" / "m.gguf"), "--from", str(tmp_path / "pruned")]) == 2
    err = capsys.readouterr().err
    assert "GGUF file's folder" in err and "is not a directory (a file)" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "f", "pruned"]
