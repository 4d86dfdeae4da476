"""The pruning engine: LoRA injection, per-step scoring, scheduled masks, final cut.

:class:`LoRAPruner` holds everything between "a Hugging Face model" and "a
smaller dense model", with no training loop of its own, so that
:func:`loraprune.prune` and the ``transformers.Trainer`` callback drive the
same object:

1. ``pruner.lora_parameters()`` go to the optimiser;
2. after ``loss.backward()``: ``pruner.score()`` (uses the gradients);
3. after ``optimizer.step()``: ``pruner.step_end(step)`` (masks on schedule);
4. at the end: ``pruner.finalize()`` cuts, merges and returns the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .allocation import allocate, resolve_skip
from .archs import arch_for, decoder_layers, layer_projections, get_submodule
from .compaction import compact
from .criterion import check_criterion, needs_weight_grad, score_module
from .groups import build_layer_groups, layer_projection_params
from .lora import LoRALinear, is_peft_lora_layer, unwrap_peft, wrap_linear
from .schedule import CubicSchedule
from .state import PruningState

NORMALIZE = (None, "module")


class LoRAPruner:
    """LoRA-guided iterative structured pruning of one model (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        ratio: float = 0.5,
        schedule: CubicSchedule | None = None,
        criterion: str = "lora",
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        square: bool = False,
        normalize: str | None = None,
        ema: float = 0.9,
        skip_layers=None,
        ranking: str = "layer",
        round_to: int = 1,
        uniform: bool = False,
        seed: int = 0,
    ):
        self.criterion = check_criterion(criterion)
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.model = unwrap_peft(model)
        self.spec = arch_for(self.model)
        self.layers = build_layer_groups(self.model, self.spec)
        skip = resolve_skip(skip_layers, len(self.layers))
        if uniform:
            if skip or ranking != "layer":
                raise ValueError("uniform=True needs every layer pruned alike: drop skip_layers and use ranking='layer'")
            shapes = {(lg.n_kv, lg.n_channels) for lg in self.layers}
            if len(shapes) > 1:
                raise ValueError(f"uniform=True needs layers of one shape; this model's layers have widths {sorted(shapes)}")
        if ranking == "global" and round_to > 1:
            raise ValueError("round_to applies per layer: use ranking='layer' with round_to > 1")
        self.total_params = sum(layer_projection_params(self.model, self.spec))
        self.allocation = allocate(self.layers, ratio, self.total_params, skip, round_to)
        self.state = PruningState(self.layers, self.allocation, ema=ema, ranking=ranking, skip=skip)
        self.schedule = schedule
        self.square = square
        self.normalize = normalize
        self.settings = dict(
            ratio=ratio, criterion=criterion, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            square=square, normalize=normalize, ema=ema, skip_layers=sorted(skip), ranking=ranking,
            round_to=round_to, uniform=uniform, seed=seed,
        )
        self.modules = self._inject_lora(lora_r, lora_alpha, lora_dropout, seed)
        leftover = [n for n, m in self.model.named_modules() if is_peft_lora_layer(m)]
        if leftover:
            raise ValueError(
                f"the PeftModel has LoRA layers outside the decoder projections ({', '.join(leftover[:4])}); "
                "loraprune continues adapters on q/k/v/o/gate/up/down only. Merge the others first "
                "(e.g. peft_model.merge_and_unload()) or target only the projections"
            )
        if criterion == "random":
            gen = torch.Generator().manual_seed(seed)
            self.state.observe(
                [torch.rand(lg.n_kv, generator=gen) for lg in self.layers],
                [torch.rand(lg.n_channels, generator=gen) for lg in self.layers],
            )
        if needs_weight_grad(criterion):
            for mods in self.modules:
                for m in mods.values():
                    m.enable_weight_grad(True)

    # ---- set-up ---------------------------------------------------------------
    def _inject_lora(self, r, alpha, dropout, seed) -> list[dict[str, LoRALinear]]:
        for p in self.model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(seed)
        out = []
        for layer in decoder_layers(self.model, self.spec):
            wrapped = {}
            for name, module in layer_projections(layer, self.spec).items():
                parent = get_submodule(layer, self.spec.attn if name in self.spec.attn_projections else self.spec.mlp)
                lora = wrap_linear(module, r, alpha, dropout)
                setattr(parent, name, lora)
                wrapped[name] = lora
            out.append(wrapped)
        return out

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for mods in self.modules for m in mods.values() for p in (m.lora_A, m.lora_B)]

    # ---- scoring ----------------------------------------------------------------
    def _vector(self, module: LoRALinear, rows: bool) -> torch.Tensor:
        row_sums, col_sums = score_module(module, self.criterion, self.square)
        v = row_sums if rows else col_sums
        if self.normalize == "module":
            v = v / v.sum().clamp_min(torch.finfo(v.dtype).tiny)
        return v

    @torch.no_grad()
    def score(self) -> None:
        """Fold this step's gradients into the EMA group scores (call after backward)."""
        if self.criterion == "random":
            return
        s = self.spec
        attn, mlp = [], []
        for lg, mods in zip(self.layers, self.modules):
            attn.append(lg.attn_group_sums(
                self._vector(mods[s.q], True), self._vector(mods[s.k], True),
                self._vector(mods[s.v], True), self._vector(mods[s.o], False),
            ))
            mlp.append(lg.mlp_group_sums(
                self._vector(mods[s.gate], True), self._vector(mods[s.up], True), self._vector(mods[s.down], False),
            ))
            if self.criterion == "grad":
                for m in mods.values():
                    m.base.weight.grad = None
        self.state.observe(attn, mlp)

    def discard_grads(self) -> None:
        """Drop every gradient the engine's layers hold (LoRA factors and, for the
        ``grad`` criterion, the frozen weights): a skipped step must not leak into
        the next one."""
        for mods in self.modules:
            for m in mods.values():
                m.lora_A.grad = m.lora_B.grad = None
                m.base.weight.grad = None

    # ---- masks ------------------------------------------------------------------
    def apply_masks(self) -> None:
        """Make the forward pass compute only kept q/k/v/gate/up rows."""
        s = self.spec
        for lg, mods, a_keep, m_keep in zip(self.layers, self.modules, self.state.masks.attn_keep, self.state.masks.mlp_keep):
            full_a, full_m = bool(a_keep.all()), bool(m_keep.all())
            mods[s.q].set_keep(None if full_a else lg.q_index(a_keep))
            mods[s.k].set_keep(None if full_a else lg.kv_index(a_keep))
            mods[s.v].set_keep(None if full_a else lg.kv_index(a_keep))
            mods[s.gate].set_keep(None if full_m else lg.channel_index(m_keep))
            mods[s.up].set_keep(None if full_m else lg.channel_index(m_keep))

    def step_end(self, step: int) -> bool:
        """Record the completed optimiser step; update masks if the schedule says so."""
        self.state.step = step
        if self.schedule is None or not self.schedule.is_update(step):
            return False
        changed = self.state.update(self.schedule.fraction(step))
        if changed:
            self.apply_masks()
        return changed

    def reach_target(self) -> None:
        """Jump to the final masks (used when training stops before the schedule ends)."""
        if self.state.update(1.0):
            self.apply_masks()

    # ---- the end ------------------------------------------------------------------
    def removed_params(self) -> int:
        return sum(
            (lg.n_kv - kv) * lg.attn_cost + (lg.n_channels - ch) * lg.mlp_cost
            for lg, kv, ch in zip(self.layers, self.state.masks.kept_kv(), self.state.masks.kept_channels())
        )

    def report(self) -> dict:
        removed = self.removed_params()
        achieved = removed / self.total_params
        target = self.settings["ratio"]
        return {
            "settings": dict(self.settings),
            "projection_params": self.total_params,
            "removed_params": removed,
            "achieved_ratio": achieved,
            "target_ratio": target,
            # achieved - target: what whole KV groups and round_to cost the parameter target
            "rounding_effect": achieved - target,
            "steps": self.state.step,
        }

    @torch.no_grad()
    def finalize(self, merge: bool = True) -> nn.Module:
        """Reach the target, cut the masked groups, merge LoRA; returns the small model.

        ``merge=False`` keeps the LoRA layers, gathered to the pruned shapes, for
        :func:`loraprune.export_adapter` (then :func:`loraprune.merge_lora`).
        """
        self.reach_target()
        report = self.report()
        for mods in self.modules:
            for m in mods.values():
                m.enable_weight_grad(False)
        model = compact(self.model, self.state.masks, self.spec, merge=merge)
        block = dict(model.config.loraprune)
        block.update(report)
        model.config.loraprune = block
        return model
