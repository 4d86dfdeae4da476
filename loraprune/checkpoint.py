"""Checkpoint and resume of a pruning run (safetensors + JSON, never pickle).

A checkpoint holds everything that decides the rest of the run: the masks,
the EMA scores, the step, the LoRA factors, the optimiser state and the RNG
state. Each one is written to a temporary directory and renamed into
``DIR/checkpoints/step-000123``, so a kill at any moment leaves either a
complete checkpoint or none; resume picks the newest complete one. Resuming
replays the data order, so the resumed run ends with the same masks and
weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import LoRAPruneError

FORMAT = 1


class CheckpointError(LoRAPruneError):
    """A checkpoint cannot be used to resume this run; the message says why."""


def pruning_state_tensors(pruner) -> dict[str, torch.Tensor]:
    """Masks and EMA scores of ``pruner`` as named tensors (the part no trainer saves for us)."""
    return {f"state.{k}": v.contiguous() for k, v in pruner.state.tensors().items()}


def _check_compatible(path: Path, meta: dict, pruner) -> None:
    if meta.get("format") != FORMAT or meta.get("n_layers") != len(pruner.layers):
        raise CheckpointError(f"{path} was written for a different model or loraprune version; remove it or start anew")
    mismatched = {k: (v, pruner.settings.get(k)) for k, v in meta["settings"].items() if pruner.settings.get(k) != v}
    if mismatched:
        raise CheckpointError(
            f"{path} was written with other settings {mismatched} (saved, now); resume with the same options "
            "or use a new output directory"
        )


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
    """Write ``{name: tensors dict | JSON payload}`` into a temporary sibling, then rename it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        for name, payload in files.items():
            if name.endswith(".safetensors"):
                save_file({k: v.detach().cpu().contiguous() for k, v in payload.items()}, str(tmp / name))
            else:
                (tmp / name).write_text(json.dumps(payload, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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
    _check_compatible(path, meta, pruner)
    _load_state(path, meta, tensors, pruner)
    pruner.apply_masks()
    return int(meta["step"])


class Checkpointer:
    """Full run state every ``every`` steps in ``root/checkpoints`` (the newest ``keep`` are kept).

    ``run`` (optional, JSON-able) describes the options the engine does not
    know about (steps, lr, batch size, ...); resuming with different ones is refused.
    """

    def __init__(self, root, every: int | None = None, keep: int = 2, run: dict | None = None):
        self.dir = Path(root) / "checkpoints"
        self.every = every
        self.keep = keep
        self.run = None if run is None else json.loads(json.dumps(run))  # as it reads back from JSON

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
        return sorted(p for p in self.dir.glob("step-*") if (p / "meta.json").is_file() and (p / "state.safetensors").is_file())

    def restore(self, pruner, optimizer) -> int:
        """Load the newest checkpoint into ``pruner``/``optimizer``; returns its step (0 if none)."""
        found = self.complete()
        if not found:
            return 0
        path = found[-1]
        meta, tensors = _read(path, "state.safetensors", "meta.json")
        _check_compatible(path, meta, pruner)
        saved_run = meta.get("run")
        if self.run is not None and saved_run is not None and saved_run != self.run:
            diff = {k: (saved_run.get(k), self.run.get(k)) for k in set(saved_run) | set(self.run)
                    if saved_run.get(k) != self.run.get(k)}
            raise CheckpointError(
                f"{path} was written by a run with other options {diff} (saved, now); resume with the same "
                "options or use a new output directory"
            )
        missing = [k for i, mods in enumerate(pruner.modules) for n in mods for k in (f"lora.{i}.{n}.A", f"lora.{i}.{n}.B")
                   if k not in tensors or tensors[k].shape != getattr(mods[n], "lora_" + k[-1]).shape]
        if missing:
            raise CheckpointError(f"{path} has no LoRA factors of this shape ({missing[0]}); resume with the same "
                                  "model and lora_r, or use a new output directory")
        _load_state(path, meta, tensors, pruner)
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
        pruner.apply_masks()
        return int(meta["step"])
