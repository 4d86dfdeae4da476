"""Every input a user can get wrong gets a clear error naming the fix.

One table, assembled from ``tests/cases_*.py`` (each area keeps its own cases
beside the code it checks); see ``tests/bad_input_table.py`` for the shape.
"""
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

from bad_input_table import Case

_HERE = Path(__file__).parent


def _all_cases() -> list[Case]:
    cases = []
    for info in sorted(pkgutil.iter_modules([str(_HERE)]), key=lambda i: i.name):
        if info.name.startswith("cases_"):
            cases += importlib.import_module(info.name).CASES
    return cases


CASES = _all_cases()


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_the_fix(case: Case, tmp_path):
    with pytest.raises(case.raises) as info:
        case.call(tmp_path)
    assert re.search(case.match, str(info.value), re.IGNORECASE), f"message was: {info.value}"


# ---- accepted, and made plain: numbers from numpy (issue 20) --------------------------------------
def test_numpy_options_become_python_values_everywhere_they_are_written(tmp_path):
    """np.float32 / np.int64 options are normalised once, in PruneConfig: the config, the checkpoint
    metadata, config.json and the report hold plain Python values that the json module writes and reads back."""
    import json

    import numpy as np

    import loraprune
    from loraprune.config import PruneConfig
    from tiny import random_batches, tiny_model

    cfg = PruneConfig(ratio=np.float32(0.3), steps=np.int64(3), lr=np.float64(1e-3), seed=np.int32(1),
                      prune_end=np.float32(0.5), skip_layers=np.array([0]), square=np.bool_(True))
    assert (cfg.ratio, cfg.steps, cfg.lr, cfg.seed, cfg.prune_end, cfg.skip_layers, cfg.square) == \
        (0.3, 3, 1e-3, 1, 0.5, [0], True)
    assert {type(v) for v in (cfg.ratio, cfg.lr, cfg.prune_end)} == {float}
    assert {type(v) for v in (cfg.steps, cfg.seed, *cfg.skip_layers)} == {int} and type(cfg.square) is bool
    assert PruneConfig.from_kwargs(np.float32(0.3)).ratio == 0.3  # prune(model, data, np.float32(0.3))

    model = loraprune.prune(tiny_model(), random_batches(n=2), np.float32(0.4), steps=np.int64(2),
                            checkpoint_dir=tmp_path / "ck", checkpoint_every=np.int64(1), progress=False)
    out = loraprune.save_pruned(model, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())["loraprune"]
    assert saved["settings"]["ratio"] == 0.4 and saved["steps"] == 2
    metas = list((tmp_path / "ck").rglob("meta.json"))
    assert metas and all(json.loads(m.read_text()) for m in metas)
    one_shot = loraprune.oneshot_prune(tiny_model(), random_batches(n=2), ratio=np.float32(0.3),
                                       calib_batches=np.int64(2), seq_len=np.int64(16))
    assert json.loads(json.dumps(one_shot.config.loraprune))["settings"]["ratio"] == 0.3
    torch = __import__("torch")
    x = random_batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loraprune.load_pruned(out)(x).logits, model(x).logits, rtol=0, atol=0)


def test_a_pruner_without_a_schedule_warns_once_that_pruning_waits_for_finalize():
    import warnings

    import loraprune
    from tiny import tiny_model

    pruner = loraprune.LoRAPruner(tiny_model(), ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.step_end(1)
        pruner.step_end(2)
    texts = [str(w.message) for w in caught if "no schedule" in str(w.message)]
    assert len(texts) == 1 and "all pruning happens in finalize()" in texts[0]
    full = pruner.state.masks
    assert full.kept_kv() == [lg.n_kv for lg in pruner.layers]  # nothing pruned during training, as warned


def test_restore_after_finalize_leaves_the_pruned_model_alone():
    import loraprune
    from tiny import tiny_model

    pruner = loraprune.LoRAPruner(tiny_model(), ratio=0.5)
    small = pruner.finalize()
    before = {k: v.clone() for k, v in small.state_dict().items()}
    config = small.config.to_dict()
    pruner.restore()  # e.g. an error after finalize() inside prune(): nothing can be put back
    assert small.config.to_dict() == config
    assert all(torch_equal(before[k], v) for k, v in small.state_dict().items())


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


# ---- the CLI: file-system problems are one line, exit 2, before the model is loaded -------------------
@pytest.mark.parametrize("where", ["output-is-a-file", "output-under-a-file", "read-only"])
def test_cli_refuses_an_unwritable_output_before_loading_anything(where, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from loraprune.apps import cli_prune
    from loraprune.apps.cli import main

    (tmp_path / "data.txt").write_text("some text " * 50)
    (tmp_path / "model").mkdir()  # exists: the output check, not the model check, is what must refuse
    (tmp_path / "f").write_text("a file")
    out = {"output-is-a-file": tmp_path / "f", "output-under-a-file": tmp_path / "f" / "out",
           "read-only": tmp_path / "out"}[where]
    if where == "read-only":  # root ignores permission bits: make the probe meet a read-only mount instead
        def read_only(*a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr("tempfile.mkstemp", read_only)

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(cli_prune, "load_model_and_tokenizer", loaded)
    code = main(["prune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"), "--output",
                 str(out), "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    expected = {"output-is-a-file": "is not a directory", "output-under-a-file": f"{tmp_path / 'f'} is a file",
                "read-only": "the file system is read-only"}[where]
    assert code == 2 and "\n" not in err and err.startswith("loraprune: error:") and expected in err, err
