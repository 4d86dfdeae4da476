"""Checkpoint and resume of a pruning run (safetensors + JSON, never pickle).

A checkpoint holds everything that decides the rest of the run: the masks,
the EMA scores, the step, the LoRA factors, the optimiser state and the RNG
state. Each one is written to a temporary directory and renamed into
``DIR/checkpoints/step-000123``, so a kill at any moment leaves either a
complete checkpoint or none; resume picks the newest complete one. Resuming
replays the data order, so the resumed run ends with the same masks and
weights as an uninterrupted one.

Resuming is refused when the checkpoint belongs to another run: other
settings, other options, or (with a fingerprint) another model, other data or
another tokenizer. :func:`check_same_run` is the one policy, used by the
library at restore and by the command line before it loads the model.
:func:`fingerprint` computes that fingerprint; pass it to
:class:`Checkpointer`::

    fp = fingerprint(model, data, tokenizer)   # before LoRA is attached
    ckpt = Checkpointer(checkpoint_dir, every=50, run=run_options, fingerprint=fp)
    start = ckpt.restore(pruner, optimizer)    # CheckpointError on a mismatch

``allow_mismatch=True`` (the CLI's ``--force-resume``) resumes anyway, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..utils.atomic import atomic_directory, sweep_stale

FORMAT = 1


def pruning_state_tensors(pruner) -> dict[str, torch.Tensor]:
    """Masks and EMA scores of ``pruner`` as named tensors (the part no trainer saves for us)."""
    return {f"state.{k}": v.contiguous() for k, v in pruner.state.tensors().items()}


# ------------------------------------------------------------------------ run identity
#: Settings that only the model resolves (``skip_layers="paper"`` -> indices, ``round_to=None`` -> 32 or 1):
#: compared once the model is loaded, not before.
MODEL_RESOLVED = ("skip_layers", "round_to")
PARTS = {"model": "another model", "data": "other data", "tokenizer": "another tokenizer"}


def run_differences(meta: dict, settings: dict, fingerprint: dict | None) -> tuple[dict, list[str]]:
    """The one "is this the same run?" policy, for the library and the command line alike.

    ``meta`` is a checkpoint's ``meta.json``; ``settings`` the run-defining options
    (:data:`loraprune.config.RUN_DEFINING`) of the run that wants to resume it, and
    ``fingerprint`` its :func:`fingerprint` (content hashes of model, data and tokenizer:
    a moved folder is the same run, an edited file is not). Only what both sides know is
    compared: the command line checks options and data before it loads the model, and the
    library checks everything at restore. Returns ``(settings that differ: {name: (saved,
    now)}, fingerprint parts that differ)``.
    """
    saved = meta.get("settings") or {}
    differ = {k: (saved[k], settings[k]) for k in sorted(set(saved) & set(settings)) if saved[k] != settings[k]}
    return differ, fingerprint_mismatch(meta.get("fingerprint"), fingerprint)


def check_same_run(path: Path, meta: dict, settings: dict, fingerprint: dict | None,
                   allow_mismatch: bool = False, n_layers: int | None = None) -> None:
    """Refuse (:class:`CheckpointError`) to resume the checkpoint at ``path`` from another run
    (:func:`run_differences`); with ``allow_mismatch`` (CLI ``--force-resume``) only warn about
    another model, data or tokenizer. A checkpoint of another format or layer count is refused always."""
    if meta.get("format") != FORMAT or (n_layers is not None and meta.get("n_layers") != n_layers):
        raise CheckpointError(f"{path} was written for a different model or loraprune version; remove it, resume with "
                              "the model it was written for, or start anew in another output directory")
    differ, parts = run_differences(meta, settings, fingerprint)
    if differ:
        raise CheckpointError(
            f"{path} was written with other settings {differ} (saved, now); resume with the same options "
            "or use a new output directory"
        )
    if not parts:
        return
    message = f"{path} was written for {' and '.join(PARTS[p] for p in parts)} than this run"
    if allow_mismatch:
        warnings.warn(f"{message}; resuming anyway (allow_mismatch=True)", RuntimeWarning, stacklevel=3)
        return
    raise CheckpointError(
        f"{message}; resume with the same model and data, use a new output directory, or pass "
        "allow_mismatch=True (CLI: --force-resume) to resume anyway"
    )


def newest_meta(root) -> tuple[Path, dict] | None:
    """``(path, meta.json)`` of the newest complete checkpoint under ``root/checkpoints``, or None."""
    found = Checkpointer(root).complete()
    if not found:
        return None
    try:
        return found[-1], json.loads((found[-1] / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{found[-1]} is corrupted ({type(err).__name__}: {err}); delete it to resume from an "
                              "older checkpoint or start anew") from err


def _load_state(path: Path, meta: dict, tensors: dict, pruner) -> None:
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    want = pruner.state.tensors()
    wrong = [k for k, v in want.items() if k not in state or state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path} does not fit this model (e.g. {wrong[0]}); resume with the model it was written for")
    pruner.state.load_tensors(state, meta["observations"], meta["step"])


def _read(path: Path, tensor_file: str, meta_file: str) -> tuple[dict, dict]:
    try:
        meta = json.loads((path / meta_file).read_text(encoding="utf-8"))
        tensors = load_file(str(path / tensor_file))
    except Exception as err:  # truncated / garbled files
        raise CheckpointError(
            f"{path} is corrupted ({type(err).__name__}: {err}); delete it to resume from an older checkpoint "
            "or start anew"
        ) from err
    return meta, tensors


def _write_atomic(final: Path, files: dict[str, object]) -> Path:
    """Write ``{name: tensors dict | JSON payload}`` as the directory ``final``, atomically (replacing it)."""
    with atomic_directory(final, overwrite=True) as tmp:
        for name, payload in files.items():
            if name.endswith(".safetensors"):
                save_file({k: v.detach().cpu().contiguous() for k, v in payload.items()}, str(tmp / name))
            else:
                (tmp / name).write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return final


# ------------------------------------------------------------------------ fingerprint
SAMPLE = 1 << 16  # elements hashed per weight tensor (evenly spaced): cheap on any model size
HASHED_BATCHES = 8
HASHED_FILE_BYTES = 1 << 20


def _hash_tensor(h, t: torch.Tensor) -> None:
    flat = t.detach().reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[torch.linspace(0, flat.numel() - 1, SAMPLE, device=flat.device).long()]
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(flat.to("cpu", torch.float32).contiguous().numpy().tobytes())


def model_fingerprint(model) -> dict:
    """Config shape plus a hash of evenly spaced samples of every weight (LoRA factors excluded)."""
    config = getattr(model, "config", None)
    h = hashlib.sha256()
    n = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        h.update(name.replace(".base.", ".").encode())  # LoRALinear wraps the base layer as .base
        _hash_tensor(h, p)
        n += 1
    fields = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size")
    return {"config": {k: getattr(config, k, None) for k in fields}, "tensors": n, "sha256": h.hexdigest()}


def _hash_path(h, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(HASHED_FILE_BYTES))


def data_fingerprint(data) -> dict:
    """What the data is, as far as it can be told without consuming it.

    Paths: names, sizes and the first MiB of each file; text and token tensors:
    their content; a list of batches: the token ids of the first few batches;
    a ``datasets.Dataset``: its own fingerprint. A one-shot iterator cannot be
    read twice, so it is recorded as ``{"kind": "iterator"}`` and not compared.
    """
    h = hashlib.sha256()
    if isinstance(data, (str, Path)) and Path(data).exists():
        _hash_path(h, Path(data))
        return {"kind": "path", "name": Path(data).name, "sha256": h.hexdigest()}
    if isinstance(data, (str, Path)):
        return {"kind": "name", "name": str(data)}
    if torch.is_tensor(data):
        _hash_tensor(h, data)
        return {"kind": "tensor", "sha256": h.hexdigest()}
    if hasattr(data, "_fingerprint"):  # datasets.Dataset
        return {"kind": "dataset", "fingerprint": str(data._fingerprint)}
    if isinstance(data, (list, tuple)):
        items = list(data)
        if all(isinstance(x, str) for x in items):
            for x in items:
                h.update(x.encode("utf-8", "surrogatepass") + b"\0")
            if all(Path(x).exists() for x in items):
                for x in items:
                    _hash_path(h, Path(x))
            return {"kind": "texts", "n": len(items), "sha256": h.hexdigest()}
        for batch in items[:HASHED_BATCHES]:
            ids = batch.get("input_ids") if isinstance(batch, dict) else batch
            if torch.is_tensor(ids):
                _hash_tensor(h, ids)
            else:
                h.update(json.dumps(ids, default=str).encode())
        return {"kind": "batches", "n": len(items), "sha256": h.hexdigest()}
    return {"kind": "iterator"}


def tokenizer_fingerprint(tokenizer) -> dict | None:
    """Vocabulary size and the ids of a probe text: enough to tell two tokenizers apart."""
    if tokenizer is None:
        return None
    probe = "The quick brown fox, 1234 times: \u00e9t\u00e9 \u4e2d\u6587!"
    ids = tokenizer(probe)["input_ids"]
    return {"size": len(tokenizer), "probe": hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()}


def fingerprint(model, data=None, tokenizer=None) -> dict:
    """``{"model", "data", "tokenizer"}`` fingerprints of a run, stored with its checkpoints.

    Call it on the model as the user passed it (before LoRA is attached or
    anything is masked), so the interrupted and the resumed run agree.
    """
    return {"model": model_fingerprint(model), "data": data_fingerprint(data),
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def fingerprint_mismatch(saved: dict | None, now: dict | None) -> list[str]:
    """Which parts (model, data, tokenizer) differ; parts either side could not fingerprint are skipped."""
    if not saved or not now:
        return []
    out = []
    for part in ("model", "data", "tokenizer"):
        a, b = saved.get(part), now.get(part)
        if a is None or b is None or "iterator" in (a.get("kind"), b.get("kind")):
            continue
        if a != b:
            out.append(part)
    return out


def save_pruning_state(pruner, path) -> Path:
    """Masks + EMA scores + step into ``path`` (atomic), for trainers that save weights and
    optimiser themselves (the ``transformers.Trainer`` callback)."""
    meta = {"format": FORMAT, "step": pruner.state.step, "observations": pruner.state.observations,
            "settings": pruner.settings, "n_layers": len(pruner.layers)}
    return _write_atomic(Path(path), {"state.safetensors": pruning_state_tensors(pruner), "meta.json": meta})


def restore_pruning_state(pruner, path) -> int:
    """Inverse of :func:`save_pruning_state`; re-applies the masks and returns the step."""
    path = Path(path)
    meta, tensors = _read(path, "state.safetensors", "meta.json")
    check_same_run(path, meta, pruner.settings, None, n_layers=len(pruner.layers))
    _load_state(path, meta, tensors, pruner)
    pruner.apply_masks()
    return int(meta["step"])


class Checkpointer:
    """Full run state every ``every`` steps in ``root/checkpoints`` (the newest ``keep`` are kept).

    ``run`` (optional, JSON-able) describes the options the engine does not
    know about (steps, lr, batch size, ...); resuming with different ones is refused.
    ``fingerprint`` (optional, from :func:`fingerprint`) identifies the model
    and data; resuming on another model or other data is refused unless
    ``allow_mismatch=True``.
    """

    def __init__(self, root, every: int | None = None, keep: int = 2, run: dict | None = None,
                 fingerprint: dict | None = None, allow_mismatch: bool = False):
        self.dir = Path(root) / "checkpoints"
        self.every = every
        self.keep = keep
        self.run = None if run is None else json.loads(json.dumps(run))  # as it reads back from JSON
        self.fingerprint = None if fingerprint is None else json.loads(json.dumps(fingerprint))
        self.allow_mismatch = allow_mismatch

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    # ---- write ------------------------------------------------------------------
    def save(self, pruner, optimizer, step: int) -> Path:
        tensors = pruning_state_tensors(pruner)
        for i, mods in enumerate(pruner.modules):
            for name, m in mods.items():
                tensors[f"lora.{i}.{name}.A"] = m.lora_A.detach()
                tensors[f"lora.{i}.{name}.B"] = m.lora_B.detach()
        opt = optimizer.state_dict()
        for idx, st in opt["state"].items():
            for key, val in st.items():
                t = val if torch.is_tensor(val) else torch.tensor(val)
                tensors[f"opt.{idx}.{key}"] = t.detach()
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for d, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{d}"] = s
        meta = {
            "format": FORMAT,
            "step": step,
            "observations": pruner.state.observations,
            "settings": pruner.settings,
            "run": self.run,
            "fingerprint": self.fingerprint,
            "param_groups": opt["param_groups"],
            "n_layers": len(pruner.layers),
        }
        final = _write_atomic(self.dir / f"step-{step:08d}", {"state.safetensors": tensors, "meta.json": meta})
        self._prune_old()
        return final

    def _prune_old(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- read -------------------------------------------------------------------
    def complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        sweep_stale(self.dir)  # a checkpoint write killed half-way left a temporary sibling
        return sorted(p for p in self.dir.glob("step-*") if (p / "meta.json").is_file() and (p / "state.safetensors").is_file())

    def restore(self, pruner, optimizer) -> int:
        """Load the newest checkpoint into ``pruner``/``optimizer``; returns its step (0 if none)."""
        found = self.complete()
        if not found:
            return 0
        path = found[-1]
        meta, tensors = _read(path, "state.safetensors", "meta.json")
        settings = dict(pruner.settings, **(self.run or {}))
        check_same_run(path, dict(meta, settings=dict(meta.get("settings") or {}, **(meta.get("run") or {}))),
                       settings, self.fingerprint, self.allow_mismatch, n_layers=len(pruner.layers))
        missing = [k for i, mods in enumerate(pruner.modules) for n in mods for k in (f"lora.{i}.{n}.A", f"lora.{i}.{n}.B")
                   if k not in tensors or tensors[k].shape != getattr(mods[n], "lora_" + k[-1]).shape]
        if missing:
            raise CheckpointError(f"{path} has no LoRA factors of this shape ({missing[0]}); resume with the same "
                                  "model and lora_r, or use a new output directory")
        _load_state(path, meta, tensors, pruner)
        # the masks first: under progressive compaction they decide the physical order
        # of the rows, which is the order the LoRA factors and optimiser state were saved in
        pruner.apply_masks()
        with torch.no_grad():
            for i, mods in enumerate(pruner.modules):
                for name, m in mods.items():
                    m.lora_A.copy_(tensors[f"lora.{i}.{name}.A"])
                    m.lora_B.copy_(tensors[f"lora.{i}.{name}.B"])
        opt_state: dict[int, dict] = {}
        for key, val in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = val
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available():
            states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
            if states:
                torch.cuda.set_rng_state_all(states)
        return int(meta["step"])
