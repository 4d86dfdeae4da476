"""Speed: the compacted model against dense, and one pruning step ``lora`` against ``grad``.

All timings of one figure are taken in one process, interleaved round-robin
(dense, 20 %, 50 %, dense, ...) so that load from other processes hits every
model alike; the reported speed-up is the median of the per-round ratios.
Next to it stands the *ideal* speed-up: the ratio of forward FLOPs (every
``nn.Linear`` including the LM head, plus the attention score and value
products), i.e. what a perfect kernel would gain from the smaller shapes.

Which groups are cut does not change speed, only the widths do; and the
widths come from the parameter-exact allocation, identical for every
criterion. So the compacted models here are cut with ``criterion="random"``
(no training needed) and have exactly the shapes of the quality table's.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn


def full_settings(**over) -> dict:
    s = dict(ratios=[0.2, 0.5], prefill_batch=8, prefill_seq=None, decode_prompt=8, decode_tokens=64, rounds=7,
             step_rounds=7, step_batch=4, step_seq=128, layer_step_rounds=3, threads=None)
    s.update({k: v for k, v in over.items() if v is not None})
    return s


def smoke_settings(**over) -> dict:
    s = full_settings(prefill_batch=2, prefill_seq=32, decode_tokens=4, rounds=2, step_rounds=2, step_batch=2,
                      step_seq=16, layer_step_rounds=1)
    s.update({k: v for k, v in over.items() if v is not None})
    return s


# ---------------------------------------------------------------- FLOPs
def _attention_widths(model) -> list[int]:
    """Query width (heads x head_dim) of each decoder layer."""
    return [layer.self_attn.q_proj.out_features for layer in model.model.layers]


def forward_flops(model, batch: int, seq: int, past: int = 0) -> float:
    """Multiply-adds x 2 of one forward over ``batch x seq`` new tokens after ``past`` cached ones.

    Linear layers: 2·in·out per token (LM head included: logits for every
    position, as the forward computes them). Attention: QKᵀ and AV, 2·2·width
    per (query, key) pair, causal: query ``i`` (0-based, after ``past``) sees
    ``past + i + 1`` keys. Norms, activations and RoPE are left out (linear in
    width, a few % at most).
    """
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    pairs = seq * past + seq * (seq + 1) / 2
    attn = sum(4 * w * pairs for w in _attention_widths(model))
    return batch * (2 * linear * seq + attn)


def decode_flops(model, prompt: int, new_tokens: int) -> float:
    return sum(forward_flops(model, 1, 1, past=prompt + t) for t in range(new_tokens))


# ---------------------------------------------------------------- models
def compacted(model, ratio: float, seed: int = 0):
    """``model`` cut to ``ratio`` with the parameter-exact allocation (random groups)."""
    from loraprune import LoRAPruner

    pruner = LoRAPruner(copy.deepcopy(model), ratio=ratio, criterion="random", lora_dropout=0.0, seed=seed)
    return pruner.finalize().eval()


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Call every ``fn`` once per round, in turn; returns the values per name."""
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(fn())
    return out


def throughput(models: dict, settings: dict, mode: str) -> dict:
    from loraprune.eval import tokens_per_second

    ctx = next(iter(models.values())).config.max_position_embeddings
    if mode == "prefill":
        kw = dict(mode="prefill", batch_size=settings["prefill_batch"], seq_len=settings["prefill_seq"] or ctx)
    else:
        kw = dict(mode="decode", batch_size=1, prompt_len=settings["decode_prompt"], new_tokens=settings["decode_tokens"])
    for m in models.values():  # warm-up
        tokens_per_second(m, repeats=1, warmup=1, **kw)
    fns = {k: (lambda m=m: tokens_per_second(m, repeats=1, warmup=0, **kw)) for k, m in models.items()}
    tps = interleaved(fns, settings["rounds"])
    dense = models["dense"]
    if mode == "prefill":
        flops = {k: forward_flops(m, kw["batch_size"], kw["seq_len"]) for k, m in models.items()}
    else:
        flops = {k: decode_flops(m, kw["prompt_len"], kw["new_tokens"]) for k, m in models.items()}
    out = {"setting": {k: v for k, v in kw.items()}, "models": {}}
    for k in models:
        per_round = [t / d for t, d in zip(tps[k], tps["dense"])]
        ideal = flops["dense"] / flops[k]
        speedup = statistics.median(per_round)
        out["models"][k] = {
            "tokens_per_s": tps[k], "median_tokens_per_s": statistics.median(tps[k]),
            "speedup": speedup, "speedup_per_round": per_round, "flops": flops[k], "ideal_speedup": ideal,
            "fraction_of_ideal": (speedup - 1) / (ideal - 1) if ideal > 1 else None,
            "speedup_over_ideal": speedup / ideal,
            "params": sum(p.numel() for p in models[k].parameters()),
        }
    del dense
    return out


