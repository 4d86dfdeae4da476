"""One-shot, retraining-free structured pruning: FLAP, Wanda-sp, and the cut with repair.

(``method="fisher"`` scores groups by the default criterion's mask gradient
instead, :mod:`loraprune.method.oneshot_fisher`; ``repair=True`` re-fits the kept
columns of every ``o_proj``/``down_proj`` by least squares,
:mod:`loraprune.surgery.repair` and :mod:`loraprune.surgery.repair_cut`.)

Both score the same groups as :mod:`loraprune.run.engine` (a KV-head group, an MLP
channel) from calibration activations alone — no gradient, no LoRA, no
training — and cut the same parameter-exact share of the decoder projections
(:func:`loraprune.method.allocation.allocate`, :class:`loraprune.method.state.PruningState`,
:func:`loraprune.surgery.compaction.compact`). They are the retraining-free baselines
of the benchmark table.

A group's score is read from the *input columns* it owns in ``o_proj`` /
``down_proj``, with statistics of those inputs over the calibration tokens:

* ``flap`` (An et al., 2024, "fluctuation-based adaptive structured pruning"):
  column score ``Var_n(X[n, j]) · ||W[:, j]||²`` (the sample variance of input
  feature ``j`` over tokens: a feature that barely fluctuates can be replaced
  by its mean), summed over the group, then standardised per layer and per
  structure kind (attention / MLP) so scores of different layers compare on a
  common scale (it only matters for ``ranking="global"``). Bias compensation:
  the removed features are replaced by their calibration mean, i.e. the
  output projection gains the bias ``W[:, removed] @ mean[removed]``.
* ``wanda-sp`` (the structured Wanda variant FLAP compares against): column
  score ``||X[:, j]||₂ · Σ_i |W[i, j]|``, summed over the group; no bias.

Bias compensation and export. LLaMA's ``o_proj`` / ``down_proj`` have no bias.
The compensating bias is stored the way a stock ``LlamaConfig`` can express it:
``attention_bias=True`` and ``mlp_bias=True``, which give *every* projection a
bias; the ones that do not compensate anything are exact zeros. The result is
a stock LLaMA (or the per-layer class, if widths differ) that ``save_pruned`` /
``load_pruned`` round-trip unchanged, at the cost of a few zero parameters
(counted in the report). Other architectures have no config switch for an
``o_proj``/``down_proj`` bias, so compensation is LLaMA-only and refused
elsewhere rather than lost silently on save. A uniform result whose head
count does not divide ``hidden_size`` (LlamaConfig rejects it, and the
Mistral export used for that case has no bias) is saved as a per-layer model.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import PruneConfig, plain_value
from ..data.batches import make_batches
from ..errors import ConfigError, DataError
from ..export.classes import attach_export
from ..export.gguf_read import forget_gguf_origin
from ..method.activation_scores import METHODS, InputStats, layer_scores
from ..method.allocation import RATIO_TOLERANCE, allocate, resolve_round_to, resolve_skip
from ..method.oneshot_fisher import fisher_group_scores
from ..method.state import STAGED_FRACTIONS, PruningState, check_reachable
from ..model.lora import unwrap_peft
from ..structure.archs import arch_for, decoder_layers, layer_projections
from ..structure.groups import LayerGroups, build_layer_groups, layer_projection_params, removed_params
from ..structure.masks import Masks
from ..surgery.compaction import compact
from ..surgery.repair import DAMP
from ..surgery.repair_cut import cut_with_repair
from .report import PruneReport, whole_model_params

#: One-shot scores: the activation formulas, and the default criterion's mask-gradient score from a few
#: backward passes of the dense model (:mod:`loraprune.method.oneshot_fisher`).
SCORES = (*METHODS, "fisher")


@torch.no_grad()
def collect_input_stats(model: nn.Module, batches, spec=None) -> list[tuple[InputStats, InputStats]]:
    """``(o_proj input stats, down_proj input stats)`` per decoder layer over ``batches`` (dense forward)."""
    spec = spec or arch_for(model)
    device = next(model.parameters()).device
    stats, handles = [], []
    for layer in decoder_layers(model, spec):
        proj = layer_projections(layer, spec)
        pair = (InputStats(proj[spec.o].weight.shape[1]), InputStats(proj[spec.down].weight.shape[1]))
        for module, st in zip((proj[spec.o], proj[spec.down]), pair):
            handles.append(module.register_forward_pre_hook(lambda _m, args, st=st: st.update(args[0])))
        stats.append(pair)
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            kwargs = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
            if "attention_mask" in batch:
                kwargs["attention_mask"] = torch.as_tensor(batch["attention_mask"]).to(device)
            model(**kwargs)
            n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise DataError("oneshot pruning got no calibration batches: pass data and calib_batches >= 1")
    return stats


def group_scores(model, layers: list[LayerGroups], stats, method: str, spec=None) -> tuple[list, list]:
    """Per-layer attention-group and MLP-channel scores (float32, as the pruning state keeps them)."""
    spec = spec or arch_for(model)
    attn, mlp = [], []
    for layer, lg, (o_stats, d_stats) in zip(decoder_layers(model, spec), layers, stats):
        proj = layer_projections(layer, spec)
        a, m = layer_scores(proj[spec.o].weight, o_stats, proj[spec.down].weight, d_stats,
                            lg.q_per_kv * lg.head_dim, method)
        attn.append(a.cpu())
        mlp.append(m.cpu())
    return attn, mlp


@torch.no_grad()
def compensation_biases(model, layers, masks, stats, spec=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``W[:, removed] @ mean[removed]`` for o_proj and down_proj of each layer (float64)."""
    spec = spec or arch_for(model)
    out = []
    for layer, lg, a_keep, m_keep, (o_stats, d_stats) in zip(
        decoder_layers(model, spec), layers, masks.attn_keep, masks.mlp_keep, stats
    ):
        proj = layer_projections(layer, spec)
        slices = lg.kept_slices(spec, a_keep, m_keep)
        o_removed, d_removed = (_removed(proj[name].weight.shape[1], slices[name][1]) for name in (spec.o, spec.down))
        pair = []
        for module, removed, st in ((proj[spec.o], o_removed, o_stats), (proj[spec.down], d_removed, d_stats)):
            W = module.weight.detach().to(device=st.mean.device, dtype=torch.float64)
            removed = removed.to(st.mean.device)
            pair.append(W[:, removed] @ st.mean[removed])
        out.append(tuple(pair))
    return out


