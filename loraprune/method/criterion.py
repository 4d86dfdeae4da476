"""Importance criteria: one class each, looked up by name.

A criterion turns what one optimiser step left behind (gradients, activation
statistics, nothing) into one score per attention KV group and per MLP channel
of every layer; :mod:`loraprune.method.state` folds those into the EMA that decides
the masks. As in Torch-Pruning's ``Importance`` classes, each criterion says
what it needs, and adding one means adding one class here and a line in
:data:`REGISTRY` (the one list of names: ``PruneConfig.criterion`` takes its choices from it).

Projection criteria (``lora``, ``grad``, ``magnitude``) score every weight of
the seven projections, with ``W' = W + s·B·A``, and sum rows (q/k/v/gate/up)
and columns (o/down) over each group:

* ``lora`` (paper Eq. 10): ``|G ⊙ W'|`` with the LoRA-guided estimate
  ``G = (∇B·A + B·∇A − ∇B·∇A) / s``. Needs only the LoRA gradients: the
  gradient of W is never formed, nor any out×in temporary (kernel
  :func:`loraprune.kernels.group_importance`). The division by the module's
  scale ``s`` makes modules with other ranks or alphas (PEFT ``rank_pattern``,
  ``alpha_pattern``, rsLoRA) comparable: the LoRA gradients estimate ``s·∇W``.
* ``grad`` (LLM-Pruner Element-1, the full-gradient Taylor baseline):
  ``|∇W ⊙ W'|``. Needs ∇W, a weight-sized gradient per projection.
* ``magnitude``: ``|W'|``.

Group criteria (``fisher``, ``taylor``) score whole groups at once, from
the activations entering o_proj (one slice per KV group) and down_proj (one
column per channel) and their gradients, which the backward pass computes
anyway. Zeroing a group's slice ``h_g`` is exactly removing the group, so
``-Σ h_g·∂L/∂h_g`` is the first-order change of the loss (the gradient of a
mask on the group). ``taylor`` takes the absolute value of its sum over the
step's tokens; ``fisher`` sums its square per sequence (the empirical Fisher of
the mask, Kwon et al. 2022), which does not cancel across sequences. Both cost
activation-sized temporaries, never a weight-sized one, and see input-side
groups (o_proj/down_proj columns) that the LoRA estimate sees poorly while B is
small.

Activation criteria (``flap``, ``wanda-sp``) apply the one-shot baselines'
formulas (:mod:`loraprune.run.oneshot`) to the inputs of o_proj / down_proj seen
in the training forwards and the merged weights: no backward needed.

``random`` draws seeded group scores once.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..errors import ConfigError
from ..model.distributed import projection_sums
from ..model.lora import LoRALinear
from .activation_scores import METHODS, InputStats, layer_scores

# Rows per block when a criterion walks a weight on the PyTorch side: the
# temporaries are block x in, never out x in.
_BLOCK_ROWS = 256


class Importance:
    """Base class: scores the prunable groups of every layer after a step.

    ``reads_parameters`` says whether it scores from the projections' parameters or their
    gradients as they stand after backward (rather than from activations seen in
    forward/backward hooks). Whoever drives the pruner reads it: DeepSpeed keeps both in its
    own partitioned buffers, so the Trainer callback refuses such a criterion there.
    """

    name = ""
    reads_parameters = False

    @classmethod
    def from_config(cls, config) -> "Importance":
        """This criterion with its options read from a :class:`~loraprune.config.PruneConfig`."""
        return cls()

    def attach(self, pruner) -> None:
        """Called once, after LoRA is injected (hooks, weight gradients, a one-off draw)."""

    def detach(self, pruner) -> None:
        """Undo :meth:`attach` (before the model is compacted and handed back)."""

    def scores(self, pruner) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """``(attention group scores, MLP channel scores)`` per layer for this step, or
        ``None`` when the criterion has nothing new to say."""
        raise NotImplementedError

    def clear(self, pruner) -> None:
        """Forget what this step left (a skipped, non-finite step)."""

    def synchronize(self, pruner) -> None:
        """Combine what every rank gathered (data parallel), so all score the global batch.

        Gradient-based criteria need nothing: DDP/FSDP already average the gradients
        they read. Criteria that gather statistics of their own override this.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ProjectionImportance(Importance):
    """Element scores of each projection's weights, summed over groups.

    It reads each projection's weight (and LoRA factors, and their gradients) after
    backward: ``reads_parameters``.

    ``square``: square the element score (the paper) rather than take its
    absolute value (the official code). ``normalize``: divide each
    projection's group vector by its sum (``"module"``) or L2 norm (``"l2"``,
    the official code's per-module normalisation) before q/k/v/o (gate/up/down)
    are added, so that no projection dominates by scale.
    """

    reads_parameters = True

    def __init__(self, square: bool = False, normalize: str | None = None):
        self.square = square
        self.normalize = normalize

    @classmethod
    def from_config(cls, config) -> "ProjectionImportance":
        return cls(square=config.square, normalize=config.normalize)

    def module_sums(self, module: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row_sums, col_sums)`` of the element scores of one projection, fp32."""
        raise NotImplementedError

    def _vector(self, module: LoRALinear, rows: bool) -> torch.Tensor:
        # FSDP2 (DTensor) shards are scored in place and summed over ranks: loraprune.model.distributed
        row_sums, col_sums = projection_sums(self.module_sums, module)
        v = row_sums if rows else col_sums
        if self.normalize == "module":
            v = v / v.sum().clamp_min(torch.finfo(v.dtype).tiny)
        elif self.normalize == "l2":
            v = v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)
        return v

    @torch.no_grad()
    def scores(self, pruner):
        s = pruner.spec
        attn, mlp = [], []
        for lg, mods in zip(pruner.layers, pruner.modules):
            attn.append(lg.attn_group_sums(
                self._vector(mods[s.q], True), self._vector(mods[s.k], True),
                self._vector(mods[s.v], True), self._vector(mods[s.o], False),
            ))
            mlp.append(lg.mlp_group_sums(
                self._vector(mods[s.gate], True), self._vector(mods[s.up], True), self._vector(mods[s.down], False),
            ))
        return attn, mlp

    def _blockwise_sums(self, module: LoRALinear, element_score) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column sums of ``element_score(rows, W'_block)`` over row blocks of ``W'``."""
        W = module.base.weight
        A = module.lora_A.detach()
        B = module.lora_B.detach()
        out_f, in_f = W.shape
        row_sums = torch.empty(out_f, dtype=torch.float32, device=W.device)
        col_sums = torch.zeros(in_f, dtype=torch.float32, device=W.device)
        power = 2 if self.square else 1
        for start in range(0, out_f, _BLOCK_ROWS):
            rows = slice(start, min(start + _BLOCK_ROWS, out_f))
            merged = torch.addmm(W[rows].float(), B[rows], A, alpha=module.scaling)
            block = element_score(rows, merged).abs().pow(power)
            row_sums[rows] = block.sum(1)
            col_sums += block.sum(0)
        return row_sums, col_sums

    def __repr__(self) -> str:
        return f"{type(self).__name__}(square={self.square}, normalize={self.normalize!r})"


