"""What "the model is exactly as it was" means in the guarantee tests: weights, module types,
``requires_grad`` flags, devices and config, compared to a snapshot taken before the call."""
import json

import torch


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m).__name__ for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: p.device for n, p in model.named_parameters()},
            json.dumps(model.config.to_dict(), sort_keys=True, default=str))


def assert_intact(model, snap):
    sd, kinds, flags, devices, cfg = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(now[k], sd[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert {n: type(m).__name__ for n, m in model.named_modules()} == kinds
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: p.device for n, p in model.named_parameters()} == devices
    assert json.dumps(model.config.to_dict(), sort_keys=True, default=str) == cfg


def fail_prune_at(model, batches, step: int, check, **settings) -> None:
    """Run :func:`loraprune.prune` on ``model`` and make it fail at ``step``, after ``check(pruner)``
    has looked at the run's state there (the caller then asserts what the failure left)."""
    import pytest

    import loraprune

    def boom(at, pruner, loss):
        if at == step:
            check(pruner)
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        loraprune.prune(model, batches, on_step=boom, **settings)
