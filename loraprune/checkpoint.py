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

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used to resume this run; the message says why."""


class Checkpointer:
    def __init__(self, root, every: int | None = None, keep: int = 2):
        self.dir = Path(root) / "checkpoints"
        self.every = every
        self.keep = keep

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    # ---- write ------------------------------------------------------------------
    def save(self, pruner, optimizer, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"state.{k}": v.contiguous() for k, v in pruner.state.tensors().items()}
        for i, mods in enumerate(pruner.modules):
            for name, m in mods.items():
                tensors[f"lora.{i}.{name}.A"] = m.lora_A.detach().contiguous()
                tensors[f"lora.{i}.{name}.B"] = m.lora_B.detach().contiguous()
        opt = optimizer.state_dict()
        for idx, st in opt["state"].items():
            for key, val in st.items():
                t = val if torch.is_tensor(val) else torch.tensor(val)
                tensors[f"opt.{idx}.{key}"] = t.detach().contiguous()
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for d, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{d}"] = s
        meta = {
            "format": FORMAT,
            "step": step,
            "observations": pruner.state.observations,
            "settings": pruner.settings,
            "param_groups": opt["param_groups"],
            "n_layers": len(pruner.layers),
        }
        tmp = Path(tempfile.mkdtemp(prefix=".step-", suffix=".partial", dir=self.dir))
        try:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            final = self.dir / f"step-{step:08d}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("n_layers") != len(pruner.layers):
            raise CheckpointError(f"{path} was written for a different model or loraprune version; remove it or start anew")
        mismatched = {k: (v, pruner.settings.get(k)) for k, v in meta["settings"].items() if pruner.settings.get(k) != v}
        if mismatched:
            raise CheckpointError(
                f"{path} was written with other settings {mismatched} (saved, now); resume with the same options "
                "or use a new output directory"
            )
        tensors = load_file(str(path / "state.safetensors"))
        state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        pruner.state.load_tensors(state, meta["observations"], meta["step"])
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
