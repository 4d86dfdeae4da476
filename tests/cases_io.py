"""Bad inputs of saving, loading, inspecting and GGUF files: each refused with a message naming the fix.

Loading cases tamper with a copy of one small saved per-layer model (built
once per session, copied into each case's ``tmp_path``).
"""
import json
import shutil
import tempfile
from pathlib import Path

import torch

from bad_input_table import Case

import loraprune
from loraprune import gguf as lp_gguf
from loraprune.io import OutputExistsError, PrunedModelError, inspect_dir, load_pruned, save_pruned
from tiny import tiny_model

_TEMPLATE: dict[str, Path] = {}


def pruned_model():
    """A tiny LLaMA with per-layer widths: layer 0 keeps KV group 0 and 30 channels, layer 1 group 1 and 40."""
    model = tiny_model()
    attn = [torch.tensor([True, False]), torch.tensor([False, True])]
    mlp = [torch.arange(48) < 30, torch.arange(48) >= 8]
    return loraprune.compact(model, loraprune.Masks(attn, mlp))


def saved(tmp_path: Path) -> Path:
    """A copy of the saved pruned model in ``tmp_path/m``."""
    if "dir" not in _TEMPLATE:
        root = Path(tempfile.mkdtemp(prefix="loraprune-cases-io-"))
        save_pruned(pruned_model(), root / "m")
        _TEMPLATE["dir"] = root / "m"
    out = tmp_path / "m"
    shutil.copytree(_TEMPLATE["dir"], out)
    return out


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _load_after(tamper):
    """A case: tamper with the saved copy, then load it."""
    def call(tmp_path):
        d = saved(tmp_path)
        tamper(d)
        return load_pruned(d)
    return call


def _config(edit):
    return lambda d: _edit_json(d / "config.json", edit)


def _masks(edit):
    return lambda d: _edit_json(d / "loraprune_masks.json", edit)


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 100])


def _other_tools_model(d: Path) -> None:
    """A per-layer pruned model another tool wrote: stock config fields, no loraprune block."""
    _edit_json(d / "config.json", lambda c: (c.pop("loraprune"), c.pop("auto_map", None),
                                              c.update(architectures=["LlamaForCausalLM"])))
    (d / "loraprune_masks.json").unlink()


def _missing(tmp_path):
    return load_pruned(tmp_path / "nowhere")


def _a_file(tmp_path, name="model.bin"):
    (tmp_path / name).write_bytes(b"\0" * 16)
    return tmp_path / name


def _nonempty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    return tmp_path / "out"


def _export_unmerged(tmp_path):
    from tiny import random_batches

    model = loraprune.prune(tiny_model(), random_batches(n=1), ratio=0.3, steps=1, merge=False, progress=False)
    return loraprune.export_adapter(model, _nonempty(tmp_path))


def _gguf_without_magic(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGML" + b"\0" * 28)
    return lp_gguf.load_gguf(tmp_path / "model.gguf")


CASES = [
    # ---- where the model should be
    Case("io-load-missing-dir", _missing, r"nowhere does not exist; pass the directory"),
    Case("io-load-file-not-dir", lambda p: load_pruned(_a_file(p)), r"is a file, not a directory"),
    Case("io-load-gguf-file", lambda p: load_pruned(_a_file(p, "m.gguf")), r"loraprune\.gguf\.load_gguf"),
    Case("io-load-empty-dir", lambda p: load_pruned(p), r"has no config\.json"),
    Case("io-inspect-data-dir", lambda p: (p / "a.txt").write_text("text") and inspect_dir(p), r"has no config\.json"),
    Case("io-load-no-weights", _load_after(lambda d: (d / "model.safetensors").unlink()),
         r"holds no \.safetensors weights"),
    # ---- damaged files
    Case("io-load-config-not-json", _load_after(lambda d: (d / "config.json").write_text("{\"model_type\": ")),
         r"config\.json is corrupted .*save the model again"),
    Case("io-load-truncated-safetensors", _load_after(_truncate), r"is truncated .*save the model again"),
    Case("io-load-garbage-safetensors", _load_after(lambda d: (d / "model.safetensors").write_bytes(b"\1\2")),
         r"not a readable safetensors file"),
    # ---- config.json contradicting the weights
    Case("io-load-other-tools-pruned-model", _load_after(_other_tools_model),
         r"not saved by loraprune .*load it with the tool that wrote it"),
    Case("io-load-block-widths-contradict", _load_after(_config(
        lambda c: c["loraprune"]["layers"][1].update(intermediate_size=41))),
         r"layer 1 weights have widths .*config\.json says .*mixed up"),
    Case("io-load-layer-count-contradicts", _load_after(_config(lambda c: c.update(num_hidden_layers=3))),
         r"config\.json says 3 layers, the weights hold 2"),
    # ---- loraprune_masks.json tampered with
    Case("io-load-masks-out-of-range", _load_after(_masks(lambda m: m["layers"][0]["mlp_channels"].__setitem__(0, 48))),
         r"index 48 is out of range \[0, 48\).*delete .*loraprune_masks\.json"),
    Case("io-load-masks-negative", _load_after(_masks(lambda m: m["layers"][1]["kv_groups"].__setitem__(0, -1))),
         r"index -1 is out of range"),
    Case("io-load-masks-duplicated", _load_after(_masks(lambda m: m["layers"][0]["mlp_channels"].__setitem__(1, 0))),
         r"lists an index twice"),
    Case("io-load-masks-contradict-weights", _load_after(_masks(lambda m: m["layers"][0]["mlp_channels"].pop())),
         r"layer 0: keeps 1 KV groups and 29 MLP channels, the weights have 1 and 30"),
    Case("io-load-masks-wrong-original", _load_after(_masks(lambda m: m["layers"][0].update(n_kv_groups=3))),
         r"indexes 3 original KV groups, config\.json says the original model had 2"),
    Case("io-load-masks-not-json", _load_after(lambda d: (d / "loraprune_masks.json").write_text("[1, 2")),
         r"loraprune_masks\.json is corrupted"),
    # ---- saving
    Case("io-save-nonempty-target", lambda p: save_pruned(pruned_model(), _nonempty(p)), r"pass overwrite=True",
         raises=OutputExistsError),
    Case("io-save-target-is-file", lambda p: save_pruned(pruned_model(), _a_file(p)), r"is not a directory",
         raises=OutputExistsError),
    Case("io-save-unpruned-model", lambda p: save_pruned(tiny_model(), p / "out"),
         r"not pruned by loraprune .*model\.save_pretrained", raises=PrunedModelError),
    Case("io-save-extra-json-collision", lambda p: save_pruned(pruned_model(), p / "o",
                                                               extra_json={"loraprune_masks.json": {}}),
         r"extra_json names loraprune_masks\.json, which save_pruned writes itself"),
    Case("io-export-adapter-nonempty-target", _export_unmerged, r"pass overwrite=True", raises=OutputExistsError),
    Case("io-export-adapter-merged-model", lambda p: loraprune.export_adapter(pruned_model(), p / "o"),
         r"holds no LoRA layers .*merge=False"),
    # ---- GGUF files
    Case("gguf-missing-file", lambda p: lp_gguf.load_gguf(p / "model.gguf"), r"model\.gguf does not exist"),
    Case("gguf-not-a-gguf-file", _gguf_without_magic, r"is not a GGUF file"),
]
