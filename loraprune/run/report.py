"""What a pruning run did, as one typed record: the ``config.loraprune`` block.

:class:`PruneReport` is written into ``model.config.loraprune`` (so it travels
with ``save_pretrained``) by the LoRA engine and the one-shot baselines, and
read back by the CLI summary, ``loraprune inspect`` and the benchmarks.
``to_dict()`` gives the JSON block; ``from_dict()`` reads it back, keeping keys
it does not know (e.g. export notes) in ``extra``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class PruneReport:
    settings: dict  # the run-defining options (see loraprune.config.RUN_DEFINING)
    projection_params: int  # decoder-projection parameters before pruning (biases included)
    removed_params: int  # of those, removed
    target_ratio: float  # the ratio asked for
    steps: int = 0  # optimiser steps run (0 for one-shot methods)
    layers: list = field(default_factory=list)  # per layer: num_attention_heads, num_key_value_heads, intermediate_size
    uniform: bool = True  # every layer keeps the same widths
    original: dict | None = None  # the widths before pruning
    extra: dict = field(default_factory=dict)  # method-specific keys (achieved_ratio_with_biases, export notes)
    model_params: int | None = None  # whole-model parameters before pruning (embeddings, head, norms; tied once)

    @property
    def achieved_ratio(self) -> float:
        """Removed share of the decoder-projection parameters (what ``ratio`` asks for)."""
        return self.removed_params / self.projection_params if self.projection_params else 0.0

    @property
    def achieved_ratio_model(self) -> float | None:
        """Removed share of all the model's parameters, as papers count (None when not recorded)."""
        return self.removed_params / self.model_params if self.model_params else None

    @property
    def rounding_effect(self) -> float:
        """achieved - target: what whole KV groups and ``round_to`` cost the parameter target."""
        return self.achieved_ratio - self.target_ratio

    @classmethod
    def measure(cls, groups, masks, projection_params: int, settings: dict, target_ratio: float, steps: int = 0,
                model_params: int | None = None, **extra) -> "PruneReport":
        """The report of ``masks`` over the :class:`~loraprune.structure.groups.LayerGroups` of the dense model.

        ``projection_params``: :func:`~loraprune.structure.groups.layer_projection_params` summed over the
        dense model (it also counts the o/down biases, which belong to no group); ``model_params``:
        :func:`whole_model_params` of the dense model.
        """
        from ..structure.groups import removed_params

        return cls(settings=dict(settings), projection_params=projection_params,
                   removed_params=removed_params(groups, masks), target_ratio=target_ratio, steps=steps, extra=extra,
                   model_params=model_params)

    # ---- the config.loraprune block ------------------------------------------------------
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["achieved_ratio"] = self.achieved_ratio
        out["achieved_ratio_model"] = self.achieved_ratio_model
        out["rounding_effect"] = self.rounding_effect
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, block: dict) -> "PruneReport":
        """Inverse of :meth:`to_dict` (``achieved_ratio``, ``achieved_ratio_model``, ``rounding_effect`` are recomputed)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = sorted(k for k in ("settings", "projection_params", "removed_params", "target_ratio") if k not in block)
        if missing:
            raise KeyError(f"the loraprune block lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in block.items() if k in known}
        derived = ("achieved_ratio", "achieved_ratio_model", "rounding_effect")
        extra = {k: v for k, v in block.items() if k not in known and k not in derived}
        return cls(**kwargs, extra=extra)

    @classmethod
    def of(cls, model) -> "PruneReport":
        """The report stored on a pruned model (``model.config.loraprune``)."""
        return cls.from_dict(getattr(model.config, "loraprune", None) or {})

    def attach(self, config) -> "PruneReport":
        """Write into ``config.loraprune``; a report without widths takes the ones compaction recorded there."""
        block = dict(getattr(config, "loraprune", None) or {})
        report = self if self.layers else dataclasses.replace(
            self, layers=block.get("layers", []), uniform=block.get("uniform", True), original=block.get("original"))
        block.update(report.to_dict())
        config.loraprune = block
        return report


def whole_model_params(model) -> int:
    """All parameters of ``model`` as papers count them: embeddings, head, norms and projections, a tied
    embedding once, LoRA factors (loraprune's or PEFT's) left out."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_A" not in name and "lora_B" not in name)
