"""Pruned models as GGUF files for llama.cpp: :func:`save_gguf`.

What is proven to run them: llama.cpp and the tools built on it (llama-cli, llama-server,
llama-cpp-python) run both kinds below. ollama is reported (its issues #9911, #9984) to fail on
per-layer head-count arrays and has not been run here: a uniform model is the choice for it.

llama.cpp reads ``{arch}.attention.head_count``, ``head_count_kv`` and
``feed_forward_length`` either as one number or as one number per layer; its
``deci`` architecture builds every layer from those per-layer counts. So:

* every layer alike, LLaMA, Mistral or Qwen2 -> the stock ``llama``
  architecture (it reads optional biases on all seven projections, so Qwen2,
  and the one-shot output with its compensating biases, are LLaMAs here);
* per-layer widths, LLaMA, Mistral or Qwen2 -> ``deci`` with per-layer uint32
  arrays (llama.cpp's ``qwen2`` graph would want q rows = hidden size);
* Qwen3, every layer alike -> the stock ``qwen3`` architecture (q/k norms);
  a per-layer Qwen3 is refused with the fix, ``uniform=True``: llama.cpp
  refuses per-layer widths in that graph.

What llama.cpp needs to compute the same function, and why it is written:

* ``attention.key_length`` / ``value_length``: without them llama.cpp derives
  the head size from layer 0's head count and refuses a pruned file;
* q/k rows (and biases) in llama.cpp's rotary order for the ``llama``/``deci``
  graphs (adjacent pairs instead of transformers' two halves, per head:
  :func:`rotary_rows`); the ``qwen3`` graph uses transformers' order as is;
* every layer keeps at least one KV group and one MLP channel (compaction
  guarantees it; checked): the ``deci`` graph drops the attention output of a
  layer written with ``feed_forward_length = 0``;
* RoPE frequency rescaling (Llama-3, linear) as the ``rope_freqs`` tensor,
  computed from the model's own rotary embedding, so any scaling that only
  rescales frequencies is reproduced exactly; others are refused;
* the vocabulary padded to the embedding's rows with unused tokens.

The tokenizer comes from the source GGUF file when given one
(``tokenizer="model.gguf"``, or automatically for a model loaded with
:func:`loraprune.load_gguf`): its ``tokenizer.*`` keys are copied as they
are. Otherwise it is converted from the Hugging Face tokenizer
(:mod:`loraprune.export.gguf_vocab`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import GGUFExportError
from ..structure.archs import arch_for, decoder_layers, get_submodule, layer_projections
from ..structure.groups import build_layer_groups
from .gguf_read import _require_gguf_package

log = logging.getLogger(__name__)

#: ``dtype`` names -> (tensor type of 2-D weights, file type); 1-D tensors are always f32, as in llama.cpp.
DTYPES = ("f32", "f16", "bf16", "q8_0")
#: transformers' rope types that only rescale the rotary frequencies (reproduced by ``rope_freqs``).
FREQ_ONLY_ROPE = ("default", "llama3", "linear")
SOURCE_ATTR = "loraprune_gguf_source"  # set by load_gguf: the file the model (and its tokenizer) came from
# transformers' projection names -> llama.cpp's tensor names
#: the projections whose biases llama.cpp's ``llama`` and ``deci`` graphs add (all seven; measured: logits
#: within 4e-7 of transformers with a non-zero bias on each in turn); its ``qwen3`` graph reads none.
BIASED_GRAPHS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TENSOR_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@dataclass
class LayerPlan:
    """What one decoder layer becomes in the file."""

    n_head: int
    n_head_kv: int
    n_ff: int


@dataclass
class ExportPlan:
    """Everything decided (and checked) before the file is opened."""

    arch: str
    permute: bool  # q/k rows into llama.cpp's rotary order
    head_dim: int
    layers: list[LayerPlan]
    n_vocab: int
    tied: bool
    rope_factors: np.ndarray | None
    rope_theta: float
    context_length: int
    notes: list[str] = field(default_factory=list)

    @property
    def uniform(self) -> bool:
        return len({(p.n_head, p.n_head_kv, p.n_ff) for p in self.layers}) == 1


# ------------------------------------------------------------------ checks and plan
def _check_dtype(dtype: str) -> str:
    name = str(dtype).lower()
    if name not in DTYPES:
        raise GGUFExportError(f"dtype={dtype!r} is not a GGUF export type; choose one of {', '.join(DTYPES)} "
                              "(4-bit and k-quants: quantize the f16 file with llama.cpp's llama-quantize)")
    return name


def check_gguf_path(path, overwrite: bool = False) -> Path:
    """Refuse, before anything is converted or loaded, a GGUF output path that cannot be written.

    The name must end in ``.gguf``; an existing file needs ``overwrite``; the
    folder that will hold it is checked as every output directory is
    (:func:`loraprune.utils.paths.check_output_dir`: not a file, writable).
    """
    import os

    from ..errors import OutputExistsError
    from ..utils.atomic import check_overwrite
    from ..utils.paths import as_path, check_output_dir

    path = as_path(path, "the GGUF path")
    check_overwrite(overwrite)
    if path.suffix.lower() != ".gguf":
        raise GGUFExportError(f"{path} does not end in .gguf; name the output file like model.gguf")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory; pass the path of a .gguf file to write")
    if os.path.lexists(path) and not overwrite:  # a symlink, even a dangling one, is an existing file
        raise OutputExistsError(f"{path} exists; choose another file name or pass overwrite=True (--overwrite)")
    if overwrite and path.is_symlink() and not path.exists():
        raise OutputExistsError(f"{path} is a symlink to {os.path.realpath(path)}, which does not exist; remove the "
                                "link or write to that path directly")
    check_output_dir(path.parent, "the GGUF file's folder")
    return path


def _rope(model: nn.Module, head_dim: int) -> tuple[float, np.ndarray | None]:
    """``(theta, frequency factors or None)``, read from the model's own rotary embedding."""
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if theta is None:
        raise GGUFExportError("the config has no rope_theta; cannot write the RoPE base frequency")
    if rope_type not in FREQ_ONLY_ROPE:
        raise GGUFExportError(f"rope_type={rope_type!r} has no exact llama.cpp equivalent in this export (supported: "
                              f"{', '.join(FREQ_ONLY_ROPE)}); run the model in transformers (loraprune.load_pruned)")
    if rope_type == "default":
        return float(theta), None
    rotary = get_submodule(model, "model.rotary_emb")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise GGUFExportError(f"rope_type={rope_type!r} scales attention, which this export cannot write")
    inv_freq = rotary.inv_freq.detach().double().cpu()
    default = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if inv_freq.shape != default.shape:
        raise GGUFExportError(f"the rotary embedding covers {2 * inv_freq.numel()} of {head_dim} head dimensions; "
                              "partial rotary embeddings are not supported by this export")
    return float(theta), (default / inv_freq).float().numpy()


