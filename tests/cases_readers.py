"""Bad inputs of the file readers (issue 26): GGUF files in and out, config.json and the weight files of a folder.

GGUF cases corrupt a copy of the tiny GGUF of ``tests/gguf_file.py`` byte by byte (truncations,
counts, offsets, types), or write it again with a key or tensor left out or changed (a
``GGUFWriter`` that filters what ``write_tiny_gguf`` adds). Folder cases tamper with a copy of
the saved per-layer model of ``tests/cases_io.py``.
"""
import json
import struct
import tempfile
from pathlib import Path
from unittest import mock

import torch

import loraprune
from bad_input_table import Case
from cases_io import _edit_json, pruned_model, run_cli, saved
from loraprune.errors import GGUFError
from loraprune.export.gguf_read import load_gguf
from loraprune.export.load import inspect_dir, load_pruned

_CACHE: dict[str, object] = {}


# ---------------------------------------------------------------- GGUF files
def _write(path: Path, omit=(), override=None, extra=None) -> Path:
    """The tiny GGUF, written without the keys/tensors in ``omit``, with ``override`` = {key: (value, type)}
    and with the keys of ``extra`` (same form) added."""
    import gguf

    from gguf_file import write_tiny_gguf

    override = override or {}
    base = gguf.GGUFWriter

    class Filtered(base):
        def add_key_value(self, key, val, vtype, sub_type=None):
            if key in omit or any(key.startswith(o) for o in omit if o.endswith(".")):
                return
            if key in override:
                val, vtype = override[key]
            super().add_key_value(key, val, vtype, sub_type=sub_type)

        def add_tensor(self, name, tensor, *args, **kwargs):
            if name in omit or any(name.startswith(o) for o in omit if o.endswith(".")):
                return
            super().add_tensor(name, tensor, *args, **kwargs)

        def write_header_to_file(self, *args, **kwargs):
            for key, (val, vtype) in (extra or {}).items():
                super().add_key_value(key, val, vtype)
            super().write_header_to_file(*args, **kwargs)

    with mock.patch.object(gguf, "GGUFWriter", Filtered):
        write_tiny_gguf(path)
    return path


def _good_bytes() -> bytes:
    if "gguf" not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix="loraprune-cases-readers-"))
        _CACHE["gguf"] = _write(root / "tiny.gguf").read_bytes()
    return _CACHE["gguf"]


def _bytes_case(edit, **kw):
    """A case: write the tiny GGUF's bytes, edited, and load it."""
    def call(tmp_path):
        path = tmp_path / "m.gguf"
        path.write_bytes(edit(bytearray(_good_bytes())))
        return load_gguf(path, **kw)
    return call


def _set(fmt: str, pos: int, value):
    def edit(data: bytearray) -> bytes:
        struct.pack_into(fmt, data, pos, value)
        return bytes(data)
    return edit


def _tensor_field(name: str, field: str, value):
    """Patch one field of tensor ``name``'s header entry (found by its name bytes)."""
    def edit(data: bytearray) -> bytes:
        raw = name.encode()
        pos = bytes(data).index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
        n_dims = struct.unpack_from("<I", data, pos)[0]
        where = {"n_dims": (pos, "<I"), "dim0": (pos + 4, "<Q"), "type": (pos + 4 + 8 * n_dims, "<I"),
                 "offset": (pos + 8 + 8 * n_dims, "<Q")}[field]
        struct.pack_into(where[1], data, where[0], value)
        return bytes(data)
    return edit


def _first_kv(part: str, value):
    """Patch the first metadata entry: its name length or its value type."""
    def edit(data: bytearray) -> bytes:
        n = struct.unpack_from("<Q", data, 24)[0]
        pos = 24 if part == "name_len" else 24 + 8 + n
        struct.pack_into("<Q" if part == "name_len" else "<I", data, pos, value)
        return bytes(data)
    return edit


def _gguf_case(omit=(), override=None, extra=None, **kw):
    """A case: write the tiny GGUF without/with changed or added keys or tensors, and load it."""
    def call(tmp_path):
        return load_gguf(_write(tmp_path / "m.gguf", omit, override, extra), **kw)
    return call


def _u32(v):
    import gguf

    return (v, gguf.GGUFValueType.UINT32)


def _typed(v, name):
    import gguf

    return (v, getattr(gguf.GGUFValueType, name))