def _removed(n: int, kept: torch.Tensor | None) -> torch.Tensor:
    """Boolean vector of the ``n`` input columns not in ``kept`` (``None``: all kept)."""
    removed = torch.ones(n, dtype=torch.bool)
    removed[kept if kept is not None else slice(None)] = False
    return removed


def _with_bias(module: nn.Linear, bias: torch.Tensor | None) -> None:
    """Give ``module`` a bias (zeros if ``bias`` is None), added to any bias it has."""
    w = module.weight
    new = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if module.bias is not None:
        new += module.bias.detach()
    if bias is not None:
        new += bias.to(device=w.device, dtype=w.dtype)
    module.bias = nn.Parameter(new, requires_grad=False)


def _apply_biases(model, biases, spec) -> None:
    """Compensating o/down biases; zero biases elsewhere, as ``attention_bias``/``mlp_bias`` imply."""
    for layer, (o_bias, d_bias) in zip(decoder_layers(model, spec), biases):
        proj = layer_projections(layer, spec)
        for name, module in proj.items():
            extra = o_bias if name == spec.o else d_bias if name == spec.down else None
            _with_bias(module, extra)
    model.config.attention_bias = True
    model.config.mlp_bias = True


@dataclass
class OneShotPlan:
    """What a one-shot run decided before cutting: masks, calibration statistics, groups."""

    masks: Masks
    stats: list[tuple[InputStats, InputStats]] | None  # None for method="fisher"
    layers: list[LayerGroups]
    total_params: int
    skip: set[int]
    config: PruneConfig  # the allocation and data options, validated (Python values)
    batches: list | None = None  # the calibration batches the plan read

    @property
    def removed_params(self) -> int:
        return removed_params(self.layers, self.masks)


