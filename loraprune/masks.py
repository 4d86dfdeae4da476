"""Which groups are kept: one boolean vector per layer for attention (KV
groups) and one for the MLP (intermediate channels). Exportable as JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch


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

    def is_uniform(self) -> bool:
        return len(set(self.kept_kv())) == 1 and len(set(self.kept_channels())) == 1

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
        attn, mlp = [], []
        for i, layer in enumerate(data["layers"]):
            a = torch.zeros(layer["n_kv_groups"], dtype=torch.bool)
            m = torch.zeros(layer["n_mlp_channels"], dtype=torch.bool)
            try:
                a[torch.as_tensor(layer["kv_groups"], dtype=torch.long)] = True
                m[torch.as_tensor(layer["mlp_channels"], dtype=torch.long)] = True
            except IndexError as err:
                raise ValueError(f"masks JSON, layer {i}: a kept index is out of range ({err})") from err
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
