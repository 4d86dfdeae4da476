"""Importance criteria: one class each, looked up by name.

A criterion turns what one optimiser step left behind (gradients, activation
statistics, nothing) into one score per attention KV group and per MLP channel
of every layer; :mod:`loraprune.state` folds those into the EMA that decides
the masks. As in Torch-Pruning's ``Importance`` classes, each criterion says
what it needs, and adding one means adding one class here and a line in
:data:`REGISTRY`.

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

``random`` draws seeded group scores once.
"""
from __future__ import annotations

import torch

from . import kernels
from .config import CRITERION_NAMES
from .errors import ConfigError
from .lora import LoRALinear

# Rows per block when a criterion walks a weight on the PyTorch side: the
# temporaries are block x in, never out x in.
_BLOCK_ROWS = 256


class Importance:
    """Base class: scores the prunable groups of every layer after a step.

    Class attributes say what the criterion needs:
    ``needs_weight_grad`` (∇W of the frozen projections: memory of full
    fine-tuning), ``needs_backward`` (it reads gradients, so steps without a
    backward pass give it nothing).
    """

    name = ""
    needs_weight_grad = False
    needs_backward = True

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ProjectionImportance(Importance):
    """Element scores of each projection's weights, summed over groups.

    ``square``: square the element score (the paper) rather than take its
    absolute value (the official code). ``normalize``: divide each
    projection's group vector by its sum (``"module"``) or L2 norm (``"l2"``,
    the official code's per-module normalisation) before q/k/v/o (gate/up/down)
    are added, so that no projection dominates by scale.
    """

    def __init__(self, square: bool = False, normalize: str | None = None):
        self.square = square
        self.normalize = normalize

    def module_sums(self, module: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row_sums, col_sums)`` of the element scores of one projection, fp32."""
        raise NotImplementedError

    def _vector(self, module: LoRALinear, rows: bool) -> torch.Tensor:
        row_sums, col_sums = self.module_sums(module)
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
    needs_weight_grad = True

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
    needs_backward = False

    def module_sums(self, module):
        return self._blockwise_sums(module, lambda rows, m: m)


class RandomImportance(Importance):
    """Seeded random group scores, drawn once (the floor every criterion must beat)."""

    name = "random"
    needs_backward = False

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


REGISTRY: dict[str, type[Importance]] = {
    "lora": LoRAImportance,
    "grad": GradImportance,
    "magnitude": MagnitudeImportance,
    "random": RandomImportance,
}
assert set(REGISTRY) == set(CRITERION_NAMES), "config.CRITERION_NAMES and criterion.REGISTRY must agree"


def make_importance(config) -> Importance:
    """The :class:`Importance` named by ``config.criterion``, with its options from ``config``."""
    cls = REGISTRY.get(config.criterion)
    if cls is None:
        raise ConfigError(f"unknown criterion {config.criterion!r}; choose one of {', '.join(REGISTRY)}")
    if issubclass(cls, ProjectionImportance):
        return cls(square=config.square, normalize=config.normalize)
    if cls is RandomImportance:
        return cls(seed=config.seed)
    return cls()


CRITERIA = tuple(REGISTRY)


def score_module(module: LoRALinear, criterion: str, square: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_sums, col_sums)`` of the element scores of one projection under a projection criterion."""
    cls = REGISTRY.get(criterion)
    if cls is None or not issubclass(cls, ProjectionImportance):
        raise ConfigError(f"criterion {criterion!r} has no per-weight score; choose lora, grad or magnitude")
    return cls(square=square).module_sums(module)
