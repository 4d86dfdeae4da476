"""Saving and reloading pruned models (safetensors + JSON only).

* Uniform models (every layer keeps the same widths) are stock models of a
  smaller config: ``AutoModelForCausalLM.from_pretrained(dir)`` reloads them
  with no remote code. One wrinkle: ``LlamaConfig`` rejects
  ``hidden_size % num_attention_heads != 0`` even with an explicit
  ``head_dim``; such a LLaMA (without biases) is exported as the
  architecturally identical Mistral with ``sliding_window=None``.
* Non-uniform models get the per-layer classes of
  :mod:`loraprune.modeling_loraprune`; their ``save_pretrained`` copies that
  file beside the weights and writes ``auto_map``, so both
  :func:`load_pruned` and ``from_pretrained(dir, trust_remote_code=True)``
  rebuild them.
* :func:`save_pruned` writes atomically: a temporary sibling directory is
  renamed (or, over an existing model, atomically swapped) into place, so an
  interrupted save never leaves a half-written model, or none, where a saved
  one is expected (:func:`atomic_directory`). Beside the weights it writes
  ``loraprune_masks.json``: the kept KV groups and MLP channels of every
  layer, as indices into the original model (:meth:`Masks.load_json` reads it).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
import torch.nn as nn

from .errors import LoRAPruneError, OutputExistsError
from .gguf import forget_gguf_origin
from .lora import LoRALinear, is_peft_lora_layer, unwrap_compiled
from .masks import Masks
from .modeling_loraprune import PER_LAYER_CLASSES
from .paths import as_path, check_output_dir, output_error

MASKS_FILE = "loraprune_masks.json"


class PrunedModelError(LoRAPruneError):
    """A directory does not hold a loadable loraprune model; the message says why."""


def _needs_mistral_export(config) -> bool:
    return (
        config.model_type == "llama"
        and config.hidden_size % config.num_attention_heads != 0
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
    )


def _as_mistral(model: nn.Module) -> nn.Module:
    """The same network as a stock ``MistralForCausalLM`` (no weight copies)."""
    from transformers import MistralConfig, MistralForCausalLM

    src = model.config.to_dict()
    drop = {"model_type", "architectures", "attention_bias", "mlp_bias", "pretraining_tp", "transformers_version",
            "auto_map", "_name_or_path"}
    kwargs = {k: v for k, v in src.items() if k not in drop}
    kwargs["sliding_window"] = None
    with torch.device("meta"):
        config = MistralConfig(**kwargs)
        config.loraprune = dict(src.get("loraprune") or {}, exported_as="mistral (LlamaConfig rejects "
                                "hidden_size % num_attention_heads != 0)")
        new = MistralForCausalLM(config)
    new.load_state_dict(model.state_dict(), assign=True, strict=True)
    # non-persistent buffers (rotary inv_freq) are not in the state dict
    src_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            new.get_submodule(owner).register_buffer(leaf, src_buffers[name].clone(), persistent=False)
    for module in new.modules():  # plain tensor attributes such as original_inv_freq
        for key, val in list(vars(module).items()):
            if torch.is_tensor(val) and val.is_meta and hasattr(module, "inv_freq"):
                setattr(module, key, module.inv_freq.clone())
    new.tie_weights()
    new.generation_config = model.generation_config
    for attr in ("loraprune_masks", "loraprune_gguf_source"):
        if getattr(model, attr, None) is not None:
            setattr(new, attr, getattr(model, attr))
    return new.eval()


def attach_export(model: nn.Module) -> nn.Module:
    """Give a compacted model the class whose ``save_pretrained`` reloads faithfully."""
    block = getattr(model.config, "loraprune", None) or {}
    uniform = block.get("uniform", True)
    if uniform and not (model.config.model_type == "llama" and model.config.hidden_size % model.config.num_attention_heads):
        return model
    if uniform and _needs_mistral_export(model.config):
        return _as_mistral(model)
    if uniform:
        # A LLaMA with biases whose head count no longer divides hidden_size:
        # neither LlamaConfig nor the bias-free Mistral can hold it, so it
        # goes out as a per-layer model whose stock fields keep the original
        # (valid) head counts and whose layers carry the real widths.
        original = block.get("original") or {}
        model.config.num_attention_heads = original["num_attention_heads"]
        model.config.num_key_value_heads = original["num_key_value_heads"]
        model.config.loraprune = dict(block, uniform=False, export="per-layer: LlamaConfig refuses hidden_size % "
                                      "num_attention_heads != 0 and Mistral has no biases")
    check_exportable(model)
    cls = PER_LAYER_CLASSES[model.config.model_type]
    if type(model) is not cls:
        model.__class__ = cls
    cls.register_for_auto_class("AutoModelForCausalLM")
    model.config.architectures = [cls.__name__]
    return model


def check_exportable(model: nn.Module) -> None:
    """Refuse, before any training, a model :func:`attach_export` could not give a per-layer class."""
    cls = PER_LAYER_CLASSES.get(getattr(model.config, "model_type", None))
    if cls is None:
        raise PrunedModelError(f"no per-layer export for model_type={model.config.model_type!r}; pass uniform=True")
    if not isinstance(model, cls.__mro__[1]):
        raise PrunedModelError(f"expected a {cls.__mro__[1].__name__}, found {type(model).__name__}: the pruned "
                               "model could not be saved; pass the transformers model itself")


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    check_output_dir(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; choose another directory or pass overwrite=True")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    False where the platform, the C library or the file system cannot; then
    :func:`atomic_directory` falls back to two renames and :func:`recover_interrupted_swap`.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _old_copies(out_dir: Path) -> list[Path]:
    """The ``.<name>.<random>.old/old`` folders a two-rename swap leaves while the new copy is not yet in place."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.[A-Za-z0-9_]+\.old")
    found = [d / "old" for d in out_dir.parent.glob(f".{out_dir.name}.*.old") if pattern.fullmatch(d.name)]
    return sorted((d for d in found if d.is_dir()), key=lambda d: d.stat().st_mtime)


