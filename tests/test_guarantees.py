"""The guarantees of issue 26 under faults: a refused or failed LoRAPruner leaves the model exactly as it
was (PEFT adapters it cannot continue, a failure inside ``__init__``); compaction completes or puts the
model back, and ``finalize()`` then gives what an uninterrupted one gives; one exclusive-create rule for
every output (concurrent writers, symlinks, ``overwrite`` a bool); a writer killed half-way leaves no
partial file at the final path, and the next save or load in that folder removes its leftovers."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import loraprune
import loraprune.surgery.compaction as compaction
from loraprune.errors import AdapterError, OutputExistsError
from loraprune.utils.atomic import TEMP_PATTERN
from model_snapshot import assert_intact, snapshot
from races import race, race_in_threads, report
from tiny import random_batches, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _peft_builders():
    pytest.importorskip("peft")
    import peft_models

    return peft_models


@pytest.mark.parametrize("kind", ["ia3", "prefix-tuning", "prompt-tuning", "dora", "lora-bias", "modules-to-save",
                                  "two-active-adapters", "two-adapters-one-active", "loha", "lokr", "adalora",
                                  "lora-on-embeddings", "ia3-injected-without-peftmodel",
                                  "loha-base-model-of-peftmodel"])
@pytest.mark.parametrize("entry", ["LoRAPruner", "prune"])
def test_an_adapter_loraprune_cannot_continue_is_refused_with_the_model_untouched(kind, entry):
    peft_models = _peft_builders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_models.BUILDERS[kind]()
    snap = snapshot(model)
    with pytest.raises(AdapterError, match="merge_and_unload"):
        if entry == "LoRAPruner":
            loraprune.LoRAPruner(model, ratio=0.5)
        else:
            loraprune.prune(model, random_batches(n=2), ratio=0.5, steps=2, progress=False)
    assert_intact(model, snap)


def test_a_plain_lora_peftmodel_is_still_continued():
    model = _peft_builders().plain_lora()
    pruner = loraprune.LoRAPruner(model, ratio=0.5)
    assert len(pruner.lora_modules()) == 14
    pruner.restore()


def test_a_model_that_already_carries_a_pruner_is_refused_and_the_first_pruner_is_unharmed():
    model = tiny_model()
    given = snapshot(model)
    first = loraprune.LoRAPruner(model, ratio=0.5)
    attached = snapshot(model)
    with pytest.raises(AdapterError, match="already carries loraprune's LoRA layers"):
        loraprune.LoRAPruner(model, ratio=0.3)
    with pytest.raises(AdapterError, match="already carries"):
        loraprune.prune(model, random_batches(n=2), ratio=0.3, steps=2, progress=False)
    assert_intact(model, attached)
    first.restore()
    assert_intact(model, given)
    unmerged = loraprune.LoRAPruner(tiny_model(), ratio=0.5).finalize(merge=False)
    with pytest.raises(AdapterError, match=r"merge_lora\(model\)"):
        loraprune.LoRAPruner(unmerged, ratio=0.3)


@pytest.mark.parametrize("where", ["wrapping the 5th projection", "attaching the criterion"])
def test_a_failure_inside_lorapruner_init_puts_the_model_back(where, monkeypatch):
    import loraprune.run.engine as engine

    model = _peft_builders().plain_lora() if where.startswith("wrapping") else tiny_model()
    snap = snapshot(model)
    if where.startswith("wrapping"):
        real, calls = engine.wrap_linear, []

        def wrap(*args):
            calls.append(1)
            if len(calls) == 5:
                raise MemoryError("out of memory while wrapping")
            return real(*args)
        monkeypatch.setattr(engine, "wrap_linear", wrap)
        exc = MemoryError
    else:
        from loraprune.method.criterion import Importance

        def attach(self, pruner):
            raise RuntimeError("hook failed")
        monkeypatch.setattr(Importance, "attach", attach)
        exc = RuntimeError
    with pytest.raises(exc):
        loraprune.LoRAPruner(model, ratio=0.5, criterion="magnitude")
    assert_intact(model, snap)


# ---- 2. the last step cannot lose the run --------------------------------------------------------------
def _pruner(seed=0, **kw):
    model = tiny_model(num_hidden_layers=3, seed=seed)
    pruner = loraprune.LoRAPruner(model, ratio=0.5, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in pruner.lora_modules():  # trained-looking factors, so the merge matters
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)
    pruner.reach_target()  # what finalize() does first: the masks the run trained to
    return model, pruner


def _run_state(pruner):
    return ({n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in enumerate(pruner.lora_modules())},
            json.dumps(pruner.state.masks.to_dict(), sort_keys=True),
            [None if m.keep is None else m.keep.clone() for m in pruner.lora_modules()])


def _assert_same_run_state(pruner, state):
    factors, masks, keeps = state
    for n, m in enumerate(pruner.lora_modules()):
        assert torch.equal(m.lora_A, factors[n][0]) and torch.equal(m.lora_B, factors[n][1])
    assert json.dumps(pruner.state.masks.to_dict(), sort_keys=True) == masks
    for m, keep in zip(pruner.lora_modules(), keeps):
        assert (m.keep is None and keep is None) or torch.equal(m.keep, keep)


def _fail_at_layer(monkeypatch, k, exc=torch.OutOfMemoryError):
    real, seen = compaction._compact_layer, []

    def step(*args):
        seen.append(1)
        if len(seen) == k + 1:
            raise exc(f"CUDA out of memory (injected at layer {k})")
        return real(*args)
    monkeypatch.setattr(compaction, "_compact_layer", step)


def _fail_at_projection(monkeypatch, n):
    real, seen = compaction.compact_linear, []

    def build(*args, **kw):
        seen.append(1)
        if len(seen) == n:
            raise torch.OutOfMemoryError("out of memory (injected mid-layer)")
        return real(*args, **kw)
    monkeypatch.setattr(compaction, "compact_linear", build)


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("where", ["layer 0", "layer 1", "layer 2", "mid-layer 1", "recording the widths"])
def test_a_failure_mid_compaction_puts_the_model_back_and_finalize_can_run_again(where, merge, monkeypatch):
    model, pruner = _pruner()
    snap, state = snapshot(model), _run_state(pruner)
    with monkeypatch.context() as patch:
        if where.startswith("layer"):
            _fail_at_layer(patch, int(where[-1]))
        elif where.startswith("mid-layer"):
            _fail_at_projection(patch, 7 + 3)  # layer 1's 4th projection (the first 7 are layer 0's)
        else:
            def broken(*args):
                raise torch.OutOfMemoryError("out of memory (injected after the last layer)")
            patch.setattr(compaction, "record_widths", broken)
        with pytest.raises(torch.OutOfMemoryError):
            pruner.finalize(merge=merge)
    assert_intact(model, snap)  # weights, LoRA factors, module types, flags, config
    _assert_same_run_state(pruner, state)
    assert not hasattr(model, "loraprune_masks")
    small = pruner.finalize(merge=merge)  # the retry
    twin_model, twin = _pruner()
    reference = twin.finalize(merge=merge)  # an uninterrupted run
    assert small.state_dict().keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(small.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert small.config.loraprune == reference.config.loraprune
    x = random_batches(n=1)[0]["input_ids"]
    with torch.no_grad():  # eval(): merge=False's gathered LoRA layers are new modules (dropout on in train mode)
        torch.testing.assert_close(small.eval()(x).logits, reference.eval()(x).logits, rtol=0, atol=0)


def test_after_a_failed_compaction_restore_gives_back_the_model_as_it_was_given(monkeypatch):
    model = tiny_model(num_hidden_layers=3)
    given = snapshot(model)
    pruner = loraprune.LoRAPruner(model, ratio=0.5)
    pruner.reach_target()
    _fail_at_layer(monkeypatch, 2)
    with pytest.raises(torch.OutOfMemoryError):
        pruner.finalize()
    pruner.restore()
    assert_intact(model, given)


@pytest.mark.parametrize("progressive", [True, False])
def test_prune_whose_compaction_fails_leaves_the_model_as_it_was_given(progressive, monkeypatch):
    model = tiny_model(num_hidden_layers=3)
    given = snapshot(model)
    _fail_at_layer(monkeypatch, 1)
    with pytest.raises(torch.OutOfMemoryError):
        loraprune.prune(model, random_batches(n=2), ratio=0.5, steps=4, progressive=progressive, progress=False)
    assert_intact(model, given)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="parking on the host is observable on a GPU only")
def test_on_a_gpu_the_originals_are_parked_on_the_host_and_put_back_on_failure(monkeypatch):
    model = tiny_model(num_hidden_layers=3).cuda()
    pruner = loraprune.LoRAPruner(model, ratio=0.5)
    pruner.reach_target()
    snap = snapshot(model)
    layer0 = [m for m in pruner.modules[0].values()]
    seen = []
    real = compaction._compact_layer

    def step(*args):
        if len(seen) == 1:  # layer 0 is cut: its originals wait on the host
            seen.append(all(m.base.weight.device.type == "cpu" for m in layer0))
            raise torch.OutOfMemoryError("injected")
        seen.append("first")
        return real(*args)
    monkeypatch.setattr(compaction, "_compact_layer", step)
    with pytest.raises(torch.OutOfMemoryError):
        pruner.finalize()
    assert seen == ["first", True]
    assert_intact(model, snap)


# ---- 3. one exclusive-create rule -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from gguf_export_cases import gpt2_tokenizer

    return gpt2_tokenizer()


def _gguf_model(tok, seed):
    from gguf_export_cases import uniform

    model = uniform("llama", len(tok))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1)  # each seed its own file
    return model


def _standalone(tok, seeds, tmp_path) -> dict:
    return {s: loraprune.save_gguf(_gguf_model(tok, s), tmp_path / f"alone-{s}.gguf", tok).read_bytes()
            for s in seeds}


def test_concurrent_save_gguf_from_threads_gives_exactly_one_success(tok, tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    alone = _standalone(tok, (1, 2), tmp_path)
    models = {s: _gguf_model(tok, s) for s in (1, 2)}
    barrier = threading.Barrier(2)
    real_close = gguf.GGUFWriter.close

    def close(self):  # both files are written, neither name is claimed yet
        real_close(self)
        barrier.wait(timeout=60)
    monkeypatch.setattr(gguf.GGUFWriter, "close", close)
    out = tmp_path / "shared.gguf"
    results, winners = race_in_threads({s: lambda s=s: loraprune.save_gguf(models[s], out, tok) for s in (1, 2)})
    assert len(results) == 2 and len(winners) == 1, results
    assert "another save" in results[3 - winners[0]] and "overwrite=True" in results[3 - winners[0]]
    assert out.read_bytes() == alone[winners[0]]
    assert not [p for p in tmp_path.iterdir() if TEMP_PATTERN.fullmatch(p.name)]


def _save_gguf_in_process(seed, out, barrier, queue):
    import gguf

    from gguf_export_cases import gpt2_tokenizer

    real_close = gguf.GGUFWriter.close

    def close(self):
        real_close(self)
        barrier.wait(timeout=60)
    gguf.GGUFWriter.close = close
    tok = gpt2_tokenizer()
    report(seed, queue, lambda: loraprune.save_gguf(_gguf_model(tok, seed), out, tok))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_save_gguf_from_processes_gives_exactly_one_success(tok, tmp_path):
    pytest.importorskip("gguf")
    alone = _standalone(tok, (1, 2), tmp_path)
    out = tmp_path / "shared.gguf"
    results, winners = race(_save_gguf_in_process, out, timeout=180)
    assert len(winners) == 1, results
    assert out.read_bytes() == alone[winners[0]]


def _pruned(seed=0):
    """A tiny LLaMA with per-layer widths (as tests/cases_io.py's), its weights drawn from ``seed``."""
    from loraprune.structure.masks import Masks

    attn = [torch.tensor([True, False]), torch.tensor([False, True])]
    mlp = [torch.arange(48) < 30, torch.arange(48) >= 8]
    return loraprune.compact(tiny_model(seed=seed), Masks(attn, mlp))


def test_a_dangling_symlink_is_an_existing_output(tok, tmp_path):
    for name in ("m.gguf", "dir"):
        os.symlink(tmp_path / "nowhere" / name, tmp_path / name)
    with pytest.raises(OutputExistsError, match="symlink|exists"):
        loraprune.save_gguf(_gguf_model(tok, 1), tmp_path / "m.gguf", tok)
    with pytest.raises(OutputExistsError, match="symlink|exists"):
        loraprune.save_pruned(_pruned(), tmp_path / "dir")
    with pytest.raises(OutputExistsError, match="does not exist"):  # overwrite=True: nothing it names to replace
        loraprune.save_pruned(_pruned(), tmp_path / "dir", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "m.gguf"]
    assert all((tmp_path / n).is_symlink() and not (tmp_path / n).exists() for n in ("dir", "m.gguf"))


def test_overwrite_through_a_symlink_replaces_what_it_names_and_keeps_the_link(tok, tmp_path):
    real = tmp_path / "store"
    real.mkdir()
    loraprune.save_pruned(_pruned(0), real / "model")
    (tmp_path / "link").symlink_to(real / "model")
    new = _pruned(1)
    loraprune.save_pruned(new, tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(real / "model")
    x = random_batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loraprune.load_pruned(real / "model")(x).logits, new(x).logits, rtol=0, atol=0)
    (real / "m.gguf").write_bytes(b"old")
    (tmp_path / "file-link.gguf").symlink_to(real / "m.gguf")
    loraprune.save_gguf(_gguf_model(tok, 1), tmp_path / "file-link.gguf", tok, overwrite=True)
    assert (tmp_path / "file-link.gguf").is_symlink() and (real / "m.gguf").read_bytes()[:4] == b"GGUF"
    leftovers = [p for d in (tmp_path, real) for p in d.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_overwrite_must_be_a_bool_and_a_truthy_string_replaces_nothing(tok, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"old")
    loraprune.save_pruned(_pruned(0), tmp_path / "dir")
    before = sorted(p.name for p in (tmp_path / "dir").iterdir())
    for bad in ("no", "yes", 1, None):
        with pytest.raises(TypeError, match="overwrite must be True or False"):
            loraprune.save_gguf(_gguf_model(tok, 1), tmp_path / "m.gguf", tok, overwrite=bad)
        with pytest.raises(TypeError, match="overwrite must be True or False"):
            loraprune.save_pruned(_pruned(1), tmp_path / "dir", overwrite=bad)
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == before


@pytest.mark.parametrize("name", ["../x.json", "sub/../../x.json", "/tmp/loraprune-escape-test.json", "..",
                                  "sub/x.json"])
def test_extra_json_names_never_leave_the_output_folder(name, tmp_path):
    out = tmp_path / "a" / "out"
    with pytest.raises(ValueError, match="not a plain file name"):
        loraprune.save_pruned(_pruned(), out, extra_json={name: {"x": 1}})
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    assert not Path("/tmp/loraprune-escape-test.json").exists()


# ---- SIGKILL mid-write: no partial file at the final path; the next save or load cleans up ---------------
_CHILD = textwrap.dedent("""
    import sys, time, pathlib, warnings
    warnings.simplefilter("ignore")
    marker = pathlib.Path(sys.argv[2])
    def hold():
        marker.write_text("mid-write")
        time.sleep(120)
    kind, out = sys.argv[1], pathlib.Path(sys.argv[3])
    import torch, loraprune
    if kind == "gguf":
        import gguf
        from gguf_export_cases import gpt2_tokenizer, uniform
        real = gguf.GGUFWriter.write_kv_data_to_file
        def kv(self):
            real(self)
            hold()
        gguf.GGUFWriter.write_kv_data_to_file = kv
        tok = gpt2_tokenizer()
        loraprune.save_gguf(uniform("llama", len(tok)), out, tok, overwrite=True)
    elif kind == "pruned":
        import loraprune.export.save as save
        from cases_io import pruned_model
        real = save.write_masks
        def masks(model, directory):
            real(model, directory)
            hold()
        save.write_masks = masks
        loraprune.save_pruned(pruned_model(), out, overwrite=True)
    else:
        import loraprune.run.checkpoint as ck
        from tiny import random_batches, tiny_model
        real, calls = ck.save_file, []
        def save_file(tensors, path, **kw):
            real(tensors, path, **kw)
            calls.append(path)
            if len(calls) == 2:
                hold()
        ck.save_file = save_file
        loraprune.prune(tiny_model(), random_batches(n=2), ratio=0.5, steps=4, checkpoint_dir=out,
                        checkpoint_every=1, progress=False)
""")


def _kill_mid_write(kind, out, tmp_path):
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, kind, str(marker), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the writer ended before the kill: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "the writer never reached mid-write"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_PATTERN.fullmatch(p.name))


@pytest.mark.slow
def test_sigkill_during_save_gguf_leaves_the_old_file_and_the_next_save_removes_the_leftover(tok, tmp_path):
    pytest.importorskip("gguf")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"old")
    _kill_mid_write("gguf", folder / "m.gguf", tmp_path)
    assert (folder / "m.gguf").read_bytes() == b"old"
    assert len(_leftovers(folder)) == 1  # the killed writer's partial file, by its recognisable name
    loraprune.save_gguf(_gguf_model(tok, 1), folder / "other.gguf", tok)  # the next save into that folder
    assert _leftovers(folder) == [] and sorted(p.name for p in folder.iterdir()) == ["m.gguf", "other.gguf"]


