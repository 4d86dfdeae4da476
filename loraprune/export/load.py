"""Reading saved models: :func:`load_pruned`, :func:`inspect_dir` (headers only) and their checks.

A directory written by :func:`loraprune.save_pruned` (or ``save_pretrained``
of a pruned model) is checked against its own ``config.loraprune`` block
before any weight is loaded: the widths the config claims, the tensor shapes
in the safetensors headers and the parameter totals must agree.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LoRAPruneError, PrunedModelError
from ..structure.masks import Masks
from ..utils.atomic import recover_interrupted_swap
from ..utils.paths import as_path
from .dtypes import check_load_dtype
from .model_files import check_config_fields, check_index_tensors, check_required_tensors, weight_files
from .modeling_loraprune import PER_LAYER_CLASSES
from .save import MASKS_FILE


# ---------------------------------------------------------------- reading directories
def _model_dir(path) -> Path:
    path = as_path(path, "path")
    recover_interrupted_swap(path)
    if not path.exists():
        raise PrunedModelError(f"{path} does not exist; pass the directory a model was saved to")
    if not path.is_dir():
        hint = " (a GGUF file: load it with loraprune.load_gguf)" if str(path).endswith(".gguf") else ""
        raise PrunedModelError(f"{path} is a file, not a directory{hint}; pass the directory holding config.json "
                               "and the *.safetensors weights")
    return path


def read_config(path) -> dict:
    path = _model_dir(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        if (path / "base" / "config.json").is_file() and (path / "adapter").is_dir():
            raise PrunedModelError(f"{path} holds a pruned model saved with its LoRA apart (base/ and adapter/, "
                                   f"--no-merge): pass {path / 'base'} (the pruned model, without its LoRA), or merge the LoRA "
                                   "in first: PeftModel.from_pretrained(load_pruned(base), adapter).merge_and_unload()")
        raise PrunedModelError(f"{path} has no config.json; expected a directory written by save_pretrained")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrunedModelError(f"{cfg} is corrupted (not valid JSON: {err}); save the model again") from err
    if not isinstance(data, dict):
        raise PrunedModelError(f"{cfg} is corrupted (not a JSON object); save the model again")
    check_config_fields(cfg, data)
    return data


def read_safetensors_header(path) -> dict:
    """Tensor names -> ``{dtype, shape, data_offsets}`` from a safetensors header (the weights are not read).

    Checks that the file is as long as its header says, so a truncated copy is
    caught here rather than as a crash in the middle of loading.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(size, 100_000_000):
                raise ValueError("the header length is implausible")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for name, meta in header.items():
            shape, offsets = meta.get("shape"), meta.get("data_offsets")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(o, int) and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
                raise ValueError(f"tensor {name} has shape {shape!r} and data_offsets {offsets!r}")
        end = max((int(meta["data_offsets"][1]) for meta in header.values()), default=0)
    except Exception as err:
        raise PrunedModelError(f"{path} is not a readable safetensors file ({err}); save the model again") from err
    if 8 + n + end > size:
        raise PrunedModelError(f"{path} is truncated ({size:,} bytes, its header promises {8 + n + end:,}); "
                               "copy or save the model again")
    return header


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _layer_widths_from_headers(tensors: dict, spec, head_dim: int) -> tuple[dict[int, dict], int]:
    """Per-layer ``{params, num_attention_heads, num_key_value_heads, intermediate_size}`` and the other params."""
    prefix = spec.layers + "."
    layers: dict[int, dict] = {}
    other = 0
    row_fields = {f"{spec.attn}.{spec.q}.weight": ("num_attention_heads", head_dim),
                  f"{spec.attn}.{spec.k}.weight": ("num_key_value_heads", head_dim),
                  f"{spec.mlp}.{spec.gate}.weight": ("intermediate_size", 1)}
    for name, meta in tensors.items():
        numel = _numel(meta["shape"])
        if not name.startswith(prefix):
            other += numel
            continue
        idx_text, _, rest = name[len(prefix):].partition(".")
        if not idx_text.isdigit():
            raise PrunedModelError(f"the tensor {name} belongs to no decoder layer ({idx_text!r} is not a layer "
                                   "number); the weights are corrupted or from another tool: save the model again")
        entry = layers.setdefault(int(idx_text), {"params": 0})
        entry["params"] += numel
        if rest in row_fields:
            key, unit = row_fields[rest]
            entry[key] = meta["shape"][0] // unit
    return layers, other


