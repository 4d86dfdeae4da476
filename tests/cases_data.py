"""Bad data: every input a user can get wrong is refused with the cause and the fix.

Batches are checked when :func:`loraprune.data.batches.make_batches` is called (lists,
text, datasets) or as they are drawn (iterators), so each call draws one batch.
"""
import functools
import json

import torch

from bad_input_table import Case
from loraprune.data.batches import make_batches
from loraprune.data.text_files import read_texts
from loraprune.eval import perplexity
from tiny import tiny_config, tiny_model

VOCAB = 512  # room for the test tokenizer (byte-level BPE has at least 259 tokens)


@functools.cache
def _tokenizer(vocab_size=300):
    from loraprune.apps.toy_shakespeare import train_tokenizer

    return train_tokenizer(["To be, or not to be, that is the question. " * 20], vocab_size=vocab_size)


def _draw(data, vocab=VOCAB, tokenizer=None, seq_len=16):
    """One batch of ``data`` for a model with ``vocab`` tokens and a 64-token context."""
    return lambda tmp_path: next(make_batches(data(tmp_path) if callable(data) else data, tiny_config(vocab_size=vocab),
                                              tokenizer, seq_len=seq_len))


def _ids(*rows, **extra):
    return [{"input_ids": torch.tensor(rows), **extra}]


def _file(name, content: bytes):
    def write(tmp_path):
        (tmp_path / name).write_bytes(content)
        return [tmp_path / name]
    return write


def _ppl(source, tokenizer=None, vocab=VOCAB, window=16):
    return lambda tmp_path: perplexity(tiny_model(vocab_size=vocab), source(tmp_path) if callable(source) else source,
                                       tokenizer=tokenizer() if tokenizer else None, window=window)


def _datasets():
    import datasets

    return datasets


def _generator(*batches):
    return lambda tmp_path: (b for b in batches)


_WRONG_TOKENIZER = r"is outside the model's vocabulary.*different tokenizer.*model's own tokenizer"
_NOTHING_TRAINED = r"no token is trained on"

