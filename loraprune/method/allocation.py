"""How many groups each layer gives up so the model loses ``ratio`` of its
decoder-projection parameters.

``ratio`` counts parameters of the seven projections of every decoder layer
(q, k, v, o, gate, up, down, biases included) — not a per-layer head/channel
fraction. Skipped layers keep everything, so the other layers remove more to
reach the same total. Attention is cut in whole KV groups (coarse); the MLP,
cut per channel (fine), absorbs the difference, so the total lands within a
fraction of a channel per layer of the target (unless width rounding asks
otherwise, which the report shows).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..structure.groups import LayerGroups


@dataclass(frozen=True)
class Allocation:
    attn_remove: list[int]  # KV groups each layer removes at the end
    mlp_remove: list[int]  # MLP channels each layer removes at the end
    total_params: int  # all decoder-projection parameters
    target_ratio: float

    def removed_params(self, layers: list[LayerGroups]) -> int:
        return sum(a * lg.attn_cost + m * lg.mlp_cost for a, m, lg in zip(self.attn_remove, self.mlp_remove, layers))

    def achieved_ratio(self, layers: list[LayerGroups]) -> float:
        return self.removed_params(layers) / self.total_params


def resolve_skip(skip_layers, n_layers: int) -> set[int]:
    """``None``/``()`` → none; ``"paper"`` → first 10 % and the last layer (as
    the official LoRAPrune code); or an iterable of indices (negative allowed)."""
    if not skip_layers:
        return set()
    if skip_layers == "paper":
        return set(range(max(1, n_layers // 10))) | {n_layers - 1}
    if isinstance(skip_layers, str):
        raise ValueError(f"skip_layers must be 'paper' or a list of layer indices, got {skip_layers!r}")
    out = set()
    for i in skip_layers:
        j = int(i) + (n_layers if int(i) < 0 else 0)
        if not 0 <= j < n_layers:
            raise ValueError(f"skip_layers index {i} is out of range for a model with {n_layers} layers")
        out.add(j)
    return out


#: ``round_to=None`` (the default) resolves to this block size where every MLP is wide enough (see resolve_round_to).
AUTO_ROUND_TO = 32
AUTO_MIN_WIDTH = 512


def resolve_round_to(round_to: int | None, layers: list[LayerGroups]) -> int:
    """The MLP block size a run uses: ``round_to`` as given, or for ``None`` 32 where every layer's MLP
    width is a multiple of 32 and at least 512 channels, else 1 (per-channel).

    32 is the block of llama.cpp's common quantizations (Q8_0, Q4_0): a ``ffn_down`` whose input width
    is not a multiple of it stays F16 in a quantized file. On SmolLM2 at 50 % (30 steps) blocks of 32
    cost no measurable perplexity against per-channel pruning (bench/README.md). Narrow MLPs (below 16
    blocks, such as the tiny test models) keep per-channel granularity, where one block would be a
    large share of a layer.
    """
    if round_to is not None:
        return int(round_to)
    ok = all(lg.n_channels % AUTO_ROUND_TO == 0 and lg.n_channels >= AUTO_MIN_WIDTH for lg in layers)
    return AUTO_ROUND_TO if ok else 1


#: How far the removed share may land from ``ratio`` (absolute): the "within 1 %" the options promise.
#: A plan that cannot land that close is refused before any work (:func:`loraprune.method.state.check_reachable`).
RATIO_TOLERANCE = 0.01


def _round_kept(kept: int, n: int, multiple: int) -> int:
    if multiple <= 1:
        return kept
    if n <= multiple:
        return n  # no multiple of round_to below the width: the MLP keeps it all (as the blocks of the other rankings)
    return min(n, max(multiple, int(round(kept / multiple)) * multiple))


def _closest_layer_cut(lg: LayerGroups, want: float, a0: int, multiple: int) -> tuple[int, int]:
    """``(KV groups, MLP channels)`` layer ``lg`` removes with kept widths a multiple of ``multiple``: the pair
    whose parameters come closest to ``want`` (ties: the KV count nearest ``a0``). Rounding the MLP alone can
    miss by half a block per layer; letting attention absorb the difference lands closer."""
    widths = [lg.n_channels] + list(range(multiple, lg.n_channels, multiple))
    best = None
    for a in range(lg.n_kv):
        for kept in widths:
            m = lg.n_channels - kept
            key = (abs(a * lg.attn_cost + m * lg.mlp_cost - want), abs(a - a0))
            if best is None or key < best[0]:
                best = (key, a, m)
    return best[1], best[2]


def allocate(
    layers: list[LayerGroups],
    ratio: float,
    total_params: int,
    skip: set[int] = frozenset(),
    round_to: int = 1,
    ranking: str = "layer",
) -> Allocation:
    """Final per-layer removal counts (the same in every layer of equal shape).

    ``round_to`` rounds each layer's kept MLP width here only for ``ranking='layer'``; the
    other rankings keep the exact total and round by removing whole blocks
    (:meth:`loraprune.method.state.PruningState.mlp_blocks`).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) — the fraction of decoder-projection parameters to remove; got {ratio}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    widest = max(lg.n_channels for lg in layers)
    if round_to > widest:
        raise ConfigError(f"round_to={round_to} is larger than the MLP width ({widest} channels); use a divisor "
                          "of the width such as 8, 64 or 128")
    prunable = [lg for lg in layers if lg.layer not in skip]
    if not prunable:
        raise ValueError("every layer is skipped; nothing can be pruned (shorten skip_layers)")
    prunable_params = sum(lg.params for lg in prunable)
    local = ratio * total_params / prunable_params
    if local >= 1.0:
        raise ValueError(
            f"ratio={ratio} cannot be reached: the {len(prunable)} unskipped layers hold "
            f"{prunable_params / total_params:.1%} of the projection parameters. Lower the ratio or skip fewer layers."
        )
    attn_remove, mlp_remove = [], []
    for lg in layers:
        if lg.layer in skip:
            attn_remove.append(0)
            mlp_remove.append(0)
            continue
        a = min(int(round(local * lg.n_kv)), lg.n_kv - 1)
        want = local * lg.params - a * lg.attn_cost
        m = min(max(int(round(want / lg.mlp_cost)), 0), lg.n_channels - 1)
        if ranking == "layer" and round_to > 1:
            a, m = _closest_layer_cut(lg, local * lg.params, a, round_to)
        kept = _round_kept(lg.n_channels - m, lg.n_channels, round_to if ranking == "layer" else 1)
        attn_remove.append(a)
        mlp_remove.append(lg.n_channels - kept)
    out = Allocation(attn_remove, mlp_remove, total_params, ratio)
    achieved = out.achieved_ratio(layers)
    if (round_to == 1 or ranking != "layer") and achieved < ratio - 0.01:
        most = sum((lg.n_kv - 1) * lg.attn_cost + (lg.n_channels - 1) * lg.mlp_cost for lg in prunable) / total_params
        raise ConfigError(
            f"ratio={ratio} cannot be reached: every layer keeps at least one KV group and one MLP channel, so at most "
            f"{most:.3f} of the projection parameters can go (this plan reaches {achieved:.3f}); lower the ratio"
            + (" or skip fewer layers" if skip else "")
        )
    return out