class LoRAImportance(ProjectionImportance):
    """``|Ĝ ⊙ W'|`` from the LoRA gradients alone (paper Eq. 10), per unit of LoRA scale."""

    name = "lora"

    def scores(self, pruner):
        if all(m.lora_A.grad is None and m.lora_B.grad is None for m in pruner.lora_modules()):
            # e.g. DeepSpeed ZeRO-2 in a hand-written loop: the gradients live in the engine's
            # partitions; zeros would rank every group alike and prune blind
            raise RuntimeError("criterion='lora' found no LoRA gradient to score (call score() after backward; "
                               "under DeepSpeed use criterion='fisher', which reads activations)")
        return super().scores(pruner)

    def module_sums(self, module):
        A, B = module.lora_A, module.lora_B
        gA = A.grad if A.grad is not None else torch.zeros_like(A)
        gB = B.grad if B.grad is not None else torch.zeros_like(B)
        rows, cols = kernels.group_importance(
            module.base.weight, A.detach(), B.detach(), gA, gB, module.scaling, square=self.square
        )
        # Ĝ estimates s·∂L/∂W: divide by s (s² when squared) so modules with other
        # ranks/alphas rank on one scale.
        div = module.scaling ** (2 if self.square else 1)
        return rows / div, cols / div


class GradImportance(ProjectionImportance):
    """``|∇W ⊙ W'|``: the full-gradient Taylor baseline (forms ∇W)."""

    name = "grad"

    def attach(self, pruner):
        for m in pruner.lora_modules():
            m.enable_weight_grad(True)

    def detach(self, pruner):
        for m in pruner.lora_modules():
            m.enable_weight_grad(False)

    def module_sums(self, module):
        gW = module.base.weight.grad
        if gW is None:
            raise RuntimeError(
                "criterion='grad' needs the weight gradient, but it is missing: call "
                "enable_weight_grad(True) on the LoRA layers before backward"
            )
        return self._blockwise_sums(module, lambda rows, m: gW[rows].float() * m)

    def scores(self, pruner):
        out = super().scores(pruner)
        self.clear(pruner)  # ∇W is read once per step: free it now
        return out

    def clear(self, pruner):
        for m in pruner.lora_modules():
            m.base.weight.grad = None


