"""Tests for loraprune.apps.toy_shakespeare: data split, tokenizer, tiny deterministic training, cache."""
import json

import pytest
import torch

from loraprune.apps import toy_shakespeare as ref
from loraprune.apps.toy_shakespeare import (
    PRESETS,
    TrainSettings,
    load_or_train_reference,
    reference_cache_dir,
    reference_config,
    train_tokenizer,
)
from loraprune.data import corpora
from loraprune.data.corpora import HELDOUT_FILES, SAMPLE_DIR, resolve_data_dir, shakespeare_split
from loraprune.data.windows import text_windows, token_stream

TINY = TrainSettings(
    vocab_size=384,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    seq_len=32,
    batch_size=4,
    steps=30,
    lr=3e-3,
)


@pytest.fixture
def tiny_data(tmp_path, data_dir):
    """A miniature copy of the Shakespeare folder (same file names, first 15 kB of each)."""
    src_train, src_held = shakespeare_split(data_dir)
    dst = tmp_path / "data" / "shakespeare"
    dst.mkdir(parents=True)
    for p in src_train[:4] + src_held:
        (dst / p.name).write_text(p.read_text(encoding="utf-8")[:15_000], encoding="utf-8")
    return tmp_path / "data"


# ------------------------------------------------------------------------- data
@pytest.mark.parametrize("folder", ["shared", "sample"])
def test_split_matches_readme(folder, data_dir):
    root = SAMPLE_DIR if folder == "sample" else data_dir
    train, held = shakespeare_split(root)
    assert sorted(p.name for p in held) == sorted(HELDOUT_FILES)
    assert set(HELDOUT_FILES) == {"hamlet.txt", "macbeth.txt", "twelfth_night.txt", "sonnets.txt"}
    all_files = {p.name for p in (root / "shakespeare").glob("*.txt")}
    assert {p.name for p in train} == all_files - set(HELDOUT_FILES)
    assert len(train) == len(all_files) - 4 and len(train) >= (5 if root == SAMPLE_DIR else 30)
    assert [p.name for p in train] == sorted(p.name for p in train)


def test_sample_is_small_real_text():
    """The shipped sample: a few hundred KB of the same works as the full corpus, opening lines intact."""
    files = sorted((SAMPLE_DIR / "shakespeare").glob("*.txt"))
    assert 150_000 < sum(p.stat().st_size for p in files) < 300_000
    assert (SAMPLE_DIR / "README.md").read_text(encoding="utf-8").count("public domain")
    assert (SAMPLE_DIR / "shakespeare" / "hamlet.txt").read_text(encoding="utf-8").startswith("HAMLET")


def test_split_missing_folder_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="LORAPRUNE_DATA"):
        shakespeare_split(tmp_path)


def test_data_dir_resolution(tmp_path, monkeypatch):
    """explicit > $LORAPRUNE_DATA > ../shared/data beside the repository > the shipped sample."""
    monkeypatch.delenv("LORAPRUNE_DATA", raising=False)
    (tmp_path / "proj").mkdir()
    beside = [tmp_path / "proj" / ".." / "shared" / "data", tmp_path / "checkout" / "shared" / "data"]
    monkeypatch.setattr(corpora, "_beside_repository", lambda: beside)
    assert resolve_data_dir() == SAMPLE_DIR  # nothing beside the repository: a fresh clone
    assert shakespeare_split()[1][0].parent == SAMPLE_DIR / "shakespeare"
    beside[1].mkdir(parents=True)
    assert resolve_data_dir() == beside[1]
    beside[0].mkdir(parents=True)
    assert resolve_data_dir() == (tmp_path / "shared" / "data")
    monkeypatch.setenv("LORAPRUNE_DATA", str(tmp_path / "elsewhere"))
    assert resolve_data_dir() == tmp_path / "elsewhere"
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"


# -------------------------------------------------------------------- tokenizer
def test_tokenizer_deterministic_and_special_tokens(data_dir):
    train, _ = shakespeare_split(data_dir)
    texts = [p.read_text(encoding="utf-8")[:40_000] for p in train[:5]]
    a = train_tokenizer(texts, vocab_size=600)
    b = train_tokenizer(texts, vocab_size=600)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) == 600
    sample = "To be, or not to be: that is the question.\n\nExeunt."
    assert a(sample)["input_ids"] == b(sample)["input_ids"]
    assert a.decode(a(sample)["input_ids"]) == sample  # byte-level: lossless
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (0, 1, 2)
    assert a(sample)["input_ids"][0] not in (0, 1, 2)  # no automatic specials