@torch.no_grad()
def oneshot_plan(model, data, ratio, tokenizer=None, method="flap", calib_batches=32, *, seq_len=128, batch_size=4,
                 skip_layers=None, ranking=None, round_to=None, seed=0, repair_batches=None) -> OneShotPlan:
    """Calibrate on the dense model and choose the groups to keep (the model is not changed).

    ``ranking=None``: ``"adaptive"`` for ``fisher`` (scores per parameter compare across layers),
    ``"layer"`` for FLAP / Wanda-sp (FLAP's standardised scores do not). The plan keeps
    ``max(calib_batches, repair_batches)`` batches; the scores read the first ``calib_batches``."""
    if method not in SCORES:
        raise ConfigError(f"unknown one-shot method {method!r}; choose one of {', '.join(SCORES)}")
    if ranking is None:
        ranking = "adaptive" if method == "fisher" else "layer"
    calib_batches = plain_value(calib_batches)
    if not isinstance(calib_batches, int) or isinstance(calib_batches, bool) or calib_batches < 1:
        raise ConfigError(f"calib_batches must be a positive integer, got {calib_batches!r}")
    repair_batches = plain_value(repair_batches)
    if repair_batches is not None and (not isinstance(repair_batches, int) or isinstance(repair_batches, bool)
                                       or repair_batches < 1):
        raise ConfigError(f"repair_batches must be a positive integer or None (= calib_batches), got {repair_batches!r}")
    # the options prune() shares are validated (and numpy values made Python ones) where prune()'s are
    cfg = PruneConfig(ratio=ratio, skip_layers=skip_layers, ranking=ranking, round_to=round_to, seq_len=seq_len,
                      batch_size=batch_size, seed=seed)
    spec = arch_for(model)
    layers = build_layer_groups(model, spec)
    cfg = cfg.replace(round_to=resolve_round_to(cfg.round_to, layers))
    total = sum(layer_projection_params(model, spec))
    skip = resolve_skip(cfg.skip_layers, len(layers))
    allocation = allocate(layers, cfg.ratio, total, skip, cfg.round_to, cfg.ranking)
    check_reachable(layers, allocation, cfg.ranking, skip, cfg.round_to)  # as prune(): exact or refused
    torch.manual_seed(cfg.seed)
    batches = make_batches(data, model.config, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    calib = list(itertools.islice(batches, max(calib_batches, repair_batches or 0)))
    state = PruningState(layers, allocation, ema=0.0, ranking=cfg.ranking, skip=skip, round_to=cfg.round_to)
    if method == "fisher":
        stats = None
        state.observe(*fisher_group_scores(model, calib[:calib_batches], layers, spec))
    else:
        stats = collect_input_stats(model, calib[:calib_batches], spec)
        state.observe(*group_scores(model, layers, stats, method, spec))
    # 'adaptive' removes in the stages of prune()'s schedule (the last ones fine-grained), so it lands where
    # prune() lands; the other rankings give the same masks in one update
    for fraction in STAGED_FRACTIONS if cfg.ranking == "adaptive" else (1.0,):
        state.update(fraction)
    landed = removed_params(layers, state.masks) / total
    if abs(landed - cfg.ratio) > RATIO_TOLERANCE:  # on these scores: refused before the model is cut
        raise ConfigError(f"ratio={cfg.ratio} cannot be reached within {RATIO_TOLERANCE} with ranking={cfg.ranking!r} "
                          f"and round_to={cfg.round_to} on this model's calibration scores (it lands at {landed:.3f}); "
                          f"pass ratio={landed:.3f}, a smaller round_to or ranking='layer'")
    return OneShotPlan(state.masks, stats, layers, total, skip, cfg, calib)


@torch.no_grad()
def oneshot_prune(
    model: nn.Module,
    data,
    ratio: float = 0.5,
    tokenizer=None,
    method: str = "flap",
    calib_batches: int = 32,
    *,
    seq_len: int = 128,
    batch_size: int = 4,
    bias_compensation: bool | None = None,
    skip_layers=None,
    ranking: str | None = None,
    round_to: int | None = None,
    seed: int = 0,
    repair: bool = False,
    damp: float = DAMP,
    sequential: bool = True,
    repair_batches: int | None = None,
) -> nn.Module:
    """Prune ``ratio`` of the decoder-projection parameters in one shot, no training.

    ``data`` is anything :func:`loraprune.prune` accepts; the first
    ``calib_batches`` batches (``batch_size`` x ``seq_len`` tokens for text)
    calibrate the input statistics of the dense model. ``method``:
    ``"flap"``, ``"wanda-sp"`` (see the module doc) or ``"fisher"`` (the default
    criterion's mask-gradient score from one backward pass per calibration
    batch, :mod:`loraprune.method.oneshot_fisher`). ``bias_compensation``: ``None`` =
    on for FLAP or with ``repair`` on LLaMA, off otherwise. Allocation
    (``skip_layers``, ``ranking``, ``round_to``) is the same as
    :func:`loraprune.prune`'s; ``ranking=None`` is ``"adaptive"`` for
    ``fisher`` and ``"layer"`` for the others.

    ``repair=True``: the cut groups' contribution is re-fitted onto the kept
    columns of each ``o_proj`` / ``down_proj`` by least squares over the same
    calibration batches, a layer at a time (:mod:`loraprune.repair_cut`):
    ``damp`` is the ridge damping relative to the mean input power,
    ``sequential`` calibrates each layer on the already repaired layers'
    outputs, ``repair_batches`` (default ``calib_batches``) is how many
    calibration batches the repair reads (the scores read ``calib_batches``:
    a few backward passes for ``fisher``, a few hundred windows for the repair). With bias compensation the fit is affine (FLAP's mean bias is
    its zeroth-order term); without it the output has no bias and exports to
    GGUF.
    Returns the compacted model (the same object) with ``config.loraprune``.
    """
    model = unwrap_peft(model)
    spec = arch_for(model)
    if bias_compensation is not None and not isinstance(bias_compensation, bool):
        raise TypeError(f"bias_compensation must be True, False or None, got {bias_compensation!r}")
    if not isinstance(repair, bool) or not isinstance(sequential, bool):
        raise TypeError(f"repair and sequential must be True or False, got {repair!r} and {sequential!r}")
    damp = plain_value(damp)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ConfigError(f"damp must be a number >= 0 (relative ridge damping, e.g. {DAMP}), got {damp!r}")
    if bias_compensation is None:
        bias_compensation = (method == "flap" or repair) and spec.model_type == "llama"
    if bias_compensation and spec.model_type != "llama":
        raise ConfigError(
            f"bias_compensation needs an o_proj/down_proj bias that {spec.model_type!r} configs cannot express "
            "(only LLaMA has attention_bias/mlp_bias switches); pass bias_compensation=False"
        )
    plan = oneshot_plan(model, data, ratio, tokenizer, method, calib_batches, seq_len=seq_len, batch_size=batch_size,
                        skip_layers=skip_layers, ranking=ranking, round_to=round_to, seed=seed,
                        repair_batches=repair_batches if repair else None)
    model_params = whole_model_params(model)
    if repair:  # the biases go onto o_proj/down_proj during the cut; the other projections get zeros below
        calib_tokens = cut_with_repair(model, plan.masks, plan.layers, plan.batches[:repair_batches or calib_batches],
                                       spec, damp=float(damp),
                                       bias=bias_compensation, sequential=sequential)
        biases = [(None, None)] * len(plan.layers) if bias_compensation else None
    else:
        stats = plan.stats
        if bias_compensation and stats is None:  # fisher scores: the means come from their own pass
            stats = collect_input_stats(model, plan.batches[:calib_batches], spec)
        biases = compensation_biases(model, plan.layers, plan.masks, stats, spec) if bias_compensation else None
        calib_tokens = sum(int(torch.as_tensor(b["input_ids"]).numel()) for b in plan.batches[:calib_batches])
    model = forget_gguf_origin(compact(model, plan.masks, spec))  # a pruned GGUF load is no file's weights
    if biases is not None:
        _apply_biases(model, biases, spec)
    after = sum(layer_projection_params(model, spec))
    opts = plan.config
    settings = dict(ratio=opts.ratio, criterion=f"oneshot-{method}", method=method,
                    bias_compensation=bias_compensation, repair=repair,
                    **(dict(damp=float(damp), sequential=sequential, repair_batches=repair_batches or calib_batches)
                       if repair else {}),
                    calib_batches=plain_value(calib_batches), calib_tokens=calib_tokens, seq_len=opts.seq_len, batch_size=opts.batch_size,
                    skip_layers=sorted(plan.skip), ranking=opts.ranking, round_to=opts.round_to, seed=opts.seed)
    PruneReport.measure(
        plan.layers, plan.masks, plan.total_params, settings, target_ratio=opts.ratio, steps=0, model_params=model_params,
        # counts the biases added for compensation (zeros except o_proj/down_proj)
        achieved_ratio_with_biases=1 - after / plan.total_params,
    ).attach(model.config)
    model.eval()
    # a biased LLaMA whose head count no longer divides hidden_size is exported
    # per layer by attach_export (neither LlamaConfig nor Mistral can hold it)
    return attach_export(model)
