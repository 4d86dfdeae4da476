"""``loraprune.prune``: one call from a Hugging Face model to a smaller dense one.

This module holds the one training loop of the project (the Trainer callback
drives the same :class:`~loraprune.run.engine.LoRAPruner` from ``transformers.Trainer``
instead). One optimiser step: ``grad_accum`` micro-batches (forward, the loss —
the LM loss, or its mix with self-distillation from the dense model — and
backward), then, if everything is finite, gradient clipping, scoring (after
clipping, as in the callback, where Trainer clips before the hook), the
learning rate of the schedule, the AdamW step, and the mask update.
"""
from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import PruneConfig
from ..data.batches import make_batches
from ..errors import DataError
from ..export.classes import attach_export, check_exportable
from ..export.gguf_read import check_dense
from ..method.loss import trained_tokens, training_loss
from ..method.schedule import CubicSchedule
from ..model.lora import unwrap_compiled, unwrap_peft
from ..model.peft_inputs import check_adapters
from ..model.recompute import gradient_checkpointing, resolve
from ..structure.archs import arch_for
from ..utils.paths import check_output_dir
from .engine import LoRAPruner

log = logging.getLogger("loraprune")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (1-based) of ``steps``."""
    progress = (step - 1) / steps
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def micro_step(pruner: LoRAPruner, batch: dict, config: PruneConfig, scale: float) -> float | None:
    """Forward and backward of one micro-batch (loss times ``scale``); the unscaled loss,
    or ``None`` if it is not finite (nothing is back-propagated then)."""
    valid = trained_tokens(batch)
    if not bool(valid.any()):
        raise DataError("a batch has no token to train on (its labels are all -100 or its attention_mask is all 0); "
                        "give batches with real targets")
    loss = training_loss(pruner, batch, config)
    if not torch.isfinite(loss):
        return None
    (loss * scale).backward()
    return float(loss.detach())


def input_device(model: nn.Module) -> torch.device:
    """Where batches go: the input embedding's device (the first shard of a ``device_map`` model;
    ``next(model.parameters())`` may live on another one)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    weight = getattr(emb, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device


def _on_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def prune(model: nn.Module, data, config: PruneConfig | float | None = None, tokenizer=None, *, on_step=None,
          **overrides) -> nn.Module:
    """Prune ``config.ratio`` of the decoder-projection parameters of ``model`` and return it compacted.

    Args:
        model: a ``transformers`` LLaMA-family causal LM (LLaMA, Mistral, Qwen2,
            Qwen3), or a ``peft`` ``PeftModel`` with LoRA on its projections. A
            ``torch.compile``'d model is pruned through the module it wraps
            (``_orig_mod``), and that plain module is returned: its shapes have
            changed, so compile the result again if wanted.
        data: batches (dicts with ``input_ids``, optionally ``attention_mask`` and
            ``labels``), strings, paths to ``.txt``/``.jsonl`` files or folders, a
            ``datasets.Dataset``, or a hub dataset name (see :mod:`loraprune.data.batches`).
        config: a :class:`~loraprune.config.PruneConfig` (or a float: the ratio).
        tokenizer: needed when ``data`` is text.
        on_step: ``on_step(step, pruner, loss)`` after every optimiser step
            (``loss`` is ``None`` for a skipped step): logging, or reading the
            engine's masks, EMA scores and schedule.
        **overrides: any :class:`PruneConfig` field, e.g. ``ratio=0.3, steps=400``.

    Returns:
        The same model object, physically smaller, LoRA merged (unless
        ``merge=False``), with ``config.loraprune`` describing what was done.

    LoRA adapters train on the frozen weights for ``steps`` optimiser steps;
    the criterion scores every attention KV group and MLP channel, the scores
    are EMA-smoothed, and masks grow on a cubic schedule from ``prune_start``
    to ``prune_end``; the steps after it are recovery on the final mask.
    Everything is checked before the model is touched (options, data, the
    model's layout and export class, a ``checkpoint_dir`` that can be written);
    if the run fails, the model is put back as it was given (the error is re-raised).
    """
    cfg = PruneConfig.from_kwargs(config, **overrides)  # a number for config is the ratio
    schedule = CubicSchedule.for_run(cfg.steps, cfg.prune_start, cfg.prune_end, cfg.prune_every)
    model = unwrap_compiled(model)
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise TypeError(f"model must be a transformers causal LM (or a PeftModel), got {type(model).__name__}")
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step must be a function on_step(step, pruner, loss), got {type(on_step).__name__}")
    check_adapters(model)  # an adapter loraprune cannot continue: refused before the data is read
    if cfg.checkpoint_dir:
        check_output_dir(cfg.checkpoint_dir, "checkpoint_dir")
    # the data is checked (and its first batch drawn) before the model is touched
    batches = make_batches(data, hf_config, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    first = next(batches, None)
    if first is None:
        raise DataError("the data gave no batch; pass at least one batch or enough text for one window")
    batches = itertools.chain([first], batches)
    check_dense(model)
    if cfg.merge and not cfg.uniform:
        arch_for(unwrap_peft(model))  # an unsupported architecture is named as such first
        check_exportable(unwrap_peft(model))  # a per-layer result needs an export class: known before training
    checkpointing = resolve(cfg.gradient_checkpointing, unwrap_peft(model))
    fingerprint = None
    if cfg.checkpoint_dir:
        from .checkpoint import fingerprint as run_fingerprint

        fingerprint = run_fingerprint(model, data, tokenizer)  # of the model as given, before LoRA
    torch.manual_seed(cfg.seed)
    pruner = LoRAPruner(model, cfg, schedule=schedule)
    hf_model = pruner.model
    given_config = hf_model.config  # finalize() gives the pruned model a copy of its own
    use_cache = getattr(given_config, "use_cache", None)
    was_training = hf_model.training
    try:  # everything from the first change to the model on: a failure puts the model back
        with gradient_checkpointing(hf_model, checkpointing):  # the model's own setting afterwards
            pruned = _run(pruner, batches, cfg, schedule, on_step, fingerprint)
        # compact() left the kept indices on the model as ``loraprune_masks``;
        # merge=False keeps LoRA for loraprune.export_adapter
        pruned = attach_export(pruned) if cfg.merge else pruned
    except BaseException:
        pruner.restore()  # nothing to undo once finalize() has cut the model (checked up front to not fail after)
        hf_model.train(was_training)
        raise
    finally:
        if use_cache is not None:
            given_config.use_cache = hf_model.config.use_cache = use_cache
    rep = pruned.config.loraprune
    log.info("loraprune: removed %.2f%% of decoder-projection parameters (target %.2f%%), %.2f%% of all parameters",
             100 * rep["achieved_ratio"], 100 * cfg.ratio, 100 * rep["achieved_ratio_model"])
    return pruned


def _run(pruner: LoRAPruner, batches, cfg: PruneConfig, schedule: CubicSchedule, on_step, fingerprint) -> nn.Module:
    from .checkpoint import Checkpointer, CheckpointError  # local: checkpointing is optional

    hf_model = pruner.model
    device = input_device(hf_model)
    params = pruner.lora_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pruner.bind_optimizer(optimizer)  # progressive compaction permutes its state along
    every = cfg.checkpoint_every or max(1, cfg.steps // 10)
    ckpt = (Checkpointer(cfg.checkpoint_dir, every=every, run=None, fingerprint=fingerprint,
                         allow_mismatch=cfg.force_resume) if cfg.checkpoint_dir else None)
    start = 0
    if ckpt is not None and cfg.resume:
        start = ckpt.restore(pruner, optimizer)
    elif ckpt is not None and ckpt.complete():
        raise CheckpointError(
            f"{ckpt.dir} holds checkpoints of an earlier run; pass resume=True to continue it, "
            "or remove them (or choose another checkpoint_dir) to start anew"
        )
    hf_model.config.use_cache = False
    hf_model.train()
    bar = tqdm(range(start + 1, cfg.steps + 1), desc=f"loraprune {cfg.criterion} {cfg.ratio:.0%}",
               disable=not cfg.progress, initial=start, total=cfg.steps)
    for _ in range(start * cfg.grad_accum):  # replay the data order so a resumed run sees the same batches
        next(batches)
    try:
        for step in bar:
            losses = []
            for _ in range(cfg.grad_accum):
                loss = micro_step(pruner, _on_device(next(batches), device), cfg, 1.0 / cfg.grad_accum)
                if loss is None:
                    break
                losses.append(loss)
            loss = sum(losses) / len(losses) if len(losses) == cfg.grad_accum else None
            if loss is not None and not pruner.grads_finite():
                loss = None
            if loss is not None and cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if loss is not None and not pruner.score():
                loss = None
            if loss is None:
                pruner.skip_step(step, cfg.lr)
            else:
                pruner.step_ok()
                factor = lr_factor(cfg.lr_schedule, step, cfg.steps)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            pruner.step_end(step)
            if on_step is not None:
                on_step(step, pruner, loss)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.3f}", kept=f"{1 - pruner.removed_params() / pruner.total_params:.0%}")
            if ckpt is not None and ckpt.due(step):
                ckpt.save(pruner, optimizer, step)
    finally:
        bar.close()
    hf_model.eval()
    return pruner.finalize(merge=cfg.merge)
