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
    from loraprune.callback import LoRAPruneCallback

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