def _layer_plans(model: nn.Module, spec) -> list[LayerPlan]:
    plans = []
    for lg in build_layer_groups(model, spec):
        if lg.n_kv == 0 or lg.n_channels == 0:
            raise GGUFExportError(f"layer {lg.layer} has {lg.n_kv} KV groups and {lg.n_channels} MLP channels; "
                                  "llama.cpp's graphs need both in every layer (loraprune's compaction keeps both)")
        plans.append(LayerPlan(lg.n_kv * lg.q_per_kv, lg.n_kv, lg.n_channels))
    return plans


def _bias(module: nn.Module):
    """The module's bias, or ``None`` when it has none or an exactly zero one (the same function without it)."""
    bias = getattr(module, "bias", None)
    return None if bias is None or not bool(bias.detach().any()) else bias


def _check_biases(model: nn.Module, spec, allowed: tuple[str, ...]) -> None:
    """Refuse a non-zero bias the target graph does not read (zero biases are left out of the file)."""
    for i, layer in enumerate(decoder_layers(model, spec)):
        for name, module in layer_projections(layer, spec).items():
            if _bias(module) is not None and name not in allowed:
                raise GGUFExportError(
                    f"layer {i}: {name} has a non-zero bias, which llama.cpp's {model.config.model_type} graph does "
                    "not read; this model cannot be exported to GGUF, run it in transformers (loraprune.load_pruned)")


def plan_export(model: nn.Module) -> ExportPlan:
    """Decide the architecture and what to write; refuse what llama.cpp would compute differently."""
    spec = arch_for(model)
    config = model.config
    model_type = config.model_type
    layers = _layer_plans(model, spec)
    head_dim = build_layer_groups(model, spec)[0].head_dim
    uniform = len({(p.n_head, p.n_head_kv, p.n_ff) for p in layers}) == 1
    notes = []
    if model_type == "qwen3":
        if not uniform:
            raise GGUFExportError(
                "llama.cpp's qwen3 graph (q/k norms) takes no per-layer widths, and this model has them; prune it "
                "with uniform=True (loraprune.prune(..., uniform=True), or 'loraprune prune --uniform') to export "
                "it, or run it in transformers (loraprune.load_pruned)")
        arch, permute = model_type, False
        _check_biases(model, spec, ())
    else:
        arch, permute = ("llama" if uniform else "deci"), True
        _check_biases(model, spec, BIASED_GRAPHS)
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and int(window) < context:
        # llama.cpp's llama graph has no sliding window: within the window both compute the same function
        notes.append(f"context length {window} (the sliding window; llama.cpp's llama graph has none)")
        context = int(window)
    theta, factors = _rope(model, head_dim)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is None or out.weight is emb or out.weight.data_ptr() == emb.data_ptr()
    return ExportPlan(arch, permute, head_dim, layers, emb.shape[0], tied, factors, theta, context, notes)


