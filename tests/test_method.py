"""The pruning method beyond the paper: mask-gradient criteria, adaptive allocation,
self-distillation, learning-rate schedules, gradient accumulation; each against a
closed form or an independent reference."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import loraprune
from loraprune.method.allocation import allocate
from loraprune.method.loss import distillation_loss
from loraprune.method.state import PruningState
from loraprune.run.prune import lr_factor
from loraprune.structure.groups import build_layer_groups, layer_projection_params
from tiny import random_batches, tiny_model


def _pruner(criterion, **kw):
    model = tiny_model(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    pruner = loraprune.LoRAPruner(model, ratio=0.5, criterion=criterion, seed=0, ema=0.0, lora_dropout=0.0, **kw)
    for m in pruner.lora_modules():  # non-zero B: every path carries gradient
        torch.nn.init.normal_(m.lora_B, std=0.1)
    model.train()
    return pruner


def _mask_gradients(pruner, batch):
    """Per-sequence gradients of a multiplicative mask on the o_proj / down_proj inputs,
    formed explicitly (independent of the criterion's hooks)."""
    masks, handles = {}, []
    s = pruner.spec
    B, T = batch["input_ids"].shape
    for i, mods in enumerate(pruner.modules):
        for kind, mod in (("attn", mods[s.o]), ("mlp", mods[s.down])):
            m = torch.ones(B, 1, mod.in_features, requires_grad=True)
            masks[(kind, i)] = m
            handles.append(mod.register_forward_pre_hook(lambda mod, args, m=m: (args[0] * m,)))
    pruner.model(**batch, labels=batch["input_ids"]).loss.backward()
    for h in handles:
        h.remove()
    grads = {k: m.grad[:, 0] for k, m in masks.items()}  # (B, D)
    pruner.discard_grads()
    return grads


@pytest.mark.parametrize("criterion", ["fisher", "taylor"])
def test_mask_gradient_criteria_equal_explicit_mask_gradients(criterion):
    pruner = _pruner(criterion)
    batch = random_batches(n=1, batch=3)[0]
    grads = _mask_gradients(pruner, batch)
    pruner.model(**batch, labels=batch["input_ids"]).loss.backward()
    assert pruner.score()
    for lg in pruner.layers:
        per_group = grads[("attn", lg.layer)].view(3, lg.n_kv, -1).sum(-1)  # (B, KV groups)
        per_chan = grads[("mlp", lg.layer)]
        if criterion == "fisher":
            want_a, want_m = per_group.square().sum(0), per_chan.square().sum(0)
        else:
            want_a, want_m = per_group.sum(0).abs(), per_chan.sum(0).abs()
        torch.testing.assert_close(pruner.state.attn_score[lg.layer], want_a, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(pruner.state.mlp_score[lg.layer], want_m, rtol=1e-4, atol=1e-10)


def test_mask_gradient_criterion_accumulates_micro_batches_and_forms_no_weight_gradient():
    pruner = _pruner("fisher")
    b1, b2 = random_batches(n=2, batch=2)
    g1, g2 = _mask_gradients(pruner, b1), _mask_gradients(pruner, b2)
    for b in (b1, b2):
        pruner.model(**b, labels=b["input_ids"]).loss.backward()
    assert all(m.base.weight.grad is None for m in pruner.lora_modules())
    pruner.score()
    want = g1[("mlp", 0)].square().sum(0) + g2[("mlp", 0)].square().sum(0)
    torch.testing.assert_close(pruner.state.mlp_score[0], want, rtol=1e-4, atol=1e-10)


def test_mask_gradient_hooks_ignore_no_grad_forwards_and_are_removed_at_the_end():
    pruner = _pruner("fisher")
    with torch.no_grad():
        pruner.model(**random_batches(n=1)[0])
    assert pruner.importance.scores(pruner) is None  # nothing gathered without backward
    pruner.finalize()
    assert not any(m._forward_pre_hooks for m in pruner.model.modules())


def _state(ranking, scores_attn, scores_mlp, ratio=0.5, skip=frozenset()):
    model = tiny_model(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                       intermediate_size=48)
    layers = build_layer_groups(model)
    total = sum(layer_projection_params(model))
    state = PruningState(layers, allocate(layers, ratio, total, skip), ema=0.0, ranking=ranking, skip=skip)
    state.observe(scores_attn, scores_mlp)
    return state, layers


def test_adaptive_ranking_removes_cheapest_score_per_parameter_within_half_a_group():
    g = torch.Generator().manual_seed(0)
    attn = [torch.rand(4, generator=g) * 10 for _ in range(4)]
    mlp = [torch.rand(48, generator=g) for _ in range(4)]
    mlp[2] = mlp[2] * 1e-3  # layer 2's MLP matters least per parameter
    state, layers = _state("adaptive", attn, mlp)
    target = state.allocation.removed_params(layers)
    state.update(1.0)
    removed = [(lg.n_kv - int(a.sum())) * lg.attn_cost + (lg.n_channels - int(m.sum())) * lg.mlp_cost
               for lg, a, m in zip(layers, state.masks.attn_keep, state.masks.mlp_keep)]
    assert abs(sum(removed) - target) <= layers[0].attn_cost / 2
    caps = state._layer_caps()
    assert all(r <= c for r, c in zip(removed, caps))
    assert all(a.sum() >= 1 and m.sum() >= 1 for a, m in zip(state.masks.attn_keep, state.masks.mlp_keep))
    # layer 2 (a middle layer, cap 2 x ratio) gives up the most
    assert removed[2] == max(removed) and removed[0] <= caps[0] and removed[3] <= caps[3]
    # among the groups still candidates, nothing kept scores lower per parameter than
    # a removed MLP channel of the same layer
    for i, lg in enumerate(layers):
        kept, gone = state.masks.mlp_keep[i], ~state.masks.mlp_keep[i]
        if gone.any() and kept.any() and removed[i] + lg.mlp_cost <= caps[i]:
            assert mlp[i][gone].max() <= mlp[i][kept].min()


def test_adaptive_ranking_masks_only_grow_and_follow_the_schedule():
    g = torch.Generator().manual_seed(1)
    state, layers = _state("adaptive", [torch.rand(4, generator=g) for _ in range(4)],
                           [torch.rand(48, generator=g) for _ in range(4)])
    target = state.allocation.removed_params(layers)
    before = [m.clone() for m in state.masks.mlp_keep]
    state.update(0.5)
    half = sum((lg.n_channels - int(m.sum())) * lg.mlp_cost + (lg.n_kv - int(a.sum())) * lg.attn_cost
               for lg, a, m in zip(layers, state.masks.attn_keep, state.masks.mlp_keep))
    assert abs(half - 0.5 * target) <= layers[0].attn_cost / 2
    mid = [m.clone() for m in state.masks.mlp_keep]
    state.observe([torch.rand(4, generator=g) for _ in range(4)], [torch.rand(48, generator=g) for _ in range(4)])
    state.update(1.0)
    for b, m, e in zip(before, mid, state.masks.mlp_keep):
        assert not (e & ~m).any() and not (m & ~b).any()  # a removed channel never comes back


@pytest.mark.slow
def test_adaptive_ranking_end_to_end_gives_a_per_layer_model_at_the_ratio():
    model = tiny_model(num_hidden_layers=3)
    out = loraprune.prune(model, random_batches(n=4), ratio=0.4, steps=4, criterion="fisher", ranking="adaptive",
                          progress=False, lora_dropout=0.0)
    assert out.config.loraprune["achieved_ratio"] == pytest.approx(0.4, abs=0.01)


def test_distillation_loss_is_the_token_mean_kl_times_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    valid = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    T = 2.0
    want, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            if valid[b, i]:
                p, q = F.softmax(t[b, i] / T, -1), F.softmax(s[b, i] / T, -1)
                want += float((p * (p.log() - q.log())).sum())
                n += 1
    assert distillation_loss(s, t, valid, T).item() == pytest.approx(want / n * T * T, rel=1e-5)


def test_dense_teacher_is_the_original_model_whatever_lora_and_masks_say():
    model = tiny_model()
    original = copy.deepcopy(model)
    pruner = loraprune.LoRAPruner(model, ratio=0.5, lora_dropout=0.0)
    for m in pruner.lora_modules():
        torch.nn.init.normal_(m.lora_B, std=0.5)
    pruner.reach_target()  # masks on
    ids = random_batches(n=1)[0]["input_ids"]
    with torch.no_grad(), pruner.dense_teacher():
        teacher = model(input_ids=ids).logits
    with torch.no_grad():
        student = model(input_ids=ids).logits
        want = original(input_ids=ids).logits
    torch.testing.assert_close(teacher, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(student, want, atol=1e-3)


def test_lr_schedules_closed_form():
    assert [lr_factor("constant", s, 4) for s in (1, 4)] == [1.0, 1.0]
    assert [lr_factor("linear", s, 4) for s in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor("cosine", 1, 4) == 1.0
    assert lr_factor("cosine", 3, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.slow
def test_grad_accum_equals_one_big_batch_for_the_lora_gradients():
    """Two micro-batches of 2 accumulate to the gradient of one batch of 4 (equal token counts)."""
    seen = {}

    def grab(step, pruner, loss):  # with ema=0 the scores are this step's, linear in the LoRA gradients
        seen[step] = pruner.state.attn_score + pruner.state.mlp_score

    b = random_batches(n=2, batch=2, seed=3)
    big = [{"input_ids": torch.cat([b[0]["input_ids"], b[1]["input_ids"]])}]
    kw = dict(ratio=0.5, steps=1, lora_dropout=0.0, progress=False, max_grad_norm=None, prune_end=1, ema=0.0)
    loraprune.prune(tiny_model(), b, grad_accum=2, batch_size=2, on_step=grab, **kw)
    acc = seen.pop(1)
    loraprune.prune(tiny_model(), big, batch_size=4, on_step=grab, **kw)
    for x, y in zip(acc, seen[1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_distillation_run_prunes_and_records_the_setting():
    out = loraprune.prune(tiny_model(), random_batches(n=3), ratio=0.5, steps=3, distill=0.5, progress=False)
    assert out.config.loraprune["settings"]["distill"] == 0.5


def test_mask_gradient_hooks_free_each_step_without_the_cyclic_gc():
    """The hook must not keep its activation (and with it the step's autograd graph) alive."""
    import gc
    import weakref

    pruner = _pruner("fisher")
    seen = []
    mod = pruner.modules[0][pruner.spec.o]
    handle = mod.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    batch = random_batches(n=1)[0]
    gc.disable()
    try:
        loss = pruner.model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        del loss
        assert seen and seen[0]() is None, "the o_proj input outlived its backward pass"
    finally:
        gc.enable()
        handle.remove()
