"""The tokenizer of a GGUF file: copied from a source GGUF, or converted from a Hugging Face tokenizer.

llama.cpp tokenizes with its own implementations, selected by
``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE: token strings in the
byte-to-unicode alphabet, merges, and a pre-tokenizer regex chosen by name in
``tokenizer.ggml.pre``) and ``llama`` (SentencePiece: pieces with ``▁`` for
spaces, scores deciding the merge order, ``<0xNN>`` byte-fallback tokens).

A Hugging Face fast tokenizer maps onto them as follows:

* byte-level BPE (GPT-2, Llama-3, SmolLM, Qwen): tokens and merges as they
  are; the pre-tokenizer is recognised from ``tokenizer.json`` (GPT-2 regex,
  SmolLM's split digits, the Llama-3 and Qwen2 regexes) and anything else is
  refused, since llama.cpp would split the text differently;
* BPE with byte fallback (LLaMA-1/2, Mistral: SentencePiece converted to
  ``tokenizer.json``): pieces as they are, and as score of each merged piece
  minus its merge rank, so llama.cpp's highest-score-first merging applies the
  merges in the same order.

Special tokens become CONTROL (USER_DEFINED for added non-special ones), the
vocabulary is padded to the embedding's rows with UNUSED tokens, and
BOS/EOS/UNK/padding ids, whether BOS/EOS are added, and the chat template go
with it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import TokenizerExportError

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ------------------------------------------------------------------ copy from a GGUF file
def copy_tokenizer(writer, source: Path, n_vocab: int) -> None:
    """Copy every ``tokenizer.*`` key of ``source`` as it is (raw bytes for strings)."""
    import gguf

    try:  # the header was checked (gguf_check.check_gguf); this guards what that check cannot see
        reader = gguf.GGUFReader(str(source))
    except (ValueError, OSError, IndexError) as err:
        raise TokenizerExportError(f"{source} cannot be read as a GGUF file ({type(err).__name__}: {err}); pass the "
                                   "Hugging Face tokenizer instead, or an intact .gguf file") from err
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise TokenizerExportError(f"{source} holds no tokenizer (no tokenizer.ggml.tokens); pass the Hugging Face "
                                   "tokenizer instead")
    if len(tokens.data) != n_vocab:
        raise TokenizerExportError(f"{source} has {len(tokens.data)} tokens, the model's embedding {n_vocab} rows; "
                                   "it is not this model's tokenizer: pass the right one")
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = fld.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = fld.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                values = [bytes(fld.parts[i]) for i in fld.data]
            else:
                values = [fld.parts[i].tolist()[0] for i in fld.data]
            writer.add_key_value(key, values, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(fld.parts[fld.data[0]]), vtype)
        else:
            writer.add_key_value(key, fld.parts[fld.data[0]].tolist()[0], vtype)


# ------------------------------------------------------------------ convert a Hugging Face tokenizer
def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerExportError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; load it with "
            "AutoTokenizer.from_pretrained(dir) (fast by default), or pass tokenizer=<the source .gguf>")
    return json.loads(backend.to_str())


def _components(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else "normalizers" if "normalizers" in node else "decoders"
        return [c for child in node.get(key, []) for c in _components(child)]
    return [node]


def _pre_name(data: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``tokenizer.json``."""
    parts = _components(data.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if data.get("normalizer") not in (None, {}) and _components(data.get("normalizer")):
        kinds.insert(0, "normalizer:" + ",".join(n.get("type", "?") for n in _components(data["normalizer"])))
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True) and not byte_level[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level[0].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if pattern == LLAMA3_REGEX:
            return "llama-bpe"
        if pattern == QWEN2_REGEX:
            return "qwen2"
    raise TokenizerExportError(
        f"the tokenizer's pre-tokenizer ({kinds}) is not one llama.cpp is known to reproduce (GPT-2, SmolLM, "
        "Llama-3, Qwen2); pass tokenizer=<a .gguf file of the same model family>, whose tokenizer is copied as is")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _vocab_list(tokenizer, n_vocab: int) -> list[str]:
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values(), default=-1) >= n_vocab:
        raise TokenizerExportError(f"the tokenizer has {len(vocab)} tokens, the model's embedding only {n_vocab} rows; "
                                   "it is not this model's tokenizer: pass the right one")
    tokens = [None] * n_vocab
    for text, idx in vocab.items():
        tokens[idx] = text
    return tokens


def _special_ids(tokenizer) -> dict[str, int]:
    out = {}
    for kind in ("bos", "eos", "unk", "pad"):
        idx = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(idx, int):
            out[kind] = idx
    return out


def _adds(tokenizer, special: dict[str, int]) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, observed on the tokenizer itself."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (bool(ids) and ids[0] == special.get("bos"), bool(ids) and ids[-1] == special.get("eos"))


def add_tokenizer(writer, tokenizer, n_vocab: int) -> str:
    """Write the tokenizer keys converted from a Hugging Face fast tokenizer; returns llama.cpp's model name."""
    data = _tokenizer_json(tokenizer)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerExportError(
            f"{model.get('type')} tokenizers are not converted by this export (BPE only: byte-level like GPT-2 / "
            "Llama-3, or SentencePiece-style like LLaMA-2); pass tokenizer=<a .gguf with this model's tokenizer>")
    tokens = _vocab_list(tokenizer, n_vocab)
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    special = _special_ids(tokenizer)
    types, scores = [], []
    rank = {m.replace(" ", ""): -float(i) for i, m in reversed(list(enumerate(_merges(model))))}
    sentencepiece = bool(model.get("byte_fallback"))
    for idx, text in enumerate(tokens):
        if text is None:
            tokens[idx] = f"[PAD{idx}]"
            types.append(UNUSED)
        elif sentencepiece and idx == special.get("unk"):
            types.append(UNKNOWN)
        elif idx in added:
            types.append(CONTROL if added[idx].get("special") else USER_DEFINED)
        elif sentencepiece and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        # SentencePiece merges highest score first: a piece's score is minus its merge rank
        scores.append(rank.get(tokens[idx], -1e9 if len(tokens[idx]) > 1 else 0.0))
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        prepend = any(n.get("type") == "Prepend" for n in _components(data.get("normalizer"))) or any(
            p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
            for p in _components(data.get("pre_tokenizer")))
        writer.add_add_space_prefix(prepend)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(data))
        writer.add_token_merges(_merges(model))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for kind, idx in special.items():
        getattr(writer, f"add_{kind}_token_id")(idx)
    add_bos, add_eos = _adds(tokenizer, special)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return "llama" if sentencepiece else "gpt2"

