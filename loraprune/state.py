"""Pruning state: EMA-smoothed group scores and the masks they decide.

Scores from every step are folded into an exponential moving average
(``ema`` ≈ 0.9, as the paper) that starts at zero, as the official code's.
Seeding it with the first observation instead would give step 1 (where
B = 0, so ∇A = 0 and the LoRA estimate is a random projection of the true
gradient) a weight of ``ema**(n-1)`` in every later decision: 59% after 6
steps. Starting at zero gives it ``(1-ema)·ema**(n-1)`` like any other step;
the ranking equals that of the bias-corrected average. On an update step the state removes, among the
groups still kept, the lowest-scoring ones until the schedule's share of the
final :class:`~loraprune.allocation.Allocation` is reached. Masks only grow:
a group once removed stays removed, which is what makes the final cut
identical to the masked network the loss has been seeing.
"""
from __future__ import annotations

import torch

from .allocation import Allocation
from .groups import LayerGroups
from .masks import Masks


class PruningState:
    def __init__(self, layers: list[LayerGroups], allocation: Allocation, ema: float = 0.9, ranking: str = "layer",
                 skip=frozenset()):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if ranking not in ("layer", "global"):
            raise ValueError(f"ranking must be 'layer' or 'global', got {ranking!r}")
        self.layers = layers
        self.allocation = allocation
        self.ema = ema
        self.ranking = ranking
        self.skip = frozenset(skip)  # layers that keep everything, whatever their scores
        self.masks = Masks.full(layers)
        self.attn_score = [torch.zeros(lg.n_kv) for lg in layers]
        self.mlp_score = [torch.zeros(lg.n_channels) for lg in layers]
        self.observations = 0
        self.step = 0

    # ---- scores -------------------------------------------------------------
    def observe(self, attn_scores: list[torch.Tensor], mlp_scores: list[torch.Tensor]) -> None:
        """Fold one step's group scores into the EMA (which starts at zero)."""
        lam = self.ema
        for i, (a, m) in enumerate(zip(attn_scores, mlp_scores)):
            self.attn_score[i].mul_(lam).add_(a.detach().float().cpu(), alpha=1 - lam)
            self.mlp_score[i].mul_(lam).add_(m.detach().float().cpu(), alpha=1 - lam)
        self.observations += 1

    # ---- masks --------------------------------------------------------------
    @staticmethod
    def _drop_lowest(keep: torch.Tensor, score: torch.Tensor, count: int) -> None:
        if count <= 0:
            return
        kept = torch.nonzero(keep).flatten()
        order = torch.argsort(score[kept], stable=True)
        keep[kept[order[:count]]] = False

    def update(self, fraction: float) -> bool:
        """Prune up to ``fraction`` of the final removal; True if a mask changed."""
        before = (self.masks.kept_kv(), self.masks.kept_channels())
        if self.ranking == "layer":
            for i in range(len(self.layers)):
                a_target = int(round(fraction * self.allocation.attn_remove[i]))
                m_target = int(round(fraction * self.allocation.mlp_remove[i]))
                a_keep, m_keep = self.masks.attn_keep[i], self.masks.mlp_keep[i]
                self._drop_lowest(a_keep, self.attn_score[i], a_target - int((~a_keep).sum()))
                self._drop_lowest(m_keep, self.mlp_score[i], m_target - int((~m_keep).sum()))
        else:
            self._global_update(fraction, self.masks.attn_keep, self.attn_score, self.allocation.attn_remove, self.skip)
            self._global_update(fraction, self.masks.mlp_keep, self.mlp_score, self.allocation.mlp_remove, self.skip)
        return before != (self.masks.kept_kv(), self.masks.kept_channels())

    @staticmethod
    def _global_update(fraction, keeps, scores, final_remove, skip=frozenset()) -> None:
        """Remove the globally lowest-scoring groups of one kind, keeping at least
        one group per layer and every group of a skipped layer; the total follows
        the schedule."""
        target = int(round(fraction * sum(final_remove)))
        need = target - sum(int((~k).sum()) for k in keeps)
        if need <= 0:
            return
        cand_layer, cand_idx, cand_score = [], [], []
        for i, (k, s) in enumerate(zip(keeps, scores)):
            if i in skip:
                continue
            idx = torch.nonzero(k).flatten()
            cand_layer.append(torch.full_like(idx, i))
            cand_idx.append(idx)
            cand_score.append(s[idx])
        layer_of = torch.cat(cand_layer)
        index_of = torch.cat(cand_idx)
        order = torch.argsort(torch.cat(cand_score), stable=True)
        left = [int(k.sum()) for k in keeps]
        for j in order.tolist():
            if need == 0:
                break
            li = int(layer_of[j])
            if left[li] <= 1:
                continue
            keeps[li][index_of[j]] = False
            left[li] -= 1
            need -= 1

    # ---- checkpoint ---------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(len(self.layers)):
            out[f"attn_keep.{i}"] = self.masks.attn_keep[i]
            out[f"mlp_keep.{i}"] = self.masks.mlp_keep[i]
            out[f"attn_score.{i}"] = self.attn_score[i]
            out[f"mlp_score.{i}"] = self.mlp_score[i]
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], observations: int, step: int) -> None:
        for i in range(len(self.layers)):
            self.masks.attn_keep[i] = tensors[f"attn_keep.{i}"].clone()
            self.masks.mlp_keep[i] = tensors[f"mlp_keep.{i}"].clone()
            self.attn_score[i] = tensors[f"attn_score.{i}"].clone()
            self.mlp_score[i] = tensors[f"mlp_score.{i}"].clone()
        self.observations = observations
        self.step = step
