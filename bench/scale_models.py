"""LLaMA-family models at published shapes, random-initialised, and their arithmetic.

Timing and memory do not depend on the weights' values, only on their shapes
and dtype, so the scale benchmarks (``bench/scale.py``, ``bench/step_cost.py
--shape``, ``bench/gpu_check.py``) build models at the published shapes with
random weights instead of downloading them. :func:`build_model` builds on the
meta device and materialises straight into the measured dtype and device (no
fp32 copy on the way: an 8B-layer model in bf16 on a GPU never exists in fp32).

Also here, one home each:

* :func:`weight_sharing_twin`: a second module tree over the *same* weight
  tensors, for the PEFT baseline step (no second copy of the weights);
* :func:`step_flops`: the FLOPs of a LoRA training step with checkpointing,
  PEFT's and the pruning step's (teacher forward included), from which the
  FLOP ideal of their ratio follows;
* :func:`memory_formula`: ``docs/memory.md``'s per-GPU memory model, as a
  function of shape, tokens and dtype (``tests/test_scale_models.py`` checks it
  against the hand figures of that page).
"""
from __future__ import annotations

import copy
import itertools

import torch

#: Published shapes (Hugging Face configs). ``layers`` is the whole model's depth.
SHAPES = {
    "llama-3.2-1b": dict(hidden=2048, mlp=8192, heads=32, kv_heads=8, head_dim=64, layers=16, vocab=128256,
                         tied=True),
    "llama-3-8b": dict(hidden=4096, mlp=14336, heads=32, kv_heads=8, head_dim=128, layers=32, vocab=128256,
                       tied=False),
    "llama-3-70b": dict(hidden=8192, mlp=28672, heads=64, kv_heads=8, head_dim=128, layers=80, vocab=128256,
                        tied=False),
    "llama-2-7b": dict(hidden=4096, mlp=11008, heads=32, kv_heads=32, head_dim=128, layers=32, vocab=32000,
                       tied=False),
    "llama-2-13b": dict(hidden=5120, mlp=13824, heads=40, kv_heads=40, head_dim=128, layers=40, vocab=32000,
                        tied=False),
    "llama-2-70b": dict(hidden=8192, mlp=28672, heads=64, kv_heads=8, head_dim=128, layers=80, vocab=32000,
                        tied=False),
    # the --smoke shape: every code path, seconds on CPU (MLP a multiple of 32 and >= 512 would turn on
    # blocks of 32; this one keeps round_to=1, as the tiny test models do)
    "tiny": dict(hidden=64, mlp=192, heads=4, kv_heads=2, head_dim=16, layers=2, vocab=512, tied=False),
}

GIB = 2**30