# ------------------------------------------------------------------ tensors
def rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from transformers' rotary layout to llama.cpp's, head by head.

    transformers rotates dimension ``i`` with ``i + head_dim/2`` (two halves);
    llama.cpp's ``llama``/``deci`` graphs rotate ``2i`` with ``2i + 1``. Row
    ``i`` of the first half goes to ``2i``, row ``i`` of the second half to ``2i + 1``.
    """
    rows, cols = weight.shape
    d = rows // n_heads
    return weight.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def _encode(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, object]:
    """``(array, raw type or None)`` of one tensor in the file's dtype; 1-D tensors stay f32."""
    import gguf

    arr = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if arr.ndim == 1 or dtype == "f32":
        return arr, None
    if dtype == "f16":
        return arr.astype(np.float16), None
    if dtype == "bf16":
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if arr.shape[-1] % block:  # llama.cpp's converter does the same: rows Q8_0 cannot pack stay f16
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def iter_tensors(model: nn.Module, plan: ExportPlan):
    """``(gguf name, torch tensor)`` for every tensor of the file, in llama.cpp's names and layout."""
    spec = arch_for(model)
    yield "token_embd.weight", model.get_input_embeddings().weight
    if plan.rope_factors is not None:
        yield "rope_freqs.weight", torch.from_numpy(plan.rope_factors)
    for i, (layer, lp) in enumerate(zip(decoder_layers(model, spec), plan.layers)):
        proj = layer_projections(layer, spec)
        attn = get_submodule(layer, spec.attn)
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        for name in spec.attn_projections:
            weight = proj[name].weight
            if plan.permute and name == spec.q:
                weight = rotary_rows(weight, lp.n_head)
            elif plan.permute and name == spec.k:
                weight = rotary_rows(weight, lp.n_head_kv)
            yield f"blk.{i}.{TENSOR_NAMES[name]}.weight", weight
            bias = _bias(proj[name])
            if bias is not None and plan.permute and name in (spec.q, spec.k):
                bias = rotary_rows(bias[:, None], lp.n_head if name == spec.q else lp.n_head_kv)[:, 0]
            if bias is not None:
                yield f"blk.{i}.{TENSOR_NAMES[name]}.bias", bias
        for norm, gguf_name in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            if getattr(attn, norm, None) is not None:
                yield f"blk.{i}.{gguf_name}.weight", getattr(attn, norm).weight
        yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
        for name in spec.mlp_projections:
            yield f"blk.{i}.{TENSOR_NAMES[name]}.weight", proj[name].weight
            if _bias(proj[name]) is not None:
                yield f"blk.{i}.{TENSOR_NAMES[name]}.bias", proj[name].bias
    yield "output_norm.weight", model.model.norm.weight
    if not plan.tied:
        yield "output.weight", model.get_output_embeddings().weight


def _check_q8_0(model: nn.Module, plan: ExportPlan) -> None:
    """Refuse a ``q8_0`` export in which no weight can be packed: the file would be f16 labelled Q8_0."""
    import gguf

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    shapes = {tuple(t.shape) for _, t in iter_tensors(model, plan) if t.dim() == 2}
    if not any(shape[-1] % block == 0 for shape in shapes):
        widths = sorted({shape[-1] for shape in shapes})
        raise GGUFExportError(f"dtype='q8_0': no weight of this model can be packed as Q8_0 (it packs rows in blocks of "
                              f"{block} values, the rows here have {widths} values), so the file would hold f16 "
                              "weights labelled Q8_0; export dtype='f16' (--dtype f16) instead")