STOCK_WIDTHS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _check_widths(path: Path, config: dict, block: dict, layers: dict[int, dict]) -> None:
    """The widths config.json describes must be the widths the weights have."""
    n_layers = config.get("num_hidden_layers")  # compared, never allocated: config.json may claim 10**9
    if n_layers is not None and (len(layers) != n_layers or sorted(layers) != list(range(len(layers)))):
        raise PrunedModelError(f"{path}: config.json says {n_layers} layers, the weights hold {len(layers)}; "
                               "the directory is mixed up, save the model again")
    if block.get("layers"):
        if len(block["layers"]) != len(layers):
            raise PrunedModelError(f"{path}: config.json's loraprune block lists {len(block['layers'])} layers, the "
                                   f"weights hold {len(layers)}; the directory is mixed up, save the model again")
        for idx, widths in enumerate(block["layers"]):
            got = {k: layers[idx].get(k) for k in widths}
            if got != widths:
                raise PrunedModelError(f"{path}: layer {idx} weights have widths {got}, config.json says {widths}; "
                                       "the directory is mixed up, save the model again")
    if block.get("uniform", True):
        stock = {k: config.get(k) for k in STOCK_WIDTHS}
        stock["num_key_value_heads"] = stock["num_key_value_heads"] or stock["num_attention_heads"]
        for idx in sorted(layers):
            got = {k: layers[idx].get(k) for k in STOCK_WIDTHS}
            if got != stock:
                origin = ("" if block else " and it was not saved by loraprune (no loraprune block in config.json): "
                          "another tool's pruned model? Load it with the tool that wrote it")
                raise PrunedModelError(f"{path}: layer {idx} weights have widths {got}, config.json says {stock}"
                                       f"{origin or '; the directory is mixed up, save the model again'}")


def _check_totals(path: Path, block: dict, tensors: dict, spec) -> None:
    """The parameter counts of the ``loraprune`` block must be those of the weights.

    ``inspect`` reports widths and parameter counts read from the safetensors
    headers, and the pruned share from the block; a block whose counts the
    weights contradict (edited by hand, or copied from another model) is refused
    rather than reported as truth."""
    total, removed = block.get("projection_params"), block.get("removed_params")
    if not (isinstance(total, int) and isinstance(removed, int)):
        return
    modules = {f"{spec.attn}.{n}" for n in spec.attn_projections} | {f"{spec.mlp}.{n}" for n in spec.mlp_projections}
    prefix = spec.layers + "."
    kept = sum(_numel(meta["shape"]) for name, meta in tensors.items()
               if name.startswith(prefix) and name[len(prefix):].partition(".")[2].rpartition(".")[0] in modules)
    with_biases = block.get("achieved_ratio_with_biases")  # one-shot bias compensation adds zero-cost biases
    expected = round(total * (1 - with_biases)) if isinstance(with_biases, float) else total - removed
    if abs(kept - expected) > 1:
        raise PrunedModelError(
            f"{path}/config.json: its loraprune block says {expected:,} decoder-projection parameters remain "
            f"({removed:,} of {total:,} removed), the weights hold {kept:,}; the block was edited or belongs to "
            "another model. Save the pruned model again (or remove the loraprune block to inspect the weights alone)")


def inspect_dir(path) -> dict:
    """Per-layer widths and parameter counts of a saved model, from config.json and the safetensors headers.

    No weights are read. Refuses (:class:`PrunedModelError`) a directory whose
    config.json contradicts its weights: ``from_pretrained`` would only warn
    and fill the gap with random weights.
    """
    from ..structure.archs import ARCHS

    config = read_config(path)
    path = Path(path).expanduser()
    files, weight_map = weight_files(path)  # the model's own files: an extra *.safetensors is not counted
    headers = {f.name: read_safetensors_header(f) for f in files}
    if weight_map is not None:
        check_index_tensors(path, weight_map, headers)
    tensors = {}
    for header in headers.values():
        tensors.update(header)
    spec = ARCHS.get(config.get("model_type"))
    if spec is None:
        raise PrunedModelError(f"model_type={config.get('model_type')!r} has no loraprune layout; "
                               f"supported: {', '.join(sorted(ARCHS))}")
    try:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    except (KeyError, TypeError, ZeroDivisionError) as err:
        raise PrunedModelError(f"{path}/config.json lacks the head geometry ({err}); save the model again") from err
    block = config.get("loraprune") or {}
    try:
        layers, other = _layer_widths_from_headers(tensors, spec, head_dim)
    except PrunedModelError as err:
        raise PrunedModelError(f"{path}: {err}") from None
    check_required_tensors(path, config, spec, tensors, set(layers))
    _check_widths(path, config, block, layers)
    _check_totals(path, block, tensors, spec)
    total = other + sum(v["params"] for v in layers.values())
    return {
        "path": str(path), "model_type": config.get("model_type"), "head_dim": head_dim,
        "pruned_by_loraprune": bool(block), "uniform": block.get("uniform", True),
        "achieved_ratio": block.get("achieved_ratio"), "original": block.get("original"),
        # whole-model share: the removed parameters over the dense total (these weights plus the removed)
        "achieved_ratio_model": (block["removed_params"] / (total + block["removed_params"])
                                 if isinstance(block.get("removed_params"), int) else None),
        "layers": [dict(layer=i, **layers[i]) for i in sorted(layers)],
        "other_params": other, "total_params": total,
    }


