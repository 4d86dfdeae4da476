"""``loraprune.prune``: one call from a Hugging Face model to a smaller dense one."""
from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .data import make_batches
from .errors import LoRAPruneError
from .engine import LoRAPruner
from .io import attach_export
from .schedule import CubicSchedule

log = logging.getLogger("loraprune")


class NonFiniteLossError(LoRAPruneError, RuntimeError):
    """Training produced NaN/inf too many steps in a row."""


def _finite_grads(params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def train_step(model, pruner: LoRAPruner, batch: dict, device) -> float | None:
    """Forward, backward and scoring of one batch; ``None`` if loss or gradients are not finite."""
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("the model returned no loss: batches need 'labels' (or text data, which gets them)")
    if not torch.isfinite(loss):
        return None
    loss.backward()
    if not _finite_grads(pruner.lora_parameters()):
        return None
    pruner.score()
    return loss.item()


def prune(
    model: nn.Module,
    data,
    ratio: float = 0.5,
    tokenizer=None,
    *,
    steps: int = 200,
    lr: float = 2e-4,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    criterion: str = "lora",
    square: bool = False,
    normalize: str | None = None,
    ema: float = 0.9,
    prune_start: float | int = 0.0,
    prune_end: float | int = 0.75,
    prune_every: int | None = None,
    skip_layers=None,
    ranking: str = "layer",
    round_to: int = 1,
    uniform: bool = False,
    seq_len: int = 128,
    batch_size: int = 4,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    max_bad_steps: int = 5,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    merge: bool = True,
    on_step=None,
) -> nn.Module:
    """Prune ``ratio`` of the decoder-projection parameters of ``model`` and return it compacted.

    LoRA adapters train on the frozen weights for ``steps`` optimiser steps;
    their gradients score every attention KV group and MLP channel (the
    ``criterion``), the scores are EMA-smoothed, and masks grow on a cubic
    schedule from ``prune_start`` to ``prune_end`` (fractions of ``steps`` or
    step numbers) every ``prune_every`` steps. The loss always sees the masked
    network; the steps after ``prune_end`` are recovery on the final mask. At
    the end the masked groups are cut out and LoRA is merged: the returned
    model is the same object, smaller, with ``config.loraprune`` describing
    what was done. ``merge=False`` keeps the LoRA layers (gathered to the pruned
    shapes) for :func:`loraprune.export_adapter`. ``on_step(step, pruner, loss)`` is
    called after every optimiser step (loss ``None`` for a skipped step): for
    logging, or to read the engine's masks, EMA scores and schedule. See the
    README for every option.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if resume and not checkpoint_dir:
        raise ValueError("resume=True needs checkpoint_dir=<the directory of the interrupted run>")
    if checkpoint_dir and checkpoint_every is None:
        checkpoint_every = max(1, steps // 10)
    torch.manual_seed(seed)
    schedule = CubicSchedule.for_run(steps, prune_start, prune_end, prune_every)
    pruner = LoRAPruner(
        model, ratio=ratio, schedule=schedule, criterion=criterion, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, square=square, normalize=normalize, ema=ema, skip_layers=skip_layers,
        ranking=ranking, round_to=round_to, uniform=uniform, seed=seed,
    )
    hf_model = pruner.model
    device = next(hf_model.parameters()).device
    batches = make_batches(data, hf_model.config, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed)
    params = pruner.lora_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    from .checkpoint import Checkpointer  # local: checkpointing is optional

    run = dict(steps=steps, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seq_len=seq_len,
               batch_size=batch_size, schedule=[schedule.start, schedule.end, schedule.every])
    ckpt = Checkpointer(checkpoint_dir, every=checkpoint_every, run=run) if checkpoint_dir else None
    start = 0
    if ckpt is not None and resume:
        start = ckpt.restore(pruner, optimizer)
    elif ckpt is not None and ckpt.complete():
        raise FileExistsError(
            f"{ckpt.dir} holds checkpoints of an earlier run; pass resume=True to continue it, "
            "or remove them (or choose another checkpoint_dir) to start anew"
        )

    use_cache = getattr(hf_model.config, "use_cache", None)
    hf_model.config.use_cache = False
    hf_model.train()
    bad_in_row = 0
    bar = tqdm(range(start + 1, steps + 1), desc=f"loraprune {criterion} {ratio:.0%}", disable=not progress,
               initial=start, total=steps)
    for _ in range(start):  # replay the data order so a resumed run sees the same batches
        next(batches)
    try:
        for step in bar:
            loss = train_step(hf_model, pruner, next(batches), device)
            if loss is None:
                bad_in_row += 1
                pruner.discard_grads()
                warnings.warn(f"step {step}: non-finite loss or gradients; update skipped", RuntimeWarning, stacklevel=2)
                if bad_in_row >= max_bad_steps:
                    raise NonFiniteLossError(
                        f"{bad_in_row} steps in a row had NaN/inf loss or gradients; lower lr (now {lr}) "
                        "or max_grad_norm, or check the data and the model's dtype"
                    )
            else:
                bad_in_row = 0
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
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
        if use_cache is not None:
            hf_model.config.use_cache = use_cache
    hf_model.eval()
    pruned = pruner.finalize(merge=merge)
    rep = pruned.config.loraprune
    log.info("loraprune: removed %.2f%% of decoder-projection parameters (target %.2f%%)",
             100 * rep["achieved_ratio"], 100 * ratio)
    # compact() left the kept indices on the model as ``loraprune_masks``;
    # merge=False keeps LoRA for loraprune.export_adapter
    return attach_export(pruned) if merge else pruned
