"""The one checked reader of GGUF files: :func:`check_gguf` reads the header and refuses a file that cannot be used.

transformers (and the ``gguf`` package under it) read a GGUF file trustingly: a
truncated or corrupted file ends in a ``reshape`` or ``unpack`` error from deep
inside the reader, and a file that lacks a tensor loads as a model whose
missing weights are **random** (transformers only logs it). Everything a later
reader relies on is checked here first, from the header alone (the tensor data
is not read), and every refusal is a :class:`~loraprune.errors.GGUFError`
naming the file, the field and the fix:

* the magic bytes and the format version (2 or 3, as llama.cpp writes);
* every count, string and array in the header lies within the file (a header
  claiming 10⁹ tensors is refused before anything is allocated);
* every tensor's type is known and its data lies within the file;
* for a model: ``general.architecture`` names one loraprune loads, its
  hyper-parameters are present and are numbers, every tensor the
  architecture needs is present for every layer, no tensor belongs to a layer
  past ``block_count``, and the weights have the widths the header claims;
* for a tokenizer: ``tokenizer.ggml.model`` and ``tokenizer.ggml.tokens``
  (and ``tokenizer.ggml.merges`` for a byte-level BPE ``gpt2`` tokenizer).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GGUFError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
#: GGUF value types -> struct format of a scalar (8 = string, 9 = array are read apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
#: architectures whose GGUF files transformers reads into a model loraprune prunes
LOADABLE = ("llama", "mistral", "qwen2", "qwen3")
#: per-layer tensors every loadable architecture needs (transformers fills a missing one with random values)
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")
EXTRA_LAYER_TENSORS = {"qwen3": ("attn_q_norm", "attn_k_norm")}
HPARAMS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
REDO = "download or convert the file again (llama.cpp's convert_hf_to_gguf.py, or loraprune.save_gguf)"


@dataclass
class ArrayValue:
    """An array in the header: its element type and length (the elements are skipped, not kept)."""

    type: int
    count: int
    values: list | None = None  # kept for short arrays of numbers (per-layer head counts)


@dataclass
class TensorInfo:
    dims: tuple[int, ...]  # GGUF order: dims[0] is the row length (columns)
    type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFInfo:
    """What :func:`check_gguf` read from a file's header."""

    path: Path
    version: int
    size: int
    fields: dict = field(default_factory=dict)  # key -> scalar value, str, or ArrayValue
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def architecture(self):
        return self.fields.get("general.architecture")


class _Cursor:
    """Bounds-checked reads from the file's bytes: a read past the end says what it was reading."""

    def __init__(self, path: Path, data):
        self.path, self.data, self.pos = path, data, 0

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise GGUFError(f"{self.path} is truncated or corrupted: it ends inside {what} (at byte {self.pos:,} of "
                            f"{len(self.data):,}, {n:,} more needed); {REDO}")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return value

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.pos += n

    def string(self, what: str, keep: bool = True):
        n = self.scalar("<Q", f"the length of {what}")
        self._need(n, what)
        raw = bytes(self.data[self.pos:self.pos + n]) if keep else None
        self.pos += n
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path} is corrupted: {what} is not UTF-8 text (at byte {self.pos - n:,}); "
                            f"{REDO}") from None


def _value(cur: _Cursor, vtype: int, key: str):
    what = f"the value of {key}"
    if vtype in SCALARS:
        return cur.scalar(SCALARS[vtype], what)
    if vtype == STRING:
        return cur.string(what)
    if vtype == ARRAY:
        sub = cur.scalar("<I", f"the element type of {key}")
        count = cur.scalar("<Q", f"the length of {key}")
        if sub == STRING:
            for i in range(count):
                if cur.pos >= len(cur.data):
                    cur.skip(8, f"element {i} of {key} ({count:,} claimed)")
                cur.string(f"element {i} of {key}", keep=False)
            return ArrayValue(sub, count)
        if sub not in SCALARS:
            raise GGUFError(f"{cur.path} is corrupted: {key} is an array of value type {sub}, which GGUF does not "
                            f"define (nested arrays included); {REDO}")
        size = struct.calcsize(SCALARS[sub])
        cur._need(size * count, f"{key} ({count:,} elements claimed)")
        values = None
        if count <= 4096:
            values = list(struct.unpack_from(f"<{count}{SCALARS[sub][1]}", cur.data, cur.pos))
        cur.pos += size * count
        return ArrayValue(sub, count, values)
    raise GGUFError(f"{cur.path} is corrupted: {key} has value type {vtype}, which GGUF does not define; {REDO}")