def read_masks(path, info: dict) -> Masks:
    """``loraprune_masks.json`` of a directory, checked against its weights (``info`` from :func:`inspect_dir`)."""
    file = Path(path) / MASKS_FILE
    fix = f"delete {file} (the weights do not need it) or save the pruned model again"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        masks = Masks.from_dict(data)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise PrunedModelError(f"{file} is corrupted ({type(err).__name__}: {err}); {fix}") from err
    if data.get("head_dim") not in (None, info["head_dim"]):
        raise PrunedModelError(f"{file} says head_dim={data['head_dim']}, config.json {info['head_dim']}; {fix}")
    if len(masks.attn_keep) != len(info["layers"]):
        raise PrunedModelError(f"{file} describes {len(masks.attn_keep)} layers, the weights hold "
                               f"{len(info['layers'])}; {fix}")
    original = info.get("original") or {}
    for row, kv, ch, a in zip(info["layers"], masks.kept_kv(), masks.kept_channels(), masks.attn_keep):
        if (kv, ch) != (row.get("num_key_value_heads"), row.get("intermediate_size")):
            raise PrunedModelError(
                f"{file}, layer {row['layer']}: keeps {kv} KV groups and {ch} MLP channels, the weights have "
                f"{row.get('num_key_value_heads')} and {row.get('intermediate_size')}; {fix}")
        if original.get("num_key_value_heads") not in (None, a.numel()):
            raise PrunedModelError(f"{file}, layer {row['layer']}: indexes {a.numel()} original KV groups, config.json "
                                   f"says the original model had {original['num_key_value_heads']}; {fix}")
    return masks


def load_pruned(path, dtype=None, device_map=None, **kwargs) -> nn.Module:
    """Reload a pruned model (uniform or per-layer) with identical logits, no remote code.

    Before any weight is read, config.json, the safetensors headers,
    ``loraprune_masks.json`` and the parameter totals of the ``loraprune``
    block are checked against each other (:func:`inspect_dir`,
    :func:`read_masks`), and ``dtype`` / ``device_map`` against what torch
    offers; after reading, every floating-point weight must be finite. A
    failed check raises :class:`PrunedModelError` (or ``LoRAPruneError`` /
    ``TypeError`` for the arguments) naming the fix.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_dtype(dtype)
    _check_device_map(device_map)
    info = inspect_dir(path)
    path = Path(path).expanduser()
    raw = read_config(path)
    masks = read_masks(path, info) if (path / MASKS_FILE).is_file() else None
    block = raw.get("loraprune") or {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if block and not block.get("uniform", True):
            cls = PER_LAYER_CLASSES[raw.get("model_type")]
            config = AutoConfig.from_pretrained(path)
            model, loading = cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
        else:
            model, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as err:
        raise PrunedModelError(
            f"could not load {path}: {type(err).__name__}: {err}. The weights do not match config.json "
            "(a corrupted or mixed-up directory?); save the pruned model again."
        ) from err
    # transformers only warns when weights are missing (it initialises them
    # randomly): for a pruned model that is a broken directory, so refuse.
    problems = {k: sorted(v)[:5] for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise PrunedModelError(
            f"{path}: the weights do not match config.json ({problems}); a corrupted or mixed-up "
            "directory? Save the pruned model again."
        )
    _check_finite(path, model)
    if masks is not None:
        model.loraprune_masks = masks
    return model


def _check_dtype(dtype) -> None:
    """``dtype`` must be what ``from_pretrained`` takes and loraprune loads: a floating torch dtype, its name, or ``"auto"``."""
    check_load_dtype(dtype)


def _check_device_map(device_map) -> None:
    """Refuse a ``device_map`` naming CUDA when torch sees no GPU (before any weight is read)."""
    if device_map is None:
        return
    if not isinstance(device_map, (str, dict, torch.device)):
        raise TypeError(f"device_map must be a string ('cpu', 'cuda', 'auto'), a torch.device or a dict, "
                        f"got {type(device_map).__name__}")
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    wants_cuda = any(isinstance(t, int) or str(t).startswith("cuda") for t in targets)
    if wants_cuda and not torch.cuda.is_available():
        raise LoRAPruneError(f"device_map={device_map!r} needs a CUDA GPU, but torch sees none "
                             "(torch.cuda.is_available() is False); pass device_map='cpu' or leave it out")


def _check_finite(path: Path, model: nn.Module) -> None:
    """Every loaded floating-point weight must be finite: NaN/inf weights give NaN logits, silently."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]
    if bad:
        raise PrunedModelError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {', '.join(bad[:3])}): the saved weights "
            "are corrupted or come from a diverged run. Save the model again from a healthy run")
