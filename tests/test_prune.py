"""loraprune.prune end to end on tiny random models."""
import pytest
import torch

import loraprune
from loraprune.errors import DataError, NonFiniteLossError
from loraprune.model.lora import LoRALinear
from loraprune.run.checkpoint import CheckpointError
from loraprune.structure.archs import UnsupportedArchitectureError
from loraprune.structure.groups import layer_projection_params
from tiny import random_batches, tiny_model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_end_to_end_smaller_model_and_report():
    model = tiny_model(hidden_size=64, intermediate_size=160, num_attention_heads=8, num_key_value_heads=4)
    before = sum(layer_projection_params(model))
    x = random_batches(n=1)[0]["input_ids"]
    pruned = loraprune.prune(model, random_batches(n=6, seq=16), ratio=0.5, steps=12, ranking="layer", progress=False)
    after = sum(layer_projection_params(pruned))
    rep = pruned.config.loraprune
    assert abs(1 - after / before - 0.5) <= 0.01
    assert rep["achieved_ratio"] == pytest.approx(1 - after / before)
    assert rep["removed_params"] == before - after and rep["steps"] == 12
    assert rep["uniform"] and pruned.config.num_key_value_heads == 2
    assert all(not isinstance(m, LoRALinear) for m in pruned.modules())
    with torch.no_grad():
        assert torch.isfinite(pruned(x).logits).all()
    out = pruned.generate(x[:1, :3], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.slow
def test_deterministic_under_seed():
    runs = []
    for _ in range(2):
        model = tiny_model(seed=1)
        pruned = loraprune.prune(model, random_batches(n=4), ratio=0.4, steps=8, seed=5, progress=False)
        runs.append(_state(pruned))
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


@pytest.mark.slow
def test_different_seed_changes_result():
    a = loraprune.prune(tiny_model(seed=1), random_batches(n=4), ratio=0.4, steps=8, seed=1, progress=False)
    b = loraprune.prune(tiny_model(seed=1), random_batches(n=4), ratio=0.4, steps=8, seed=2, progress=False)
    sa, sb = _state(a), _state(b)
    assert any(sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["grad", "magnitude", "random"])
def test_other_criteria_run(criterion):
    """Each criterion drives a whole run whose cut matches its own masks: with merge=False the
    base weights of the result are the original rows/columns at the kept indices, exactly."""
    model = tiny_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = loraprune.prune(model, random_batches(n=3), ratio=0.3, steps=6, criterion=criterion, merge=False,
                             progress=False)
    masks = pruned.loraprune_masks
    assert abs(pruned.config.loraprune["achieved_ratio"] - 0.3) <= 0.01
    assert sum(masks.kept_channels()) < sum(m.numel() for m in masks.mlp_keep)  # something was cut
    for i, layer in enumerate(pruned.model.layers):
        ch = torch.nonzero(masks.mlp_keep[i]).flatten()
        pre = f"model.layers.{i}.mlp."
        assert torch.equal(layer.mlp.gate_proj.base.weight, original[pre + "gate_proj.weight"][ch])
        assert torch.equal(layer.mlp.up_proj.base.weight, original[pre + "up_proj.weight"][ch])
        assert torch.equal(layer.mlp.down_proj.base.weight, original[pre + "down_proj.weight"][:, ch])


@pytest.mark.slow
def test_global_ranking_and_skip_layers_give_per_layer_model(tmp_path):
    model = tiny_model(num_hidden_layers=3, intermediate_size=64)
    pruned = loraprune.prune(model, random_batches(n=3), ratio=0.3, steps=6, skip_layers=[0], progress=False)
    widths = pruned.config.loraprune["layers"]
    assert widths[0]["intermediate_size"] == 64 and not pruned.config.loraprune["uniform"]
    loraprune.save_pruned(pruned, tmp_path / "m")
    again = loraprune.load_pruned(tmp_path / "m")
    x = random_batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        assert (again(x).logits - pruned(x).logits).abs().max() <= 1e-5
    model = tiny_model(num_hidden_layers=3, intermediate_size=64)
    pruned = loraprune.prune(model, random_batches(n=3), ratio=0.3, steps=6, ranking="global", progress=False)
    assert abs(pruned.config.loraprune["achieved_ratio"] - 0.3) <= 0.01


@pytest.mark.skipif(not loraprune.kernels.triton_interpreting(),
                    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest where no GPU exists)")
@pytest.mark.slow
def test_triton_kernels_drive_the_same_run():
    """One code path above the kernels: the interpreted Triton kernels give the same pruning."""
    from loraprune.kernels import use_backend

    res = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            model = tiny_model(seed=2)
            res[backend] = loraprune.prune(model, random_batches(n=3, seq=8), ratio=0.5, steps=4,
                                           lora_dropout=0.0, progress=False)
    assert res["torch"].config.loraprune["layers"] == res["triton"].config.loraprune["layers"]
    st, sr = _state(res["torch"]), _state(res["triton"])
    for k in st:
        torch.testing.assert_close(st[k], sr[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_text_data_with_tokenizer():
    import pathlib
    import tempfile

    from loraprune.apps.toy_shakespeare import train_tokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 200
    with tempfile.TemporaryDirectory() as d:
        f = pathlib.Path(d) / "a.txt"
        f.write_text(text)
        tok = train_tokenizer([f], vocab_size=120)
        model = tiny_model(vocab_size=len(tok))
        pruned = loraprune.prune(model, [text], tokenizer=tok, ratio=0.5, steps=4, seq_len=16, progress=False)
        assert pruned.config.loraprune["steps"] == 4
        pruned = loraprune.prune(tiny_model(vocab_size=len(tok)), d, tokenizer=tok, ratio=0.5, steps=2,
                                 seq_len=16, progress=False)
        assert pruned.config.loraprune["steps"] == 2


def test_peft_model_is_accepted_and_its_adapter_continued():
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = random_batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        want = peft_model(x).logits
    pruner = loraprune.LoRAPruner(peft_model, ratio=0.5, lora_dropout=0.0)
    assert pruner.modules[0]["q_proj"].r == 4  # the existing adapter, not a fresh one
    with torch.no_grad():
        got = pruner.model(x).logits
    assert (got - want).abs().max() <= 1e-5


# ---- bad input -----------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, 1, -0.5, 1.2])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio must be"):
        loraprune.prune(tiny_model(), random_batches(n=1), ratio=ratio, steps=1, progress=False)


def test_empty_data():
    with pytest.raises(DataError, match="empty"):
        loraprune.prune(tiny_model(), [], ratio=0.5, steps=1, progress=False)
    with pytest.raises(DataError, match="no batches"):
        loraprune.prune(tiny_model(), iter([]), ratio=0.5, steps=1, progress=False)


def test_text_without_tokenizer():
    with pytest.raises(DataError, match="tokenizer"):
        loraprune.prune(tiny_model(), ["some text"], ratio=0.5, steps=1, progress=False)


def test_sequence_longer_than_context():
    batches = [{"input_ids": torch.zeros(1, 65, dtype=torch.long)}]
    with pytest.raises(DataError, match="max_position_embeddings=64"):
        loraprune.prune(tiny_model(), batches, ratio=0.5, steps=1, progress=False)


def test_nan_loss_stops_with_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
            loraprune.prune(model, random_batches(n=2), ratio=0.5, steps=10, max_bad_steps=3, progress=False)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="Supported: llama"):
        loraprune.prune(model, random_batches(n=1, vocab=50), ratio=0.5, steps=1, progress=False)


@pytest.mark.slow
def test_on_step_hook_sees_every_step_and_the_schedule():
    seen = []
    loraprune.prune(tiny_model(), random_batches(n=2), ratio=0.5, steps=6, prune_end=4, prune_every=2,
                    progress=False, on_step=lambda step, pruner, loss: seen.append(
                        (step, pruner.removed_params() / pruner.total_params, loss)))
    assert [s for s, _, _ in seen] == list(range(1, 7))
    fractions = [f for _, f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0  # cubic: nothing before the first update
    assert fractions[3] == pytest.approx(0.5, abs=0.01) and fractions[-1] == fractions[3]  # target at prune_end
    assert all(loss is not None and loss > 0 for _, _, loss in seen)


@pytest.mark.slow
def test_global_ranking_honours_skip_layers():
    model = tiny_model(num_hidden_layers=4, intermediate_size=48)
    pruned = loraprune.prune(model, random_batches(n=3), ratio=0.3, steps=6, ranking="global",
                             skip_layers=[0, 3], progress=False)
    widths = pruned.config.loraprune["layers"]
    assert widths[0]["intermediate_size"] == widths[3]["intermediate_size"] == 48
    assert widths[0]["num_key_value_heads"] == widths[3]["num_key_value_heads"] == 2
    assert abs(pruned.config.loraprune["achieved_ratio"] - 0.3) <= 0.01


def test_peft_lora_outside_the_projections_and_lora_bias_are_refused():
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head.*merge_and_unload"):
        loraprune.LoRAPruner(pm, ratio=0.5)
    pm = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match="lora_bias"):
        loraprune.LoRAPruner(pm, ratio=0.5)


def test_checkpoint_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        loraprune.prune(tiny_model(), random_batches(n=2), ratio=0.5, steps=2, resume=True, progress=False)
    loraprune.prune(tiny_model(), random_batches(n=2), ratio=0.5, steps=4, checkpoint_dir=tmp_path, progress=False)
    assert list((tmp_path / "checkpoints").glob("step-*"))  # checkpoint_every defaults to a tenth of steps
    with pytest.raises(CheckpointError, match="resume=True"):
        loraprune.prune(tiny_model(), random_batches(n=2), ratio=0.5, steps=4, checkpoint_dir=tmp_path,
                        progress=False)


def test_grad_criterion_skipped_step_leaves_no_weight_gradient():
    model = tiny_model()
    pruner = loraprune.LoRAPruner(model, ratio=0.5, criterion="grad")
    batch = random_batches(n=1)[0]
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert pruner.modules[0]["q_proj"].weight.grad is not None
    pruner.discard_grads()
    assert all(m.weight.grad is None and m.lora_A.grad is None for mods in pruner.modules for m in mods.values())


@pytest.mark.slow
def test_user_batches_are_normalised():
    import numpy as np

    batches = [
        {"input_ids": torch.randint(0, 97, (2, 8), dtype=torch.int32)},
        {"input_ids": np.random.randint(0, 97, (2, 8)), "attention_mask": np.ones((2, 8), dtype=np.int64)},
        {"input_ids": list(range(8)), "attention_mask": [1] * 8},
    ]
    pruned = loraprune.prune(tiny_model(), batches, ratio=0.5, steps=3, progress=False)
    assert pruned.config.loraprune["steps"] == 3
    with pytest.raises(DataError, match="attention_mask has shape"):
        loraprune.prune(tiny_model(), [{"input_ids": torch.zeros(2, 8, dtype=torch.long),
                                        "attention_mask": torch.ones(2, 7)}], ratio=0.5, steps=1, progress=False)


@pytest.mark.slow
def test_tokenized_dataset_is_accepted():
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": torch.randint(0, 97, (6, 12)).tolist()})
    pruned = loraprune.prune(tiny_model(), ds, ratio=0.5, steps=3, batch_size=2, progress=False)
    assert pruned.config.loraprune["steps"] == 3