def recover_interrupted_swap(out_dir) -> bool:
    """Put back a directory that a save over it left only in its ``.old`` folder.

    Where :func:`_exchange` is unavailable, replacing a directory takes two
    renames (old out, new in); an interrupt between them leaves ``out_dir``
    absent and the old copy in ``.<name>.<random>.old/old``. The next save,
    load or inspect of ``out_dir`` moves it back, with a warning, so the path
    again holds the model it held before the interrupted save.
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return False
    copies = _old_copies(out_dir)
    if not copies:
        return False
    if out_dir.exists():  # the swap completed and only its clean-up was interrupted: the old copies are stale
        for copy in copies:
            shutil.rmtree(copy.parent, ignore_errors=True)
        return False
    with suppress(FileExistsError, OSError):
        os.rename(copies[-1], out_dir)
        shutil.rmtree(copies[-1].parent, ignore_errors=True)
        warnings.warn(f"{out_dir} was missing after an interrupted save; restored the copy it held before "
                      f"(from {copies[-1].parent.name})", RuntimeWarning, stacklevel=3)
        return True
    return False


def _claim(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir`` only if nothing is there (an empty directory counts as nothing).

    POSIX ``rename`` refuses a non-empty target directory, so of two saves racing for one new
    name exactly one wins, across threads and processes alike."""
    try:
        os.rename(tmp, out_dir)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise OutputExistsError(f"{out_dir} was filled by another save while this one was writing; nothing "
                                    "was replaced. Choose another directory or pass overwrite=True") from err
        raise


def _replace(tmp: Path, out_dir: Path) -> None:
    """Put ``tmp`` at ``out_dir`` so that the path holds a complete directory at every instant."""
    if not out_dir.exists():
        with suppress(OutputExistsError):
            return _claim(tmp, out_dir)  # appeared meanwhile: replace it below (overwrite=True)
    if _exchange(tmp, out_dir):  # out_dir now the new copy, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    try:
        os.rename(out_dir, trash / "old")
    except BaseException:
        trash.rmdir()
        raise
    os.rename(tmp, out_dir)  # an interrupt before this line: recover_interrupted_swap() undoes the first
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_directory(out_dir, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``out_dir``, on error it vanishes.

    The one home of atomic writes in loraprune: a reader (or a rerun after a
    kill) sees the old directory or the complete new one, never a mix, and
    never nothing (where the platform cannot swap two directories atomically,
    an interrupted swap is undone by the next call: :func:`recover_interrupted_swap`).
    With ``overwrite=False`` the final name is claimed exclusively: of two
    saves into one new directory, one fails with :class:`OutputExistsError`.
    File-system failures (a full or read-only disk) raise :class:`OutputPathError`.
    """
    out_dir = as_path(out_dir, "the output directory")
    recover_interrupted_swap(out_dir)
    _check_target(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    except OSError as err:
        raise output_error(out_dir, err) from err
    try:
        yield tmp
        if overwrite:
            _replace(tmp, out_dir)
        else:
            _claim(tmp, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, LoRAPruneError):
            raise
        raise output_error(out_dir, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path, overwrite: bool = True):
    """Yield a temporary sibling path to write; on success it replaces ``path``, on error it vanishes.

    For writers that take a file name (the GGUF writer); :func:`write_atomic` writes bytes this way.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; choose another file name or pass overwrite=True")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise output_error(path, err, "the file") from err
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, LoRAPruneError):
            raise output_error(path, err, "the file") from err
        raise


