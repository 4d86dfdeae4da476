"""LoRAPruneCallback in transformers.Trainer: same result as a hand-written loop,
NaN handling, checkpoint/resume, and DDP (2 CPU processes, gloo) with identical masks."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from loraprune import CubicSchedule, LoRAPruner
from loraprune.errors import NonFiniteLossError
from loraprune.run.callback import LoRAPruneCallback
from tiny import tiny_model

pytestmark = pytest.mark.slow  # trains, spawns subprocesses or compiles

TESTS = Path(__file__).resolve().parent
STEPS, BATCH, SEQ, LR = 6, 2, 12, 1e-3


def rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (n, SEQ), generator=g)
    return [{"input_ids": r, "labels": r} for r in ids]


def trainer_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, use_cpu=True,
                report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                lr_scheduler_type="constant", max_grad_norm=0.0, train_sampling_strategy="sequential",
                learning_rate=LR, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def new_pruner(**kw):
    schedule = CubicSchedule.for_run(STEPS, 0, 4, 1)
    return LoRAPruner(tiny_model(seed=3), ratio=0.5, schedule=schedule, lora_dropout=0.0, ranking="layer", **kw)


def run_trainer(out, data, resume=None, **kw):
    pruner = new_pruner()
    cb = LoRAPruneCallback(pruner)
    trainer = Trainer(model=pruner.model, args=trainer_args(out, **kw), train_dataset=data, callbacks=[cb],
                      optimizers=(cb.optimizer(lr=LR), None))
    trainer.train(resume_from_checkpoint=resume)
    return pruner, cb


def hand_loop(data, batch, **kw):
    """The engine's documented protocol, written out: the independent reference."""
    pruner = new_pruner(**kw)
    opt = torch.optim.AdamW(pruner.lora_parameters(), lr=LR)
    pruner.model.train()
    for step in range(1, STEPS + 1):
        chunk = data[(step - 1) * batch: step * batch]
        ids = torch.stack([r["input_ids"] for r in chunk])
        pruner.model(input_ids=ids, labels=ids).loss.backward()
        pruner.score()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruner.step_end(step)
    return pruner