def shape(name: str, layers: int | None = None) -> dict:
    """The named shape (a copy), with ``layers`` decoder layers if given."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    s = dict(SHAPES[name], name=name)
    if layers is not None:
        s["layers"] = int(layers)
    return s


def llama_config(s: dict, max_positions: int = 2048):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
        max_position_embeddings=max_positions, tie_word_embeddings=s["tied"], rms_norm_eps=1e-5,
        rope_theta=500000.0 if s["vocab"] > 100000 else 10000.0, use_cache=False)


@torch.no_grad()
def build_model(s: dict, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0, max_positions: int = 2048):
    """A ``LlamaForCausalLM`` of shape ``s``, random weights (N(0, 0.02); norms 1), built on the
    meta device and allocated once, directly in ``dtype`` on ``device``.

    RoPE is the plain kind (Llama-3's frequency rescaling changes values, not cost); the rotary
    buffers are recomputed after materialisation (``to_empty`` leaves them uninitialised)."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(s, max_positions)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    rot = model.model.rotary_emb
    fresh = type(rot)(cfg)  # tiny: a few hundred floats
    for key, buf in fresh.named_buffers():
        setattr(rot, key, buf.to(device))
    if s["tied"]:
        model.tie_weights()
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.lm_head.weight = model.model.embed_tokens.weight
    model.config.dtype = dtype
    return model


def weight_sharing_twin(model):
    """A deep copy of ``model`` whose parameters and buffers are the very same tensors (no copy).

    Used for the PEFT baseline step: PEFT wraps the twin's modules, ``prune`` the original's, and
    the frozen weights exist once. Progressive compaction permutes weights in place, which the
    twin then sees permuted: same shapes, same cost."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def random_batches(vocab: int, n: int, batch: int, seq: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen)} for _ in range(n)]


# ---------------------------------------------------------------------------------------------- FLOPs
def projection_macs(s: dict) -> int:
    """Multiply-adds per token of one layer's seven projections (dense)."""
    h, q, kv, i = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["mlp"]
    return h * q + 2 * h * kv + q * h + 3 * h * i


def lora_macs(s: dict, r: int = 8) -> int:
    """Multiply-adds per token of one layer's seven LoRA branches (r * (in + out) each)."""
    h, q, kv, i = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["mlp"]
    return r * ((h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i))


def step_flops(s: dict, batch: int, seq: int, r: int = 8, kept_macs: float | None = None,
               kept_q_width: float | None = None, teacher: bool = True, student: bool = True) -> float:
    """FLOPs of one LoRA training step with per-layer gradient checkpointing (forward, the layer's
    recomputed forward in backward, backward), frozen weights: backward forms dx only (no dW, no
    gradient of the embedding or head). ``teacher``: adds one dense forward (the distillation
    teacher of the pruning step). ``kept_macs``/``kept_q_width``: the student's projection
    multiply-adds per token summed over layers, and its summed query width, after a cut
    (default dense). PEFT's step is ``teacher=False``; the pruning step ``teacher=True``.

    Per token: projections fwd + recompute + dx = 3 P; LoRA fwd + recompute + (dA, dB, dx) = 4 R;
    attention products (QK^T, AV; causal) fwd + recompute + backward (twice the forward) = 4 A;
    head fwd + dx = 2 H. Norms, activations, softmax, RoPE, the loss: memory-bound, left out.
    """
    L = s["layers"]
    P = projection_macs(s) * L if kept_macs is None else kept_macs
    R = lora_macs(s, r) * L
    qw = s["heads"] * s["head_dim"] * L if kept_q_width is None else kept_q_width
    pairs = (seq + 1) / 2  # mean keys per query, causal
    A = 2 * qw * pairs  # QK^T and AV, multiply-adds per token summed over layers
    H = s["vocab"] * s["hidden"]
    tokens = batch * seq
    total = 0.0
    if student:
        total += 3 * P + 4 * R + 4 * A + 2 * H
    if teacher:
        P_d = projection_macs(s) * L
        A_d = 2 * s["heads"] * s["head_dim"] * L * pairs
        total += P_d + A_d + H
    return 2.0 * tokens * total


def step_flops_2x_convention(s: dict, batch: int, seq: int, kept_fraction: float = 1.0) -> tuple[float, float]:
    """(pruning, PEFT) step FLOPs under the common "backward = 2 x forward" rule (weight gradients
    counted although the weights are frozen): the convention of the issue's "ideal 1.27x / 0.92x"."""
    P = projection_macs(s) * s["layers"]
    H = s["vocab"] * s["hidden"]
    peft = 4 * P + 3 * H  # fwd + recompute + 2x bwd on layers; fwd + 2x bwd on the head
    prune = 4 * kept_fraction * P + 3 * H + P + H
    return 2.0 * batch * seq * prune, 2.0 * batch * seq * peft


# ---------------------------------------------------------------------------------------------- memory
def layer_params(s: dict) -> int:
    return projection_macs(s) + 2 * s["hidden"]


def model_params(s: dict) -> int:
    """L (projections + two norms) + embedding + head (once if tied) + final norm."""
    emb = s["vocab"] * s["hidden"]
    return s["layers"] * layer_params(s) + emb * (1 if s["tied"] else 2) + s["hidden"]


def memory_formula(s: dict, tokens: int, dtype_bytes: int = 2, r: int = 8, ratio: float = 0.5,
                   checkpointing: bool = True, gpus: int = 1, loss_chunk: int = 64,
                   saved_dropout_masks: bool = False, parked: bool = False) -> dict:
    """``docs/memory.md``'s memory model, in bytes, for shape ``s``, ``tokens`` tokens per step and
    weights of ``dtype_bytes`` bytes (2: bf16, as the page; 4: fp32). Terms:

    * ``base``: the weights, e·P (divided by ``gpus``: FSDP2/ZeRO-3);
    * ``lora_adam``: 16 bytes per LoRA parameter (fp32 factor, gradient, two AdamW moments);
    * ``activations``: with checkpointing the layer inputs e·h·T·L plus one layer's saved
      activations a·T; without, a·T·L. a = 4h (first RMSNorm input, fp32) + e·h (q/k/v input)
      + e·(q + 2·kv·d) (q/k/v after RoPE) + e·q (attention output) + e·q (o_proj input; the page
      writes h for q, equal in every LLaMA) + 4h (second RMSNorm) + e·h (gate/up input)
      + 3e·I (gate, silu(gate), up) + e·I (down_proj input) + 7·4r (the LoRA kernels' fp32 x·Aᵀ);
      ``saved_dropout_masks`` (the CPU twin with dropout > 0; the Triton kernels recompute theirs):
      + 5h + q + I, one bool per input element of q, k, v (three masks of h), o (q), gate, up, down (I);
    * ``logits``: one loss chunk's buffers, 12·c·V (the student's fp32 logits, the teacher's
      log-probabilities and their exponential; measured 12.1–12.3·c·V in bf16 and fp32 at
      V = 128256, the page said 20), plus the teacher's final hidden states and the hidden-state
      gradient, 2·e·h·T;
    * ``fisher``: the criterion's transient h·∂L/∂h in fp32, ≈ 12·T·I (not in the page's totals);
    * ``gathered``: with ``gpus`` > 1, two gathered layers, 2·e·(layer parameters);
    * ``compaction``: (1 − ratio) × the projection bytes, held at the final cut (after training);
      with ``parked`` (an accelerator: compaction parks each replaced original in host memory,
      issue 26) one layer's share of it, the originals waiting on the host.

    What a run adds above the loaded model during the training steps, ``training_extra``: the terms
    do not all live at once. The loss's chunk buffers live while the head runs, after the decoder
    forward; a layer's recomputed activations and the ``fisher`` transient live during backward, after
    them. So: lora_adam + gathered + the checkpointed layer inputs + max(logits, a·T + fisher) with
    checkpointing (all layers' activations + max(logits, fisher) without). Measured at Llama-3.2-1B
    and Llama-3-8B-layer shapes within 0.94–1.06 (bench/scale.py); the page's first version summed
    every term (``training_extra_sum``), 1.6–2.2x the measured peak at 256 tokens.
    ``compaction_phase``: the final cut holds (1 − ratio) x the projections while LoRA and AdamW's
    state are still live. ``training``/``peak``: with the base weights.
    """
    e, h, L, I, V = dtype_bytes, s["hidden"], s["layers"], s["mlp"], s["vocab"]
    q, kvd = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    base = e * model_params(s) / gpus
    lora = lora_macs(s, r) * L
    lora_adam = 16 * lora / gpus
    a = 4 * h + e * h + e * (q + 2 * kvd) + e * q + e * q + 4 * h + e * h + 3 * e * I + e * I + 7 * 4 * r
    if saved_dropout_masks:
        a += 5 * h + q + I
    acts = (e * h * tokens * L + a * tokens) if checkpointing else a * tokens * L
    logits = 12 * loss_chunk * V + 2 * e * h * tokens
    fisher = 12 * tokens * I
    gathered = 2 * e * layer_params(s) if gpus > 1 else 0
    proj_bytes = e * projection_macs(s) * L
    compaction = (1 - ratio) * proj_bytes / (L if parked else 1)
    if checkpointing:
        inputs, layer_acts = e * h * tokens * L, a * tokens
        training_extra = lora_adam + gathered + inputs + max(logits, layer_acts + fisher)
    else:
        training_extra = lora_adam + gathered + acts + max(logits, fisher)
    training_extra_sum = lora_adam + acts + logits + gathered + fisher
    compaction_phase = compaction + lora_adam
    return {"base": base, "lora_params": lora, "lora_adam": lora_adam, "activation_bytes_per_token_layer": a,
            "activations": acts, "logits": logits, "fisher": fisher, "gathered": gathered,
            "projection_bytes": proj_bytes, "compaction": compaction, "compaction_phase": compaction_phase,
            "training_extra": training_extra, "training_extra_sum": training_extra_sum,
            "training": base + training_extra,
            # one device only: how the final cut behaves under sharding is not modelled (not measured)
            "peak": base + max(training_extra, compaction_phase) if gpus == 1 else None}