def _quant_sizes() -> dict:
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading a GGUF file needs the gguf package: pip install gguf") from None
    return {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}


def _tensor_bytes(path: Path, name: str, dims, ttype: int, sizes: dict) -> int:
    if ttype not in sizes:
        raise GGUFError(f"{path}: tensor {name} has type id {ttype}, which the installed gguf package does not know "
                        "(a newer llama.cpp type, or a corrupted header); upgrade gguf (pip install -U gguf) or "
                        f"{REDO}")
    block, type_size = sizes[ttype]
    if dims[0] % block:
        raise GGUFError(f"{path} is corrupted: tensor {name} has rows of {dims[0]} values, which its type "
                        f"(id {ttype}) packs in blocks of {block}; {REDO}")
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size


def read_gguf_header(path) -> GGUFInfo:
    """The header of a GGUF file, every count and extent checked against the file's size."""
    path = Path(path).expanduser()
    if not path.exists():
        raise GGUFError(f"{path} does not exist; pass the path of a .gguf file")
    if not path.is_file():
        raise GGUFError(f"{path} is not a file; pass the path of a .gguf file")
    size = path.stat().st_size
    if size < 4:
        raise GGUFError(f"{path} is not a GGUF file ({size} bytes, no GGUF magic bytes); {REDO}")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); pass a .gguf "
                            "file written by llama.cpp or loraprune.save_gguf")
        cur = _Cursor(path, data)
        cur.pos = 4
        version = cur.scalar("<I", "the format version")
        if version not in VERSIONS:
            raise GGUFError(f"{path}: GGUF format version {version} is not supported (versions "
                            f"{', '.join(map(str, VERSIONS))} are); "
                            + ("convert the model again with a current llama.cpp" if version < 2 else
                               "a newer llama.cpp wrote it, or the header is corrupted: " + REDO))
        n_tensors = cur.scalar("<Q", "the tensor count")
        n_kv = cur.scalar("<Q", "the metadata count")
        # each tensor entry takes at least 8+4+8+4+8 bytes, each key/value at least 8+4+1
        if n_tensors * 32 > size or n_kv * 13 > size:
            raise GGUFError(f"{path} is truncated or corrupted: its header claims {n_tensors:,} tensors and {n_kv:,} metadata "
                            f"entries, more than a file of {size:,} bytes can hold; {REDO}")
        info = GGUFInfo(path, version, size)
        for i in range(n_kv):
            key = cur.string(f"the name of metadata entry {i}")
            vtype = cur.scalar("<I", f"the value type of {key}")
            info.fields[key] = _value(cur, vtype, key)
        sizes = _quant_sizes()
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor {i}")
            n_dims = cur.scalar("<I", f"the dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{path} is corrupted: tensor {name} claims {n_dims} dimensions (GGUF allows 1 to "
                                f"{MAX_DIMS}); {REDO}")
            dims = tuple(cur.scalar("<Q", f"the shape of {name}") for _ in range(n_dims))
            ttype = cur.scalar("<I", f"the type of {name}")
            offset = cur.scalar("<Q", f"the data offset of {name}")
            if name in info.tensors:
                raise GGUFError(f"{path} is corrupted: tensor {name} is listed twice; {REDO}")
            info.tensors[name] = TensorInfo(dims, ttype, offset, _tensor_bytes(path, name, dims, ttype, sizes))
        align = info.fields.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{path} is corrupted: general.alignment is {align!r}, not a power of two; {REDO}")
        start = -(-cur.pos // align) * align
    for name, t in info.tensors.items():
        end = start + t.offset + t.nbytes
        if end > size:
            raise GGUFError(f"{path} is truncated or corrupted: tensor {name} lies past the end of the file (its data "
                            f"ends at byte {end:,}, the file has {size:,}); {REDO}")
    return info


def _int_field(info: GGUFInfo, key: str):
    """An integer hyper-parameter (one number, or one per layer); refuses a missing or non-integer one."""
    if key not in info.fields:
        raise GGUFError(f"{info.path} lacks the metadata key {key}, which a {info.architecture} model needs; it is "
                        f"not a complete model file: {REDO}")
    value = info.fields[key]
    if isinstance(value, ArrayValue) and value.type in INTEGER_TYPES and value.values is not None:
        if not value.values or min(value.values) < 0:
            raise GGUFError(f"{info.path}: {key} is {value.values}, not a list of counts; {REDO}")
        return value.values
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    shown = f"an array of type {value.type}" if isinstance(value, ArrayValue) else repr(value)
    raise GGUFError(f"{info.path}: {key} is {shown}, not a count; the header is corrupted: {REDO}")


def _vocab_size(info: GGUFInfo, arch: str) -> int:
    """The vocabulary size the file states: ``{arch}.vocab_size``, else the length of its token list.

    transformers takes it from there; a file stating neither gets a default size (32000 for LLaMA) and
    embeddings re-initialised at random, so it is refused.
    """
    key = f"{arch}.vocab_size"
    tokens = info.fields.get("tokenizer.ggml.tokens")
    counts = {}
    if key in info.fields:
        counts[key] = _int_field(info, key)
    if isinstance(tokens, ArrayValue):
        counts["tokenizer.ggml.tokens"] = tokens.count
    if not counts:
        raise GGUFError(f"{info.path} states no vocabulary size (neither {key} nor tokenizer.ggml.tokens): transformers "
                        "would assume a default size and re-initialise the embeddings at random; write the file with "
                        f"its tokenizer or {key}: {REDO}")
    if len(set(counts.values())) > 1 or isinstance(counts.get(key), list):
        raise GGUFError(f"{info.path}: {key} is {counts.get(key)} but tokenizer.ggml.tokens holds "
                        f"{counts.get('tokenizer.ggml.tokens')} tokens; the header is inconsistent: {REDO}")
    return next(iter(counts.values()))


def _check_model(info: GGUFInfo) -> None:
    arch = info.architecture
    if arch is None:
        raise GGUFError(f"{info.path} lacks the metadata key general.architecture, so it does not say what model it "
                        f"holds; {REDO}")
    if not isinstance(arch, str):
        raise GGUFError(f"{info.path}: general.architecture is {arch!r}, not a name; the header is corrupted: {REDO}")
    if arch not in LOADABLE:
        extra = (" (a per-layer file written by loraprune.save_gguf: load the pruned model folder with "
                 "loraprune.load_pruned instead)" if arch == "deci" else "")
        raise GGUFError(f"{info.path} holds a {arch!r} model{extra}; loraprune loads GGUF files of "
                        f"{', '.join(LOADABLE)} models: pass one of those, or a model directory")
    hp = {k: _int_field(info, f"{arch}.{k}") for k in HPARAMS}
    for key, value in hp.items():
        if isinstance(value, list):
            raise GGUFError(f"{info.path}: {arch}.{key} holds one value per layer, which transformers cannot load "
                            f"into a {arch} model; load the pruned model folder with loraprune.load_pruned instead")
    n_layers, n_embd, n_ff, n_head = (hp[k] for k in HPARAMS)
    if n_layers == 0 or n_embd == 0 or n_head == 0:
        raise GGUFError(f"{info.path}: {arch}.block_count={n_layers}, embedding_length={n_embd}, "
                        f"attention.head_count={n_head}: not a usable model; {REDO}")
    held = {int(n.split(".")[1]) for n in info.tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if n_layers > max(held, default=-1) + 1:  # compared, not enumerated: the header may claim 10**9 layers
        raise GGUFError(f"{info.path}: {arch}.block_count says {n_layers:,} layers, the file holds tensors of "
                        f"{len(held)}; the file is incomplete or its header corrupted: {REDO}")
    n_vocab = _vocab_size(info, arch)
    needed = ["token_embd.weight", "output_norm.weight"]
    per_layer = LAYER_TENSORS + EXTRA_LAYER_TENSORS.get(arch, ())
    needed += [f"blk.{i}.{t}.weight" for i in range(n_layers) for t in per_layer]
    missing = [n for n in needed if n not in info.tensors]
    if missing:
        raise GGUFError(f"{info.path} lacks tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                     else "")
                        + f" that a {n_layers}-layer {arch} model needs (transformers would fill it with random "
                        f"values); the file is incomplete: {REDO}")
    for name in info.tensors:
        if name.startswith("blk."):
            idx = name.split(".")[1]
            if not idx.isdigit() or int(idx) >= n_layers:
                raise GGUFError(f"{info.path}: tensor {name} belongs to no layer ({arch}.block_count is {n_layers}); "
                                f"the header is inconsistent: {REDO}")
    rows_in = {"token_embd", "attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"}
    for name, t in info.tensors.items():
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        if not name.endswith(".weight"):
            continue
        if kind in rows_in | {"attn_output", "ffn_down"} and len(t.dims) != 2:
            raise GGUFError(f"{info.path}: tensor {name} has shape {list(t.dims)}, not a matrix; the file is "
                            f"inconsistent: {REDO}")
        want = None
        if kind in rows_in and t.dims[0] != n_embd:
            want = f"rows of {n_embd} values ({arch}.embedding_length)"
        elif kind in ("attn_output", "ffn_down") and t.dims[1] != n_embd:
            want = f"{n_embd} rows ({arch}.embedding_length)"
        elif kind in ("ffn_gate", "ffn_up") and t.dims[1] != n_ff:
            want = f"{n_ff} rows ({arch}.feed_forward_length)"
        elif kind in ("attn_norm", "ffn_norm", "output_norm") and t.dims != (n_embd,):
            want = f"{n_embd} values ({arch}.embedding_length)"
        elif kind in ("token_embd", "output") and t.dims[1] != n_vocab:
            want = f"{n_vocab} rows (the vocabulary size)"
        if want:
            raise GGUFError(f"{info.path}: tensor {name} has shape {list(t.dims)}, where the header's widths need "
                            f"{want}; the file is inconsistent: {REDO}")


def check_tokenizer_fields(info: GGUFInfo, fix: str) -> None:
    """The tokenizer keys transformers and llama.cpp build a tokenizer from; ``fix`` says what to do without them."""
    model = info.fields.get("tokenizer.ggml.model")
    tokens = info.fields.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        key = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
        raise GGUFError(f"{info.path} holds no tokenizer (no {key}); {fix}")
    if not isinstance(model, str):
        raise GGUFError(f"{info.path}: tokenizer.ggml.model is {model!r}, not a name; the header is corrupted: {fix}")
    if not isinstance(tokens, ArrayValue) or tokens.type != STRING or tokens.count == 0:
        raise GGUFError(f"{info.path}: tokenizer.ggml.tokens is not a list of token strings; the header is "
                        f"corrupted: {fix}")
    if model == "gpt2" and not isinstance(info.fields.get("tokenizer.ggml.merges"), ArrayValue):
        raise GGUFError(f"{info.path}: its gpt2 (byte-level BPE) tokenizer has no tokenizer.ggml.merges; {fix}")


def check_gguf(path, model: bool = True, tokenizer: bool = True,
               tokenizer_fix: str = "pass tokenizer=False and load the tokenizer from its directory "
                                    "(loraprune CLI: --tokenizer DIR)") -> GGUFInfo:
    """Read and check a GGUF file's header: the file itself, then what a model and/or a tokenizer need."""
    info = read_gguf_header(path)
    if tokenizer:
        check_tokenizer_fields(info, tokenizer_fix)
    if model:
        _check_model(info)
    return info
