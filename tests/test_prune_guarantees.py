"""What prune() promises beyond the result: a failed call leaves the model exactly as it
was; the pruned model owns its config; an already pruned model prunes again, counted
against what it was given; the callback saves the masks it cut."""
import warnings

import pytest
import torch

import loraprune
from loraprune.errors import DataError, NonFiniteLossError
from model_snapshot import assert_intact, snapshot
from tiny import random_batches, tiny_config, tiny_model

pytestmark = pytest.mark.slow  # trains, spawns subprocesses or compiles


def _failing_data():
    yield from random_batches(n=2)
    raise OSError("disk went away")


def _nan_data():
    for b in random_batches(n=6):
        yield {**b, "labels": b["input_ids"]}


@pytest.mark.parametrize("case", ["empty", "bad-option", "data-fails-mid-run", "no-signal", "non-finite"])
def test_a_failed_prune_leaves_the_model_as_it_was(case):
    model = tiny_model()
    snap = snapshot(model)
    kw = dict(ratio=0.5, steps=4, progress=False)
    if case == "empty":
        call, exc = (lambda: loraprune.prune(model, [], **kw)), DataError
    elif case == "bad-option":
        call, exc = (lambda: loraprune.prune(model, random_batches(n=2), **kw, round_to=10_000)), ValueError
    elif case == "data-fails-mid-run":
        call, exc = (lambda: loraprune.prune(model, _failing_data(), **kw)), OSError
    elif case == "no-signal":
        b = random_batches(n=1)[0]
        data = [b, {"input_ids": b["input_ids"], "labels": torch.full_like(b["input_ids"], -100)}]
        call, exc = (lambda: loraprune.prune(model, data, **kw)), DataError
    else:  # NaN loss every step: a NaN weight in the final norm
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        snap = snapshot(model)
        call, exc = (lambda: loraprune.prune(model, random_batches(n=6), **kw, max_bad_steps=2)), NonFiniteLossError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped steps warn
        with pytest.raises(exc):
            call()
    assert_intact(model, snap)
    # and the model still works as a plain model
    model(**random_batches(n=1)[0])


def test_the_pruned_model_gets_its_own_config():
    import transformers

    cfg = tiny_config()
    before = cfg.to_dict()
    model = transformers.LlamaForCausalLM(cfg)
    out = loraprune.prune(model, random_batches(n=2), ratio=0.5, steps=2, ranking="layer", progress=False)
    assert cfg.to_dict() == before and not hasattr(cfg, "loraprune")
    assert out.config.intermediate_size < before["intermediate_size"]


def test_pruning_an_already_pruned_model_counts_against_the_model_given():
    kw = dict(ratio=0.5, steps=2, ranking="layer", progress=False)  # uniform: the stock config fields shrink
    once = loraprune.prune(tiny_model(), random_batches(n=2), **kw)
    widths = (once.config.num_key_value_heads, once.config.intermediate_size)
    twice = loraprune.prune(once, random_batches(n=2), **kw)
    rep = twice.config.loraprune
    assert rep["achieved_ratio"] == pytest.approx(0.5, abs=0.01)
    assert twice.config.intermediate_size < widths[1]


def test_callback_finalize_saves_the_masks_it_cut_when_training_stops_early():
    from loraprune.method.schedule import CubicSchedule
    from loraprune.run.callback import LoRAPruneCallback

    pruner = loraprune.LoRAPruner(tiny_model(), ratio=0.5, schedule=CubicSchedule(0, 10, 1), lora_dropout=0.0,
                                  ranking="layer")
    callback = LoRAPruneCallback(pruner)
    model = callback.finalize()  # stopped at step 0: nothing masked yet, finalize jumps to the target
    masks = model.loraprune_masks
    assert masks.kept_kv() == [model.config.num_key_value_heads] * len(masks.kept_kv())
    assert masks.kept_channels() == [model.config.intermediate_size] * len(masks.kept_channels())


def test_a_compiled_model_is_pruned_through_the_module_it_wraps(tmp_path):
    """prune(torch.compile(model)) prunes the wrapped module and returns it, the same result as pruning
    the plain model (per-layer widths: the export class is the wrapped module's); a failed call on a
    compiled model leaves the module as it was."""
    kw = dict(ratio=0.5, steps=4, progress=False)
    plain = loraprune.prune(tiny_model(), random_batches(n=2), **kw)
    model = tiny_model()
    pruned = loraprune.prune(torch.compile(model), random_batches(n=2), **kw)
    assert pruned is model and not pruned.config.loraprune["uniform"]
    assert type(pruned) is type(plain)
    want, got = plain.state_dict(), pruned.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    out = loraprune.save_pruned(torch.compile(pruned), tmp_path / "c")  # saved as the module it wraps
    x = random_batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loraprune.load_pruned(out)(x).logits, plain(x).logits, rtol=0, atol=0)

    model = tiny_model()
    snap = snapshot(model)
    with pytest.raises(OSError, match="disk went away"):
        loraprune.prune(torch.compile(model), _failing_data(), **kw)
    assert_intact(model, snap)


def test_a_failure_after_training_before_the_cut_leaves_the_model_as_it_was(monkeypatch):
    """Everything after the first change to the model is inside the restore guarantee: a failure in
    the final step (here: reaching the target masks) puts the model back."""
    model = tiny_model()
    snap = snapshot(model)

    def broken(self):
        raise RuntimeError("failed at the end")
    monkeypatch.setattr(loraprune.LoRAPruner, "reach_target", broken)
    with pytest.raises(RuntimeError, match="failed at the end"):
        loraprune.prune(model, random_batches(n=2), ratio=0.5, steps=3, progress=False)
    assert_intact(model, snap)