CASES = [
    # -- token ids: a mismatched tokenizer, float ids, nothing to learn from
    Case("data-ids-above-vocab", _draw(_ids([1, 300]), vocab=256), r"token id 300 " + _WRONG_TOKENIZER),
    Case("data-ids-negative", _draw(_ids([-1, 5])), r"token id -1 " + _WRONG_TOKENIZER),
    Case("data-labels-above-vocab", _draw(_ids([1, 2, 3], labels=torch.tensor([[1, 900, -100]]))),
         r"labels: token id 900 " + _WRONG_TOKENIZER),
    Case("data-ids-float", _draw([{"input_ids": torch.rand(2, 8)}]), r"input_ids must hold integer token ids.*tokenize"),
    Case("data-ids-float-list", _draw([{"input_ids": [[0.5, 1.5, 2.5]]}]), r"integer token ids, got torch.float"),
    Case("data-labels-all-ignored", _draw(_ids([1, 2, 3], labels=torch.full((1, 3), -100))), _NOTHING_TRAINED),
    Case("data-mask-all-zero", _draw(_ids([1, 2, 3], attention_mask=torch.zeros(1, 3, dtype=torch.long))),
         _NOTHING_TRAINED),
    Case("data-one-token-sequences", _draw(_ids([7], [8])), _NOTHING_TRAINED + r".*sequences of one token"),
    Case("data-mask-not-binary", _draw(_ids([1, 2, 3], attention_mask=torch.full((1, 3), 2))), r"only 0 and 1"),
    Case("data-drawn-batch-out-of-vocab", _draw(_generator({"input_ids": torch.tensor([[3, 4000]])})),
         r"batch 1: input_ids: token id 4000 " + _WRONG_TOKENIZER),
    Case("data-iterator-exhausted", lambda p: [next(it) for it in [make_batches(iter(_ids([1, 2])), tiny_config())]
                                               for _ in range(2)],
         r"cannot be re-iterated; pass a list"),
    Case("data-tokenizer-larger-than-model", _draw(["some text " * 50], vocab=97, tokenizer=_tokenizer()),
         r"tokenizer has \d+ tokens but the model's embedding has 97 rows.*AutoTokenizer.from_pretrained"),
    # -- text: too short, unreadable, missing, empty, wrong shape
    Case("data-text-too-short", _draw(["a few words"], tokenizer=_tokenizer(), seq_len=64),
         r"text too short: found \d+ tokens, need at least window=64.*smaller seq_len"),
    Case("data-text-without-tokenizer", _draw(["some text"]), r"needs a tokenizer: pass tokenizer="),
    Case("data-non-utf8-file", _draw(_file("latin1.txt", "café crème".encode("latin-1")), tokenizer=_tokenizer()),
         r"latin1.txt is not UTF-8 text.*re-save it as UTF-8"),
    Case("data-empty-folder", _draw(lambda p: [p], tokenizer=_tokenizer()), r"holds no .txt/.jsonl/.json files"),
    Case("data-jsonl-without-text-field",
         _draw(_file("a.jsonl", json.dumps({"body": "hello"}).encode()), tokenizer=_tokenizer()),
         r"a.jsonl:1: expected a JSON string or an object with a 'text' field, found \['body'\]"),
    Case("data-jsonl-not-json", _draw(_file("b.jsonl", b"{not json\n"), tokenizer=_tokenizer()),
         r"b.jsonl:1 is not valid JSON"),
    Case("data-missing-path", _draw(lambda p: p / "nope", tokenizer=_tokenizer()), r"no such file or folder: .*nope"),
    Case("data-missing-file-name", _draw(["corpus/train.txt"], tokenizer=_tokenizer()),
         r"no such file or folder: corpus/train.txt"),
    Case("data-empty-list", _draw([]), r"the data is empty: pass at least one batch or one text"),
    Case("data-blank-text", _draw(["   \n"], tokenizer=_tokenizer()), r"the text data is empty"),
    Case("data-dataset-without-text-column",
         _draw(lambda p: _datasets().Dataset.from_dict({"body": ["a", "b"]}), tokenizer=_tokenizer()),
         r"the dataset has no 'text' column \(columns: \['body'\]\); select or rename"),
    Case("data-int", _draw(5), r"unsupported data of type int: pass a list of batches"),
    Case("data-none", _draw(None), r"data is required"),
    Case("data-single-batch-dict", _draw({"input_ids": torch.tensor([[1, 2]])}),
         r"single batch \(a dict\); pass a list of batches: \[batch\]"),
    Case("data-list-of-ints", lambda p: read_texts(["fine text", 3]), r"expected strings or paths in the list, got int"),
    # -- perplexity on bad text
    Case("eval-text-too-short", _ppl("To be.", _tokenizer, window=64),
         r"text too short: found \d+ tokens, need at least window=64"),
    Case("eval-empty-text", _ppl([], _tokenizer), r"the text is empty"),
    Case("eval-float-ids", _ppl(torch.rand(100)), r"integer tensor \(LongTensor\), got torch.float32"),
    Case("eval-ids-above-vocab", _ppl(torch.arange(200), vocab=97), r"token id 199 " + _WRONG_TOKENIZER),
    Case("eval-tokenizer-larger-than-model", _ppl("To be, or not to be. " * 20, _tokenizer, vocab=97),
         r"tokenizer has \d+ tokens but the model's embedding has 97 rows"),
    Case("eval-non-utf8-file", _ppl(_file("x.txt", b"\xff\xfe bad"), _tokenizer), r"x.txt is not UTF-8 text"),
    Case("eval-text-without-tokenizer", _ppl("some text"), r"text needs a tokenizer"),
]


# ---- issue 20: text records that are not text; datasets that are not one split; advice ---------------
def _jsonl(*lines):
    return _file("d.jsonl", "\n".join(json.dumps(x) for x in lines).encode())


