"""The pruning engine: LoRA injection, per-step scoring, scheduled masks, final cut.

:class:`LoRAPruner` holds everything between "a Hugging Face model" and "a
smaller dense model", with no training loop of its own, so that
:func:`loraprune.prune` and the ``transformers.Trainer`` callback drive the
same object:

1. ``pruner.lora_parameters()`` go to the optimiser, and ``pruner.bind_optimizer(opt)``
   lets the pruner cut groups out progressively (:mod:`loraprune.surgery.progressive`: the
   optimiser state follows the cut); without it, training stays masked;
2. after ``loss.backward()``: if ``pruner.grads_finite()``, ``pruner.score()`` (uses
   the gradients); if either is not, ``pruner.skip_step(step, lr)`` instead of the
   optimiser step (the one policy for NaN/inf steps);
3. after ``optimizer.step()``: ``pruner.step_end(step)`` (masks on schedule);
4. at the end: ``pruner.finalize()`` cuts, merges and returns the model.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn as nn

from ..config import RUN_DEFINING, PruneConfig
from ..errors import ConfigError, LoRAPruneError, NonFiniteLossError
from ..export.gguf_read import forget_gguf_origin
from ..method.allocation import allocate, resolve_round_to, resolve_skip
from ..method.criterion import Importance, make_importance
from ..method.schedule import CubicSchedule
from ..method.state import PruningState, check_reachable
from ..model.distributed import all_ranks, is_sharded, local
from ..model.lora import LoRALinear, is_peft_lora_layer, unwrap_peft, wrap_linear
from ..model.peft_inputs import check_adapters
from ..structure.archs import arch_for, decoder_layers, get_submodule, layer_projections
from ..structure.groups import build_layer_groups, layer_projection_params, removed_params
from ..structure.masks import Masks
from ..surgery.compaction import compact
from ..surgery.progressive import reorder_layer, to_original, unpermute_module
from ..surgery.repair_run import RunRepair
from .report import PruneReport, whole_model_params


class LoRAPruner:
    """LoRA-guided iterative structured pruning of one model (see module doc).

    ``LoRAPruner(model, config)`` or ``LoRAPruner(model, ratio=0.5, criterion="lora", ...)``
    (keyword overrides of :class:`~loraprune.config.PruneConfig`). ``schedule``
    defaults to none: :func:`loraprune.prune` and the Trainer callback build
    one from the run length. Everything about the model is checked before it
    is touched; :meth:`restore` undoes the LoRA injection if a run is abandoned.
    """

    def __init__(self, model: nn.Module, config: PruneConfig | None = None, schedule: CubicSchedule | None = None,
                 **overrides):
        cfg = PruneConfig.from_kwargs(config, **overrides)  # also LoRAPruner(model, 0.5)
        self.config = cfg
        check_adapters(model)  # another adapter type, DoRA, modules_to_save, a pruner already attached
        self.model = unwrap_peft(model)
        # ---- plan (reads the model, changes nothing) ----
        if any(p.is_meta for p in self.model.parameters()):
            raise LoRAPruneError("the model's weights are on the meta device (built without weights, e.g. under "
                                 "init_empty_weights or device_map='meta'); load its weights before pruning")
        self.spec = arch_for(self.model)
        self.layers = build_layer_groups(self.model, self.spec)
        skip = resolve_skip(cfg.skip_layers, len(self.layers))
        if cfg.uniform:
            shapes = {(lg.n_kv, lg.n_channels) for lg in self.layers}
            if len(shapes) > 1:
                raise ConfigError(f"uniform=True needs layers of one shape; this model's layers have widths {sorted(shapes)}")
        projections = [m for layer in decoder_layers(self.model, self.spec)
                       for m in layer_projections(layer, self.spec).values()]
        ids = {id(m) for m in projections}
        leftover = [n for n, m in self.model.named_modules() if is_peft_lora_layer(m) and id(m) not in ids]
        if leftover:
            raise ConfigError(
                f"the PeftModel has LoRA layers outside the decoder projections ({', '.join(leftover[:4])}); "
                "loraprune continues adapters on q/k/v/o/gate/up/down only. Merge the others first "
                "(e.g. peft_model.merge_and_unload()) or target only the projections"
            )
        smallest = min(min(m.weight.shape) for m in projections)
        if cfg.lora_r > smallest:
            raise ConfigError(f"lora_r={cfg.lora_r} is larger than the smallest projection dimension ({smallest}); a "
                              f"rank above it adds nothing: use lora_r <= {smallest}")
        self.total_params = sum(layer_projection_params(self.model, self.spec))
        self.model_params = whole_model_params(self.model)  # before LoRA is injected
        round_to = resolve_round_to(cfg.round_to, self.layers)
        self.allocation = allocate(self.layers, cfg.ratio, self.total_params, skip, round_to, cfg.ranking)
        self.state = PruningState(self.layers, self.allocation, ema=cfg.ema, ranking=cfg.ranking, skip=skip,
                                  round_to=round_to)
        check_reachable(self.layers, self.allocation, cfg.ranking, skip, round_to)  # exact or refused, before any work
        self.schedule = schedule
        self.settings = {k: v for k, v in cfg.to_dict().items() if k in RUN_DEFINING}
        self.settings["skip_layers"] = sorted(skip)
        self.settings["round_to"] = round_to  # resolved: the report and config.loraprune say what ran
        self.importance: Importance = make_importance(cfg)
        self._optimizer = None  # bind_optimizer(): progressive compaction needs it
        self.bad_in_row = 0  # non-finite steps in a row (skip_step)
        self.skipped_steps = 0
        self._finalized = False  # finalize() cuts the model once; restore() cannot undo that
        self._warned_no_schedule = False
        self.scores_final = False  # True from the schedule's end on (step_end): scoring is over
        # physical order of each layer's groups (original indices); identity until cut progressively
        self.attn_order = [torch.arange(lg.n_kv) for lg in self.layers]
        self.mlp_order = [torch.arange(lg.n_channels) for lg in self.layers]
        # ---- attach (changes the model; undone by restore()) ----
        self._saved_requires_grad = {id(p): p.requires_grad for p in self.model.parameters()}
        self._given_config = self.model.config  # finalize() gives the pruned model a copy
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self.modules: list[dict[str, LoRALinear]] = []
        self.repairer = RunRepair(cfg.repair_damp) if cfg.repair else None
        try:  # any failure from the first change on puts the model back before the error leaves
            self.modules = self._inject_lora(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.seed)
            self.importance.attach(self)
            if self.repairer is not None:
                self.repairer.attach(self)
                self.repairer.collect = schedule is not None and schedule.is_update(1)
        except BaseException:
            self.restore()
            raise

    @property
    def criterion(self) -> str:
        return self.config.criterion

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
                self._replaced.append((parent, name, module))
                setattr(parent, name, lora)
                wrapped[name] = lora
            out.append(wrapped)
        return out

    def restore(self) -> None:
        """Put the model back as it was given: original projection modules (LoRA and
        masks gone, rows and columns in their original order), ``requires_grad`` flags.
        Used when a run fails or is abandoned. After :meth:`finalize` the model has been
        cut and there is nothing to put back: it does nothing."""
        if self._finalized:
            return
        self.importance.detach(self)
        for m in self.lora_modules():
            unpermute_module(m, self._optimizer)
        if self.repairer is not None:
            self.repairer.detach(self)
            RunRepair.restore(self.lora_modules())
        for parent, name, module in reversed(self._replaced):
            setattr(parent, name, module)
        self._replaced = []
        self.model.config = self._given_config
        for p in self.model.parameters():
            if id(p) in self._saved_requires_grad:
                p.requires_grad_(self._saved_requires_grad[id(p)])
                p.grad = None

    def rebind(self, model: nn.Module, modules: list[dict[str, LoRALinear]]) -> None:
        """Point this engine at another copy of its model: ``modules`` are that copy's
        LoRA layers (per decoder layer, by projection name), e.g. an unsharded twin of
        a sharded model (:func:`loraprune.model.distributed.unsharded_pruner`). The copy is
        not the model given, so :meth:`restore` has nothing to put back there; the
        current masks are applied to it."""
        self.model = model
        self.modules = modules
        self._replaced = []
        self.apply_masks()

    def lora_modules(self) -> list[LoRALinear]:
        return [m for mods in self.modules for m in mods.values()]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.lora_modules() for p in (m.lora_A, m.lora_B)]

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser of the LoRA factors, whose state (Adam moments) is permuted along
        when groups are cut out progressively. Progressive compaction (``config.progressive``)
        takes effect only once bound: :func:`loraprune.prune` binds its optimiser; the
        Trainer callback and loops that do not bind one train masked."""
        if self.state.masks.kept_kv() != [lg.n_kv for lg in self.layers] or \
                self.state.masks.kept_channels() != [lg.n_channels for lg in self.layers]:
            if self.progressive != (self.config.progressive and optimizer is not None):
                raise LoRAPruneError("bind the optimizer before the first mask update: masks already applied one way "
                                     "cannot switch between masked and progressive training")
        self._optimizer = optimizer

    @property
    def progressive(self) -> bool:
        """True when removed groups are cut out of the computation at each update
        (:mod:`loraprune.surgery.progressive`) rather than computed as zeros."""
        return bool(self.config.progressive) and self._optimizer is not None

    @contextlib.contextmanager
    def dense_teacher(self):
        """Inside: the model computes the original dense network (LoRA and masks off).

        The self-distillation teacher: the same frozen weights, so it costs one
        extra forward pass and no second copy of the model.
        """
        mods = self.lora_modules()
        for m in mods:
            m.bypass = True
        try:
            yield self.model
        finally:
            for m in mods:
                m.bypass = False

    # ---- scoring ----------------------------------------------------------------
    @torch.no_grad()
    def score(self) -> bool:
        """Fold this step's evidence into the EMA group scores (call after backward,
        after gradient clipping). Returns False if the scores were not finite (the
        step is then left out of the EMA, with a warning)."""
        if self.scores_final:
            return True  # the final mask is set (step_end): nothing reads scores any more
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.importance.synchronize(self)  # every rank scores the global batch
        scores = self.importance.scores(self)
        if scores is None:
            return True
        # criteria score the physical layout: put each group's score at its original index
        attn = [to_original(t, order) for t, order in zip(scores[0], self.attn_order)]
        mlp = [to_original(t, order) for t, order in zip(scores[1], self.mlp_order)]
        finite = all(bool(torch.isfinite(t).all()) for t in attn + mlp)
        if not finite:
            warnings.warn("non-finite importance scores this step; left out of the EMA", RuntimeWarning, stacklevel=2)
            return False
        self.state.observe(attn, mlp)
        return True

    def discard_grads(self) -> None:
        """Drop every gradient the engine's layers hold (LoRA factors and, for the
        ``grad`` criterion, the frozen weights) and whatever the criterion gathered
        this step: a skipped step must not leak into the next one."""
        for m in self.lora_modules():
            m.lora_A.grad = m.lora_B.grad = None
            m.base.weight.grad = None
        self.importance.clear(self)

    # ---- non-finite steps ---------------------------------------------------------
    def grads_finite(self) -> bool:
        """True if every LoRA gradient of this step is finite; under data parallelism
        (each rank checks its own shard) one answer for all ranks: they must skip together."""
        ok = all(p.grad is None or bool(torch.isfinite(local(p.grad)).all()) for p in self.lora_parameters())
        return all_ranks(ok)

    def skip_step(self, step: int, lr: float, limit: int | None = None) -> None:
        """The policy for a step whose loss, gradients or scores are not finite: drop its
        gradients and evidence (:meth:`discard_grads`), warn, and after ``limit``
        (default ``config.max_bad_steps``) such steps in a row raise
        :class:`~loraprune.errors.NonFiniteLossError`. The caller skips the optimiser step."""
        self.bad_in_row += 1
        self.skipped_steps += 1
        self.discard_grads()
        warnings.warn(f"step {step}: non-finite loss, gradients or scores; update skipped", RuntimeWarning,
                      stacklevel=3)
        limit = self.config.max_bad_steps if limit is None else limit
        if self.bad_in_row >= limit:
            raise NonFiniteLossError(
                f"{self.bad_in_row} steps in a row had NaN/inf loss, gradients or scores; lower the learning rate "
                f"(now {lr}) or max_grad_norm, or check the data and the model's dtype"
            )

    def step_ok(self) -> None:
        """A finite step: the count of non-finite steps in a row starts again."""
        self.bad_in_row = 0

    # ---- masks ------------------------------------------------------------------
    def apply_masks(self) -> None:
        """Make the student compute only the kept groups: progressively (the kept groups
        reordered into a dense prefix that every projection computes alone) or masked
        (q/k/v/gate/up compute kept rows, o/down read zeros)."""
        s = self.spec
        masks = self.state.masks
        if self.progressive:
            for i, (lg, mods) in enumerate(zip(self.layers, self.modules)):
                self.attn_order[i], self.mlp_order[i] = reorder_layer(
                    mods, s, lg, self.attn_order[i], masks.attn_keep[i], self.mlp_order[i], masks.mlp_keep[i],
                    self._optimizer)
            return
        for lg, mods, a_keep, m_keep in zip(self.layers, self.modules, masks.attn_keep, masks.mlp_keep):
            kept = lg.kept_slices(s, a_keep, m_keep)
            for name in (s.q, s.k, s.v, s.gate, s.up):  # row-owning projections; o/down read zeros
                mods[name].set_keep(kept[name][0])

    def step_end(self, step: int) -> bool:
        """Record the completed optimiser step; update masks if the schedule says so.

        From the schedule's end on the mask is final and no score is read again: the criterion
        is detached (no hooks, no weight gradients) and :meth:`score` does nothing.

        Without a schedule (a hand-written loop that gave none) the masks stay full
        during training and all the pruning happens in :meth:`finalize`, with no
        recovery steps after it; that is warned once. Give one with
        ``LoRAPruner(model, config, schedule=CubicSchedule.for_run(steps, ...))``."""
        self.state.step = step
        if self.schedule is None and not self._warned_no_schedule:
            self._warned_no_schedule = True
            warnings.warn("this LoRAPruner has no schedule: the masks stay full while training and all pruning "
                          "happens in finalize(), with no recovery after it. Pass schedule=CubicSchedule.for_run("
                          "steps, config.prune_start, config.prune_end) to prune during training", UserWarning,
                          stacklevel=2)
        if self.schedule is None:
            return False
        changed = False
        if self.schedule.is_update(step):
            changed = self.state.update(self.schedule.fraction(step))
            if changed and self.repairer is not None:
                self.repairer.cut(self)  # before apply_masks: the statistics are in the current layout
            if changed:
                self.apply_masks()
        if self.repairer is not None:
            self.repairer.collect = self.schedule.is_update(step + 1)
        if step >= self.schedule.end and not self.scores_final:
            self.scores_final = True
            if not is_sharded(self.model):  # FSDP2/ZeRO-3 fixed which parameters need gradients when they
                self.importance.detach(self)  # sharded them: flipping that mid-run is left to finalize()
        return changed

    def reach_target(self) -> None:
        """Jump to the final masks (used when training stops before the schedule ends)."""
        if self.state.update(1.0):
            self.apply_masks()

    # ---- the end ------------------------------------------------------------------
    def removed_params(self) -> int:
        return removed_params(self.layers, self.state.masks)

    def report(self) -> PruneReport:
        return PruneReport.measure(self.layers, self.state.masks, self.total_params, self.settings,
                                   target_ratio=self.config.ratio, steps=self.state.step, model_params=self.model_params)

    @torch.no_grad()
    def finalize(self, merge: bool = True) -> nn.Module:
        """Reach the target, cut the masked groups, merge LoRA; returns the small model.

        ``merge=False`` keeps the LoRA layers, gathered to the pruned shapes, for
        :func:`loraprune.export_adapter` (then :func:`loraprune.merge_lora`).
        A pruner finalizes once: a second call is refused (the model is already cut).
        """
        if self._finalized:
            raise LoRAPruneError("finalize() was already called on this LoRAPruner: it cut the model and returned it "
                                 "(also pruner.model); use that model. To prune again, build a new LoRAPruner on a "
                                 "freshly loaded model")
        self.reach_target()
        report = self.report()
        # the pruned model gets its own config: the user's config object (shared
        # with other models built from it) must not shrink with this one
        config = self.model.config
        self.model.config = copy.deepcopy(config)
        masks = self.state.masks
        if self.progressive:  # the kept groups already form each layer's prefix, in original order
            masks = Masks([torch.arange(lg.n_kv) < int(a.sum()) for lg, a in zip(self.layers, masks.attn_keep)],
                          [torch.arange(lg.n_channels) < int(m.sum()) for lg, m in zip(self.layers, masks.mlp_keep)])
        try:  # compact() completes or puts every layer back: then restore() or another finalize() still works
            model = compact(self.model, masks, self.spec, merge=merge)
        except BaseException:
            self.model.config = config
            raise
        self._finalized = True  # the model is cut: restore() has nothing to put back
        self.importance.detach(self)  # its hooks and flags were on the layers just replaced
        if self.repairer is not None:
            self.repairer.detach(self)
        model = forget_gguf_origin(model)  # no file's weights now
        model.loraprune_masks = self.state.masks.clone()  # kept indices of the original model
        self._replaced = []
        report.attach(model.config)
        return model
