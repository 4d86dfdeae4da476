"""Progressive compaction (loraprune.surgery.progressive) equals masked training.

The reference is the same run with ``progressive=False``: the masked model
computes the removed groups as zeros at full width. Same seed, no LoRA
dropout (its mask is drawn over the narrower o/down input otherwise), so the
final masks must be identical and the weights equal to fp32 tolerance.
"""
import pytest
import torch

import loraprune
from loraprune import LoRAPruner
from loraprune.surgery.progressive import expand, physical_order, relative, to_original
from model_snapshot import assert_intact, fail_prune_at, snapshot
from tiny import logits, random_batches, tiny_model

RUN = dict(ratio=0.5, steps=8, lr=1e-2, lora_dropout=0.0, prune_start=1, prune_end=5, prune_every=1,
           progress=False, seed=3)


def _run(arch, progressive, losses=None, **overrides):
    model = tiny_model(arch)
    batches = random_batches(n=16, seed=1)
    on_step = None if losses is None else (lambda step, pruner, loss: losses.append(loss))
    out = loraprune.prune(model, batches, progressive=progressive, on_step=on_step, **{**RUN, **overrides})
    return out


def _same_masks(a, b):
    ma, mb = a.loraprune_masks, b.loraprune_masks
    return all(torch.equal(x, y) for x, y in zip(ma.attn_keep + ma.mlp_keep, mb.attn_keep + mb.mlp_keep))


@pytest.mark.parametrize("arch,criterion,distill", [
    ("llama", "fisher", 0.5), ("llama", "lora", 0.0), ("llama", "grad", 0.0), ("qwen2", "fisher", 0.5),
    ("qwen3", "lora", 0.5), ("llama-mha", "taylor", 0.0),
])
def test_progressive_run_equals_masked_run(arch, criterion, distill):
    losses_p, losses_m = [], []
    prog = _run(arch, True, losses_p, criterion=criterion, distill=distill)
    masked = _run(arch, False, losses_m, criterion=criterion, distill=distill)
    assert _same_masks(prog, masked)
    torch.testing.assert_close(losses_p, losses_m, rtol=1e-5, atol=1e-6)
    sp, sm = prog.state_dict(), masked.state_dict()
    assert sp.keys() == sm.keys()
    for k in sp:
        torch.testing.assert_close(sp[k], sm[k], rtol=1e-4, atol=1e-5, msg=k)
    ids = random_batches(n=1, seed=9)[0]["input_ids"]
    torch.testing.assert_close(logits(prog, ids), logits(masked, ids), rtol=1e-4, atol=1e-5)


def test_progressive_layers_compute_only_the_kept_prefix_and_the_teacher_stays_dense():
    model = tiny_model("llama")
    ids = random_batches(n=1, seed=5)[0]["input_ids"]
    dense = logits(model, ids)
    pruner = LoRAPruner(model, ratio=0.5, lora_dropout=0.0, criterion="random", ranking="layer")
    pruner.bind_optimizer(torch.optim.AdamW(pruner.lora_parameters(), lr=1e-3))
    with torch.no_grad():  # a non-zero adapter, so that a wrong row order shows up
        for p in pruner.lora_parameters():
            p.normal_(0, 0.05)
    masked_twin = LoRAPruner(tiny_model("llama"), ratio=0.5, lora_dropout=0.0, criterion="random", ranking="layer")
    for a, b in zip(masked_twin.lora_parameters(), pruner.lora_parameters()):
        a.data.copy_(b.data)
    for p in (pruner, masked_twin):
        p.state.update(1.0)
        p.apply_masks()
    s = pruner.spec
    lg, mods = pruner.layers[0], pruner.modules[0]
    kv = int(pruner.state.masks.attn_keep[0].sum())
    assert mods[s.q].live_out == kv * lg.q_per_kv * lg.head_dim and mods[s.o].live_in == mods[s.q].live_out
    assert mods[s.q].keep is None  # no gather on the hot path
    # the student equals the masked network, the teacher the original dense one
    torch.testing.assert_close(logits(pruner.model, ids), logits(masked_twin.model, ids), rtol=1e-5, atol=1e-6)
    with pruner.dense_teacher():
        torch.testing.assert_close(logits(pruner.model, ids), dense, rtol=1e-5, atol=1e-6)


def test_optimizer_state_follows_the_permutation():
    model = tiny_model("llama")
    pruner = LoRAPruner(model, ratio=0.5, lora_dropout=0.0, criterion="random", ranking="layer")
    opt = torch.optim.AdamW(pruner.lora_parameters(), lr=1e-3)
    pruner.bind_optimizer(opt)
    for p in pruner.lora_parameters():  # moments tagged with their original row/column
        st = opt.state[p]
        st["step"] = torch.tensor(1.0)
        st["exp_avg"] = torch.arange(p.numel(), dtype=torch.float32).view_as(p).clone()
        st["exp_avg_sq"] = st["exp_avg"].clone()
    before = {id(p): (p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in pruner.lora_parameters()}
    pruner.state.update(1.0)
    pruner.apply_masks()
    for m in pruner.lora_modules():
        for p, order, dim in ((m.lora_B, m.out_order, 0), (m.lora_A, m.in_order, 1)):
            if order is None:
                continue
            value, moment = before[id(p)]
            torch.testing.assert_close(p.detach(), value.index_select(dim, order))
            torch.testing.assert_close(opt.state[p]["exp_avg"], moment.index_select(dim, order))


def test_a_failed_progressive_run_puts_rows_back_in_order():
    model = tiny_model("qwen2")
    snap = snapshot(model)

    def check(pruner):
        assert any(m.out_order is not None for m in pruner.lora_modules())  # rows were permuted

    fail_prune_at(model, random_batches(n=16, seed=1), 6, check, **RUN)
    assert_intact(model, snap)


def test_progressive_resume_equals_an_uninterrupted_run(tmp_path):
    batches = random_batches(n=16, seed=1)
    whole = loraprune.prune(tiny_model("llama"), batches, **RUN)

    def stop(step, pruner, loss):
        if step == 4:
            raise KeyboardInterrupt

    ckpt = dict(checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        loraprune.prune(tiny_model("llama"), batches, on_step=stop, **RUN, **ckpt)
    resumed = loraprune.prune(tiny_model("llama"), batches, resume=True, **RUN, **ckpt)
    assert _same_masks(whole, resumed)
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_order_helpers_against_closed_forms():
    keep = torch.tensor([True, False, True, False, True])
    assert physical_order(keep).tolist() == [0, 2, 4, 1, 3]
    assert expand(torch.tensor([1, 0]), 3).tolist() == [3, 4, 5, 0, 1, 2]
    now = torch.tensor([0, 2, 4, 1, 3])
    target = physical_order(torch.tensor([True, False, False, False, True]))  # [0, 4, 1, 2, 3]
    rel = relative(now, target)
    assert now[rel].tolist() == target.tolist()
    assert relative(now, now) is None
    assert to_original(torch.tensor([5.0, 6.0]), now).tolist() == [5.0, 0.0, 6.0, 0.0, 0.0]


@pytest.mark.parametrize("criterion", ["flap", "wanda-sp"])
def test_activation_criteria_score_the_narrowed_layers(criterion):
    out = _run("llama", True, criterion=criterion, ranking="layer")
    report = out.config.loraprune
    assert abs(report["achieved_ratio"] - RUN["ratio"]) < 0.05
