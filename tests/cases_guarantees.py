"""Bad inputs of the broken guarantees (issue 26): adapters loraprune cannot continue, a model that already
carries a pruner, ``overwrite`` of the wrong type, caller-given names that would leave the output folder,
and symlinks at an output path. Each is refused, before anything is touched or written, naming the fix.

(Only names that exist on every version are imported at module level: ``AdapterError`` is a ``ValueError``.)
"""
import os
import warnings
from functools import lru_cache

import loraprune
from bad_input_table import Case
from loraprune.errors import OutputExistsError
from tiny import random_batches, tiny_model


# ---- builders (lazy: a case builds what it needs) ------------------------------------------------------------
@lru_cache(maxsize=1)
def _tok():
    from gguf_export_cases import gpt2_tokenizer

    return gpt2_tokenizer()


def _gguf_model():
    from gguf_export_cases import uniform

    return uniform("llama", len(_tok()))


def _pruned():
    import torch

    from loraprune.structure.masks import Masks

    attn = [torch.tensor([True, False]), torch.tensor([False, True])]
    mlp = [torch.arange(48) < 30, torch.arange(48) >= 8]
    return loraprune.compact(tiny_model(), Masks(attn, mlp))


def _unmerged():
    return loraprune.LoRAPruner(tiny_model(), ratio=0.5).finalize(merge=False)


def _peft(kind):
    import peft_models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_models.BUILDERS[kind]()


# ---- PEFT inputs -------------------------------------------------------------------------------------------
PEFT_KINDS = ["ia3", "prefix-tuning", "prompt-tuning", "dora", "lora-bias", "modules-to-save", "two-active-adapters",
              "two-adapters-one-active", "loha", "lokr", "adalora", "lora-on-embeddings",
              "ia3-injected-without-peftmodel", "loha-base-model-of-peftmodel"]


def _pruner_on(kind):
    return lambda tmp_path: loraprune.LoRAPruner(_peft(kind), ratio=0.5)


def _prune_on(kind):
    return lambda tmp_path: loraprune.prune(_peft(kind), random_batches(n=2), ratio=0.5, steps=2, progress=False)


PEFT_CASES = [Case(f"guarantee-peft-{k}-lorapruner", _pruner_on(k), r"merge_and_unload") for k in PEFT_KINDS]
PEFT_CASES += [Case(f"guarantee-peft-{k}-prune", _prune_on(k), r"merge_and_unload")
               for k in ("ia3", "prefix-tuning", "dora", "modules-to-save", "two-active-adapters", "loha")]


# ---- a model that already carries a pruner ------------------------------------------------------------------
def _second_pruner(tmp_path):
    model = tiny_model()
    loraprune.LoRAPruner(model, ratio=0.5)
    return loraprune.LoRAPruner(model, ratio=0.3)


def _prune_attached(tmp_path):
    model = tiny_model()
    loraprune.LoRAPruner(model, ratio=0.5)
    return loraprune.prune(model, random_batches(n=2), ratio=0.3, steps=2, progress=False)


def _pruner_on_unmerged(tmp_path):
    return loraprune.LoRAPruner(_unmerged(), ratio=0.3)


def _prune_unmerged(tmp_path):
    return loraprune.prune(_unmerged(), random_batches(n=2), ratio=0.3, steps=2, progress=False, uniform=True)


WRAPPED_CASES = [
    Case("guarantee-wrapped-second-lorapruner", _second_pruner, r"already carries loraprune's LoRA layers"),
    Case("guarantee-wrapped-prune-on-attached", _prune_attached, r"already carries loraprune's LoRA layers"),
    Case("guarantee-wrapped-lorapruner-on-unmerged", _pruner_on_unmerged, r"merge_lora\(model\)"),
    Case("guarantee-wrapped-prune-on-unmerged", _prune_unmerged, r"merge_lora\(model\)"),
]


# ---- overwrite must be a bool -------------------------------------------------------------------------------
def _gguf_overwrite(value):
    def call(tmp_path):
        (tmp_path / "m.gguf").write_bytes(b"old")
        return loraprune.save_gguf(_gguf_model(), tmp_path / "m.gguf", _tok(), overwrite=value)
    return call


def _pruned_overwrite(value):
    def call(tmp_path):
        loraprune.save_pruned(_pruned(), tmp_path / "m")
        return loraprune.save_pruned(_pruned(), tmp_path / "m", overwrite=value)
    return call


def _adapter_overwrite(value):
    return lambda tmp_path: loraprune.export_adapter(_unmerged(), tmp_path / "a", overwrite=value)


_OVERWRITE = "overwrite must be True or False"
OVERWRITE_CASES = [Case(f"guarantee-overwrite-gguf-{name}", _gguf_overwrite(v), _OVERWRITE, TypeError)
                   for name, v in (("str-no", "no"), ("str-yes", "yes"), ("str-False", "False"), ("int-0", 0),
                                   ("int-1", 1), ("none", None), ("list", []))]
