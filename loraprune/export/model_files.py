"""The checked reading of a model folder's ``config.json`` fields and weight files (before anything is allocated).

``config.json`` is JSON a user can edit: a field of the wrong type (``"num_hidden_layers": "2"``, a
``loraprune`` block that is a string) would otherwise surface as a raw ``TypeError`` deep in
transformers, and a claimed size (10⁹ layers) would be allocated before anything compares it with
the weights. :func:`check_config_fields` checks the type and range of every field loraprune reads.

The weights are the model's own files only: those the index (``model.safetensors.index.json``)
names, else ``model.safetensors``, else ``model-XXXXX-of-YYYYY.safetensors`` shards; any other
``*.safetensors`` in the folder (an adapter, a user's file) is not the model's and is not counted.
A shard the index names but the folder lacks, and a tensor the model needs but no file holds, are
named as such (:func:`weight_files`, :func:`check_required_tensors`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import PrunedModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
COPY_AGAIN = "copy the whole model folder again, or save the model again"
#: config.json fields loraprune reads: name -> (required, may be None)
COUNTS = {"num_hidden_layers": True, "hidden_size": True, "num_attention_heads": True, "intermediate_size": True,
          "num_key_value_heads": False, "head_dim": False, "vocab_size": False}
BLOCK_COUNTS = ("projection_params", "removed_params")
BLOCK_RATIOS = ("achieved_ratio", "achieved_ratio_with_biases")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(cfg: Path, field: str, value, want: str) -> PrunedModelError:
    return PrunedModelError(f"{cfg}: {field} is {value!r} ({type(value).__name__}), not {want}; config.json was edited "
                            f"or corrupted: set {field} right (as save_pretrained wrote it) or save the model again")


def check_config_fields(cfg: Path, data: dict) -> None:
    """Refuse a field of ``config.json`` (or of its ``loraprune`` block) of the wrong type or out of range."""
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise _bad(cfg, "model_type", model_type, "a model type name such as 'llama'")
    known = model_type is not None
    for name, required in COUNTS.items():
        value = data.get(name)
        if value is None and not (required and known and name in data):
            continue
        if not _is_int(value) or value < 1:
            raise _bad(cfg, name, value, "a whole number >= 1")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if name in data and not isinstance(data[name], bool):
            raise _bad(cfg, name, data[name], "true or false")
    block = data.get("loraprune")
    if block is None:
        return
    if not isinstance(block, dict):
        raise _bad(cfg, "the loraprune block", block, "a JSON object (as save_pruned writes it)")
    where = "loraprune."
    if "uniform" in block and not isinstance(block["uniform"], bool):
        raise _bad(cfg, where + "uniform", block["uniform"], "true or false")
    for name in BLOCK_COUNTS:
        if block.get(name) is not None and (not _is_int(block[name]) or block[name] < 0):
            raise _bad(cfg, where + name, block[name], "a whole number >= 0")
    for name in BLOCK_RATIOS:
        value = block.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
            raise _bad(cfg, where + name, value, "a fraction in [0, 1)")
    for name in ("original", "settings"):
        if block.get(name) is not None and not isinstance(block[name], dict):
            raise _bad(cfg, where + name, block[name], "a JSON object")
    layers = block.get("layers")
    if layers is None:
        return
    if not isinstance(layers, list):
        raise _bad(cfg, where + "layers", layers, "a list with one object of widths per layer")
    for i, widths in enumerate(layers):
        if not isinstance(widths, dict):
            raise _bad(cfg, f"{where}layers[{i}]", widths, "an object of widths")
        for key, value in widths.items():
            if not _is_int(value) or value < 0:
                raise _bad(cfg, f"{where}layers[{i}].{key}", value, "a whole number >= 0")


def _read_index(path: Path) -> dict[str, str]:
    index = path / INDEX
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrunedModelError(f"{index} is corrupted (not valid JSON: {err}); {COPY_AGAIN}") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise PrunedModelError(f"{index} is corrupted (no weight_map of tensor names to shard files); {COPY_AGAIN}")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise PrunedModelError(f"{index} names the shard {shard!r}, not a .safetensors file in the folder; the "
                                   f"index is corrupted: {COPY_AGAIN}")
    return weight_map


def weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """``(the model's own weight files, the index's tensor -> shard map or None)``; a missing shard is refused."""
    if (path / INDEX).is_file():
        weight_map = _read_index(path)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise PrunedModelError(f"{path}: {INDEX} names the shard {missing[0]}, which is missing "
                                   f"({len(shards) - len(missing)} of {len(shards)} shards present); {COPY_AGAIN}")
        return [path / s for s in shards], weight_map
    if (path / SINGLE).is_file():
        return [path / SINGLE], None
    shards = sorted(f for f in path.glob("model-*-of-*.safetensors") if SHARD.fullmatch(f.name))
    if shards:
        totals = {int(SHARD.fullmatch(f.name).group(2)) for f in shards}
        numbers = {int(SHARD.fullmatch(f.name).group(1)) for f in shards}
        total = max(totals)
        if len(totals) > 1 or numbers != set(range(1, total + 1)):
            gap = next((n for n in range(1, total + 1) if n not in numbers), None)
            what = (f"the shard model-{gap:05d}-of-{total:05d}.safetensors is missing" if gap is not None
                    else "its shards belong to different saves")
            raise PrunedModelError(f"{path}: {what} (and there is no {INDEX}); {COPY_AGAIN}")
        return shards, None
    others = sorted(f.name for f in path.glob("*.safetensors"))
    extra = (f" ({', '.join(others[:3])} {'is' if len(others) == 1 else 'are'} not the model's: the weights are "
             f"{SINGLE}, or the shards {INDEX} names)" if others else "")
    raise PrunedModelError(f"{path} holds no .safetensors weights{extra}; expected a model saved by save_pretrained")


def check_index_tensors(path: Path, weight_map: dict[str, str], headers: dict[str, dict]) -> None:
    """Every tensor the index places in a shard must be in that shard's header."""
    for name, shard in weight_map.items():
        if name not in headers.get(shard, {}):
            raise PrunedModelError(f"{path}: {INDEX} places the tensor {name} in {shard}, which does not hold it; "
                                   f"the shard is incomplete or from another save: {COPY_AGAIN}")


