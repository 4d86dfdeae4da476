"""Gradient checkpointing changes memory, not results: the same mask-gradient scores,
the same per-step losses and masks from prune(), the same Trainer-callback run; and the
model's own checkpointing setting is back afterwards (also when the run fails)."""
import pytest
import torch

import loraprune
from loraprune.errors import ConfigError
from loraprune.model.recompute import gradient_checkpointing, is_checkpointing
from tiny import random_batches, tiny_model


def _fisher_scores(checkpointing: bool):
    model = tiny_model()
    pruner = loraprune.LoRAPruner(model, ratio=0.5, criterion="fisher", seed=0, ema=0.0, lora_dropout=0.0)
    for m in pruner.lora_modules():  # non-zero B: every path carries gradient
        torch.nn.init.normal_(m.lora_B, std=0.1)
    model.train()
    calls = []
    pruner.modules[0][pruner.spec.o].register_forward_pre_hook(lambda m, a: calls.append(1))
    with gradient_checkpointing(model, checkpointing):
        assert is_checkpointing(model) == checkpointing
        for batch in random_batches(n=2, batch=3):  # two micro-batches: accumulation too
            model(**batch, labels=batch["input_ids"]).loss.backward()
    assert pruner.score()
    return pruner.state.attn_score + pruner.state.mlp_score, len(calls)


def test_fisher_scores_are_the_same_with_gradient_checkpointing():
    plain, forwards = _fisher_scores(False)
    recomputed, forwards_ckpt = _fisher_scores(True)
    assert forwards_ckpt == 2 * forwards  # the layer really was recomputed (the probe ran twice per forward)
    assert all(bool(t.gt(0).any()) for t in plain)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)  # counted once, not twice


def test_context_restores_the_models_own_setting_and_hooks():
    model = tiny_model()
    emb = model.get_input_embeddings()
    hooks = dict(emb._forward_hooks)
    with gradient_checkpointing(model):
        assert is_checkpointing(model)
    assert not is_checkpointing(model) and dict(emb._forward_hooks) == hooks
    assert not any("_gradient_checkpointing_func" in m.__dict__ for m in model.modules())
    # a model that already checkpoints (the user's own function) keeps it
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": True})
    funcs = [m._gradient_checkpointing_func for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    with gradient_checkpointing(model):
        pass
    assert is_checkpointing(model)
    assert funcs == [m._gradient_checkpointing_func for m in model.modules()
                     if hasattr(m, "_gradient_checkpointing_func")]


def test_model_without_checkpointing_support_is_refused_before_the_run():
    model = tiny_model()
    model.supports_gradient_checkpointing = False
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        loraprune.prune(model, random_batches(n=1), ratio=0.5, steps=2, gradient_checkpointing=True, progress=False)
    assert not any(type(m).__name__ == "LoRALinear" for m in model.modules())


@pytest.mark.parametrize("supported", [True, False])
def test_by_default_prune_checkpoints_where_the_model_supports_it(supported):
    model = tiny_model()
    model.supports_gradient_checkpointing = supported
    seen = []
    loraprune.prune(model, random_batches(n=1), ratio=0.5, steps=2, progress=False,
                    on_step=lambda s, p, loss: seen.append(is_checkpointing(p.model)))
    assert seen == [supported, supported]
    assert not is_checkpointing(model)


def _run(criterion, checkpointing, dropout):
    losses = []
    model = loraprune.prune(tiny_model(), random_batches(n=3), ratio=0.5, steps=4, prune_start=1, prune_end=3,
                            prune_every=1, criterion=criterion, lora_dropout=dropout, progress=False,
                            gradient_checkpointing=checkpointing, on_step=lambda s, p, loss: losses.append(loss))
    return model, losses


@pytest.mark.slow
@pytest.mark.parametrize("criterion,dropout", [("fisher", 0.0), ("lora", 0.0), ("grad", 0.0), ("fisher", 0.05)])
def test_prune_gives_the_same_masks_and_losses_with_gradient_checkpointing(criterion, dropout):
    """lora_dropout > 0 matches too: non-reentrant checkpointing replays the forward with the
    RNG state of the first pass, and the dropout seeds come from that RNG."""
    plain, losses = _run(criterion, False, dropout)
    ckpt, losses_ckpt = _run(criterion, True, dropout)
    assert len(losses) == 4 and None not in losses
    assert losses_ckpt == losses
    assert ckpt.config.loraprune["layers"] == plain.config.loraprune["layers"]
    assert ckpt.config.loraprune["achieved_ratio"] > 0.3
    ref = plain.state_dict()
    for k, v in ckpt.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    assert not is_checkpointing(ckpt)  # the run's setting is gone


@pytest.mark.slow
def test_failed_run_leaves_checkpointing_off():
    model = tiny_model()

    def stop(step, pruner, loss):
        assert is_checkpointing(pruner.model)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loraprune.prune(model, random_batches(n=2), ratio=0.5, steps=3, gradient_checkpointing=True,
                        progress=False, on_step=stop)
    assert not is_checkpointing(model)
    assert not model.get_input_embeddings()._forward_hooks


@pytest.mark.slow
def test_trainer_callback_under_gradient_checkpointing_matches_the_hand_loop(tmp_path):
    from transformers import TrainingArguments

    from test_callback import BATCH, STEPS, assert_same_run, hand_loop, rows, run_trainer

    data = rows(STEPS * BATCH)
    # transformers 5 renamed the options (the old names still work, with a FutureWarning)
    name = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") else "gradient_checkpointing"
    pruner, _ = run_trainer(tmp_path / "t", data, **{name: True, f"{name}_kwargs": {"use_reentrant": False}})
    assert is_checkpointing(pruner.model)
    assert_same_run(pruner, hand_loop(data, BATCH))