def drive_callback(cb, model, opt, args, state, data, rank):
    """Trainer's event order for this rank's share of each global batch, driven by hand (for the
    two-rank workers): backward, on_pre_optimizer_step, step, zero_grad, on_step_end."""
    for step in range(1, STEPS + 1):
        chunk = data[(step - 1) * 2 * BATCH + rank * BATCH:][:BATCH]
        ids = torch.stack([r["input_ids"] for r in chunk])
        model(input_ids=ids, labels=ids).loss.backward()
        cb.on_pre_optimizer_step(args, state, None, model=model, optimizer=opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.global_step = step
        cb.on_step_end(args, state, None)


def assert_same_run(a: LoRAPruner, b: LoRAPruner, atol=1e-5):
    assert a.state.masks.to_dict() == b.state.masks.to_dict()
    assert a.state.masks.kept_kv() != [lg.n_kv for lg in a.layers]  # something was pruned
    for pa, pb in zip(a.lora_parameters(), b.lora_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=atol)


def test_trainer_callback_matches_hand_loop(tmp_path):
    data = rows(STEPS * BATCH)
    pruner, cb = run_trainer(tmp_path / "t", data)
    ref = hand_loop(data, BATCH)
    # scores are observed up to the schedule's end (the final mask), not during recovery
    assert pruner.state.step == STEPS and pruner.state.observations == pruner.schedule.end < STEPS
    assert_same_run(pruner, ref)
    small, ref_small = cb.finalize(), ref.finalize()
    assert small.config.loraprune["layers"] == ref_small.config.loraprune["layers"]
    sd, rd = small.state_dict(), ref_small.state_dict()
    for k in rd:
        torch.testing.assert_close(sd[k], rd[k], rtol=1e-4, atol=1e-5)
    assert cb.finalize() is small  # idempotent


def test_trainer_checkpoint_resume_restores_pruning_state(tmp_path):
    data = rows(STEPS * BATCH)
    full, _ = run_trainer(tmp_path / "a", data)
    run_trainer(tmp_path / "b", data, save_strategy="steps", save_steps=3, max_steps=3)
    saved = tmp_path / "b" / "checkpoint-3"
    assert (saved / "loraprune_state" / "state.safetensors").is_file()
    resumed, _ = run_trainer(tmp_path / "b", data, resume=str(saved), save_strategy="no")
    assert resumed.state.observations == resumed.schedule.end  # EMA history came back with the masks
    assert_same_run(resumed, full)


def test_trainer_nan_gradients_are_skipped_then_stop(tmp_path):
    pruner = new_pruner()
    with torch.no_grad():
        pruner.model.model.norm.weight.fill_(float("nan"))
    cb = LoRAPruneCallback(pruner, max_bad_steps=2)
    trainer = Trainer(model=pruner.model, args=trainer_args(tmp_path), train_dataset=rows(STEPS * BATCH),
                      callbacks=[cb], optimizers=(cb.optimizer(lr=LR), None))
    before = [p.clone() for p in pruner.lora_parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite loss, gradients or scores; update skipped"):
        with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
            trainer.train()
    assert cb.skipped_steps == 2 and pruner.state.observations == 0
    assert all(torch.equal(a, b) for a, b in zip(before, pruner.lora_parameters()))


def test_optimizer_over_frozen_weights_is_refused(tmp_path):
    pruner = LoRAPruner(tiny_model(), ratio=0.5, criterion="grad")  # frozen weights get gradients
    cb = LoRAPruneCallback(pruner)
    trainer = Trainer(model=pruner.model, args=trainer_args(tmp_path), train_dataset=rows(4), callbacks=[cb])
    with pytest.raises(ValueError, match=r"optimizers=\(callback.optimizer\(\), None\)"):
        trainer.train()


def test_schedule_from_max_steps_and_type_check(tmp_path):
    with pytest.raises(TypeError, match="LoRAPruner"):
        LoRAPruneCallback(tiny_model())
    pruner = LoRAPruner(tiny_model(), ratio=0.5, lora_dropout=0.0, ranking="layer")
    cb = LoRAPruneCallback(pruner, prune_start=0, prune_end=0.5)
    trainer = Trainer(model=pruner.model, args=trainer_args(tmp_path, max_steps=4), train_dataset=rows(8),
                      callbacks=[cb], optimizers=(cb.optimizer(lr=LR), None))
    trainer.train()
    assert pruner.schedule == CubicSchedule(0, 2, 1)
    # target reached at step 2: half of the 2 KV groups and of the 48 channels of each layer
    assert pruner.state.masks.kept_kv() == [1, 1] and pruner.state.masks.kept_channels() == [24, 24]


# ---------------------------------------------------------------------- DDP, 2 ranks
DDP_WORKER = textwrap.dedent(
    """
    import os, sys, json
    sys.path.insert(0, {tests!r})
    import torch
    from safetensors.torch import save_file
    import test_callback as T
    from transformers import Trainer

    out = sys.argv[1]
    pruner = T.new_pruner()
    cb = T.LoRAPruneCallback(pruner)
    trainer = Trainer(model=pruner.model, args=T.trainer_args(out, ddp_backend="gloo"),
                      train_dataset=T.rows(T.STEPS * T.BATCH * 2), callbacks=[cb],
                      optimizers=(cb.optimizer(lr=T.LR), None))
    trainer.train()
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    tensors = {{f"lora.{{i}}": p.detach().clone() for i, p in enumerate(pruner.lora_parameters())}}
    tensors.update({{k: v.to(torch.uint8) if v.dtype == torch.bool else v for k, v in pruner.state.tensors().items()}})
    small = cb.finalize()
    tensors.update({{"final." + k: v.contiguous() for k, v in small.state_dict().items()}})
    save_file(tensors, os.path.join(out, f"rank{{rank}}.safetensors"))
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as fh:
        json.dump({{"world": world, "disagreements": cb.mask_disagreements, "steps": pruner.state.step,
                    "layers": small.config.loraprune["layers"]}}, fh)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_gloo_identical_masks_and_weights(tmp_path):
    meta, (r0, r1) = _run_two_ranks(tmp_path, DDP_WORKER)
    assert meta[0]["world"] == 2 and meta[0]["steps"] == STEPS
    assert meta[0]["layers"] == meta[1]["layers"]
    assert meta[0]["disagreements"] == meta[1]["disagreements"] == 0  # equal before the broadcast, too
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # and DDP computed what one process computes on the global batch (rank 0 rows + rank 1 rows)
    ref = hand_loop(rows(STEPS * BATCH * 2), 2 * BATCH)
    assert ref.state.masks.to_dict()["layers"] == [
        {"kv_groups": torch.nonzero(r0[f"attn_keep.{i}"]).flatten().tolist(), "n_kv_groups": ref.layers[i].n_kv,
         "mlp_channels": torch.nonzero(r0[f"mlp_keep.{i}"]).flatten().tolist(),
         "n_mlp_channels": ref.layers[i].n_channels}
        for i in range(len(ref.layers))
    ]
    for i, p in enumerate(ref.lora_parameters()):
        torch.testing.assert_close(r0[f"lora.{i}"], p, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------- FSDP (v1), 2 ranks
FSDP_WORKER = textwrap.dedent(
    """
    import os, sys, json
    sys.path.insert(0, {tests!r})
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from safetensors.torch import save_file
    import test_callback as T

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pruner = T.new_pruner()
    model = FSDP(pruner.model, use_orig_params=True, device_id=torch.device("cpu"))
    cb = T.LoRAPruneCallback(pruner)
    opt = cb.optimizer(lr=T.LR)
    args = T.trainer_args(out)
    state = type("State", (), {{"global_step": 0, "max_steps": T.STEPS}})()
    data = T.rows(T.STEPS * T.BATCH * 2)
    T.drive_callback(cb, model, opt, args, state, data, rank)
    with FSDP.summon_full_params(model):
        tensors = {{f"lora.{{i}}": p.detach().clone() for i, p in enumerate(pruner.lora_parameters())}}
    tensors.update({{k: v.to(torch.uint8) if v.dtype == torch.bool else v for k, v in pruner.state.tensors().items()}})
    save_file(tensors, os.path.join(out, f"rank{{rank}}.safetensors"))
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as fh:
        json.dump({{"disagreements": cb.mask_disagreements, "observations": pruner.state.observations}}, fh)
    dist.destroy_process_group()
    """
)


def _run_two_ranks(tmp_path, source, *args: str):
    """Run ``source`` (formatted with ``tests=``) as two gloo ranks: ``worker.py OUT_DIR *args``;
    each writes ``rank{r}.json`` and ``rank{r}.safetensors`` to OUT_DIR."""
    script = tmp_path / "worker.py"
    script.write_text(source.format(tests=str(TESTS)))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    meta = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    tensors = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    return meta, tensors


def test_fsdp_two_ranks_gather_scoring_matches_single_process(tmp_path):
    """FSDP shards parameters and gradients; the callback gathers them for scoring."""
    meta, (r0, r1) = _run_two_ranks(tmp_path, FSDP_WORKER)
    assert meta[0]["disagreements"] == meta[1]["disagreements"] == 0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    ref = hand_loop(rows(STEPS * BATCH * 2), 2 * BATCH)
    assert meta[0]["observations"] == ref.state.observations == ref.schedule.end  # scored up to the final mask
    for i in range(len(ref.layers)):
        assert torch.equal(r0[f"attn_keep.{i}"].bool(), ref.state.masks.attn_keep[i])
        assert torch.equal(r0[f"mlp_keep.{i}"].bool(), ref.state.masks.mlp_keep[i])
        torch.testing.assert_close(r0[f"attn_score.{i}"], ref.state.attn_score[i], rtol=1e-4, atol=1e-7)
    for i, p in enumerate(ref.lora_parameters()):
        torch.testing.assert_close(r0[f"lora.{i}"], p, rtol=1e-4, atol=1e-5)


BROADCAST_WORKER = textwrap.dedent(
    """
    import os, sys, json
    sys.path.insert(0, {tests!r})
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    import test_callback as T

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pruner = T.new_pruner()
    cb = T.LoRAPruneCallback(pruner)
    g = torch.Generator().manual_seed(100 + rank)  # ranks disagree on purpose
    pruner.state.observe([torch.rand(lg.n_kv, generator=g) for lg in pruner.layers],
                         [torch.rand(lg.n_channels, generator=g) for lg in pruner.layers])
    state = type("State", (), {{"global_step": pruner.schedule.end}})()
    cb.on_step_end(T.trainer_args(out), state, None)
    tensors = {{k: v.to(torch.uint8) for k, v in pruner.state.tensors().items() if "keep" in k}}
    tensors["q_keep.0"] = pruner.modules[0]["q_proj"].keep
    save_file(tensors, os.path.join(out, f"rank{{rank}}.safetensors"))
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as fh:
        json.dump({{"disagreements": cb.mask_disagreements}}, fh)
    dist.destroy_process_group()
    """
)


def test_mask_broadcast_overrides_a_diverging_rank(tmp_path):
    meta, (r0, r1) = _run_two_ranks(tmp_path, BROADCAST_WORKER)
    assert meta[0]["disagreements"] == 0 and meta[1]["disagreements"] == 1
    assert r0.keys() == r1.keys()
    for k in r0:  # masks and the applied row indices follow rank 0
        assert torch.equal(r0[k], r1[k]), k


def test_optimizer_defaults_come_from_the_pruners_config():
    pruner = LoRAPruner(tiny_model(), ratio=0.3, lr=3e-3, weight_decay=0.01)
    cb = LoRAPruneCallback(pruner)
    group = cb.optimizer().param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (3e-3, 0.01)
    assert {id(p) for p in group["params"]} == {id(p) for p in pruner.lora_parameters()}
    assert cb.optimizer(lr=1e-4, weight_decay=0.0).param_groups[0]["lr"] == 1e-4
