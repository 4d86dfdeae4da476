"""Checkpoint and resume: a real SIGKILL mid-run, then --resume, ends exactly where
an uninterrupted run ends (masks and every weight); damaged or foreign checkpoints
are refused with a message naming the fix."""
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraprune
from loraprune.apps.cli import main
from loraprune.apps.toy_shakespeare import train_tokenizer
from loraprune.run.checkpoint import Checkpointer, CheckpointError
from tiny import tiny_model

pytestmark = pytest.mark.slow  # trains, spawns subprocesses or compiles

STEPS, EVERY = 12, 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("ckpt")
    text = (data_dir / "shakespeare" / "sonnets.txt").read_text(encoding="utf-8")[:12000]
    (root / "data.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer([text], vocab_size=160)
    model = tiny_model(vocab_size=len(tok), intermediate_size=64, num_attention_heads=4, num_key_value_heads=4)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def prune_args(root, out, *extra):
    return ["prune", "--model", str(root / "model"), "--data", str(root / "data.txt"), "--output", str(out),
            "--ratio", "0.5", "--steps", str(STEPS), "--seq-len", "16", "--batch-size", "2",
            "--checkpoint-every", str(EVERY), "--prune-every", "2", "--no-progress", *extra]


# The child is the real CLI; each training step is slowed down so that the kill lands mid-run.
SLOW_CLI = textwrap.dedent(
    """
    import importlib, sys, time
    P = importlib.import_module("loraprune.run.prune")  # the module (the package exports a function of that name)
    real = P.micro_step
    def slow(*a, **k):
        time.sleep(0.4)
        return real(*a, **k)
    P.micro_step = slow
    from loraprune.apps.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def saved_state(out: Path):
    weights = load_file(str(out / "model.safetensors"))
    masks = json.loads((out / "loraprune_masks.json").read_text())
    layers = json.loads((out / "config.json").read_text())["loraprune"]["layers"]
    return weights, masks, layers


def test_kill_then_resume_equals_uninterrupted_run(workdir, tmp_path):
    full = tmp_path / "full"
    assert main(prune_args(workdir, full)) == 0
    assert not (full / "checkpoints").exists()  # a finished run leaves only the model

    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *prune_args(workdir, out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = Checkpointer(out)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and child.poll() is None:
            done = ckpt.complete()
            if done and int(done[-1].name.split("-")[1]) >= 4:
                break
            time.sleep(0.05)
        assert child.poll() is None, "the run ended before it could be killed: " + child.stderr.read()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    killed_at = int(ckpt.complete()[-1].name.split("-")[1])
    assert 4 <= killed_at < STEPS and not (out / "config.json").exists()  # really interrupted

    # without --resume the half-done directory is protected
    assert main(prune_args(workdir, out)) == 2
    assert ckpt.complete()  # ... and untouched
    assert main(prune_args(workdir, out, "--resume")) == 0

    w_full, m_full, l_full = saved_state(full)
    w_res, m_res, l_res = saved_state(out)
    assert m_res == m_full and l_res == l_full
    assert w_res.keys() == w_full.keys()
    for k in w_full:
        assert torch.equal(w_res[k], w_full[k]), k
    report = json.loads((out / "loraprune_report.json").read_text())
    assert report["achieved_ratio"] == pytest.approx(0.5, abs=0.01)


def _interrupted_run(tmp_path, steps=4, **kw):
    """prune() up to a checkpoint at step ``steps`` of an 8-step run, via a data stream that stops."""
    batches = [{"input_ids": torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(i))} for i in range(8)]

    def stream():
        yield from batches[:steps]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loraprune.prune(tiny_model(), stream(), ratio=0.5, steps=8, checkpoint_dir=tmp_path, checkpoint_every=2,
                        progress=False, **kw)
    return batches


def test_resume_refuses_other_options_and_damaged_checkpoints(tmp_path):
    batches = _interrupted_run(tmp_path)
    found = Checkpointer(tmp_path).complete()
    assert [p.name for p in found] == ["step-00000002", "step-00000004"]
    with pytest.raises(CheckpointError, match="other settings .*ratio"):
        loraprune.prune(tiny_model(), batches, ratio=0.3, steps=8, checkpoint_dir=tmp_path, resume=True,
                        progress=False)
    with pytest.raises(CheckpointError, match="other settings .*lr"):
        loraprune.prune(tiny_model(), batches, ratio=0.5, steps=8, lr=1e-3, checkpoint_dir=tmp_path, resume=True,
                        progress=False)
    with pytest.raises(CheckpointError, match="different model"):
        loraprune.prune(tiny_model(num_hidden_layers=3), batches, ratio=0.5, steps=8, checkpoint_dir=tmp_path,
                        resume=True, progress=False)
    newest = found[-1] / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="corrupted.*delete it"):
        loraprune.prune(tiny_model(), batches, ratio=0.5, steps=8, checkpoint_dir=tmp_path, resume=True,
                        progress=False)


def test_partial_checkpoint_is_ignored(tmp_path):
    _interrupted_run(tmp_path, steps=2)
    ckdir = tmp_path / "checkpoints"
    partial = ckdir / ".step-00000004.abc.partial"  # what a kill during a write leaves
    partial.mkdir()
    (partial / "meta.json").write_text("{")
    assert [p.name for p in Checkpointer(tmp_path).complete()] == ["step-00000002"]


def test_pruning_state_round_trip(tmp_path):
    from loraprune.run.checkpoint import restore_pruning_state, save_pruning_state

    a = loraprune.LoRAPruner(tiny_model(), ratio=0.5, schedule=loraprune.CubicSchedule(0, 2, 1))
    a.state.observe([torch.rand(lg.n_kv) for lg in a.layers], [torch.rand(lg.n_channels) for lg in a.layers])
    a.step_end(1)
    save_pruning_state(a, tmp_path / "s")
    b = loraprune.LoRAPruner(tiny_model(), ratio=0.5)
    assert restore_pruning_state(b, tmp_path / "s") == 1
    assert b.state.masks.to_dict() == a.state.masks.to_dict() and b.state.observations == 1
    for x, y in zip(a.state.attn_score + a.state.mlp_score, b.state.attn_score + b.state.mlp_score):
        assert torch.equal(x, y)
    c = loraprune.LoRAPruner(tiny_model(), ratio=0.3)
    with pytest.raises(CheckpointError, match="other settings"):
        restore_pruning_state(c, tmp_path / "s")


# ---- fingerprints: resume refuses another model or other data ------------------------------
def _pruner_and_optimizer(model):
    pruner = loraprune.LoRAPruner(model, ratio=0.5)
    return pruner, torch.optim.AdamW(pruner.lora_parameters(), lr=1e-3)


def test_fingerprint_tells_models_data_and_tokenizers_apart(workdir, tmp_path):
    from transformers import AutoTokenizer

    from loraprune.run.checkpoint import fingerprint, fingerprint_mismatch

    batches = [{"input_ids": torch.arange(16).view(2, 8)}]
    model = tiny_model()
    base = fingerprint(model, batches)
    assert fingerprint(tiny_model(), [{"input_ids": torch.arange(16).view(2, 8)}]) == base  # same content
    loraprune.LoRAPruner(model, ratio=0.5)  # LoRA attached: the fingerprint of the weights is unchanged
    assert fingerprint(model, batches) == base
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.base.weight[3, 5] += 1e-3
    assert fingerprint_mismatch(base, fingerprint(model, batches)) == ["model"]
    other = [{"input_ids": torch.arange(16).view(2, 8) + 1}]
    assert fingerprint_mismatch(base, fingerprint(tiny_model(), other)) == ["data"]
    # files: name, size and content; a one-shot iterator cannot be compared
    (tmp_path / "a.txt").write_text("some text")
    text_fp = fingerprint(tiny_model(), str(tmp_path / "a.txt"))["data"]
    (tmp_path / "a.txt").write_text("more text")
    assert fingerprint(tiny_model(), str(tmp_path / "a.txt"))["data"] != text_fp
    assert fingerprint_mismatch(base, fingerprint(tiny_model(), iter(batches))) == []
    tok = AutoTokenizer.from_pretrained(workdir / "model")
    assert fingerprint_mismatch(fingerprint(model, None, tok), fingerprint(model, None, None)) == []


def test_checkpointer_refuses_another_model_or_data_unless_allowed(tmp_path):
    from loraprune.run.checkpoint import fingerprint

    batches = [{"input_ids": torch.arange(16).view(2, 8)}]
    pruner, opt = _pruner_and_optimizer(tiny_model())
    Checkpointer(tmp_path, every=1, fingerprint=fingerprint(tiny_model(), batches)).save(pruner, opt, 1)
    meta = json.loads((tmp_path / "checkpoints" / "step-00000001" / "meta.json").read_text())
    assert meta["fingerprint"]["model"]["sha256"]

    other_data = fingerprint(tiny_model(), [{"input_ids": torch.ones(2, 8, dtype=torch.long)}])
    pruner2, opt2 = _pruner_and_optimizer(tiny_model())
    with pytest.raises(CheckpointError, match="written for other data than this run.*--force-resume"):
        Checkpointer(tmp_path, fingerprint=other_data).restore(pruner2, opt2)
    other_model = fingerprint(tiny_model(seed=1), batches)
    with pytest.raises(CheckpointError, match="written for another model than this run"):
        Checkpointer(tmp_path, fingerprint=other_model).restore(pruner2, opt2)
    with pytest.warns(RuntimeWarning, match="resuming anyway"):
        assert Checkpointer(tmp_path, fingerprint=other_model, allow_mismatch=True).restore(pruner2, opt2) == 1
    assert Checkpointer(tmp_path).restore(pruner2, opt2) == 1  # no fingerprint given: not compared