def required_tensors(config: dict, spec, layer: int) -> list[str]:
    """The tensor names one decoder layer needs (projection weights, norms, and the biases config.json promises)."""
    prefix = f"{spec.layers}.{layer}."
    names = [f"{prefix}{spec.attn}.{p}.weight" for p in spec.attn_projections]
    names += [f"{prefix}{spec.mlp}.{p}.weight" for p in spec.mlp_projections]
    names += [f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight"]
    if config.get("attention_bias") is True:
        names += [f"{prefix}{spec.attn}.{p}.bias" for p in spec.attn_projections]
    if config.get("mlp_bias") is True:
        names += [f"{prefix}{spec.mlp}.{p}.bias" for p in spec.mlp_projections]
    return names


def check_required_tensors(path: Path, config: dict, spec, tensors: dict, layer_ids) -> None:
    """Name the first tensor the model needs that no weight file holds (transformers would make it random)."""
    needed = ["model.embed_tokens.weight"]
    if config.get("tie_word_embeddings") is False:
        needed.append("lm_head.weight")
    ids = sorted(layer_ids)
    holes = [i for i in range(ids[-1] + 1) if i not in layer_ids] if ids else []
    if holes:
        raise PrunedModelError(f"{path}: the weights hold no tensor of layer {holes[0]} (they hold layers up to "
                               f"{ids[-1]}): a shard or tensors are missing; {COPY_AGAIN}")
    for i in ids:
        needed += required_tensors(config, spec, i)
    missing = [n for n in needed if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PrunedModelError(f"{path}: the weights lack the tensor {missing[0]}{more}, which the model needs: a "
                               f"shard or tensor is missing; {COPY_AGAIN}")
