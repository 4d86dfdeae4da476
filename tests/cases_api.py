"""Bad calls of prune(), LoRAPruner and the callback: refused with the fix, model untouched
(``tests/test_prune_guarantees.py`` checks the model after each)."""
import torch

import loraprune
from bad_input_table import Case
from tiny import random_batches, tiny_model


def _prune(model=None, data=None, **kw):
    kw.setdefault("steps", 2)
    kw.setdefault("progress", False)
    return lambda tmp_path: loraprune.prune(tiny_model() if model is None else model(),
                                            random_batches(n=2) if data is None else data, **kw)


def _meta_tiny():
    import transformers

    from tiny import tiny_config

    with torch.device("meta"):
        return transformers.LlamaForCausalLM(tiny_config())


def _no_signal():
    b = random_batches(n=1)[0]
    return [{"input_ids": b["input_ids"], "labels": torch.full_like(b["input_ids"], -100)}]


def _masked_out():
    b = random_batches(n=1)[0]
    return [{"input_ids": b["input_ids"], "attention_mask": torch.zeros_like(b["input_ids"])}]


def _callback_with(obj):
    from loraprune.run.callback import LoRAPruneCallback

    return lambda tmp_path: LoRAPruneCallback(obj)


CASES = [
    Case("api-ratio-unreachable", _prune(ratio=0.99), r"cannot be reached.*at most 0\.\d+"),
    Case("api-round-to-wider-than-mlp", _prune(round_to=1024, ranking="layer"), r"round_to=1024 is larger than the MLP width"),
    Case("api-lora-rank-above-layer", _prune(lora_r=64), r"lora_r=64 is larger than the smallest projection"),
    Case("api-meta-device-model", _prune(model=_meta_tiny), r"meta device.*load its weights"),
    Case("api-labels-all-ignored", _prune(data=_no_signal()), r"no token (is )?trained on|no token to train on"),
    Case("api-attention-mask-all-zero", _prune(data=_masked_out()), r"no token (is )?trained on|no token to train on"),
    Case("api-not-a-model", lambda p: loraprune.prune(torch.nn.Linear(4, 4), random_batches(n=1)), r"transformers",
         raises=TypeError),
    Case("api-unknown-option", _prune(ratoi=0.3), r"did you mean 'ratio'"),
    Case("api-criterion-typo", _prune(criterion="fischer"), r"criterion must be one of"),
    Case("api-config-not-a-config", lambda p: loraprune.prune(tiny_model(), random_batches(n=1), {"ratio": 0.3}),
         r"must be a loraprune.PruneConfig", raises=TypeError),
    Case("api-pruner-bad-ratio", lambda p: loraprune.LoRAPruner(tiny_model(), ratio=1.5), r"ratio must be < 1"),
    Case("api-pruner-uniform-global", lambda p: loraprune.LoRAPruner(tiny_model(), uniform=True, ranking="global"),
         r"uniform=True needs every layer"),
    Case("api-callback-without-pruner", _callback_with(tiny_model()), r"needs a loraprune.LoRAPruner",
         raises=TypeError),
    Case("api-skip-every-layer", _prune(skip_layers=[0, 1]), r"every layer is skipped"),
    Case("api-skip-layer-out-of-range", _prune(skip_layers=[5]), r"out of range"),
]


# ---- issue 20: wrong types, contradictions, engine misuse, compiled models ----------------------------
def _finalized_twice(tmp_path):
    pruner = loraprune.LoRAPruner(tiny_model(), ratio=0.5)
    pruner.finalize()
    return pruner.finalize()


def _callback_schedule_ignored(tmp_path):
    from loraprune.run.callback import LoRAPruneCallback

    pruner = loraprune.LoRAPruner(tiny_model(), ratio=0.5, schedule=loraprune.CubicSchedule(1, 3, 1))
    return LoRAPruneCallback(pruner, prune_end=0.5)


def _a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    return tmp_path / "f"


def _datasets():
    import datasets

    return datasets


CASES += [
    # wrong types
    Case("api-skip-layers-int", _prune(skip_layers=1), r"skip_layers must be None, 'paper' or a list"),
    Case("api-tokenizer-is-a-name", lambda p: loraprune.prune(tiny_model(), ["some text"], tokenizer="gpt2"),
         r"tokenizer must be a tokenizer object.*AutoTokenizer\.from_pretrained\('gpt2'\)", raises=TypeError),
    Case("api-on-step-not-callable", _prune(on_step=5), r"on_step must be a function", raises=TypeError),
    Case("api-streaming-dataset", lambda p: loraprune.prune(
        tiny_model(), _datasets().Dataset.from_dict({"text": ["a b c"] * 4}).to_iterable_dataset(), steps=2),
        r"streaming datasets\.IterableDataset.*Dataset\.from_list\(list\(ds\.take\(N\)\)\)"),
    Case("api-dataset-dict", lambda p: loraprune.prune(
        tiny_model(), _datasets().DatasetDict({"train": _datasets().Dataset.from_dict({"text": ["a b"]})}), steps=2),
        r"DatasetDict with splits \['train'\]; pass one split, e.g\. ds\['train'\]"),
    # file-system: the checkpoint directory is checked before the model is touched
    Case("api-checkpoint-dir-is-a-file", lambda p: loraprune.prune(tiny_model(), random_batches(n=2), steps=2,
                                                                   checkpoint_dir=str(_a_file(p)), progress=False),
         r"checkpoint_dir .*/f exists and is not a directory", raises=FileExistsError),
    Case("api-checkpoint-dir-under-a-file", lambda p: loraprune.prune(tiny_model(), random_batches(n=2), steps=2,
                                                                      checkpoint_dir=str(_a_file(p) / "ck"),
                                                                      progress=False),
         r"cannot write checkpoint_dir .*/f/ck: .*/f is a file, not a directory"),
    # contradictions and no-ops
    Case("api-ratio-positional-and-keyword", lambda p: loraprune.prune(tiny_model(), random_batches(n=2), 0.3, ratio=0.5),
         r"ratio is given twice"),
    Case("api-pruner-ratio-twice", lambda p: loraprune.LoRAPruner(tiny_model(), 0.3, ratio=0.5), r"ratio is given twice"),
    Case("api-callback-schedule-ignored", _callback_schedule_ignored,
         r"already has a schedule.*prune_end given to LoRAPruneCallback would be ignored"),
    Case("api-force-resume-without-resume", _prune(force_resume=True), r"force_resume=True only applies with resume"),
    Case("api-checkpoint-every-without-dir", _prune(checkpoint_every=1), r"does nothing without checkpoint_dir"),
    Case("api-oneshot-skip-layers-int", lambda p: loraprune.oneshot_prune(tiny_model(), random_batches(n=1),
                                                                        skip_layers=1),
         r"skip_layers must be None, 'paper' or a list"),
    Case("api-oneshot-ratio-string", lambda p: loraprune.oneshot_prune(tiny_model(), random_batches(n=1), ratio="0.3"),
         r"ratio must be a finite number"),
    Case("api-oneshot-bias-compensation-string", lambda p: loraprune.oneshot_prune(
        tiny_model(), random_batches(n=1), bias_compensation="yes"), r"bias_compensation must be True, False or None",
        raises=TypeError),
    # engine misuse
    Case("api-finalize-twice", _finalized_twice, r"finalize\(\) was already called.*use that model"),
]