def _text_dataset(values):
    return lambda tmp_path: _datasets().Dataset.from_dict({"text": values})


_NOT_TEXT = r"expected text \(a string\), found"

CASES += [
    Case("data-jsonl-text-null", _draw(_jsonl({"text": "fine"}, {"text": None}), tokenizer=_tokenizer()),
         _NOT_TEXT + r" null"),
    Case("data-jsonl-text-object", _draw(_jsonl({"text": {"body": "x"}}), tokenizer=_tokenizer()), _NOT_TEXT + r" dict"),
    Case("data-jsonl-text-number", _draw(_jsonl({"text": 42}), tokenizer=_tokenizer()), _NOT_TEXT + r" int"),
    Case("data-jsonl-text-list", _draw(_jsonl({"text": ["a", "b"]}), tokenizer=_tokenizer()), _NOT_TEXT + r" list"),
    Case("data-jsonl-names-line", _draw(_jsonl({"text": "ok"}, {"text": None}), tokenizer=_tokenizer()),
         r"d\.jsonl:2, field 'text'"),
    Case("data-nul-bytes-file", _draw(_file("zeros.txt", b"\0" * 4096), tokenizer=_tokenizer()),
         r"holds NUL bytes: it is binary data, not text"),
    Case("data-binary-with-nul", _draw(_file("weights.txt", b"PK\x03\x04\0\0abc" * 100), tokenizer=_tokenizer()),
         r"binary data, not text"),
    Case("data-string-with-nul", _draw(["text\0with a NUL " * 20], tokenizer=_tokenizer()), r"holds NUL bytes"),
    Case("data-read-texts-nul", lambda p: read_texts(_file("z.txt", b"a\0b")(p)), r"holds NUL bytes"),
    Case("data-dataset-text-none", _draw(_text_dataset(["a text", None]), tokenizer=_tokenizer()),
         r"row 1 of the dataset's 'text' column: expected text \(a string\), found null"),
    Case("data-dataset-text-numbers", _draw(_text_dataset([1, 2]), tokenizer=_tokenizer()), _NOT_TEXT + r" int"),
    Case("data-dataset-dict", _draw(lambda p: _datasets().DatasetDict({"train": _text_dataset(["a"])(p),
                                                                        "test": _text_dataset(["b"])(p)}),
                                    tokenizer=_tokenizer()),
         r"DatasetDict with splits \['train', 'test'\]; pass one split, e.g\. ds\['train'\]"),
    Case("data-streaming-text", _draw(lambda p: _text_dataset(["a b c"] * 8)(p).to_iterable_dataset(),
                                      tokenizer=_tokenizer()), r"streaming datasets\.IterableDataset.*ds\.take\(N\)"),
    Case("data-streaming-tokenized", _draw(lambda p: _datasets().Dataset.from_dict(
        {"input_ids": [[1, 2, 3]] * 4}).to_iterable_dataset()), r"streaming datasets\.IterableDataset"),
    Case("data-tokenizer-is-a-path", _draw(["some text " * 20], tokenizer="path/to/tok"),
         r"tokenizer must be a tokenizer object.*AutoTokenizer\.from_pretrained\('path/to/tok'\)", raises=TypeError),
    Case("data-perplexity-tokenizer-is-a-name", _ppl(["some text " * 30], tokenizer=lambda: "gpt2"),
         r"tokenizer must be a tokenizer object.*AutoTokenizer\.from_pretrained\('gpt2'\)", raises=TypeError),
    # right error, right advice: labels padded with -1 are padding, not another tokenizer
    Case("data-labels-padded-minus-one", _draw(_ids([5, 6, 7, 8], labels=torch.tensor([[5, 6, -1, -1]]))),
         r"value -1 is neither a token id nor the ignore index -100.*labels\[labels == -1\] = -100"),
    Case("data-labels-padded-minus-two", _draw(_ids([5, 6, 7, 8], labels=torch.tensor([[5, -2, 7, 8]]))),
         r"padding in labels must be -100"),
]
