"""Repair inside a LoRA pruning run (``PruneConfig(repair=True)``): at every mask update.

When a mask update cuts groups, each layer's consumers (``o_proj``,
``down_proj``) get their kept columns re-fitted by least squares
(:func:`loraprune.repair.repair_columns`, no bias) to what the whole of their
live input computed just before the cut, so LoRA starts the next steps from
the best linear stand-in instead of from a hole. The effective weight
``W + s·B·A`` is fitted; the change goes into the frozen base weight (the
LoRA factors are left alone).

Statistics: the second moments of each consumer's *live* input (the kept
prefix under progressive compaction, the full width when masked) are gathered
by forward pre-hooks during the training forwards of the step right before
each update (teacher forwards excluded), in float32, and freed at the cut.
They exist only during those steps: ``Σ_layers (o_in² + down_in²) · 4`` bytes
(323 MiB on SmolLM2 at full width, shrinking as groups go; see docs/memory.md).

The teacher stays dense: before a consumer's base weight is first changed, a
copy of it is kept (``LoRALinear.teacher_weight``) and the distillation teacher
(``bypass``) computes with the copy; progressive permutations move the copy with
the weight. That costs one copy of every ``o_proj`` and ``down_proj`` weight
from the first update on (about a third of the projection parameters of a
LLaMA), and :meth:`RunRepair.restore` puts the original weights back when a
run is abandoned.
"""
from __future__ import annotations

import torch

from .repair import SecondMoments, repair_columns


class RunRepair:
    """Gathers the consumers' input statistics before each mask update and repairs at the cut."""

    def __init__(self, damp: float):
        self.damp = float(damp)
        self.collect = False  # set by the pruner: the coming step precedes a mask update
        self._handles = []
        self._stats: dict[tuple[int, str], SecondMoments] = {}

    def attach(self, pruner) -> None:
        s = pruner.spec
        for i, mods in enumerate(pruner.modules):
            for name in (s.o, s.down):
                self._handles.append(mods[name].register_forward_pre_hook(self._hook(i, name)))

    def detach(self, pruner=None) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stats = {}
        self.collect = False

    def _hook(self, i: int, name: str):
        def pre_hook(module, args):
            if not self.collect or module.bypass:
                return None  # not a step before an update, or the dense teacher's forward
            x = args[0]
            st = self._stats.get((i, name))
            if st is None or st.n != x.shape[-1]:
                st = self._stats[i, name] = SecondMoments(x.shape[-1])
            st.update(x)
            return None
        return pre_hook

    @torch.no_grad()
    def cut(self, pruner) -> None:
        """Repair every consumer for the masks just updated (``pruner.state.masks``), in the physical
        layout the statistics were gathered in (before :meth:`LoRAPruner.apply_masks` reorders)."""
        if not self._stats:
            return
        s = pruner.spec
        masks = pruner.state.masks
        for i, (lg, mods) in enumerate(zip(pruner.layers, pruner.modules)):
            q_width = lg.q_per_kv * lg.head_dim
            for name, order, keep, width in ((s.o, pruner.attn_order[i], masks.attn_keep[i], q_width),
                                             (s.down, pruner.mlp_order[i], masks.mlp_keep[i], 1)):
                st = self._stats.get((i, name))
                if st is None or st.count == 0:
                    continue
                module = mods[name]
                live = st.n
                kept_cols = keep[order].repeat_interleave(width)[:live]  # physical column -> kept by the new masks
                if bool(kept_cols.all()) or not bool(kept_cols.any()):
                    continue
                self._repair(module, kept_cols, st, live)
        self._stats = {}

    def _repair(self, module, kept_cols: torch.Tensor, st: SecondMoments, live: int) -> None:
        W = module.base.weight
        if getattr(module, "teacher_weight", None) is None:
            module.teacher_weight = W.detach().clone()  # the dense teacher keeps the original weight
        eff = W[:, :live].float() + module.scaling * (module.lora_B.float() @ module.lora_A[:, :live].float())
        new_k, _ = repair_columns(eff, kept_cols, st, damp=self.damp)
        idx = torch.nonzero(kept_cols, as_tuple=False).flatten().to(W.device)
        delta = new_k - eff[:, idx]
        W[:, idx] += delta.to(W.dtype)

    @staticmethod
    @torch.no_grad()
    def restore(modules) -> None:
        """Put the original (teacher) weights back into every repaired base weight."""
        for m in modules:
            copy = getattr(m, "teacher_weight", None)
            if copy is not None:
                m.base.weight.copy_(copy)
                m.teacher_weight = None
