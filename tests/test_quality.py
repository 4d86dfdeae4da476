"""Sanity check that the scores mean something: on a model that has learned
real text, pruning 50% by the LoRA criterion beats pruning at random."""
import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loraprune
from loraprune.apps.toy_shakespeare import train_tokenizer
from loraprune.data.corpora import load_texts, shakespeare_split
from loraprune.data.windows import text_windows
from loraprune.eval import perplexity

pytestmark = pytest.mark.slow  # trains, spawns subprocesses or compiles


@pytest.fixture(scope="module")
def learned_model():
    train, heldout = shakespeare_split()  # ../shared/data ships beside the repository
    files = [p for p in train if p.name in ("othello.txt", "lear.txt", "julius_caesar.txt")]
    tok = train_tokenizer(files, vocab_size=384)
    rows = text_windows(tok, files, 64)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        batch = rows[torch.randint(0, rows.shape[0], (16,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    held = [t[:20000] for t in load_texts([p for p in heldout if p.name == "hamlet.txt"])]
    calib = [{"input_ids": rows[i:i + 8]} for i in range(0, 160, 8)]
    return model, tok, held, calib


def _pruned_ppl(learned, criterion):
    model, tok, held, calib = learned
    # the criterion alone decides (layer-wise ranking, LM loss): the test is about the scores
    pruned = loraprune.prune(copy.deepcopy(model), calib, ratio=0.5, steps=30, lr=1e-3, criterion=criterion,
                             ranking="layer", distill=0.0, seed=0, progress=False)
    return perplexity(pruned, held, tokenizer=tok, window=64)


def test_lora_criterion_beats_random_at_half(learned_model):
    model, tok, held, _ = learned_model
    dense = perplexity(model, held, tokenizer=tok, window=64)
    lora = _pruned_ppl(learned_model, "lora")
    rand = _pruned_ppl(learned_model, "random")
    print(f"dense {dense:.2f}  lora {lora:.2f}  random {rand:.2f}")
    assert dense < lora  # pruning half the projections costs something...
    # ...but clearly less when the LoRA scores choose what goes: at most 3/4 of
    # random pruning's excess loss (measured here: about 0.6)
    assert math.log(lora / dense) < 0.75 * math.log(rand / dense)
