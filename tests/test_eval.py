"""Tests for loraprune.eval against independent closed-form / manual references."""
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from loraprune.apps.toy_shakespeare import train_tokenizer
from loraprune.data.corpora import load_eval_text
from loraprune.eval import lm_eval_tasks, perplexity, tokens_per_second

VOCAB = 300


def tiny_llama(vocab=VOCAB, ctx=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=ctx,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # make the predictions sharp enough that mistakes would show
        model.lm_head.weight.mul_(5)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 30
    return train_tokenizer([text, "The slings and arrows of outrageous fortune. " * 30], vocab_size=VOCAB)


TEXTS = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "All the world's a stage, and all the men and women merely players. " * 3,
]


# --------------------------------------------------------------- closed form
def test_uniform_logits_give_vocab_size():
    """Zero logits = uniform prediction: perplexity is exactly the vocabulary size."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(0))
    for stride in (None, 7):
        assert perplexity(model, ids, window=32, stride=stride) == pytest.approx(VOCAB, rel=1e-6)


def test_duck_typed_model_with_constant_logits():
    class Const(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(v))
            self.config = SimpleNamespace(max_position_embeddings=16, vocab_size=v)

        def forward(self, input_ids, **kw):
            return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))

    m = Const(50)
    assert perplexity(m, torch.arange(200) % 50, window=None) == pytest.approx(50.0, rel=1e-6)


# ------------------------------------------------------------ manual NLL refs
def _manual_ppl(model, ids, window, stride):
    """Independent formulation: slide windows, score each token once, left to right."""
    nll, count, scored_until = 0.0, 0, 1  # position 0 is never predicted
    start = 0
    while start + window <= ids.numel():
        chunk = ids[start : start + window]
        with torch.no_grad():
            logits = model(input_ids=chunk[None]).logits[0].double()
        for pos in range(max(scored_until, start + 1), start + window):
            nll -= F.log_softmax(logits[pos - start - 1], -1)[chunk[pos - start]].item()
            count += 1
        scored_until = start + window
        start += stride
    return math.exp(nll / count), count


@pytest.mark.parametrize("window,stride", [(16, None), (16, 16), (16, 5), (20, 3), (13, 12)])
def test_matches_manual_nll(window, stride):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (103,), generator=torch.Generator().manual_seed(1))
    expected, count = _manual_ppl(model, ids, window, stride or window)
    got = perplexity(model, ids, window=window, stride=stride, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got > 1 and math.isfinite(got)
    if stride not in (None, window):  # sliding scores every token up to the last window's end once
        last_end = (ids.numel() - window) // stride * stride + window
        assert count == last_end - 1


def test_non_overlapping_is_mean_of_hf_losses():
    """stride=None equals the classic loop: exp(mean of per-window HF losses)."""
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (130,), generator=torch.Generator().manual_seed(2))
    windows = ids[:128].view(-1, 32)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert perplexity(model, ids, window=32) == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_batch_size_and_max_windows():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(3))
    a = perplexity(model, ids, window=32, batch_size=1)
    b = perplexity(model, ids, window=32, batch_size=64)
    assert a == pytest.approx(b, rel=1e-5)
    first2 = perplexity(model, ids[:64], window=32)
    assert perplexity(model, ids, window=32, max_windows=2) == pytest.approx(first2, rel=1e-6)
    # window=None = the model's full context (64 here)
    assert perplexity(model, ids, window=None) == pytest.approx(perplexity(model, ids, window=64), rel=1e-6)


# ------------------------------------------------------------------ inputs
def test_input_forms_agree(tok, tmp_path):
    model = tiny_llama()
    joined = "\n\n".join(TEXTS)
    paths = []
    for i, t in enumerate(TEXTS):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(p)
    ids = torch.tensor(tok(joined, add_special_tokens=False)["input_ids"])
    ref_ppl = perplexity(model, ids, window=16)

    import datasets

    forms = [TEXTS, joined, paths, [str(p) for p in paths], datasets.Dataset.from_dict({"text": TEXTS})]
    for form in forms:
        assert perplexity(model, form, tokenizer=tok, window=16) == pytest.approx(ref_ppl, rel=1e-6)
    single = tmp_path / "one.txt"
    single.write_text(joined, encoding="utf-8")
    assert perplexity(model, str(single), tokenizer=tok, window=16) == pytest.approx(ref_ppl, rel=1e-6)
    assert perplexity(model, ids.view(1, -1), window=16) == pytest.approx(ref_ppl, rel=1e-6)


def test_errors(tok):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"found \d+ tokens, need at least window=64"):
        perplexity(model, "too short", tokenizer=tok, window=64)
    with pytest.raises(ValueError, match=r"window=4096 exceeds the model's context.*window<=64"):  # as training
        perplexity(model, "too short", tokenizer=tok, window=4096)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, "some text", window=4)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, torch.arange(100), window=10, stride=11)


def test_mode_restored():
    model = tiny_llama()
    model.train()
    perplexity(model, torch.arange(100) % VOCAB, window=16)
    assert model.training
    model.eval()
    perplexity(model, torch.arange(100) % VOCAB, window=16)
    assert not model.training


# ---------------------------------------------------------------- throughput
def test_tokens_per_second_runs():
    model = tiny_llama()
    model.train()
    pre = tokens_per_second(model, batch_size=2, seq_len=16, mode="prefill", repeats=2)
    dec = tokens_per_second(model, mode="decode", new_tokens=4, repeats=2)
    assert pre > 0 and dec > 0 and math.isfinite(pre) and math.isfinite(dec)
    assert model.training
    with pytest.raises(ValueError, match="mode"):
        tokens_per_second(model, mode="train")


# ------------------------------------------------------------------ lm-eval
def test_lm_eval_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r"pip install loraprune\[eval\]"):
        lm_eval_tasks(tiny_llama(), None, ["boolq"])


# --------------------------------------------------------------- eval texts
def test_load_eval_text_local(eval_data_dir):
    DATA = eval_data_dir
    wt = load_eval_text("wikitext2", "test", data_dir=DATA)
    assert wt == (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    assert "<unk>" in wt
    assert load_eval_text("ptb", "valid", data_dir=DATA) == (DATA / "ptb" / "valid.txt").read_text(encoding="utf-8")
    sh = load_eval_text("shakespeare", data_dir=DATA)
    assert "HAMLET" in sh and "MACBETH" in sh.upper() and "TEMPEST" not in sh.upper()[:2000]
    assert load_eval_text(str(DATA / "ptb"), "test") == (DATA / "ptb" / "test.txt").read_text(encoding="utf-8")


def test_load_eval_text_hub_fallback(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [" = Title = \n", " body text \n"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    text = load_eval_text("wikitext2", "test", data_dir=tmp_path)  # no local copy there
    assert calls == [("wikitext", "wikitext-2-v1", "test")]
    assert text == " = Title = \n\n\n body text \n"

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="LORAPRUNE_DATA"):
        load_eval_text("ptb", "test", data_dir=tmp_path)


def test_load_eval_text_from_the_shipped_sample():
    """A fresh clone has no data folder: the held-out Shakespeare comes from the package's sample."""
    from loraprune.data.corpora import SAMPLE_DIR

    held = load_eval_text("shakespeare", "test", data_dir=SAMPLE_DIR)
    assert held.startswith("HAMLET") and "MACBETH" in held and "OTHELLO" not in held
    assert held == "\n\n".join((SAMPLE_DIR / "shakespeare" / f).read_text(encoding="utf-8")
                               for f in ("hamlet.txt", "macbeth.txt", "sonnets.txt", "twelfth_night.txt"))
    assert "OTHELLO" in load_eval_text("shakespeare", "train", data_dir=SAMPLE_DIR)
