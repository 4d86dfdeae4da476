"""save_pruned over an existing model, interrupted at every step, leaves a loadable model at the path;
two saves into one new directory never both succeed (threads and processes).

The reference is the models themselves: after each interrupted or raced save the
path reloads (``load_pruned``) with exactly the logits of one of the two models.
"""
import multiprocessing
import os
import shutil
import threading
import warnings

import pytest
import torch

import loraprune
from loraprune.errors import OutputExistsError
from loraprune.structure.masks import Masks
from loraprune.utils import atomic as lp_io
from races import race, race_in_threads, report
from tiny import random_batches, tiny_model


def _pruned(seed: int):
    """A per-layer pruned tiny model; ``seed`` makes its weights (and logits) its own."""
    model = tiny_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    attn = [torch.tensor([True, False]), torch.tensor([False, True])]
    mlp = [torch.arange(48) < 30, torch.arange(48) >= 8]
    return loraprune.compact(model, Masks(attn, mlp))


X = random_batches(n=1)[0]["input_ids"]


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _which(path, refs) -> str:
    """Which of ``refs`` the directory at ``path`` reloads as (exact logits); fails if none."""
    got = _logits(loraprune.load_pruned(path))
    names = [name for name, ref in refs.items() if torch.equal(got, ref)]
    assert len(names) == 1, f"{path} reloads as neither model"
    return names[0]


class _Interrupt(BaseException):
    """Stands for Ctrl-C / a kill between two file-system steps (not an Exception: nothing may catch it)."""


def _steps_of_a_save(monkeypatch, arm_at: int | None, path, seen: list):
    """Wrap each file-system step of a swap; record whether ``path`` holds a model before each, and
    raise :class:`_Interrupt` instead of step number ``arm_at``."""
    count = [0]

    def wrap(fn):
        def step(*args, **kwargs):
            seen.append((path / "config.json").is_file())
            count[0] += 1
            if count[0] == arm_at:
                raise _Interrupt()
            return fn(*args, **kwargs)
        return step

    monkeypatch.setattr(lp_io.os, "rename", wrap(os.rename))
    monkeypatch.setattr(lp_io, "_exchange", wrap(lp_io._exchange))
    monkeypatch.setattr(lp_io.shutil, "rmtree", wrap(shutil.rmtree))
    return count


@pytest.mark.parametrize("swap", ["exchange", "two-renames"])
def test_a_save_over_a_model_interrupted_at_any_step_leaves_a_model_at_the_path(tmp_path, monkeypatch, swap):
    old, new = _pruned(1), _pruned(2)
    refs = {"old": _logits(old), "new": _logits(new)}
    out = tmp_path / "m"
    if swap == "two-renames":  # a platform without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(lp_io, "_exchange", lambda a, b: False)
    if swap == "exchange":
        probe = [tmp_path / "probe-a", tmp_path / "probe-b"]
        for d in probe:
            d.mkdir()
        if not lp_io._exchange(*probe):
            pytest.skip("this platform or file system cannot exchange two directories")
        for d in probe:
            d.rmdir()
    loraprune.save_pruned(old, out)

    with monkeypatch.context() as m:  # count the steps of one uninterrupted save
        steps = _steps_of_a_save(m, None, out, [])
        loraprune.save_pruned(new, out, overwrite=True)
    n_steps = steps[0]
    assert n_steps >= 2 and _which(out, refs) == "new"

    outcomes = set()
    for arm_at in range(1, n_steps + 1):
        shutil.rmtree(out)
        loraprune.save_pruned(old, out)
        seen: list = []
        with monkeypatch.context() as m:
            _steps_of_a_save(m, arm_at, out, seen)
            with pytest.raises(_Interrupt):
                loraprune.save_pruned(new, out, overwrite=True)
        if swap == "exchange":  # the path holds a model at every instant
            assert all(seen) and (out / "config.json").is_file(), (arm_at, seen)
        missing = not (out / "config.json").is_file()  # only between the two renames of the fallback
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcomes.add(_which(out, refs))  # the next load puts back a model a two-rename swap left aside
        assert missing == any("restored the copy it held before" in str(w.message) for w in caught), arm_at
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")]
        assert not leftovers, (arm_at, leftovers)  # no partial copy, no old copy left behind once loaded
    assert "old" in outcomes  # interrupted early, the old model stays


def test_the_next_save_recovers_a_model_left_in_its_old_folder_and_says_so(tmp_path):
    old, new = _pruned(1), _pruned(2)
    out = tmp_path / "m"
    loraprune.save_pruned(old, out)
    aside = tmp_path / ".m.abc123.old"  # what an interrupt between the two renames leaves
    aside.mkdir()
    os.rename(out, aside / "old")
    with pytest.warns(RuntimeWarning, match=r"m was missing after an interrupted save; restored"):
        with pytest.raises(OutputExistsError, match="pass overwrite=True"):  # the recovered model is not replaced
            loraprune.save_pruned(new, out)
    assert _which(out, {"old": _logits(old), "new": _logits(new)}) == "old" and not aside.exists()


def test_two_threads_saving_into_one_new_directory_do_not_both_succeed(tmp_path):
    a, b = _pruned(1), _pruned(2)
    refs = {"a": _logits(a), "b": _logits(b)}
    out = tmp_path / "shared"
    barrier = threading.Barrier(2)

    class WaitingTokenizer:  # both saves have written everything, neither has claimed the name yet
        def save_pretrained(self, directory):
            barrier.wait(timeout=60)

    results, winners = race_in_threads(
        {name: lambda m=m: loraprune.save_pruned(m, out, tokenizer=WaitingTokenizer()) for name, m in (("a", a), ("b", b))})
    assert len(results) == 2 and len(winners) == 1, results
    loser = next(r for n, r in results.items() if n not in winners)
    assert "filled by another save" in loser and "overwrite=True" in loser
    assert _which(out, refs) == winners[0]


def _save_in_process(seed, out, barrier, queue):
    class WaitingTokenizer:
        def save_pretrained(self, directory):
            barrier.wait(timeout=60)

    report(seed, queue, lambda: loraprune.save_pruned(_pruned(seed), out, tokenizer=WaitingTokenizer()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_saving_into_one_new_directory_do_not_both_succeed(tmp_path):
    out = tmp_path / "shared"
    results, winners = race(_save_in_process, out)
    assert len(winners) == 1, results
    assert _which(out, {1: _logits(_pruned(1)), 2: _logits(_pruned(2))}) == winners[0]