OVERWRITE_CASES += [Case(f"guarantee-overwrite-pruned-{name}", _pruned_overwrite(v), _OVERWRITE, TypeError)
                    for name, v in (("str-no", "no"), ("int-1", 1), ("float", 1.0))]
OVERWRITE_CASES += [Case(f"guarantee-overwrite-adapter-{name}", _adapter_overwrite(v), _OVERWRITE, TypeError)
                    for name, v in (("str-no", "no"), ("int-1", 1), ("none", None))]


# ---- caller-given names stay inside the output folder --------------------------------------------------------
def _extra_json(name):
    def call(tmp_path):
        key = name.replace("ABS", str(tmp_path / "escaped.json"))
        return loraprune.save_pruned(_pruned(), tmp_path / "a" / "out", extra_json={key: {"x": 1}})
    return call


NAME_CASES = [Case(f"guarantee-extra-json-{label}", _extra_json(name), r"not a plain file name")
              for label, name in (("parent", "../x.json"), ("grandparent", "../../x.json"), ("absolute", "ABS"),
                                  ("subfolder", "sub/x.json"), ("dot-slash", "./x.json"), ("dotdot", ".."),
                                  ("dot", "."), ("backslash", "..\\x.json"), ("nul", "x\x00.json"),
                                  ("up-and-back", "sub/../x.json"), ("home", "~/x.json"),
                                  ("trailing-slash", "x.json/"))]


# ---- symlinks at the output path -------------------------------------------------------------------------------
def _dangling(tmp_path, name):
    link = tmp_path / name
    os.symlink(tmp_path / "nowhere" / name, link)
    return link


def _gguf_dangling(overwrite):
    return lambda tmp_path: loraprune.save_gguf(_gguf_model(), _dangling(tmp_path, "m.gguf"), _tok(),
                                                overwrite=overwrite)


def _pruned_dangling(overwrite):
    return lambda tmp_path: loraprune.save_pruned(_pruned(), _dangling(tmp_path, "m"), overwrite=overwrite)


def _adapter_dangling(overwrite):
    return lambda tmp_path: loraprune.export_adapter(_unmerged(), _dangling(tmp_path, "a"), overwrite=overwrite)


def _pruned_link_to(kind):
    def call(tmp_path):
        target = tmp_path / "target"
        if kind == "file":
            target.write_text("x")
        else:
            target.mkdir()
            if kind == "full-dir":
                (target / "keep.txt").write_text("x")
        (tmp_path / "link").symlink_to(target)
        return loraprune.save_pruned(_pruned(), tmp_path / "link")
    return call


def _gguf_link_to_file(tmp_path):
    (tmp_path / "t.gguf").write_bytes(b"old")
    (tmp_path / "m.gguf").symlink_to(tmp_path / "t.gguf")
    return loraprune.save_gguf(_gguf_model(), tmp_path / "m.gguf", _tok())


def _gguf_link_loop(tmp_path):
    (tmp_path / "m.gguf").symlink_to(tmp_path / "m.gguf")
    return loraprune.save_gguf(_gguf_model(), tmp_path / "m.gguf", _tok())


SYMLINK_CASES = [
    Case("guarantee-symlink-gguf-dangling", _gguf_dangling(False), r"exists|symlink", OutputExistsError),
    Case("guarantee-symlink-gguf-dangling-overwrite", _gguf_dangling(True), r"does not exist", OutputExistsError),
    Case("guarantee-symlink-gguf-to-file", _gguf_link_to_file, r"exists", OutputExistsError),
    Case("guarantee-symlink-gguf-loop", _gguf_link_loop, r"exists", OutputExistsError),
    Case("guarantee-symlink-pruned-dangling", _pruned_dangling(False), r"symlink", OutputExistsError),
    Case("guarantee-symlink-pruned-dangling-overwrite", _pruned_dangling(True), r"does not exist",
         OutputExistsError),
    Case("guarantee-symlink-pruned-to-empty-dir", _pruned_link_to("empty-dir"), r"symlink", OutputExistsError),
    Case("guarantee-symlink-pruned-to-full-dir", _pruned_link_to("full-dir"), r"symlink|not empty",
         OutputExistsError),
    Case("guarantee-symlink-pruned-to-file", _pruned_link_to("file"), r"symlink|not a directory", OutputExistsError),
    Case("guarantee-symlink-adapter-dangling", _adapter_dangling(False), r"symlink", OutputExistsError),
    Case("guarantee-symlink-adapter-dangling-overwrite", _adapter_dangling(True), r"does not exist",
         OutputExistsError),
]

CLASSES = {"peft-inputs": PEFT_CASES, "already-wrapped": WRAPPED_CASES, "overwrite-type": OVERWRITE_CASES,
           "names-escaping-the-folder": NAME_CASES, "symlinks": SYMLINK_CASES}
CASES = [c for cases in CLASSES.values() for c in cases]
