"""Gradient (activation) checkpointing for the length of one pruning run.

At long sequence lengths the activations every decoder layer keeps for
backward dominate the memory of a run (the frozen weights are shared, the LoRA
factors are small). Checkpointing keeps only each layer's input and recomputes
the rest during backward: one more forward pass per step, activations of one
layer at a time.

:func:`gradient_checkpointing` turns on the model's own (Hugging Face)
checkpointing, non-reentrant, for the enclosed block and afterwards puts back
exactly what the model had: every module's ``gradient_checkpointing`` flag and
checkpoint function, and no input-embedding hook left behind (transformers adds
one when checkpointing is enabled). Non-reentrant checkpointing is the one
that works with frozen inputs (the reentrant one back-propagates only through
layers whose input requires grad) and it replays the forward with the RNG state
of the first pass, so LoRA dropout draws the same masks.

The criteria keep working under it: the projection criteria read gradients,
which are the same, and the mask-gradient probe of ``fisher``/``taylor`` saves
its input with ``save_for_backward`` so that checkpointing recomputes it too
(see :class:`loraprune.method.criterion.MaskGradientImportance`).
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

from ..errors import ConfigError

#: what transformers' ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` receive
CHECKPOINT_KWARGS = {"use_reentrant": False}
_ABSENT = object()
_MODULE_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")
_MODEL_ATTRS = ("_require_grads_hooks", "_require_grads_hook")


def check_supported(model: nn.Module) -> None:
    """Raise :class:`ConfigError` (before any work) if ``model`` cannot checkpoint its layers."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; "
                          "drop gradient_checkpointing=True (--gradient-checkpointing)")


def resolve(setting: bool | None, model: nn.Module) -> bool:
    """``PruneConfig.gradient_checkpointing`` for ``model``: None is on where the model supports it;
    True on a model that cannot raises :class:`ConfigError` (before any work)."""
    if setting is None:
        return bool(getattr(model, "supports_gradient_checkpointing", False))
    if setting:
        check_supported(model)
    return setting


def _enable(model: nn.Module) -> None:
    # transformers 5 renamed the method (the old name warns); 4.x only has the old one
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, on: bool = True):
    """Non-reentrant gradient checkpointing of ``model``'s layers inside the block (``on=False``: nothing changes).

    The model's previous state is restored on exit, also when the block raises.
    """
    if not on:
        yield model
        return
    check_supported(model)
    saved = [(m, {a: m.__dict__.get(a, _ABSENT) for a in _MODULE_ATTRS})
             for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    model_attrs = {a: model.__dict__.get(a, _ABSENT) for a in _MODEL_ATTRS}
    hooks_before = {id(h) for h in (getattr(model, "_require_grads_hooks", None) or ())}
    _enable(model)
    try:
        yield model
    finally:
        for h in getattr(model, "_require_grads_hooks", None) or ():
            if id(h) not in hooks_before:
                h.remove()  # the embedding hook enable() added (not needed without reentrant checkpointing)
        for name, value in model_attrs.items():
            _put(model, name, value)
        for m, attrs in saved:
            for name, value in attrs.items():
                _put(m, name, value)


def _put(obj, name: str, value) -> None:
    if value is _ABSENT:
        obj.__dict__.pop(name, None)  # back to the class attribute
    else:
        setattr(obj, name, value)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether any module of ``model`` checkpoints its forward now."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