# ------------------------------------------------------------------ metadata
def _write_hparams(writer, model: nn.Module, plan: ExportPlan, dtype: str) -> None:
    import gguf

    config = model.config
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    block = getattr(config, "loraprune", None) or {}
    name = getattr(config, "_name_or_path", None) or config.model_type
    writer.add_name(f"{Path(str(name)).name} (pruned by loraprune)")
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(plan.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(plan.layers))
    if plan.uniform:
        first = plan.layers[0]
        writer.add_feed_forward_length(first.n_ff)
        writer.add_head_count(first.n_head)
        writer.add_head_count_kv(first.n_head_kv)
    else:
        writer.add_feed_forward_length([p.n_ff for p in plan.layers])
        writer.add_head_count([p.n_head for p in plan.layers])
        writer.add_head_count_kv([p.n_head_kv for p in plan.layers])
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(plan.rope_theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(plan.n_vocab)
    if block.get("achieved_ratio") is not None:
        writer.add_string("loraprune.achieved_ratio", f"{block['achieved_ratio']:.6f}")


# ------------------------------------------------------------------ entry point
def _source_gguf(model: nn.Module, tokenizer):
    """The GGUF file to copy the tokenizer from, or ``None`` (then ``tokenizer`` is a Hugging Face tokenizer)."""
    from .gguf_read import is_gguf_file

    if isinstance(tokenizer, (str, Path)):
        if not is_gguf_file(tokenizer):
            raise GGUFExportError(f"tokenizer={str(tokenizer)!r}: pass a tokenizer object, or the path of the .gguf "
                                  "file whose tokenizer to copy (load a tokenizer directory with AutoTokenizer)")
        path = Path(tokenizer).expanduser()
        if not path.is_file():
            raise GGUFExportError(f"tokenizer={str(tokenizer)!r} does not exist; pass an existing .gguf file")
        return _checked_source(path)
    if tokenizer is not None:
        return None
    source = getattr(model, SOURCE_ATTR, None)
    if source is not None and Path(source).is_file():
        return _checked_source(Path(source))
    raise GGUFExportError("save_gguf needs the tokenizer to put in the file: pass tokenizer=<the model's Hugging Face "
                          "tokenizer> or tokenizer=<path of the .gguf file the model came from> "
                          "(loraprune export: --tokenizer DIR_OR_GGUF, default the tokenizer saved with the model)")


def _checked_source(path: Path) -> Path:
    """A GGUF file to copy the tokenizer from, its header and tokenizer keys checked (the gguf reader trusts them)."""
    from .gguf_check import check_gguf

    check_gguf(path, model=False, tokenizer=True,
               tokenizer_fix="pass the model's Hugging Face tokenizer instead (tokenizer=AutoTokenizer.from_pretrained"
                             "(dir); loraprune export: --tokenizer DIR)")
    return path


def save_gguf(model: nn.Module, path, tokenizer=None, dtype: str = "f16", *, overwrite: bool = False) -> Path:
    """Write a pruned, merged model as one GGUF file that llama.cpp runs; returns the path.

    Args:
        model: a model pruned by loraprune, LoRA merged (as :func:`loraprune.prune` returns it).
        path: the ``.gguf`` file to write (atomically: a temporary sibling renamed into place).
        tokenizer: the model's Hugging Face tokenizer (byte-level BPE or
            SentencePiece-style LLaMA), or the path of a GGUF file whose
            tokenizer keys are copied; ``None`` uses the GGUF file the model was
            loaded from (:func:`loraprune.load_gguf`).
        dtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the 2-D weights
            (norms stay f32; rows Q8_0 cannot pack stay f16). For k-quants,
            quantize the f16 file with llama.cpp's ``llama-quantize``.
        overwrite: replace an existing file.

    Raises:
        PrunedModelError: the model was not pruned by loraprune, or still holds LoRA layers
            (the same errors as :func:`loraprune.save_pruned`).
        GGUFExportError: llama.cpp could not compute this model exactly (the message names the alternative).
    """
    from .save import require_merged, require_pruned

    dtype = _check_dtype(dtype)
    path = check_gguf_path(path, overwrite)
    require_pruned(model, "save_gguf")
    require_merged(model)
    return _write_gguf(model, path, tokenizer, dtype, overwrite)


def _write_gguf(model: nn.Module, path: Path, tokenizer, dtype: str, overwrite: bool) -> Path:
    """The writer, on a checked path and dtype (each checked once, by the public caller)."""
    from ..utils.atomic import atomic_file

    _require_gguf_package()
    import gguf

    from .gguf_vocab import add_tokenizer, copy_tokenizer

    plan = plan_export(model)
    source = _source_gguf(model, tokenizer)
    if dtype == "q8_0":
        _check_q8_0(model, plan)
    for note in plan.notes:
        log.info("save_gguf: %s", note)
    with torch.no_grad(), atomic_file(path, overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), plan.arch)
        _write_hparams(writer, model, plan, dtype)
        if source is not None:
            copy_tokenizer(writer, source, plan.n_vocab)
        else:
            add_tokenizer(writer, tokenizer, plan.n_vocab)
        for name, tensor in iter_tensors(model, plan):
            arr, raw = _encode(tensor, dtype)
            writer.add_tensor(name, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
