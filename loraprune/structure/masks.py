"""Which groups are kept: one boolean vector per layer for attention (KV
groups) and one for the MLP (intermediate channels). Exportable as JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch


def _keep_vector(layer: dict, kept_key: str, total_key: str, i: int) -> torch.Tensor:
    """A bool vector of ``layer[total_key]`` entries, True at the indices ``layer[kept_key]``."""
    total, kept = layer.get(total_key), layer.get(kept_key)
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise ValueError(f"layer {i}: {total_key} must be a positive integer, got {total!r}")
    if not isinstance(kept, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in kept):
        raise ValueError(f"layer {i}: {kept_key} must be a list of integers")
    bad = [k for k in kept if not 0 <= k < total]
    if bad:
        raise ValueError(f"layer {i}: {kept_key} index {bad[0]} is out of range [0, {total})")
    if len(set(kept)) != len(kept):
        raise ValueError(f"layer {i}: {kept_key} lists an index twice")
    if not kept:
        raise ValueError(f"layer {i}: {kept_key} is empty; every layer keeps at least one group")
    out = torch.zeros(total, dtype=torch.bool)
    out[torch.as_tensor(kept, dtype=torch.long)] = True
    return out


@dataclass
class Masks:
    attn_keep: list[torch.Tensor]  # per layer, bool (n_kv,)
    mlp_keep: list[torch.Tensor]  # per layer, bool (n_channels,)

    @classmethod
    def full(cls, layers) -> "Masks":
        return cls(
            [torch.ones(lg.n_kv, dtype=torch.bool) for lg in layers],
            [torch.ones(lg.n_channels, dtype=torch.bool) for lg in layers],
        )

    def clone(self) -> "Masks":
        return Masks([m.clone() for m in self.attn_keep], [m.clone() for m in self.mlp_keep])

    def kept_kv(self) -> list[int]:
        return [int(m.sum()) for m in self.attn_keep]

    def kept_channels(self) -> list[int]:
        return [int(m.sum()) for m in self.mlp_keep]

    def to_dict(self) -> dict:
        """Kept indices per layer (JSON-friendly)."""
        return {
            "layers": [
                {
                    "kv_groups": torch.nonzero(a).flatten().tolist(),
                    "n_kv_groups": int(a.numel()),
                    "mlp_channels": torch.nonzero(m).flatten().tolist(),
                    "n_mlp_channels": int(m.numel()),
                }
                for a, m in zip(self.attn_keep, self.mlp_keep)
            ]
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Masks":
        """Inverse of :meth:`to_dict`; refuses (``ValueError``) indices out of range, repeated or not integers."""
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise ValueError("masks JSON needs a 'layers' list")
        attn, mlp = [], []
        for i, layer in enumerate(data["layers"]):
            a = _keep_vector(layer, "kv_groups", "n_kv_groups", i)
            m = _keep_vector(layer, "mlp_channels", "n_mlp_channels", i)
            attn.append(a)
            mlp.append(m)
        return cls(attn, mlp)

    def save_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh)

    @classmethod
    def load_json(cls, path) -> "Masks":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))
