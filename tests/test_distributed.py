"""FSDP2 (``fully_shard``, DTensor shards) with two gloo ranks on CPU: identical masks and
weights on both ranks, equal to one process on the global batch, and the final cut on rank 0.

The reference is :func:`test_callback.hand_loop`: the engine's protocol in one process,
on the rows both ranks saw, as the DDP and FSDP v1 tests use it."""
import textwrap

import pytest
import torch

from test_callback import BATCH, STEPS, _run_two_ranks, hand_loop, rows

FSDP2_WORKER = textwrap.dedent(
    """
    import os, sys, json
    sys.path.insert(0, {tests!r})
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from safetensors.torch import save_file
    import test_callback as T
    from loraprune.model.distributed import _row_sharded, full

    out, criterion, layout = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pruner = T.new_pruner(criterion=criterion)
    # "rows": FSDP2's default Shard(0) (scored from per-shard partial sums);
    # "cols": every matrix sharded by columns (scored by gathering each projection)
    place = (lambda p: Shard(1) if p.ndim == 2 else None) if layout == "cols" else None
    for layer in pruner.model.model.layers:
        fully_shard(layer, shard_placement_fn=place)
    model = fully_shard(pruner.model, shard_placement_fn=place)
    q = pruner.modules[0]["q_proj"]
    assert type(q.lora_A).__name__ == "DTensor"
    assert _row_sharded(q.base.weight, q.lora_B) == (layout == "rows")  # partial sums, else the gather
    cb = T.LoRAPruneCallback(pruner)
    opt = cb.optimizer(lr=T.LR)
    args = T.trainer_args(out)
    state = type("State", (), {{"global_step": 0, "max_steps": T.STEPS}})()
    cb.on_train_begin(args, state, None, model=model, optimizer=opt)
    data = T.rows(T.STEPS * T.BATCH * 2)
    T.drive_callback(cb, model, opt, args, state, data, rank)
    tensors = {{f"lora.{{i}}": full(p).detach().clone() for i, p in enumerate(pruner.lora_parameters())}}
    tensors.update({{k: v.to(torch.uint8) if v.dtype == torch.bool else v for k, v in pruner.state.tensors().items()}})
    small = cb.finalize()  # collective: the small model on rank 0, None elsewhere
    assert cb.finalize() is small
    if rank == 0:
        tensors.update({{"final." + k: v.contiguous() for k, v in small.state_dict().items()}})
        layers = small.config.loraprune["layers"]
    else:
        assert small is None
        layers = None
    save_file(tensors, os.path.join(out, f"rank{{rank}}.safetensors"))
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as fh:
        json.dump({{"disagreements": cb.mask_disagreements, "observations": pruner.state.observations,
                    "layers": layers}}, fh)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("criterion, layout", [("fisher", "rows"), ("lora", "rows"), ("lora", "cols"), ("grad", "rows")])
def test_fsdp2_two_ranks_match_single_process(tmp_path, criterion, layout):
    meta, (r0, r1) = _run_two_ranks(tmp_path, FSDP2_WORKER, criterion, layout)
    assert meta[0]["disagreements"] == meta[1]["disagreements"] == 0  # equal before the broadcast, too
    assert meta[0]["observations"] == meta[1]["observations"] == _scored_steps()
    shared = [k for k in r0 if not k.startswith("final.")]
    assert set(shared) == set(r1)
    for k in shared:  # masks, EMA scores, LoRA factors: bit-identical on both ranks
        assert torch.equal(r0[k], r1[k]), k
    ref = hand_loop(rows(STEPS * BATCH * 2), 2 * BATCH, criterion=criterion)
    assert ref.state.masks.kept_kv() != [lg.n_kv for lg in ref.layers]  # something was pruned
    for i in range(len(ref.layers)):
        assert torch.equal(r0[f"attn_keep.{i}"].bool(), ref.state.masks.attn_keep[i])
        assert torch.equal(r0[f"mlp_keep.{i}"].bool(), ref.state.masks.mlp_keep[i])
        torch.testing.assert_close(r0[f"attn_score.{i}"], ref.state.attn_score[i], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(r0[f"mlp_score.{i}"], ref.state.mlp_score[i], rtol=1e-4, atol=1e-9)
    for i, p in enumerate(ref.lora_parameters()):
        torch.testing.assert_close(r0[f"lora.{i}"], p, rtol=1e-4, atol=1e-5)
    small = ref.finalize()
    assert meta[0]["layers"] == small.config.loraprune["layers"]
    sd = small.state_dict()
    assert {k[len("final."):] for k in r0 if k.startswith("final.")} == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(r0["final." + k], v, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ DeepSpeed ZeRO-2/3, 2 ranks
DEEPSPEED_WORKER = textwrap.dedent(
    """
    import contextlib, os, sys, json
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, {tests!r})
    import torch, torch.distributed as dist
    import deepspeed
    from safetensors.torch import save_file
    import test_callback as T

    out, stage = sys.argv[1], int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    pruner = T.new_pruner()  # criterion: fisher, the default
    cb = T.LoRAPruneCallback(pruner)
    config = {{"train_micro_batch_size_per_gpu": T.BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
               "zero_allow_untested_optimizer": True,
               # threshold 0: every parameter, however small, is partitioned under ZeRO-3
               "zero_optimization": {{"stage": stage, "stage3_param_persistence_threshold": 0}}}}
    engine, opt, _, _ = deepspeed.initialize(model=pruner.model, optimizer=cb.optimizer(lr=T.LR), config=config)
    if stage == 3:
        assert pruner.modules[0]["q_proj"].base.weight.numel() == 0  # partitioned away
    args = T.trainer_args(out)
    state = type("State", (), {{"global_step": 0, "max_steps": T.STEPS}})()
    cb.on_train_begin(args, state, None, model=pruner.model, optimizer=opt)
    data = T.rows(T.STEPS * T.BATCH * 2)
    # accelerate's order under DeepSpeed: backward and the engine's step, then Trainer's hooks
    for step in range(1, T.STEPS + 1):
        chunk = data[(step - 1) * 2 * T.BATCH + rank * T.BATCH:][: T.BATCH]
        ids = torch.stack([r["input_ids"] for r in chunk])
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        cb.on_pre_optimizer_step(args, state, None, model=pruner.model, optimizer=opt)
        state.global_step = step
        cb.on_step_end(args, state, None)
    gathered = deepspeed.zero.GatheredParameters(pruner.lora_parameters()) if stage == 3 else contextlib.nullcontext()
    with gathered:
        tensors = {{f"lora.{{i}}": p.detach().clone() for i, p in enumerate(pruner.lora_parameters())}}
    tensors.update({{k: v.to(torch.uint8) if v.dtype == torch.bool else v for k, v in pruner.state.tensors().items()}})
    small = cb.finalize()  # ZeRO-3: a collective, the model on rank 0 and None elsewhere; ZeRO-2: every rank
    layers = None
    if small is not None:
        tensors.update({{"final." + k: v.detach().contiguous() for k, v in small.state_dict().items()}})
        layers = small.config.loraprune["layers"]
    save_file(tensors, os.path.join(out, f"rank{{rank}}.safetensors"))
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as fh:
        json.dump({{"disagreements": cb.mask_disagreements, "observations": pruner.state.observations,
                    "layers": layers}}, fh)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_ranks_match_single_process(tmp_path, stage):
    """DeepSpeed on CPU (DS_ACCELERATOR=cpu, gloo). Its first use JIT-compiles a shared-memory
    communication op into TORCH_EXTENSIONS_DIR (about 8 minutes on a busy 2-core machine)."""
    pytest.importorskip("deepspeed")
    meta, (r0, r1) = _run_two_ranks(tmp_path, DEEPSPEED_WORKER, str(stage))
    assert meta[0]["disagreements"] == meta[1]["disagreements"] == 0
    assert meta[0]["observations"] == meta[1]["observations"] == _scored_steps()
    shared = [k for k in r0 if not k.startswith("final.")]
    for k in shared:
        assert torch.equal(r0[k], r1[k]), k
    if stage == 3:
        assert meta[1]["layers"] is None and not any(k.startswith("final.") for k in r1)
    else:  # parameters are whole on every rank under ZeRO-2: every rank cuts its own copy
        assert meta[1]["layers"] == meta[0]["layers"]
    ref = hand_loop(rows(STEPS * BATCH * 2), 2 * BATCH)
    for i in range(len(ref.layers)):
        assert torch.equal(r0[f"attn_keep.{i}"].bool(), ref.state.masks.attn_keep[i])
        assert torch.equal(r0[f"mlp_keep.{i}"].bool(), ref.state.masks.mlp_keep[i])
        torch.testing.assert_close(r0[f"mlp_score.{i}"], ref.state.mlp_score[i], rtol=1e-4, atol=1e-9)
    for i, p in enumerate(ref.lora_parameters()):
        torch.testing.assert_close(r0[f"lora.{i}"], p, rtol=1e-4, atol=1e-5)
    small = ref.finalize()
    assert meta[0]["layers"] == small.config.loraprune["layers"]
    for k, v in small.state_dict().items():
        torch.testing.assert_close(r0["final." + k], v, rtol=1e-4, atol=1e-5)


def test_deepspeed_refuses_criteria_that_read_parameter_gradients():
    from types import SimpleNamespace

    from loraprune import LoRAPruner
    from loraprune.errors import ConfigError
    from loraprune.run.callback import LoRAPruneCallback
    from tiny import tiny_model

    state = SimpleNamespace(global_step=0, max_steps=4)
    args = SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}})
    cb = LoRAPruneCallback(LoRAPruner(tiny_model(), ratio=0.5, criterion="lora"))
    with pytest.raises(ConfigError, match="criterion='fisher'"):
        cb.on_train_begin(args, state, None)
    ok = LoRAPruneCallback(LoRAPruner(tiny_model(), ratio=0.5))  # fisher: activations only
    ok.on_train_begin(args, state, None)
    assert ok._deepspeed



def _scored_steps() -> int:
    """Steps whose scores are observed: up to the schedule's end (the final mask), not during recovery."""
    from loraprune.config import PruneConfig
    from loraprune.method.schedule import CubicSchedule

    cfg = PruneConfig()
    return CubicSchedule.for_run(STEPS, cfg.prune_start, cfg.prune_end).end