def write_atomic(path, content: str | bytes) -> Path:
    """Write one file atomically: a temporary sibling, flushed, then renamed over ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def write_json(path, payload, indent: int | None = 1) -> Path:
    """:func:`write_atomic` of ``payload`` as JSON."""
    return write_atomic(path, json.dumps(payload, indent=indent) + "\n")


def masks_payload(model: nn.Module) -> dict | None:
    """``loraprune_masks.json`` content: kept indices per layer plus the geometry to read them."""
    masks = getattr(model, "loraprune_masks", None)
    if masks is None:
        return None
    original = (getattr(model.config, "loraprune", None) or {}).get("original") or {}
    n_heads, n_kv = original.get("num_attention_heads"), original.get("num_key_value_heads")
    payload = {
        "description": "kept groups per layer, as indices into the original model: KV group g owns k/v rows "
                       "[g*head_dim, (g+1)*head_dim) and q rows / o_proj columns "
                       "[g*q_per_kv*head_dim, (g+1)*q_per_kv*head_dim); an MLP channel c owns gate/up row c "
                       "and down_proj column c",
        "head_dim": getattr(model.config, "head_dim", None),
        "q_per_kv": n_heads // n_kv if n_heads and n_kv else None,
    }
    payload.update(masks.to_dict())
    return payload


def write_masks(model: nn.Module, directory) -> Path | None:
    payload = masks_payload(model)
    if payload is None:
        return None
    path = Path(directory) / MASKS_FILE
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def require_pruned(model: nn.Module, what: str = "save_pruned") -> dict:
    """The model's ``config.loraprune`` block; refuse a model loraprune did not compact."""
    block = getattr(getattr(model, "config", None), "loraprune", None) or {}
    if not block.get("layers"):
        raise PrunedModelError(
            f"{what}: the model was not pruned by loraprune (its config has no loraprune block); prune it first "
            "(loraprune.prune or LoRAPruner.finalize), or save an unpruned model with model.save_pretrained(dir)"
        )
    return block


def require_merged(model: nn.Module) -> None:
    """Refuse a model that still holds LoRA layers (what save_pruned and save_gguf write is one dense model)."""
    lora = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) or is_peft_lora_layer(m)]
    if lora:
        raise PrunedModelError(
            f"the model still holds {len(lora)} LoRA layers (e.g. {lora[0]}); call loraprune.merge_lora(model) "
            "to save the merged model, or loraprune.export_adapter(model, dir) to save the pruned base and its adapter"
        )


