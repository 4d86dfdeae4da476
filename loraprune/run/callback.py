"""LoRAPrune inside ``transformers.Trainer``: a callback, not a copied training loop.

Trainer (4.4x to 5.x) calls, for every optimiser step::

    backward (per micro-batch) -> [DDP all-reduce] -> clip -> on_pre_optimizer_step
    -> optimizer.step() -> on_optimizer_step -> lr_scheduler.step() -> zero_grad
    -> global_step += 1 -> on_step_end -> save (on_save)

so the callback scores in ``on_pre_optimizer_step`` (the LoRA gradients of the
whole accumulated step are present, already all-reduced under DDP) and
updates the masks in ``on_step_end`` (after the step, with ``global_step``
counting completed optimiser steps, as :func:`loraprune.prune` does). Trainer
clips before the hook, so the scores see clipped gradients: a per-step scalar
that leaves each step's ranking unchanged; pass ``max_grad_norm=0`` to score
exactly as :func:`loraprune.prune` does.

Distributed training (via Accelerate):

* **DDP** - gradients are averaged over ranks before the hook, so every rank
  computes the same scores and masks. The masks are still broadcast from rank
  0 at each update (a few hundred bytes), so ranks cannot drift apart even
  through floating-point differences; a rank that disagreed is reported.
* **FSDP** (v1, ``use_orig_params=True``) - parameters and gradients are
  sharded at the hook. Scoring needs, per projection, the full LoRA factors,
  their gradients and the frozen weight, so the callback gathers them with
  ``FullyShardedDataParallel.summon_full_params(with_grads=True,
  writeback=False)`` for the duration of :meth:`LoRAPruner.score` (peak memory:
  one full copy of the model's parameters and LoRA gradients, transient).
  Per-shard partial sums (each rank scoring the rows it owns and all-reducing
  the group sums) would avoid the gather for the ``lora`` criterion, but
  FSDP's flat shards do not follow row boundaries, so this is not done.
  ``finalize()`` under FSDP v1 is not covered by a test: call it on an
  unwrapped model.
* **FSDP2** (``fully_shard``; accelerate's and transformers' default) -
  parameters and gradients are row-sharded ``DTensor`` s at the hook, and no
  weight-sized tensor is gathered for scoring (:mod:`loraprune.model.distributed`
  holds the details). ``fisher`` (the default) and ``taylor`` read activations, which are
  never sharded, and all-reduce their per-group statistics (a few KB per step).
  ``lora`` / ``grad`` / ``magnitude`` score each projection from **per-shard
  partial sums**: each rank keeps its rows of ``W``, ``B``, ``∇B`` (``∇W``)
  local, gathers only ``A`` and ``∇A`` (``r x in``), and the group sums are
  all-gathered (rows) / all-reduced (columns): no weight-sized tensor is
  gathered. Other layouts (``shard_placement_fn`` giving ``Shard(1)``) are
  gathered one projection at a time (peak: one full projection). Masks are
  broadcast from rank 0 as under DDP. ``finalize()`` is a collective: every
  parameter is gathered one at a time to rank 0's CPU, the model is rebuilt
  there without FSDP, and rank 0 gets the small model (the other ranks
  ``None``): peak, the unpruned model once in rank 0's host memory.
* **DeepSpeed ZeRO-2 / ZeRO-3** - accelerate runs DeepSpeed's ``engine.step()``
  inside ``backward``, before any callback: the LoRA gradients are reduced
  into DeepSpeed's partitioned buffers and consumed before the hook. So under
  DeepSpeed the callback scores with the activation criteria only
  (``fisher``, the default, and ``taylor``; also ``random``), whose statistics
  are gathered in backward hooks and all-reduced at the hook: no parameter
  gradient, no ``GatheredParameters`` during training. ``lora`` / ``grad`` /
  ``magnitude`` are refused at ``on_train_begin`` with that explanation.
  Masks are broadcast from rank 0. ``finalize()``: under ZeRO-2 every rank
  holds whole parameters and cuts its own copy; under ZeRO-3 it is a
  collective like FSDP2's (``GatheredParameters`` one tensor at a time, the
  model on rank 0). Tested on CPU with deepspeed 0.19.8
  (``pip install deepspeed``, ``DS_ACCELERATOR=cpu``, gloo; its first
  ``init_distributed`` JIT-compiles the ``deepspeed_shm_comm`` op, 7.6 min on
  the shared 2-core test machine) with ZeRO-2 and ZeRO-3, driven in
  accelerate's order (``engine.backward``, ``engine.step``, then the hooks),
  not through ``Trainer`` itself.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..errors import ConfigError
from ..method.schedule import CubicSchedule
from ..model.distributed import data_parallel, finalize_sharded, is_sharded, on_comm_device, uses_deepspeed
from .checkpoint import restore_pruning_state, save_pruning_state
from .engine import LoRAPruner

log = logging.getLogger("loraprune")

STATE_DIR = "loraprune_state"  # inside each Trainer checkpoint-N folder
_NOT_YET = object()  # finalize() not called yet (None is rank > 0's answer under FSDP2)


def _fsdp_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None
    return FullyShardedDataParallel


def _find_fsdp(model):
    fsdp = _fsdp_class()
    if fsdp is None or model is None:
        return None
    if isinstance(model, fsdp):
        return model
    return next((m for m in model.modules() if isinstance(m, fsdp)), None)


class LoRAPruneCallback(TrainerCallback):
    """Drive a :class:`~loraprune.LoRAPruner` from ``transformers.Trainer``.

    ::

        pruner = LoRAPruner(model, ratio=0.5)
        callback = LoRAPruneCallback(pruner)
        trainer = Trainer(model=pruner.model, args=args, train_dataset=ds, callbacks=[callback],
                          optimizers=(callback.optimizer(), None))
        trainer.train()
        small = callback.finalize()          # compacted, LoRA merged
        loraprune.save_pruned(small, "out")  # FSDP2 / ZeRO-3: small is None except on rank 0

    ``prune_start`` / ``prune_end`` / ``prune_every`` (default: the pruner's
    :class:`~loraprune.config.PruneConfig`) build the cubic schedule from
    ``max_steps`` when training starts (unless the pruner already has a schedule). Steps with NaN/inf gradients are skipped with a warning;
    ``max_bad_steps`` of them in a row raise :class:`NonFiniteLossError`.
    Trainer checkpoints get the pruning state (masks, EMA scores) in
    ``checkpoint-N/loraprune_state``; ``trainer.train(resume_from_checkpoint=...)``
    restores it together with Trainer's own weights, optimiser and RNG.
    """

    def __init__(self, pruner: LoRAPruner, prune_start: float | int | None = None, prune_end: float | int | None = None,
                 prune_every: int | None = None, max_bad_steps: int | None = None, sync_masks: bool = True):
        if not isinstance(pruner, LoRAPruner):
            raise TypeError(f"LoRAPruneCallback needs a loraprune.LoRAPruner, got {type(pruner).__name__}")
        self.pruner = pruner
        # the schedule options default to the pruner's PruneConfig (one home for the options)
        schedule_options = {k: v for k, v in dict(prune_start=prune_start, prune_end=prune_end,
                                                  prune_every=prune_every).items() if v is not None}
        self._explicit_schedule = sorted(schedule_options)
        self._check_schedule_source()
        cfg = pruner.config.replace(**schedule_options, **({} if max_bad_steps is None else
                                                           {"max_bad_steps": max_bad_steps}))
        self.prune_start, self.prune_end, self.prune_every = cfg.prune_start, cfg.prune_end, cfg.prune_every
        self.max_bad_steps = cfg.max_bad_steps
        self.sync_masks = sync_masks
        self.mask_disagreements = 0
        self._finalized = _NOT_YET
        self._deepspeed = False

    def _check_schedule_source(self) -> None:
        """A pruner that already has a schedule keeps it: schedule options given here would be ignored."""
        if self.pruner.schedule is not None and self._explicit_schedule:
            raise ConfigError(
                f"the pruner already has a schedule ({self.pruner.schedule}), so {', '.join(self._explicit_schedule)} "
                "given to LoRAPruneCallback would be ignored; give them to the schedule, or build the pruner without one"
            )

    @property
    def skipped_steps(self) -> int:
        """Optimiser steps skipped for NaN/inf gradients or scores (counted by the engine)."""
        return self.pruner.skipped_steps

    # ---- helpers for users ----------------------------------------------------------
    def optimizer(self, lr: float | None = None, weight_decay: float | None = None, **kwargs) -> torch.optim.Optimizer:
        """AdamW over the LoRA factors only (pass as ``Trainer(optimizers=(opt, None))``); ``lr`` and
        ``weight_decay`` default to the pruner's :class:`~loraprune.config.PruneConfig` values."""
        cfg = self.pruner.config
        return torch.optim.AdamW(self.pruner.lora_parameters(), lr=cfg.lr if lr is None else lr,
                                 weight_decay=cfg.weight_decay if weight_decay is None else weight_decay, **kwargs)

    def finalize(self):
        """Reach the target masks, cut the pruned groups, merge LoRA: the small model (call after ``train()``)."""
        if self._finalized is _NOT_YET:
            from ..export.classes import attach_export

            # compact() attaches the kept indices of the masks it cut (the target
            # masks, reached by finalize() even if training stopped early)
            if is_sharded(self.pruner.model):  # FSDP2, ZeRO-3: a collective; the model on rank 0, None elsewhere
                small = finalize_sharded(self.pruner)
            else:
                small = self.pruner.finalize()
            self._finalized = None if small is None else attach_export(small)
        return self._finalized

    # ---- Trainer events ---------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check_schedule_source()
        if self.pruner.schedule is None:
            if not state.max_steps or state.max_steps < 1:
                raise ConfigError("LoRAPruneCallback needs a known number of steps: set TrainingArguments(max_steps=...) "
                                 "or give the pruner a CubicSchedule")
            self.pruner.schedule = CubicSchedule.for_run(state.max_steps, self.prune_start, self.prune_end,
                                                         self.prune_every)
        self._deepspeed = uses_deepspeed(args, optimizer)
        if self._deepspeed and self.pruner.importance.reads_parameters:
            raise ConfigError(
                f"criterion={self.pruner.criterion!r} reads the projections' parameters or gradients after backward, "
                "which DeepSpeed keeps in its own partitioned buffers and consumes inside backward (accelerate steps the engine there, before any "
                "callback runs); use criterion='fisher' (the default) or 'taylor', which read activations, or train "
                "with DDP / FSDP / FSDP2"
            )
        if optimizer is not None and not self._deepspeed:  # ZeRO's param_groups hold its own flat partitions
            lora = {id(p) for p in self.pruner.lora_parameters()}
            extra = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in lora]
            if extra:
                raise ConfigError(
                    f"the optimizer also updates {len(extra)} non-LoRA tensors (the frozen weights must stay as they "
                    "are while they are scored); pass Trainer(..., optimizers=(callback.optimizer(), None))"
                )
        fsdp = _find_fsdp(model)
        if fsdp is not None and not getattr(fsdp, "_use_orig_params", True):
            raise ConfigError("FSDP needs use_orig_params=True for LoRAPrune scoring "
                             "(accelerate: fsdp_use_orig_params: true)")
        if state.global_step > 0:
            self._restore(args, state)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._deepspeed:
            # the engine has stepped already; the activation statistics of the step are all there is
            self._count_bad(self.pruner.score(), args, state)
            return
        params = self.pruner.lora_parameters()
        fsdp = _find_fsdp(model)
        if fsdp is None and all(p.grad is None for p in params):
            raise RuntimeError(
                "no LoRA gradients are visible at the optimizer step, so the groups cannot be scored (a DeepSpeed "
                "run that LoRAPruneCallback did not recognise? pass TrainingArguments(deepspeed=...))"
            )
        if fsdp is not None:
            with type(fsdp).summon_full_params(fsdp, with_grads=True, writeback=False, recurse=True):
                finite = self.pruner.grads_finite() and self.pruner.score()
        else:
            finite = self.pruner.grads_finite() and self.pruner.score()
        # AdamW skips parameters without a gradient: skip_step() drops them, so the update is skipped
        self._count_bad(finite, args, state)

    def _count_bad(self, finite: bool, args, state) -> None:
        if finite:
            self.pruner.step_ok()
        else:
            self.pruner.skip_step(state.global_step + 1, args.learning_rate, limit=self.max_bad_steps)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        updating = self.pruner.schedule.is_update(step)
        self.pruner.step_end(step)
        if updating and self.sync_masks and data_parallel():
            self._broadcast_masks()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_DIR
            save_pruning_state(self.pruner, folder)

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner.schedule is not None and state.global_step < self.pruner.schedule.end:
            log.warning("training stopped at step %d before the pruning schedule ended (step %d); finalize() "
                        "jumps to the target masks", state.global_step, self.pruner.schedule.end)

    # ---- internals ----------------------------------------------------------------------
    def _broadcast_masks(self) -> None:
        """Rank 0's masks everywhere (one packed uint8 tensor); count disagreements."""
        masks = self.pruner.state.masks
        local = torch.cat([m.to(torch.uint8) for m in masks.attn_keep + masks.mlp_keep])
        packed = on_comm_device(local.clone())
        dist.broadcast(packed, src=0)
        packed = packed.cpu()
        if not torch.equal(packed, local):
            self.mask_disagreements += 1
            log.warning("rank %d: masks differed from rank 0's; using rank 0's", dist.get_rank())
            pieces = packed.split([m.numel() for m in masks.attn_keep + masks.mlp_keep])
            n = len(masks.attn_keep)
            masks.attn_keep[:] = [p.bool() for p in pieces[:n]]
            masks.mlp_keep[:] = [p.bool() for p in pieces[n:]]
            self.pruner.apply_masks()

    def _restore(self, args, state) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_DIR
        if not folder.is_dir():
            raise FileNotFoundError(
                f"resuming at step {state.global_step} but {folder} is missing: the checkpoint was not written with "
                "LoRAPruneCallback; resume from a checkpoint it wrote, or start anew"
            )
        restore_pruning_state(self.pruner, folder)
