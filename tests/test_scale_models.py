"""bench/scale_models.py: the memory formula against docs/memory.md's hand figures, the FLOP model
against counted shapes, and the meta-device build against a model transformers builds itself."""
import pytest
import torch

from bench import scale_models as sm

GIB = 2**30


@pytest.mark.parametrize("name,params_b", [("llama-2-7b", 6.74), ("llama-3-8b", 8.03), ("llama-2-13b", 13.02),
                                           ("llama-2-70b", 68.98)])
def test_parameter_counts_are_the_published_ones(name, params_b):
    assert sm.model_params(sm.shape(name)) / 1e9 == pytest.approx(params_b, abs=0.006)


# docs/memory.md, "Per GPU, fisher criterion" (bf16, T = 2048), as corrected on 2026-12-07 after the
# measurements of bench/scale.py: base, LoRA + Adam, activations without / with checkpointing,
# total without / with checkpointing, and (one GPU) the peak including the final compaction at 50 %
HAND = {
    "llama-2-7b": [(1, 12.6, 0.30, 10.9, 0.84, 24.0, 13.9, 18.9), (8, 1.6, 0.04, 10.9, 0.84, 13.5, 3.5, None)],
    "llama-3-8b": [(1, 15.0, 0.31, 11.8, 0.87, 27.4, 16.5, 21.8), (8, 1.9, 0.04, 11.8, 0.87, 14.8, 3.9, None)],
    "llama-2-13b": [(1, 24.2, 0.47, 17.0, 1.21, 42.1, 26.2, 36.5), (8, 3.0, 0.06, 17.0, 1.21, 21.6, 5.8, None)],
    "llama-2-70b": [(1, 128.5, 1.54, 58.2, 3.23, 188.8, 133.9, 193.8),
                    (8, 16.1, 0.19, 58.2, 3.23, 78.3, 23.3, None)],
}


@pytest.mark.parametrize("name", list(HAND))
def test_memory_formula_reproduces_the_hand_figures(name):
    s = sm.shape(name)
    for gpus, base, lora, plain, ckpt, tot_plain, tot_ckpt, peak in HAND[name]:
        f = sm.memory_formula(s, 2048, dtype_bytes=2, gpus=gpus, checkpointing=True)
        g = sm.memory_formula(s, 2048, dtype_bytes=2, gpus=gpus, checkpointing=False)
        assert f["base"] / GIB == pytest.approx(base, abs=0.051)
        assert f["lora_adam"] / GIB == pytest.approx(lora, abs=0.006)
        assert g["activations"] / GIB == pytest.approx(plain, abs=0.051)
        assert f["activations"] / GIB == pytest.approx(ckpt, abs=0.006)
        assert g["training"] / GIB == pytest.approx(tot_plain, abs=0.051)
        assert f["training"] / GIB == pytest.approx(tot_ckpt, abs=0.051)
        assert (f["peak"] is None) if peak is None else f["peak"] / GIB == pytest.approx(peak, abs=0.051)


def test_the_terms_that_do_not_live_together_are_not_summed():
    """Checkpointed: the loss chunk lives after the decoder forward, one layer's activations and the
    fisher transient during backward: the peak takes the larger, not the sum."""
    s = sm.shape("llama-3-8b", 2)
    f = sm.memory_formula(s, 256)
    inputs = 2 * s["hidden"] * 256 * s["layers"]
    assert f["training_extra"] == f["lora_adam"] + inputs + max(
        f["logits"], f["activation_bytes_per_token_layer"] * 256 + f["fisher"])
    assert f["training_extra_sum"] > f["training_extra"]


def test_memory_formula_per_token_and_compaction_terms():
    s7 = sm.shape("llama-2-7b")
    f = sm.memory_formula(s7, 2048)
    assert f["activation_bytes_per_token_layer"] == 178_400  # the page's a for 7B
    assert sm.memory_formula(sm.shape("llama-2-13b"), 2048)["activation_bytes_per_token_layer"] == 223_456
    assert sm.memory_formula(sm.shape("llama-2-70b"), 2048)["activation_bytes_per_token_layer"] == 381_152
    assert f["lora_params"] == 624_640 * 32
    assert f["compaction"] / GIB == pytest.approx(6.05, abs=0.03)  # 50 % (the page halves its rounded 12.1)
    assert sm.memory_formula(s7, 2048, ratio=0.2)["compaction"] / GIB == pytest.approx(9.7, abs=0.05)
    assert f["fisher"] / GIB == pytest.approx(0.25, abs=0.01)
    assert f["logits"] == 12 * 64 * 32000 + 2 * 2 * 4096 * 2048  # 12·c·V (measured) + 2·e·h·T
    # fp32 weights: the e-byte terms double, the fp32 ones (norm inputs, x·Aᵀ) do not
    h, kvd, i, r = 4096, 4096, 11008, 8
    a32 = sm.memory_formula(s7, 2048, dtype_bytes=4)["activation_bytes_per_token_layer"]
    assert a32 == 8 * h + 4 * (5 * h + 2 * kvd) + 4 * 4 * i + 28 * r


def test_step_flops_counts_the_forward_of_a_real_model():
    """The forward part of step_flops equals bench.speed.forward_flops on the built model."""
    from bench.speed import forward_flops

    s = sm.shape("tiny")
    model = sm.build_model(s)
    teacher_only = sm.step_flops(s, 2, 16, student=False)  # one dense forward
    assert teacher_only == pytest.approx(forward_flops(model, 2, 16), rel=1e-9)


def test_build_model_matches_transformers_layout_and_dtype():
    from transformers import LlamaForCausalLM

    s = sm.shape("tiny")
    ref = LlamaForCausalLM(sm.llama_config(s))
    for dtype in (torch.float32, torch.bfloat16):
        m = sm.build_model(s, dtype)
        assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert all(p.dtype == dtype and p.device.type == "cpu" and torch.isfinite(p.float()).all()
                   for p in m.parameters())
        torch.testing.assert_close(m.model.rotary_emb.inv_freq.float(), ref.model.rotary_emb.inv_freq)
    tied = sm.build_model(dict(s, tied=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    twin = sm.weight_sharing_twin(tied)
    assert all(a is b for a, b in zip(twin.parameters(), tied.parameters()))
    assert twin is not tied and twin.model.layers[0] is not tied.model.layers[0]