@pytest.mark.slow
def test_sigkill_during_save_pruned_leaves_nothing_at_the_path_and_the_next_load_removes_the_leftover(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    loraprune.save_pruned(_pruned(0), folder / "kept")
    _kill_mid_write("pruned", folder / "m", tmp_path)
    assert not os.path.lexists(folder / "m")
    assert len(_leftovers(folder)) == 1  # a full copy of the weights, under the temporary name
    loraprune.load_pruned(folder / "kept")  # the next load in that folder
    assert _leftovers(folder) == [] and sorted(p.name for p in folder.iterdir()) == ["kept"]


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_earlier_one_and_the_next_resume_removes_the_leftover(tmp_path):
    from loraprune.run.checkpoint import Checkpointer

    _kill_mid_write("checkpoint", tmp_path / "run", tmp_path)
    ck_dir = tmp_path / "run" / "checkpoints"
    assert len(_leftovers(ck_dir)) == 1
    found = Checkpointer(tmp_path / "run").complete()  # what resume=True reads first
    assert [p.name for p in found] == ["step-00000001"]
    assert _leftovers(ck_dir) == []


def test_a_live_writers_temporary_sibling_is_never_swept(tmp_path):
    from loraprune.utils.atomic import sweep_stale, temp_sibling

    mine = temp_sibling(tmp_path / "x")  # this process: alive
    mine.mkdir()
    init = temp_sibling(tmp_path / "y").name.replace(f"-{os.getpid()}-", "-1-")  # pid 1 is alive
    (tmp_path / init).write_text("")
    assert sweep_stale(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, init])