class MagnitudeImportance(ProjectionImportance):
    """``|W'|``: no gradient at all."""

    name = "magnitude"

    def module_sums(self, module):
        return self._blockwise_sums(module, lambda rows, m: m)


class RandomImportance(Importance):
    """Seeded random group scores, drawn once (the floor every criterion must beat)."""

    name = "random"

    @classmethod
    def from_config(cls, config) -> "RandomImportance":
        return cls(seed=config.seed)

    def __init__(self, seed: int = 0):
        self.seed = seed

    def attach(self, pruner):
        gen = torch.Generator().manual_seed(self.seed)
        pruner.state.observe(
            [torch.rand(lg.n_kv, generator=gen) for lg in pruner.layers],
            [torch.rand(lg.n_channels, generator=gen) for lg in pruner.layers],
        )

    def scores(self, pruner):
        return None


class _MaskProbe(torch.autograd.Function):
    """Identity on a projection input ``x`` whose backward hands ``(x, ∂L/∂x)`` to ``add``.

    Why a Function rather than a tensor hook holding ``x``: ``x`` is kept by
    ``save_for_backward`` only, so

    * without gradient checkpointing it is the very tensor the projection saves
      anyway (no extra memory, no reference cycle through a hook);
    * under (non-reentrant) gradient checkpointing the saved-tensor hooks drop
      it after the forward and recompute it for the backward, as for every other
      activation of the layer. The recomputation runs this forward again (the
      pre-hook fires twice) but builds a graph that is never back-propagated:
      ``add`` runs once per real backward, so nothing is counted twice.
    """

    @staticmethod
    def forward(ctx, x, add):
        ctx.save_for_backward(x)
        ctx.add = add
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            ctx.add(x, g)
        return g, None


