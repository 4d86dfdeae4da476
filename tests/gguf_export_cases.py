"""Pruned tiny models and tokenizers for the GGUF export tests (fast ones and the llama.cpp ones)."""
import json

import torch

import loraprune
from loraprune.structure.masks import Masks
from tiny import tiny_model

TEXTS = [
    "the quick brown fox jumps over the lazy dog. ",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer 1234 slings. ",
    "Numbers 42 and 1999, punctuation!? and newlines\nare here too. ",
] * 8


def gpt2_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer), as loraprune.apps.toy_shakespeare trains it."""
    from loraprune.apps.toy_shakespeare import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=vocab_size, min_frequency=1)


def spm_tokenizer(vocab_size: int = 360):
    """A SentencePiece-style LLaMA tokenizer as transformers stores one: BPE with byte fallback, ``▁`` for spaces.

    ``<unk> <s> </s>`` are ids 0-2, the 256 ``<0xNN>`` byte tokens 3-258, then
    the learned pieces; encoding prepends ``<s>`` (as LLaMA-2's does).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    split = pre_tokenizers.Split("▁", behavior="merged_with_next")
    base = Tokenizer(models.BPE())
    base.normalizer, base.pre_tokenizer = norm, split
    base.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False))
    trained = json.loads(base.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{i:02X}>" for i in range(256)]
    pieces += [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in pieces]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer, tok.pre_tokenizer = norm, split
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def compacted(arch: str, attn: list, mlp: list, vocab_size: int, seed: int = 0, **cfg):
    """A tiny model of ``arch`` compacted to the given per-layer keep masks (lists of bools)."""
    n_layers = len(attn)
    model = tiny_model(arch, seed=seed, vocab_size=vocab_size, num_hidden_layers=n_layers,
                       intermediate_size=len(mlp[0]), **cfg)
    with torch.no_grad():  # larger weights than the init's, so that layout mistakes show in the logits
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.15)
    masks = Masks([torch.tensor(a) for a in attn], [torch.tensor(m) for m in mlp])
    return loraprune.compact(model, masks)


def channels(n: int, keep: int) -> list:
    return [i < keep for i in range(n)]


def per_layer_llama(vocab_size: int, arch: str = "llama", **cfg):
    """Per-layer widths with the hard cases: one KV group (of two) left, one MLP channel left, a full layer."""
    attn = [[False, True], [True, True], [True, False], [False, True]]
    mlp = [channels(48, 5), channels(48, 48), channels(48, 1), [i % 3 == 0 for i in range(48)]]
    return compacted(arch, attn, mlp, vocab_size, **cfg)


def uniform(arch: str, vocab_size: int, **cfg):
    attn = [[True, False, True, False] if arch == "llama-mha" else [True, False]] * 3
    mlp = [channels(48, 32)] * 3
    return compacted(arch, attn, mlp, vocab_size, **cfg)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor([ids])).logits[0]