TOKENIZER_KEYS = ("tokenizer.",)

CASES = [
    # ---- truncated or corrupted files: the file, the place and the fix, never the reader's reshape/unpack text
    Case("gguf-read-empty-file", _bytes_case(lambda d: b""), r"m\.gguf is not a GGUF file \(0 bytes"),
    Case("gguf-read-magic-only", _bytes_case(lambda d: b"GGUF"),
         r"m\.gguf is truncated or corrupted: it ends inside the format version.*convert the file again"),
    Case("gguf-read-truncated-in-counts", _bytes_case(lambda d: bytes(d[:20])),
         r"truncated or corrupted: it ends inside the metadata count"),
    Case("gguf-read-truncated-in-metadata", _bytes_case(lambda d: bytes(d[:1500])),
         r"truncated or corrupted: it ends inside .*(general|tokenizer|llama|metadata)"),
    Case("gguf-read-truncated-in-tensor-data", _bytes_case(lambda d: bytes(d[:-1000])),
         r"tensor \S+ lies past the end of the file"),
    Case("gguf-read-truncated-by-half", _bytes_case(lambda d: bytes(d[: len(d) // 2])),
         r"truncated or corrupted: .*(past the end|ends inside)"),
    Case("gguf-read-version-1", _bytes_case(_set("<I", 4, 1)),
         r"GGUF format version 1 is not supported .*convert the model again"),
    Case("gguf-read-version-99", _bytes_case(_set("<I", 4, 99)), r"format version 99 is not supported"),
    Case("gguf-read-tensor-count-huge", _bytes_case(_set("<Q", 8, 10**12)),
         r"claims 1,000,000,000,000 tensors .*more than a file of"),
    Case("gguf-read-metadata-count-huge", _bytes_case(_set("<Q", 16, 2**40)), r"metadata entries, more than a file"),
    Case("gguf-read-one-tensor-too-many", _bytes_case(lambda d: _set("<Q", 8, struct.unpack_from("<Q", d, 8)[0] + 1)(d)),
         r"(truncated or )?corrupted"),
    Case("gguf-read-metadata-count-too-high", _bytes_case(lambda d: _set("<Q", 16, struct.unpack_from("<Q", d, 16)[0]
                                                                          + 3)(d)), r"(truncated or )?corrupted"),
    Case("gguf-read-tensor-offset-past-end", _bytes_case(_tensor_field("output_norm.weight", "offset", 10**9)),
         r"tensor output_norm\.weight lies past the end of the file"),
    Case("gguf-read-tensor-shape-huge", _bytes_case(_tensor_field("token_embd.weight", "dim0", 10**9)),
         r"tensor token_embd\.weight lies past the end"),
    Case("gguf-read-tensor-nine-dims", _bytes_case(_tensor_field("blk.0.attn_q.weight", "n_dims", 9)),
         r"tensor blk\.0\.attn_q\.weight claims 9 dimensions"),
    Case("gguf-read-tensor-type-unknown", _bytes_case(_tensor_field("blk.1.ffn_up.weight", "type", 200)),
         r"blk\.1\.ffn_up\.weight has type id 200.*upgrade gguf"),
    Case("gguf-read-tensor-type-k-quant-misfit", _bytes_case(_tensor_field("blk.0.attn_q.weight", "type", 12)),
         r"blk\.0\.attn_q\.weight has rows of 32 values, which its type \(id 12\) packs in blocks of 256"),
    Case("gguf-read-key-length-huge", _bytes_case(_first_kv("name_len", 2**50)),
         r"truncated or corrupted: it ends inside the name of metadata entry 0"),
    Case("gguf-read-value-type-unknown", _bytes_case(_first_kv("vtype", 77)), r"has value type 77, which GGUF does not"),
    # ---- keys: present, and of the right kind
    Case("gguf-read-no-architecture", _gguf_case(omit={"general.architecture"}),
         r"lacks the metadata key general\.architecture"),
    Case("gguf-read-architecture-number", _gguf_case(override={"general.architecture": _u32(5)}),
         r"general\.architecture is 5, not a name"),
    Case("gguf-read-architecture-bert", _gguf_case(override={"general.architecture": _typed("bert", "STRING")}),
         r"holds a 'bert' model; loraprune loads GGUF files of llama, mistral, qwen2, qwen3"),
    Case("gguf-read-per-layer-deci-file", lambda p: load_gguf(Path(__file__).parent / "fixtures" / "per_layer.gguf"),
         r"holds a 'deci' model .*loraprune\.load_pruned"),
    Case("gguf-read-no-block-count", _gguf_case(omit={"llama.block_count"}),
         r"lacks the metadata key llama\.block_count, which a llama model needs"),
    Case("gguf-read-no-embedding-length", _gguf_case(omit={"llama.embedding_length"}),
         r"lacks the metadata key llama\.embedding_length"),
    Case("gguf-read-no-head-count", _gguf_case(omit={"llama.attention.head_count"}),
         r"lacks the metadata key llama\.attention\.head_count"),
    Case("gguf-read-no-feed-forward-length", _gguf_case(omit={"llama.feed_forward_length"}),
         r"lacks the metadata key llama\.feed_forward_length"),
    Case("gguf-read-block-count-string", _gguf_case(override={"llama.block_count": _typed("2", "STRING")}),
         r"llama\.block_count is '2', not a count"),
    Case("gguf-read-head-count-float", _gguf_case(override={"llama.attention.head_count": _typed(4.0, "FLOAT32")}),
         r"llama\.attention\.head_count is 4\.0, not a count"),
    Case("gguf-read-block-count-zero", _gguf_case(override={"llama.block_count": _u32(0)}), r"not a usable model"),
    Case("gguf-read-block-count-huge", _gguf_case(override={"llama.block_count": _u32(10**9)}),
         r"block_count says 1,000,000,000 layers, the file holds tensors of 2"),
    Case("gguf-read-block-count-one-more", _gguf_case(override={"llama.block_count": _u32(3)}),
         r"block_count says 3 layers, the file holds tensors of 2"),
    Case("gguf-read-block-count-one-less", _gguf_case(override={"llama.block_count": _u32(1)}),
         r"tensor blk\.1\..* belongs to no layer \(llama\.block_count is 1\)"),
    Case("gguf-read-embedding-length-wrong", _gguf_case(override={"llama.embedding_length": _u32(48)}),
         r"has shape \[32, .*embedding_length"),
    Case("gguf-read-feed-forward-length-wrong", _gguf_case(override={"llama.feed_forward_length": _u32(40)}),
         r"blk\.0\.ffn_gate\.weight has shape \[32, 48\].*40 rows \(llama\.feed_forward_length\)"),
    # ---- tensors: every one the architecture needs (transformers would make a missing one random)
    Case("gguf-read-missing-ffn-down", _gguf_case(omit={"blk.1.ffn_down.weight"}),
         r"lacks tensor blk\.1\.ffn_down\.weight that a 2-layer llama model needs .*random"),
    Case("gguf-read-missing-attn-q", _gguf_case(omit={"blk.0.attn_q.weight"}), r"lacks tensor blk\.0\.attn_q\.weight"),
    Case("gguf-read-missing-norm", _gguf_case(omit={"blk.0.ffn_norm.weight"}), r"lacks tensor blk\.0\.ffn_norm\.weight"),
    Case("gguf-read-missing-token-embd", _gguf_case(omit={"token_embd.weight"}), r"lacks tensor token_embd\.weight"),
    Case("gguf-read-missing-output-norm", _gguf_case(omit={"output_norm.weight"}), r"lacks tensor output_norm\.weight"),
    Case("gguf-read-missing-last-layer", _gguf_case(omit={"blk.1."}),
         r"block_count says 2 layers, the file holds tensors of 1"),
    Case("gguf-read-missing-first-layer", _gguf_case(omit={"blk.0."}),
         r"lacks tensor blk\.0\.attn_norm\.weight \(and 8 more\)"),
    # ---- the tokenizer, when one is asked for
    Case("gguf-read-no-tokenizer-keys", _gguf_case(omit=TOKENIZER_KEYS),
         r"holds no tokenizer \(no tokenizer\.ggml\.model\); pass tokenizer=False .*--tokenizer DIR"),
    Case("gguf-read-no-token-list", _gguf_case(omit={"tokenizer.ggml.tokens"}),
         r"holds no tokenizer \(no tokenizer\.ggml\.tokens\)"),
    Case("gguf-read-no-merges", _gguf_case(omit={"tokenizer.ggml.merges"}),
         r"gpt2 \(byte-level BPE\) tokenizer has no tokenizer\.ggml\.merges"),
    Case("gguf-read-tokenizer-model-number", _gguf_case(override={"tokenizer.ggml.model": _u32(2)}),
         r"tokenizer\.ggml\.model is 2, not a name"),
    # ---- the vocabulary size: stated, and the embeddings' (else transformers re-initialises them at random)
    Case("gguf-read-no-vocab-size", _gguf_case(omit=TOKENIZER_KEYS, tokenizer=False),
         r"states no vocabulary size \(neither llama\.vocab_size nor tokenizer\.ggml\.tokens\).*at random"),
    Case("gguf-read-vocab-size-disagrees", _gguf_case(extra={"llama.vocab_size": _u32(300)}),
         r"llama\.vocab_size is 300 but tokenizer\.ggml\.tokens holds 260 tokens"),
    Case("gguf-read-vocab-size-not-the-embeddings", _gguf_case(omit=TOKENIZER_KEYS, tokenizer=False,
                                                               extra={"llama.vocab_size": _u32(300)}),
         r"token_embd\.weight has shape \[32, 260\].*300 rows \(the vocabulary size\)"),
    Case("gguf-read-vocab-size-string", _gguf_case(omit=TOKENIZER_KEYS, tokenizer=False,
                                                   extra={"llama.vocab_size": _typed("260", "STRING")}),
         r"llama\.vocab_size is '260', not a count"),
    # ---- dtype: a torch floating-point dtype
    Case("gguf-read-dtype-f16-string", lambda p: load_gguf(p / "m.gguf", dtype="f16"),
         r"dtype='f16' is not a torch dtype \(did you mean torch\.float16\?\)", raises=GGUFError),
    Case("gguf-read-dtype-bf16-string", lambda p: load_gguf(p / "m.gguf", dtype="bf16"),
         r"did you mean torch\.bfloat16", raises=GGUFError),
    Case("gguf-read-dtype-int8", lambda p: load_gguf(p / "m.gguf", dtype=torch.int8),
         r"dtype=torch\.int8 is not a floating-point dtype", raises=GGUFError),
    Case("gguf-read-dtype-number", lambda p: load_gguf(p / "m.gguf", dtype=16), r"dtype=16 is not a torch dtype"),
    Case("gguf-read-dtype-auto", lambda p: load_gguf(p / "m.gguf", dtype="auto"), r"dtype='auto' is not a torch dtype"),
]


# ---------------------------------------------------------------- GGUF export
def _tokenizer_file(tmp_path, data: bytes) -> Path:
    path = tmp_path / "tok.gguf"
    path.write_bytes(data)
    return path


def _export_with_tokenizer(make):
    def call(tmp_path):
        model = pruned_model()
        return loraprune.save_gguf(model, tmp_path / "out.gguf", make(tmp_path), dtype="f32")
    return call


def _unpackable(tmp_path):
    """A pruned model none of whose rows Q8_0 can pack (rows of 24, 12 and 20 values; Q8_0 packs 32)."""
    from loraprune.structure.masks import Masks
    from tiny import tiny_model

    model = tiny_model(hidden_size=24, head_dim=6, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2)
    small = loraprune.compact(model, Masks([torch.tensor([True, False])] * 2, [torch.arange(40) < 20] * 2))
    from gguf_export_cases import gpt2_tokenizer

    tok = gpt2_tokenizer(vocab_size=97)
    return loraprune.save_gguf(small, tmp_path / "out.gguf", tok, dtype="q8_0")


def _qwen3_biased(tmp_path):
    from gguf_export_cases import gpt2_tokenizer, uniform

    tok = gpt2_tokenizer()
    return loraprune.save_gguf(uniform("qwen3", len(tok), attention_bias=True), tmp_path / "o.gguf", tok)


def _no_merge_output(tmp_path) -> Path:
    from tiny import random_batches, tiny_model

    model = loraprune.prune(tiny_model(), random_batches(n=1), ratio=0.3, steps=1, merge=False, progress=False)
    loraprune.export_adapter(model, tmp_path / "run")
    return tmp_path / "run"


def _gpt2_folder(tmp_path) -> Path:
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    model.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


CASES += [
    Case("gguf-export-tokenizer-not-gguf", _export_with_tokenizer(lambda p: _tokenizer_file(p, b"\0" * 64)),
         r"tok\.gguf is not a GGUF file"),
    Case("gguf-export-tokenizer-empty", _export_with_tokenizer(lambda p: _tokenizer_file(p, b"")),
         r"tok\.gguf is not a GGUF file \(0 bytes"),
    Case("gguf-export-tokenizer-truncated", _export_with_tokenizer(lambda p: _tokenizer_file(p, _good_bytes()[:400])),
         r"tok\.gguf is truncated or corrupted"),
    Case("gguf-export-tokenizer-version-99", _export_with_tokenizer(
        lambda p: _tokenizer_file(p, _set("<I", 4, 99)(bytearray(_good_bytes())))), r"format version 99"),
    Case("gguf-export-tokenizer-without-tokens", _export_with_tokenizer(
        lambda p: _write(p / "tok.gguf", omit=TOKENIZER_KEYS)),
         r"tok\.gguf holds no tokenizer .*pass the model's Hugging Face tokenizer"),
    Case("gguf-export-q8-0-nothing-packs", _unpackable,
         r"dtype='q8_0': no weight of this model can be packed as Q8_0 .*export dtype='f16'"),
    Case("gguf-export-qwen3-bias", _qwen3_biased, r"layer 0: q_proj has a non-zero bias, which llama\.cpp's qwen3 graph"),
    Case("gguf-export-cli-from-no-merge", lambda p: run_cli(["export", "--from", str(_no_merge_output(p)),
                                                             str(p / "o.gguf")]),
         r"base/ and adapter/, --no-merge\): pass .*run/base"),
    Case("gguf-export-load-no-merge-root", lambda p: load_pruned(_no_merge_output(p)), r"pass .*run/base"),
    Case("gguf-export-cli-unsupported-unpruned", lambda p: run_cli(["export", "--from", str(_gpt2_folder(p)),
                                                                    str(p / "o.gguf")]),
         r"a 'gpt2' model, which loraprune cannot prune .*convert it as it is with llama\.cpp's convert_hf_to_gguf"),
    Case("gguf-export-cli-tokenizer-not-gguf", lambda p: run_cli(
        ["export", "--from", str(saved(p)), str(p / "o.gguf"), "--tokenizer", str(_tokenizer_file(p, b"GGML" * 9))]),
         r"tok\.gguf is not a GGUF file"),
]


# ---------------------------------------------------------------- config.json fields
def _load_cfg(edit, reader=load_pruned):
    def call(tmp_path):
        d = saved(tmp_path)
        _edit_json(d / "config.json", edit)
        return reader(d)
    return call


def _set_cfg(**fields):
    return lambda c: c.update(fields)


def _set_block(**fields):
    return lambda c: c["loraprune"].update(fields)


CFG = r"config\.json: "
CASES += [
    Case("cfg-read-layers-string", _load_cfg(_set_cfg(num_hidden_layers="2")),
         CFG + r"num_hidden_layers is '2' \(str\), not a whole number >= 1; .*save the model again"),
    Case("cfg-read-layers-float", _load_cfg(_set_cfg(num_hidden_layers=2.0)), r"num_hidden_layers is 2\.0 \(float\)"),
    Case("cfg-read-layers-bool", _load_cfg(_set_cfg(num_hidden_layers=True)), r"num_hidden_layers is True \(bool\)"),
    Case("cfg-read-layers-negative", _load_cfg(_set_cfg(num_hidden_layers=-1)), r"num_hidden_layers is -1"),
    Case("cfg-read-layers-null", _load_cfg(_set_cfg(num_hidden_layers=None)), r"num_hidden_layers is None"),
    Case("cfg-read-layers-billion", _load_cfg(_set_cfg(num_hidden_layers=10**9)),
         r"config\.json says 1000000000 layers, the weights hold 2"),
    Case("cfg-inspect-layers-billion", _load_cfg(_set_cfg(num_hidden_layers=10**9), inspect_dir),
         r"says 1000000000 layers, the weights hold 2"),
    Case("cfg-inspect-layers-string", _load_cfg(_set_cfg(num_hidden_layers="2"), inspect_dir),
         r"num_hidden_layers is '2'"),
    Case("cfg-read-hidden-size-string", _load_cfg(_set_cfg(hidden_size="32")), r"hidden_size is '32' \(str\)"),
    Case("cfg-read-heads-zero", _load_cfg(_set_cfg(num_attention_heads=0)), r"num_attention_heads is 0 \(int\)"),
    Case("cfg-read-kv-heads-list", _load_cfg(_set_cfg(num_key_value_heads=[1, 1])),
         r"num_key_value_heads is \[1, 1\] \(list\)"),
    Case("cfg-read-head-dim-string", _load_cfg(_set_cfg(head_dim="8")), r"head_dim is '8' \(str\)"),
    Case("cfg-read-intermediate-dict", _load_cfg(_set_cfg(intermediate_size={"0": 30})), r"intermediate_size is \{"),
    Case("cfg-read-model-type-number", _load_cfg(_set_cfg(model_type=7)), r"model_type is 7 \(int\), not a model type"),
    Case("cfg-read-tie-string", _load_cfg(_set_cfg(tie_word_embeddings="no")), r"tie_word_embeddings is 'no'.*true or"),
    Case("cfg-read-block-string", _load_cfg(_set_cfg(loraprune="pruned")),
         r"the loraprune block is 'pruned' \(str\), not a JSON object"),
    Case("cfg-read-block-list", _load_cfg(_set_cfg(loraprune=[{"uniform": False}])),
         r"the loraprune block is \[.*\(list\), not a JSON object"),
    Case("cfg-inspect-block-number", _load_cfg(_set_cfg(loraprune=1), inspect_dir), r"the loraprune block is 1 \(int\)"),
    Case("cfg-read-block-layers-string", _load_cfg(_set_block(layers="30,40")),
         r"loraprune\.layers is '30,40' \(str\), not a list"),
    Case("cfg-read-block-layer-entry-list", _load_cfg(lambda c: c["loraprune"]["layers"].__setitem__(0, [1, 30])),
         r"loraprune\.layers\[0\] is \[1, 30\] \(list\), not an object of widths"),
    Case("cfg-read-block-width-string", _load_cfg(
        lambda c: c["loraprune"]["layers"][1].update(intermediate_size="40")),
         r"loraprune\.layers\[1\]\.intermediate_size is '40' \(str\)"),
    Case("cfg-read-block-uniform-string", _load_cfg(_set_block(uniform="false")),
         r"loraprune\.uniform is 'false' \(str\), not true or false"),
    Case("cfg-read-block-removed-string", _load_cfg(_set_block(removed_params="100")),
         r"loraprune\.removed_params is '100' \(str\)"),
    Case("cfg-read-block-ratio-above-one", _load_cfg(_set_block(achieved_ratio=7)),
         r"loraprune\.achieved_ratio is 7 \(int\), not a fraction"),
    Case("cfg-read-block-original-list", _load_cfg(_set_block(original=[2, 48])),
         r"loraprune\.original is \[2, 48\] \(list\), not a JSON object"),
]


# ---------------------------------------------------------------- the weight files: shards, tensors
def _shard(d: Path, keep_index: bool = True) -> None:
    """Split model.safetensors into two shards with an index, as save_pretrained(max_shard_size=...) does."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves, 1):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in half}, d / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in half})
    (d / "model.safetensors").unlink()
    if keep_index:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _drop_tensors(*names, file="model.safetensors"):
    def tamper(d: Path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / file)
        for n in names:
            del tensors[n]
        save_file(tensors, d / file, metadata={"format": "pt"})
    return tamper


def _add_tensor(name):
    def tamper(d: Path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / "model.safetensors")
        tensors[name] = torch.zeros(2)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return tamper


def _folder_case(*tampers, reader=load_pruned):
    def call(tmp_path):
        d = saved(tmp_path)
        for t in tampers:
            t(d)
        return reader(d)
    return call


def _edit_index(edit):
    def tamper(d: Path):
        index = d / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        edit(data)
        index.write_text(json.dumps(data))
    return tamper


def _move_one_tensor(data):
    name = next(n for n, f in data["weight_map"].items() if f.startswith("model-00002"))
    data["weight_map"][name] = "model-00001-of-00002.safetensors"


def _header_shape(d: Path):
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", raw, 0)[0]
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"] = ["32"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _untie(d: Path):
    from safetensors.torch import load_file

    tensors = load_file(d / "model.safetensors")
    assert "lm_head.weight" in tensors  # the tiny model is untied: its lm_head is a tensor of its own


_L0 = "model.layers.0."
CASES += [
    Case("files-read-missing-shard", _folder_case(_shard, lambda d: (d / "model-00002-of-00002.safetensors").unlink()),
         r"model\.safetensors\.index\.json names the shard model-00002-of-00002\.safetensors, which is missing "
         r"\(1 of 2 shards present\); copy the whole model folder again"),
    Case("files-inspect-missing-first-shard", _folder_case(
        _shard, lambda d: (d / "model-00001-of-00002.safetensors").unlink(), reader=inspect_dir),
         r"names the shard model-00001-of-00002\.safetensors, which is missing"),
    Case("files-read-index-not-json", _folder_case(_shard, lambda d: (d / "model.safetensors.index.json").write_text("{")),
         r"model\.safetensors\.index\.json is corrupted \(not valid JSON"),
    Case("files-read-index-no-weight-map", _folder_case(_shard, _edit_index(lambda x: x.pop("weight_map"))),
         r"index\.json is corrupted \(no weight_map"),
    Case("files-read-index-names-outside", _folder_case(_shard, _edit_index(
        lambda x: x["weight_map"].update({"model.norm.weight": "../model-00001-of-00002.safetensors"}))),
         r"names the shard '\.\./model-00001-of-00002\.safetensors', not a \.safetensors file in the folder"),
    Case("files-read-index-tensor-not-in-shard", _folder_case(_shard, _edit_index(_move_one_tensor)),
         r"places the tensor .* in model-00001-of-00002\.safetensors, which does not hold it"),
    Case("files-read-shard-without-index-missing", _folder_case(
        lambda d: _shard(d, keep_index=False), lambda d: (d / "model-00002-of-00002.safetensors").unlink()),
         r"the shard model-00002-of-00002\.safetensors is missing \(and there is no model\.safetensors\.index\.json\)"),
    Case("files-read-missing-down-proj", _folder_case(_drop_tensors(_L0 + "mlp.down_proj.weight")),
         r"the weights lack the tensor model\.layers\.0\.mlp\.down_proj\.weight, which the model needs: a shard or "
         r"tensor is missing"),
    Case("files-inspect-missing-q-proj", _folder_case(_drop_tensors(_L0 + "self_attn.q_proj.weight"),
                                                      reader=inspect_dir),
         r"lack the tensor model\.layers\.0\.self_attn\.q_proj\.weight"),
    Case("files-read-missing-norm", _folder_case(_drop_tensors(_L0 + "post_attention_layernorm.weight")),
         r"lack the tensor model\.layers\.0\.post_attention_layernorm\.weight"),
    Case("files-read-missing-embedding", _folder_case(_drop_tensors("model.embed_tokens.weight")),
         r"lack the tensor model\.embed_tokens\.weight"),
    Case("files-read-missing-lm-head", _folder_case(_untie, _drop_tensors("lm_head.weight")),
         r"lack the tensor lm_head\.weight"),
    Case("files-read-missing-whole-first-layer", _folder_case(_drop_tensors(
        *[_L0 + n for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                            "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")])),
         r"the weights hold no tensor of layer 0 \(they hold layers up to 1\)"),
    Case("files-read-only-foreign-safetensors", _folder_case(
        lambda d: (d / "model.safetensors").rename(d / "adapter.safetensors")),
         r"holds no \.safetensors weights \(adapter\.safetensors is not the model's"),
    Case("files-read-tensor-of-no-layer", _folder_case(_add_tensor("model.layers.x.extra")),
         r"the tensor model\.layers\.x\.extra belongs to no decoder layer"),
    Case("files-read-header-shape-not-numbers", _folder_case(_header_shape),
         r"not a readable safetensors file \(tensor model\.norm\.weight has shape \['32'\]"),
    # ---- the dtype a folder is loaded in
    Case("dtype-load-int8", lambda p: load_pruned(saved(p), dtype=torch.int8),
         r"dtype=torch\.int8 is not a floating-point dtype: loraprune loads model weights as floats"),
    Case("dtype-load-bool", lambda p: load_pruned(saved(p), dtype=torch.bool), r"torch\.bool is not a floating-point"),
    Case("dtype-load-int64-name", lambda p: load_pruned(saved(p), dtype="int64"), r"dtype='int64' is not a floating"),
    Case("dtype-load-f16-short-name", lambda p: load_pruned(saved(p), dtype="f16"),
         r"dtype='f16' is not a torch dtype \(did you mean torch\.float16\?\)"),
    Case("dtype-load-dunder-name", lambda p: load_pruned(saved(p), dtype="__name__"), r"is not a torch dtype"),
]