class MaskGradientImportance(Importance):
    """First-order score of removing each whole group, from activations and their gradients.

    ``reduce="fisher"``: ``Σ_sequences (Σ_tokens h_g·∂L/∂h_g)²``;
    ``reduce="taylor"``: ``|Σ_sequences,tokens h_g·∂L/∂h_g|``. Pre-hooks route the inputs
    of o_proj and down_proj through a :class:`_MaskProbe`, whose backward gathers the
    per-sequence sums; gradient accumulation adds micro-batches up until :meth:`scores`
    reads them. Works under gradient checkpointing (and keeps its memory saving).
    """

    @classmethod
    def from_config(cls, config) -> "MaskGradientImportance":
        return cls(reduce=config.criterion)

    def __init__(self, reduce: str = "fisher"):
        if reduce not in ("fisher", "taylor"):
            raise ConfigError(f"reduce must be 'fisher' or 'taylor', got {reduce!r}")
        self.reduce = reduce
        self.name = reduce
        self._handles = []
        self._attn: list[torch.Tensor | None] = []
        self._mlp: list[torch.Tensor | None] = []

    def attach(self, pruner):
        s = pruner.spec
        n = len(pruner.layers)
        self._attn, self._mlp = [None] * n, [None] * n
        for i, (lg, mods) in enumerate(zip(pruner.layers, pruner.modules)):
            # group widths, not group counts: the layers may shrink during the run
            self._handles.append(mods[s.o].register_forward_pre_hook(self._hook(self._attn, i, lg.q_per_kv * lg.head_dim)))
            self._handles.append(mods[s.down].register_forward_pre_hook(self._hook(self._mlp, i, 1)))

    def detach(self, pruner):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, store: list, i: int, width: int):
        """A pre-hook that routes the projection's input through a :class:`_MaskProbe`."""
        def add(x: torch.Tensor, g: torch.Tensor) -> None:
            per_seq = (x.float() * g.float()).reshape(-1, *x.shape[-2:]).sum(1)  # (B, D)
            if width > 1:
                per_seq = per_seq.view(per_seq.shape[0], -1, width).sum(-1)  # (B, groups)
            part = per_seq.square().sum(0) if self.reduce == "fisher" else per_seq.sum(0)
            store[i] = part if store[i] is None else store[i] + part

        def pre_hook(module, args):
            x = args[0]
            if not (torch.is_grad_enabled() and x.requires_grad):
                return None  # the teacher's or an evaluation forward
            return (_MaskProbe.apply(x, add), *args[1:])
        return pre_hook

    def synchronize(self, pruner):
        """Sum the per-rank statistics over the data-parallel ranks, scaled to what one
        process would compute on the global batch: the ranks' losses are means over
        their own tokens, a global loss divides by ``world`` more, so per-sequence mask
        gradients scale by ``1/world`` (``1/world²`` once squared)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        if any(t is None for t in self._attn + self._mlp):
            raise RuntimeError("a rank gathered no mask gradients this step; every rank must run backward "
                               "through every layer before scoring")
        world = dist.get_world_size()
        sizes = [t.numel() for t in self._attn + self._mlp]
        flat = torch.cat([t.flatten() for t in self._attn + self._mlp])
        dist.all_reduce(flat)
        flat /= world ** 2 if self.reduce == "fisher" else world
        parts = list(flat.split(sizes))
        n = len(self._attn)
        self._attn[:] = parts[:n]
        self._mlp[:] = parts[n:]

    def scores(self, pruner):
        if any(t is None for t in self._attn + self._mlp):
            return None  # no backward reached every layer this step
        post = (lambda t: t) if self.reduce == "fisher" else torch.abs
        attn = [post(t) for t in self._attn]
        mlp = [post(t) for t in self._mlp]
        self.clear(pruner)
        return attn, mlp

    def clear(self, pruner):
        self._attn[:] = [None] * len(self._attn)
        self._mlp[:] = [None] * len(self._mlp)

    def __repr__(self) -> str:
        return f"MaskGradientImportance(reduce={self.reduce!r})"


class ActivationImportance(Importance):
    """FLAP or Wanda-sp group scores, from the activations of the training forwards.

    The one-shot formulas of :mod:`loraprune.method.activation_scores` (:class:`~loraprune.method.activation_scores.InputStats`,
    :func:`~loraprune.method.activation_scores.layer_scores`), computed with the current merged
    weight ``W' = W + s·B·A`` of o_proj / down_proj and the statistics of their
    inputs over the tokens of this step's training forwards (forward pre-hooks;
    gradient accumulation merges the micro-batches). ``method="flap"``:
    ``Var(X_j)·||W'[:, j]||²`` per column, summed per group and standardised per
    layer and kind; ``"wanda-sp"``: ``||X_j||₂·Σ_i |W'[i, j]|``. No backward is
    needed. Forwards without gradients (the distillation teacher, evaluation)
    are not counted. FLAP's bias compensation does not apply here: the removed
    features are not replaced by their mean, LoRA training recovers instead.

    Groups are read from each weight's width (``q_per_kv * head_dim`` o_proj
    columns per KV group, one down_proj column per channel), so a layer that
    has already been narrowed yields the scores of the groups it still has.
    """


    @classmethod
    def from_config(cls, config) -> "ActivationImportance":
        return cls(method=config.criterion)

    def __init__(self, method: str = "flap"):
        if method not in METHODS:
            raise ConfigError(f"method must be 'flap' or 'wanda-sp', got {method!r}")
        self.method = method
        self.name = method
        self._handles = []
        self._stats: list[list] = []  # per layer: [o_proj input stats, down_proj input stats] (None: no token yet)

    def attach(self, pruner):
        s = pruner.spec
        self._stats = [[None, None] for _ in pruner.layers]
        for i, mods in enumerate(pruner.modules):
            for slot, name in enumerate((s.o, s.down)):
                self._handles.append(mods[name].register_forward_pre_hook(self._hook(i, slot)))

    def detach(self, pruner):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int, slot: int):
        def pre_hook(module, args):
            if not torch.is_grad_enabled() or getattr(module, "bypass", False):
                return  # the teacher's or an evaluation forward
            x = args[0]
            st = self._stats[i][slot]
            if st is None or st.mean.numel() != x.shape[-1]:  # first tokens, or the layer was narrowed
                st = self._stats[i][slot] = InputStats(x.shape[-1])
            st.update(x)
        return pre_hook

    @torch.no_grad()
    def scores(self, pruner):
        if any(st is None for pair in self._stats for st in pair):
            return None  # no training forward reached every layer this step
        s = pruner.spec
        attn, mlp = [], []
        for lg, mods, (o_st, d_st) in zip(pruner.layers, pruner.modules, self._stats):
            a, m = layer_scores(_merged_weight(mods[s.o]), o_st, _merged_weight(mods[s.down]), d_st,
                                lg.q_per_kv * lg.head_dim, self.method)
            attn.append(a)
            mlp.append(m)
        self.clear(pruner)
        return attn, mlp

    def synchronize(self, pruner):
        """Data parallel: every rank would need the statistics of the global batch; not implemented."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(f"criterion={self.method!r} gathers activation statistics per process and does not "
                              "combine them across data-parallel ranks; use fisher, taylor, lora or grad there")

    def clear(self, pruner):
        self._stats = [[None, None] for _ in self._stats]

    def __repr__(self) -> str:
        return f"ActivationImportance(method={self.method!r})"


