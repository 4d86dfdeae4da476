"""Pruning state: EMA-smoothed group scores and the masks they decide.

Scores from every step are folded into an exponential moving average
(``ema`` ≈ 0.9, as the paper) that starts at zero, as the official code's.
Seeding it with the first observation instead would give step 1 (where
B = 0, so ∇A = 0 and the LoRA estimate is a random projection of the true
gradient) a weight of ``ema**(n-1)`` in every later decision: 59% after 6
steps. Starting at zero gives it ``(1-ema)·ema**(n-1)`` like any other step;
the ranking equals that of the bias-corrected average. On an update step the state removes, among the
groups still kept, the lowest-scoring ones until the schedule's share of the
final :class:`~loraprune.method.allocation.Allocation` is reached. Masks only grow:
a group once removed stays removed, which is what makes the final cut
identical to the masked network the loss has been seeing.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..structure.groups import LayerGroups, removed_params
from ..structure.masks import Masks
from .allocation import RATIO_TOLERANCE, Allocation, allocate


class PruningState:
    def __init__(self, layers: list[LayerGroups], allocation: Allocation, ema: float = 0.9, ranking: str = "layer",
                 skip=frozenset(), round_to: int = 1):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if ranking not in ("layer", "global", "adaptive"):
            raise ValueError(f"ranking must be 'layer', 'global' or 'adaptive', got {ranking!r}")
        self.layers = layers
        self.allocation = allocation
        self.ema = ema
        self.ranking = ranking
        self.skip = frozenset(skip)  # layers that keep everything, whatever their scores
        # MLP widths stay multiples of round_to: 'adaptive' and 'global' remove whole blocks of channels
        # (:meth:`mlp_blocks`); 'layer' gets rounded widths from the allocation
        self.round_to = int(round_to)
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
        elif self.ranking == "adaptive":
            self._adaptive_update(fraction)
        else:
            self._global_update(fraction, self.masks.attn_keep, self.attn_score, self.allocation.attn_remove, self.skip)
            if self.round_to > 1:
                self._global_block_update(fraction)
            else:
                self._global_update(fraction, self.masks.mlp_keep, self.mlp_score, self.allocation.mlp_remove,
                                    self.skip)
        return before != (self.masks.kept_kv(), self.masks.kept_channels())

    def mlp_blocks(self, i: int) -> list[torch.Tensor]:
        """The MLP channels layer ``i`` can still give up, as blocks removed whole, lowest scores first.

        The kept channels sorted by score, cut so that every block removed leaves a multiple of
        ``round_to`` kept: the first block takes the channels above the next lower multiple (all
        ``round_to`` of them when the width already is one), the others ``round_to`` each, and the
        last ``round_to`` channels (the per-layer floor) are never offered. A block's score is the
        sum of its channels' scores. With ``round_to=1`` every kept channel but one is a block.
        """
        r = self.round_to
        kept = torch.nonzero(self.masks.mlp_keep[i]).flatten()
        n = kept.numel()
        if n <= r:
            return []
        order = kept[torch.argsort(self.mlp_score[i][kept], stable=True)]
        first = n - r * ((n - 1) // r)
        rest = order[first:n - r]  # empty when only the first block is left (n <= 2r): split() would give [empty]
        return [order[:first]] + (list(rest.split(r)) if rest.numel() else [])

    def _global_block_update(self, fraction: float) -> None:
        """'global' ranking with ``round_to > 1``: the lowest-scoring MLP blocks across layers (each layer's
        in score order, at least one block kept per layer), until the schedule's channel count is
        reached within half a block."""
        target = int(round(fraction * sum(self.allocation.mlp_remove)))
        need = target - sum(int((~k).sum()) for k in self.masks.mlp_keep)
        cands = []  # (block score, layer, position in the layer's block order, channels)
        for i in range(len(self.layers)):
            if i not in self.skip:
                cands += [(float(self.mlp_score[i][b].sum()), i, j, b) for j, b in enumerate(self.mlp_blocks(i))]
        cands.sort(key=lambda c: (c[0], c[1], c[2]))
        blocked = set()
        for _, i, _, block in cands:
            if need <= 0:
                break
            if i in blocked or block.numel() > need + block.numel() / 2:
                blocked.add(i)  # a layer's later blocks score higher: they wait for this one
                continue
            self.masks.mlp_keep[i][block] = False
            need -= block.numel()

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

    #: adaptive ranking: no layer gives up more than this share of its projection
    #: parameters, and the first and last layers (the most sensitive, in LLM-Pruner's
    #: and the official code's experience) no more than half the overall ratio.
    MAX_LAYER_SHARE = 0.9
    EDGE_LAYER_FACTOR = 0.5

    def _layer_caps(self) -> list[float]:
        """Per-layer caps on the parameters removed (see :data:`MAX_LAYER_SHARE`). Where they would leave the
        target out of reach (few layers: the two edge layers are a large share of the model; coarse blocks),
        they are relaxed a level at a time: edge layers as the others, then every layer up to its floor, so
        the ratio is met rather than missed in silence."""
        total = self.allocation.removed_params(self.layers)
        ratio = total / max(1, sum(lg.params for lg in self.layers))
        n = len(self.layers)
        for level in range(3):
            caps = []
            for i, lg in enumerate(self.layers):
                if i in self.skip:
                    caps.append(0.0)
                    continue
                share = min(self.MAX_LAYER_SHARE, 2.0 * ratio) if level < 2 else 1.0
                if n > 2 and i in (0, n - 1) and level == 0:
                    share = self.EDGE_LAYER_FACTOR * ratio
                caps.append(share * lg.params)
            unit = max(max(lg.attn_cost, min(self.round_to, lg.n_channels) * lg.mlp_cost) for lg in self.layers)
            if self._capacity(caps) >= total + unit:  # room for the greedy order's slack: one unit
                break
        return caps

    def _capacity(self, caps: list[float]) -> float:
        """What the layers can give up under ``caps`` in whole units: per layer, the most that KV groups and
        MLP blocks above its floor (one of each kept) add up to without passing its cap."""
        out = 0.0
        r = max(1, self.round_to)
        for i, (lg, cap) in enumerate(zip(self.layers, caps)):
            if i in self.skip:
                continue
            blocks = (lg.n_channels - 1) // r if lg.n_channels > r else 0  # whole blocks above the floor
            block = r * lg.mlp_cost
            best = 0
            for a in range(lg.n_kv):
                room = cap - a * lg.attn_cost
                if room < 0:
                    break
                best = max(best, a * lg.attn_cost + min(blocks, int(room // block)) * block)
            out += best
        return out

    def _adaptive_update(self, fraction: float) -> None:
        """Score-driven allocation across layers *and* between attention and MLP.

        All remaining KV groups and channels compete in one ranking by score per
        parameter (the cost of keeping them), so removal follows where the loss
        cares least: a knapsack, solved greedily. The parameter total follows the
        schedule and lands within half a group of the allocation's total; a
        layer keeps at least one KV group and one channel and stays under its cap
        (:meth:`_layer_caps`). With ``round_to > 1`` the MLP competes in blocks
        (:meth:`mlp_blocks`: score = the sum of its channels', cost = its channels'),
        taken in each layer's order, so every width stays a multiple of ``round_to``.
        """
        target = fraction * self.allocation.removed_params(self.layers)
        removed = [(lg.n_kv - int(a.sum())) * lg.attn_cost + (lg.n_channels - int(m.sum())) * lg.mlp_cost
                   for lg, a, m in zip(self.layers, self.masks.attn_keep, self.masks.mlp_keep)]
        need = target - sum(removed)
        if need <= 0:
            return
        caps = self._layer_caps()
        blocks = self.round_to > 1
        cands = []  # (score per parameter, kind, layer, index or block of indices, cost, groups)
        for i, lg in enumerate(self.layers):
            if i in self.skip:
                continue
            units = (("attn", self.masks.attn_keep[i], self.attn_score[i], lg.attn_cost),)
            if not blocks:
                units += (("mlp", self.masks.mlp_keep[i], self.mlp_score[i], lg.mlp_cost),)
            for kind, keep, score, cost in units:
                idx = torch.nonzero(keep).flatten()
                for j, v in zip(idx.tolist(), (score[idx] / cost).tolist()):
                    cands.append((v, kind, i, j, cost, 1))
            if blocks:
                for b in self.mlp_blocks(i):
                    cost = b.numel() * lg.mlp_cost
                    cands.append((float(self.mlp_score[i][b].sum()) / cost, "mlp", i, b, cost, b.numel()))
        cands.sort(key=lambda c: c[0])
        left = {("attn", i): int(a.sum()) for i, a in enumerate(self.masks.attn_keep)}
        left.update({("mlp", i): int(m.sum()) for i, m in enumerate(self.masks.mlp_keep)})
        # two passes in score order. First a unit may overshoot what is still needed by less than half its cost
        # and never by more than the ratio's tolerance (a KV group can be a tenth of a small model: the finer
        # units behind it in the ranking fill the rest instead); then, if that left the total short, by less
        # than half its cost (the rule of one pass before), whichever lands closer
        slack = RATIO_TOLERANCE * self.allocation.total_params
        taken = set()
        for limit in (slack, float("inf")):
            blocked = set()  # layers whose next MLP block was passed over: their later blocks wait too
            for n, (_, kind, i, j, cost, size) in enumerate(cands):
                if need <= 0:
                    break
                if n in taken or (blocks and kind == "mlp" and i in blocked):
                    continue
                if left[(kind, i)] - size < 1 or removed[i] + cost > caps[i] or cost - need > min(cost / 2, limit):
                    if blocks and kind == "mlp":
                        blocked.add(i)
                    continue  # keep one of each per layer; layer cap; overshoot
                (self.masks.attn_keep if kind == "attn" else self.masks.mlp_keep)[i][j] = False
                taken.add(n)
                left[(kind, i)] -= size
                removed[i] += cost
                need -= cost

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


# ---- reachability: is the ratio exact, or refused -------------------------------------------------------
def _synthetic_scores(layers: list[LayerGroups], seed: int, attn_scale: float):
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(lg.n_kv, generator=g) * attn_scale for lg in layers],
            [torch.rand(lg.n_channels, generator=g) for lg in layers])


#: The score draws of the dry run: (seed, attention scale): mixed, the MLP paying (attention dear), and
#: attention paying first (attention cheap); each run in one update (one-shot) and on a 10-update schedule.
DRY_RUN_DRAWS = ((0, 1.0), (1, 1e6), (2, 1e-6))
#: A cubic schedule of 10 mask updates (as prune() spreads them; also how the one-shot baselines apply
#: 'adaptive' ranking), and a single update.
STAGED_FRACTIONS = tuple(1 - (1 - t / 10) ** 3 for t in range(1, 11))
DRY_RUN_FRACTIONS = (STAGED_FRACTIONS, (1.0,))


def dry_run(layers: list[LayerGroups], allocation: Allocation, ranking: str, skip=frozenset(),
            round_to: int = 1) -> list[float]:
    """The removed shares a run with these options lands at, on synthetic scores (:data:`DRY_RUN_DRAWS`), once
    the blocks are formed: the masks' own update rule, run on copies, so every constraint a real run meets
    (whole KV groups, blocks of ``round_to`` channels, one group and one block kept per layer, the adaptive
    per-layer caps) is in it. 'layer' ranking is exact: its widths come from the allocation alone."""
    if ranking == "layer":
        return [allocation.achieved_ratio(layers)]
    out = []
    for seed, scale in DRY_RUN_DRAWS:
        for fractions in DRY_RUN_FRACTIONS:
            state = PruningState(layers, allocation, ema=0.0, ranking=ranking, skip=skip, round_to=round_to)
            state.observe(*_synthetic_scores(layers, seed, scale))
            for f in fractions:
                state.update(f)
            out.append(removed_params(layers, state.masks) / allocation.total_params)
    return out


def check_reachable(layers: list[LayerGroups], allocation: Allocation, ranking: str, skip=frozenset(),
                    round_to: int = 1, tolerance: float = RATIO_TOLERANCE) -> None:
    """Refuse, before any work, options whose blocks cannot land within ``tolerance`` of the ratio
    (:func:`dry_run`), naming the closest ratio they reach and a ``round_to`` (or ranking) that reaches it."""
    ratio = allocation.target_ratio
    landed = dry_run(layers, allocation, ranking, skip, round_to)
    worst = max(landed, key=lambda r: abs(r - ratio))
    if abs(worst - ratio) <= tolerance:
        return
    fixes = []
    for r in sorted({d for d in (round_to // 2, round_to // 4, 32, 16, 8, 1) if 1 <= d < round_to}, reverse=True):
        if _lands(layers, ratio, allocation.total_params, skip, r, ranking, tolerance):
            fixes.append(f"round_to={r}")
            break
    for other in ("global", "layer", "adaptive"):
        if other != ranking and _lands(layers, ratio, allocation.total_params, skip, round_to, other, tolerance):
            fixes.append(f"ranking={other!r}")
            break
    what = f"blocks of round_to={round_to} MLP channels" if round_to > 1 else "whole KV groups and MLP channels"
    caps = " under the per-layer caps of ranking='adaptive'" if ranking == "adaptive" else ""
    raise ConfigError(
        f"ratio={ratio} cannot be reached within {tolerance} with ranking={ranking!r} and round_to={round_to}: "
        f"{what}{caps} land at {worst:.3f} (the closest they reach: pass ratio={worst:.3f})"
        + (f", or keep the ratio with {' or '.join(fixes)}" if fixes else ", or lower round_to / skip fewer layers")
    )


def _lands(layers, ratio, total, skip, round_to, ranking, tolerance) -> bool:
    try:
        allocation = allocate(layers, ratio, total, skip, round_to, ranking)
    except ValueError:
        return False
    return all(abs(r - ratio) <= tolerance for r in dry_run(layers, allocation, ranking, skip, round_to))
