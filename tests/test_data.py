"""Text plumbing (corpora, text_files, windows, batches): one home each, batches checked."""
import ast
import fnmatch
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

import loraprune
from loraprune.data.batches import make_batches
from loraprune.data.corpora import SAMPLE_DIR, load_eval_text, load_texts
from loraprune.data.windows import text_windows, token_stream
from loraprune.errors import DataError
from test_layout import package_modules
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_text_plumbing_has_one_home():
    """Each function of the text plumbing is defined in exactly one module of the package, and
    eval / reference import the plumbing instead of re-exporting it."""
    from loraprune import eval as E
    from loraprune.apps import toy_shakespeare as R

    defined: dict[str, list[str]] = {}
    for name, path in package_modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(name)
    homes = {"read_texts": "loraprune.data.text_files", "resolve_data_dir": "loraprune.data.corpora",
             "load_eval_text": "loraprune.data.corpora", "token_stream": "loraprune.data.windows",
             "cut_windows": "loraprune.data.windows", "make_batches": "loraprune.data.batches", "DataError": "loraprune.errors"}
    for name, home in homes.items():
        assert defined[name] == [home], (name, defined[name])
    assert not set(homes) & set(getattr(E, "__all__", ())) and not set(homes) & set(R.__all__)


# ------------------------------------------------------------------------- hub
def test_hub_name_convention_is_shared(monkeypatch):
    """``"name:config"`` (CLI) and ``config=`` (eval) both reach load_dataset(name, config, split=)."""
    import datasets

    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["one", "  ", "two"], "sentence": ["s1", "s2", "s3"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_texts("wikitext:wikitext-2-raw-v1") == ["one", "two"]
    assert load_eval_text("wikitext", "test", config="wikitext-2-raw-v1", data_dir=ROOT / "nowhere") == "one\n\n  \n\ntwo"
    assert load_eval_text("someone/corpus:cfg", "valid") == "one\n\n  \n\ntwo"
    assert load_eval_text("ptb", data_dir=ROOT / "nowhere") == "s1\n\ns2\n\ns3"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("wikitext", "wikitext-2-raw-v1", "test"),
                     ("someone/corpus", "cfg", "valid"), ("ptb_text_only", "penn_treebank", "test")]


def test_unreachable_hub_names_the_fix(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="neither a local file/folder nor a loadable hub dataset"):
        load_texts("no-such-corpus")
    with pytest.raises(FileNotFoundError, match=r"no local copy at .*nowhere.*LORAPRUNE_DATA"):
        load_eval_text("wikitext2", data_dir=ROOT / "nowhere")


# --------------------------------------------------------------------- batches
def test_list_of_batches_is_checked_before_the_first_draw():
    good = {"input_ids": torch.tensor([[1, 2, 3]])}
    bad = {"input_ids": torch.tensor([[1, 2, 99]])}
    with pytest.raises(DataError, match="batch 3: input_ids: token id 99"):
        make_batches([good, good, bad], tiny_config(vocab_size=97))  # no next(): refused up front


def test_checked_batches_cycle_and_derive_labels():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0]])
    it = make_batches([{"input_ids": ids, "attention_mask": mask}, {"input_ids": [9, 10]}], tiny_config())
    first, second, again = next(it), next(it), next(it)
    assert torch.equal(first["labels"], torch.tensor([[5, 6, 7, -100]]))  # padding is not trained on
    assert torch.equal(second["input_ids"], torch.tensor([[9, 10]])) and second["input_ids"].dtype == torch.long
    assert torch.equal(again["input_ids"], ids)
    # a boolean mask is a mask too
    b = next(make_batches([{"input_ids": ids, "attention_mask": mask.bool()}], tiny_config()))
    assert torch.equal(b["labels"], first["labels"])


def test_text_batches_are_the_token_stream(data_dir):
    from loraprune.apps.toy_shakespeare import train_tokenizer

    text = (data_dir / "shakespeare" / "sonnets.txt").read_text(encoding="utf-8")[:6000]
    tok = train_tokenizer([text], vocab_size=300)
    rows = text_windows(tok, [text], 32)
    assert torch.equal(rows.flatten(), token_stream(tok, text)[: rows.numel()])
    batch = next(make_batches([text], tiny_config(vocab_size=300), tok, seq_len=32, batch_size=4))
    assert batch["input_ids"].shape == (4, 32)
    assert all(any(torch.equal(r, w) for w in rows) for r in batch["input_ids"])  # whole windows, shuffled


# --------------------------------------------------------------------- package
def test_sample_text_is_declared_package_data():
    """Every shipped sample file matches a package-data pattern of pyproject.toml, so wheels carry it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = meta["tool"]["setuptools"]["package-data"]["loraprune.data"]
    files = [p.relative_to(SAMPLE_DIR.parent).as_posix() for p in SAMPLE_DIR.rglob("*") if p.is_file()]
    assert len(files) >= 10 and "samples/README.md" in files
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
    assert meta["project"]["dynamic"] == ["version"] or meta["project"].get("version") == loraprune.__version__


@pytest.mark.slow
def test_public_surface_is_small_and_lazy():
    import subprocess
    import sys

    assert 10 <= len(loraprune.__all__) <= 16
    for name in loraprune.__all__:
        getattr(loraprune, name)  # every exported name resolves (raises AttributeError otherwise)
    heavy = "print('loraprune.run.callback' in sys.modules, 'transformers.trainer_callback' in sys.modules)"
    code = f"import sys, loraprune; {heavy}; loraprune.LoRAPruneCallback; {heavy}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True", "True"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        loraprune.nope  # noqa: B018
    assert importlib.import_module("loraprune.run.callback").LoRAPruneCallback is loraprune.LoRAPruneCallback