def _merged_weight(module: LoRALinear) -> torch.Tensor:
    """``W + s·B·A`` of the input columns one LoRA projection still computes on, fp32 (a
    weight-sized temporary). Under progressive compaction that is the kept prefix."""
    cols = module.live_in if module.live_in is not None else module.in_features
    return torch.addmm(module.base.weight.detach()[:, :cols].float(), module.lora_B.detach(),
                       module.lora_A.detach()[:, :cols], alpha=module.scaling)


REGISTRY: dict[str, type[Importance]] = {
    "lora": LoRAImportance,
    "grad": GradImportance,
    "magnitude": MagnitudeImportance,
    "random": RandomImportance,
    "fisher": MaskGradientImportance,
    "taylor": MaskGradientImportance,
    "flap": ActivationImportance,
    "wanda-sp": ActivationImportance,
}


def make_importance(config) -> Importance:
    """The :class:`Importance` named by ``config.criterion``, with its options from ``config``."""
    cls = REGISTRY.get(config.criterion)
    if cls is None:
        raise ConfigError(f"unknown criterion {config.criterion!r}; choose one of {', '.join(REGISTRY)}")
    return cls.from_config(config)


#: The criterion names (``PruneConfig.criterion``'s choices): the registry is their one list.
CRITERIA = tuple(REGISTRY)


def score_module(module: LoRALinear, criterion: str, square: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_sums, col_sums)`` of the element scores of one projection under a projection criterion."""
    cls = REGISTRY.get(criterion)
    if cls is None or not issubclass(cls, ProjectionImportance):
        raise ConfigError(f"criterion {criterion!r} has no per-weight score; choose lora, grad or magnitude")
    return cls(square=square).module_sums(module)
