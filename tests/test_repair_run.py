"""Repair inside prune() (PruneConfig(repair=True), loraprune.surgery.repair_run)."""
import pytest
import torch

import loraprune
from loraprune import LoRAPruner
from loraprune.errors import ConfigError
from model_snapshot import assert_intact, fail_prune_at, snapshot
from tiny import logits, random_batches, tiny_model

RUN = dict(ratio=0.5, steps=8, lr=1e-2, lora_dropout=0.0, prune_start=1, prune_end=5, prune_every=1,
           progress=False, seed=3, repair=True)


def test_one_cut_is_the_least_squares_fit_of_the_effective_weight():
    """At a mask update each consumer's kept columns of W + s·B·A become the lstsq fit, on the tokens of
    the step before it, of what the whole live input computed."""
    model = tiny_model("llama")
    pruner = LoRAPruner(model, ratio=0.5, lora_dropout=0.0, criterion="random", ranking="layer", repair=True,
                        repair_damp=0.0)
    with torch.no_grad():
        for p in pruner.lora_parameters():
            p.normal_(0, 0.05)
    s = pruner.spec
    mods = pruner.modules[0]
    seen = {}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(
        a[0].reshape(-1, a[0].shape[-1]).double())) for n in (s.o, s.down)]
    pruner.repairer.collect = True
    ids = random_batches(n=1, batch=8, seq=32, seed=5)[0]["input_ids"]  # 256 tokens > every input width
    with torch.no_grad():
        pruner.model(input_ids=ids)
    for h in hooks:
        h.remove()
    eff = {n: (mods[n].base.weight + mods[n].scaling * mods[n].lora_B @ mods[n].lora_A).double().detach().clone()
           for n in (s.o, s.down)}
    pruner.state.update(1.0)
    lg = pruner.layers[0]
    keep = {s.o: lg.q_index(pruner.state.masks.attn_keep[0]), s.down: lg.channel_index(pruner.state.masks.mlp_keep[0])}
    pruner.repairer.cut(pruner)
    for n in (s.o, s.down):
        x = torch.cat(seen[n])
        ref = torch.linalg.lstsq(x[:, keep[n]], x @ eff[n].T).solution.T
        got = (mods[n].base.weight + mods[n].scaling * mods[n].lora_B @ mods[n].lora_A).detach().double()[:, keep[n]]
        target = x @ eff[n].T

        def err(w):
            return float((target - x[:, keep[n]] @ w.T).pow(2).mean())

        # the statistics are float32 in a run: the fit's error equals the float64 optimum's, not its digits
        assert err(got) == pytest.approx(err(ref), rel=1e-3)
        assert err(got) < err(eff[n][:, keep[n]])  # better than the plain cut on these tokens
        assert mods[n].teacher_weight is not None
    pruner.restore()


def test_teacher_stays_dense_and_progressive_equals_masked():
    model = tiny_model("llama")
    ids = random_batches(n=1, seed=9)[0]["input_ids"]
    dense = logits(model, ids)
    checked = []

    def check(step, pruner, loss):
        if step == 4:
            assert any(m.teacher_weight is not None for m in pruner.lora_modules())  # a repair happened
            with pruner.dense_teacher():
                torch.testing.assert_close(logits(pruner.model, ids), dense, rtol=1e-5, atol=1e-5)
            checked.append(step)

    prog = loraprune.prune(model, random_batches(n=16, seed=1), on_step=check, distill=0.5, **RUN)
    assert checked == [4]
    masked = loraprune.prune(tiny_model("llama"), random_batches(n=16, seed=1), progressive=False, distill=0.5, **RUN)
    plain = loraprune.prune(tiny_model("llama"), random_batches(n=16, seed=1), distill=0.5, **{**RUN, "repair": False})
    ma, mb = prog.loraprune_masks, masked.loraprune_masks
    assert all(torch.equal(x, y) for x, y in zip(ma.attn_keep + ma.mlp_keep, mb.attn_keep + mb.mlp_keep))
    torch.testing.assert_close(logits(prog, ids), logits(masked, ids), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(logits(prog, ids), logits(plain, ids), atol=1e-3)  # the repair did something
    assert prog.config.loraprune["settings"]["repair"] is True


def test_a_failed_run_with_repair_puts_the_original_weights_back():
    model = tiny_model("llama")
    snap = snapshot(model)

    def check(pruner):
        assert any(m.teacher_weight is not None for m in pruner.lora_modules())

    fail_prune_at(model, random_batches(n=16, seed=1), 4, check, **RUN)
    assert_intact(model, snap)


def test_repair_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        loraprune.PruneConfig(repair=True, checkpoint_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="repair_damp"):
        loraprune.PruneConfig(repair_damp=-1)
    with pytest.raises(ConfigError, match="repair"):
        loraprune.PruneConfig(repair="yes")