# ---------------------------------------------------------------- pruning step
def step_times(model, settings: dict, rounds: int, batch: int, seq: int) -> dict:
    """Wall time of one pruning step (forward, backward, scoring, optimiser) per criterion, interleaved."""
    from loraprune import LoRAPruner

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    runners = {}
    for crit in ("lora", "grad"):
        m = copy.deepcopy(model)
        m.config.use_cache = False
        pruner = LoRAPruner(m, ratio=0.5, criterion=crit, lora_dropout=0.0)
        m.train()
        opt = torch.optim.AdamW(pruner.lora_parameters(), lr=1e-4)

        def one(m=m, pruner=pruner, opt=opt):
            t = time.perf_counter()
            m(input_ids=ids, labels=ids).loss.backward()
            pruner.score()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        one()  # warm-up
        runners[crit] = one
    times = interleaved(runners, rounds)
    per_round = [lo / gr for lo, gr in zip(times["lora"], times["grad"])]
    return {"batch": [batch, seq], "seconds": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "lora_over_grad": statistics.median(per_round), "lora_over_grad_per_round": per_round}


def run(setup, settings: dict, log=print) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .common import result_payload, write_json
    from .memory import LLAMA7B_LAYER, SMOKE_LAYER

    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    model, _, _ = setup.reference()
    models = {"dense": model.eval()}
    for r in settings["ratios"]:
        models[f"{r:g}"] = compacted(model, r)
    res = {}
    for mode in ("prefill", "decode"):
        res[mode] = throughput(models, settings, mode)
        for k, v in res[mode]["models"].items():
            log(f"speed: {mode:>7} {k:>5}: x{v['speedup']:.2f} (ideal x{v['ideal_speedup']:.2f})")
    res["pruning_step"] = {"reference": step_times(model, settings, settings["step_rounds"], settings["step_batch"],
                                                   settings["step_seq"])}
    log(f"speed: pruning step (reference) lora/grad = {res['pruning_step']['reference']['lora_over_grad']:.2f}")
    if settings["layer_step_rounds"]:
        torch.manual_seed(0)
        with torch.no_grad():
            layer = LlamaForCausalLM(LlamaConfig(**(SMOKE_LAYER if setup.smoke else LLAMA7B_LAYER))).eval()
        res["pruning_step"]["llama7b-layer"] = step_times(layer, settings, settings["layer_step_rounds"], 2,
                                                          32 if setup.smoke else 128)
        log(f"speed: pruning step (7B layer) lora/grad = {res['pruning_step']['llama7b-layer']['lora_over_grad']:.2f}")
    prefill50 = res["prefill"]["models"].get("0.5")
    res["targets"] = {
        "prefill_50pct_speedup_over_ideal": prefill50["speedup_over_ideal"] if prefill50 else None,
        "prefill_50pct_target_0.9_of_ideal_met": bool(prefill50 and prefill50["speedup_over_ideal"] >= 0.9),
    }
    res["paper_anchor"] = {"latency_change_gpu": {"0.2": -0.247, "0.5": -0.495}}
    payload = result_payload("speed", dict(settings, smoke=setup.smoke), res)
    write_json(setup.out / "speed.json", payload)
    return payload