def test_text_windows_cut_the_stream():
    tok = train_tokenizer(["hello world " * 50, "to be or not to be " * 50], vocab_size=300)
    texts = ["hello world " * 20, "to be or not to be " * 20]
    stream = token_stream(tok, texts)
    win = text_windows(tok, texts, 16)
    assert win.dtype == torch.long and win.shape == (stream.numel() // 16, 16)
    assert torch.equal(win.flatten(), stream[: win.numel()])
    with pytest.raises(ValueError, match="need at least window=100000"):
        text_windows(tok, texts, 100_000)


# ------------------------------------------------------------------------ model
def test_reference_config_gqa_and_size():
    from transformers import LlamaForCausalLM

    cfg = reference_config()
    assert cfg.num_attention_heads == 8 and cfg.num_key_value_heads in (2, 4)
    assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in LlamaForCausalLM(preset.config()).parameters())
        assert (3e6 if name == "default" else 1e6) <= n <= (10e6 if name == "default" else 40e6), (name, n)
    with pytest.raises(ValueError, match="multiple"):
        reference_config(num_attention_heads=8, num_key_value_heads=3)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_tiny_training_deterministic_loss_decreases(tiny_data, tmp_path):
    m1, tok1 = load_or_train_reference(cache_dir=tmp_path / "c1", data_dir=tiny_data, preset=TINY, progress=False)
    m2, tok2 = load_or_train_reference(cache_dir=tmp_path / "c2", data_dir=tiny_data, preset=TINY, progress=False)
    w1, w2 = _weights(m1), _weights(m2)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert tok1.get_vocab() == tok2.get_vocab()
    d1 = reference_cache_dir(tmp_path / "c1", preset=TINY, data_dir=tiny_data)
    stats = json.loads((d1 / ref.STATS_FILE).read_text())
    assert stats["final_train_loss"] < stats["first_train_loss"] - 0.3
    assert stats["heldout_perplexity"] < TINY.vocab_size  # learned something beyond uniform
    assert stats["tokens_seen"] == TINY.steps * TINY.batch_size * TINY.seq_len
    for key in ("train_wall_time_s", "heldout_bits_per_byte", "num_parameters"):
        assert key in stats
    # safetensors only, never pickle
    files = {p.name for p in d1.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    cfg = m1.config
    assert cfg.num_key_value_heads == 2 and cfg.num_attention_heads == 4

    # a different seed gives a different cache entry and different weights
    m3, _ = load_or_train_reference(cache_dir=tmp_path / "c1", data_dir=tiny_data, preset=TINY, seed=1, progress=False)
    assert len([p for p in (tmp_path / "c1").iterdir()]) == 2
    assert not torch.equal(_weights(m3)["model.embed_tokens.weight"], w1["model.embed_tokens.weight"])


@pytest.mark.slow
def test_cache_is_reused(tiny_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    m1, _ = load_or_train_reference(cache_dir=cache, data_dir=tiny_data, preset=TINY, progress=False)
    d = reference_cache_dir(cache, preset=TINY, data_dir=tiny_data)
    before = (d / ref.STATS_FILE).read_bytes()

    def boom(*a, **k):
        raise AssertionError("retrained although the cache exists")

    monkeypatch.setattr(ref, "train_reference", boom)
    m2, tok = load_or_train_reference(cache_dir=cache, data_dir=tiny_data, preset=TINY, progress=False)
    assert (d / ref.STATS_FILE).read_bytes() == before
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert not m2.training
    # LORAPRUNE_CACHE selects the root when cache_dir is not given
    monkeypatch.setenv("LORAPRUNE_CACHE", str(tmp_path / "envroot"))
    assert reference_cache_dir(preset=TINY, data_dir=tiny_data).parent == tmp_path / "envroot" / "reference"
    # steps are part of the key
    assert reference_cache_dir(cache, preset=TINY, steps=31, data_dir=tiny_data) != d


@pytest.mark.slow
def test_atomic_write_on_failure(tiny_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def fail(settings, train_ids, seed=0, progress=True):
        raise RuntimeError("simulated crash mid-training")

    monkeypatch.setattr(ref, "train_reference", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        load_or_train_reference(cache_dir=cache, data_dir=tiny_data, preset=TINY, progress=False)
    assert list(cache.iterdir()) == []  # neither a final dir nor a leftover temp dir

    # crash after some files were already written: still nothing that looks like a cache
    real_build = ref._build

    def half_written(tmp, *a, **k):
        real_build(tmp, *a, **k)
        (tmp / ref.STATS_FILE).unlink()
        raise KeyboardInterrupt

    monkeypatch.undo()  # real training again
    monkeypatch.setattr(ref, "_build", half_written)
    with pytest.raises(KeyboardInterrupt):
        load_or_train_reference(cache_dir=cache, data_dir=tiny_data, preset=TINY, progress=False)
    assert list(cache.iterdir()) == []


@pytest.mark.slow
def test_stale_temp_dir_from_killed_run_is_ignored(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    final = reference_cache_dir(cache, preset=TINY, data_dir=tiny_data)
    cache.mkdir()
    # a dead pid (pid_max is far below this on Linux) and a half-written model file
    stale = cache / f".tmp-{final.name}-999999999-abc"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    model, tok = load_or_train_reference(cache_dir=cache, data_dir=tiny_data, preset=TINY, progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in cache.iterdir()) == [final.name]
    assert model.config.vocab_size == TINY.vocab_size == len(tok)