def save_pruned(model: nn.Module, out_dir, overwrite: bool = False, tokenizer=None, extra_json: dict | None = None,
                **save_kwargs) -> Path:
    """Save atomically (safetensors + JSON): write a sibling temp dir, then rename it into place.

    The model is first given its export class (:func:`attach_export`), so a
    merged model from ``finalize``/``merge_lora`` saves the same way as one
    from :func:`loraprune.prune`. A model that still holds LoRA layers is
    refused: merge it (:func:`loraprune.merge_lora`) or export base and
    adapter apart (:func:`loraprune.export_adapter`). ``extra_json`` adds
    ``{file name: payload}`` files; a name the save itself writes
    (``config.json``, ``loraprune_masks.json``, ...) is refused rather than overwritten.
    """
    model = unwrap_compiled(model)  # a torch.compile'd pruned model saves as the module it wraps
    require_pruned(model)
    out_dir = as_path(out_dir, "out_dir")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        hint = (f" (to save the tokenizer of {tokenizer!r}, pass AutoTokenizer.from_pretrained({tokenizer!r}))"
                if isinstance(tokenizer, (str, os.PathLike)) else "")
        raise TypeError(f"tokenizer must be a tokenizer object with save_pretrained(), got "
                        f"{type(tokenizer).__name__}{hint}")
    _check_extra_json(extra_json)
    require_merged(model)
    _check_target(out_dir, overwrite)
    model = attach_export(forget_gguf_origin(model))
    with atomic_directory(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
        write_masks(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            if (tmp / name).exists():
                raise PrunedModelError(f"extra_json names {name}, which save_pruned writes itself; choose another file name")
            (tmp / name).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return out_dir


def _check_extra_json(extra_json) -> None:
    """``extra_json`` must map file names to JSON-able payloads: checked before anything is written."""
    if extra_json is None:
        return
    if not isinstance(extra_json, dict) or not all(isinstance(k, str) and k for k in extra_json):
        raise TypeError(f"extra_json must be a dict of {{file name: JSON-able payload}}, got {extra_json!r:.80}")
    for name, payload in extra_json.items():
        try:
            json.dumps(payload)
        except (TypeError, ValueError) as err:
            raise TypeError(f"extra_json[{name!r}] cannot be written as JSON ({err}); convert numpy numbers and "
                            "tensors to Python values (e.g. float(x), x.tolist())") from err


# ---------------------------------------------------------------- reading directories
def _model_dir(path) -> Path:
    path = as_path(path, "path")
    recover_interrupted_swap(path)
    if not path.exists():
        raise PrunedModelError(f"{path} does not exist; pass the directory a model was saved to")
    if not path.is_dir():
        hint = " (a GGUF file: load it with loraprune.gguf.load_gguf)" if str(path).endswith(".gguf") else ""
        raise PrunedModelError(f"{path} is a file, not a directory{hint}; pass the directory holding config.json "
                               "and the *.safetensors weights")
    return path


def read_config(path) -> dict:
    path = _model_dir(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise PrunedModelError(f"{path} has no config.json; expected a directory written by save_pretrained")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrunedModelError(f"{cfg} is corrupted (not valid JSON: {err}); save the model again") from err
    if not isinstance(data, dict):
        raise PrunedModelError(f"{cfg} is corrupted (not a JSON object); save the model again")
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
        entry = layers.setdefault(int(idx_text), {"params": 0})
        entry["params"] += numel
        if rest in row_fields:
            key, unit = row_fields[rest]
            entry[key] = meta["shape"][0] // unit
    return layers, other


STOCK_WIDTHS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _check_widths(path: Path, config: dict, block: dict, layers: dict[int, dict]) -> None:
    """The widths config.json describes must be the widths the weights have."""
    n_layers = config.get("num_hidden_layers")
    if n_layers is not None and sorted(layers) != list(range(n_layers)):
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
    from .archs import ARCHS

    config = read_config(path)
    path = Path(path).expanduser()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PrunedModelError(f"{path} holds no .safetensors weights; expected a model saved by save_pretrained")
    tensors = {}
    for f in files:
        tensors.update(read_safetensors_header(f))
    spec = ARCHS.get(config.get("model_type"))
    if spec is None:
        raise PrunedModelError(f"model_type={config.get('model_type')!r} has no loraprune layout; "
                               f"supported: {', '.join(sorted(ARCHS))}")
    try:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    except (KeyError, TypeError, ZeroDivisionError) as err:
        raise PrunedModelError(f"{path}/config.json lacks the head geometry ({err}); save the model again") from err
    block = config.get("loraprune") or {}
    layers, other = _layer_widths_from_headers(tensors, spec, head_dim)
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


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _check_dtype(dtype) -> None:
    """``dtype`` must be what ``from_pretrained`` takes: a torch dtype, its name, or ``"auto"``."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return
    hint = f" (did you mean torch.{_DTYPE_ALIASES[dtype]}?)" if dtype in _DTYPE_ALIASES else ""
    raise LoRAPruneError(f"dtype={dtype!r} is not a torch dtype{hint}; pass e.g. torch.bfloat16, 'bfloat16', "
                         "torch.float32 or 'auto'")


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
