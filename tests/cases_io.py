"""Bad inputs of saving, loading, inspecting and GGUF files: each refused with a message naming the fix.

Loading cases tamper with a copy of one small saved per-layer model (built
once per session, copied into each case's ``tmp_path``).
"""
import json
import shutil
import tempfile
from pathlib import Path

import torch

import loraprune
from bad_input_table import Case
from loraprune.errors import OutputExistsError, PrunedModelError
from loraprune.export import gguf_read as lp_gguf
from loraprune.export.load import inspect_dir, load_pruned
from loraprune.export.save import save_pruned
from loraprune.structure.masks import Masks
from tiny import tiny_model

_TEMPLATE: dict[str, Path] = {}


def pruned_model():
    """A tiny LLaMA with per-layer widths: layer 0 keeps KV group 0 and 30 channels, layer 1 group 1 and 40."""
    model = tiny_model()
    attn = [torch.tensor([True, False]), torch.tensor([False, True])]
    mlp = [torch.arange(48) < 30, torch.arange(48) >= 8]
    return loraprune.compact(model, Masks(attn, mlp))


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


def _unmerged():
    from tiny import random_batches

    return loraprune.prune(tiny_model(), random_batches(n=1), ratio=0.3, steps=1, merge=False, progress=False)


def _export_unmerged(tmp_path):
    return loraprune.export_adapter(_unmerged(), _nonempty(tmp_path))


def _gguf_without_magic(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGML" + b"\0" * 28)
    return lp_gguf.load_gguf(tmp_path / "model.gguf")


CASES = [
    # ---- where the model should be
    Case("io-load-missing-dir", _missing, r"nowhere does not exist; pass the directory"),
    Case("io-load-file-not-dir", lambda p: load_pruned(_a_file(p)), r"is a file, not a directory"),
    Case("io-load-gguf-file", lambda p: load_pruned(_a_file(p, "m.gguf")), r"loraprune\.load_gguf"),
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


def _resume_with_other_data(tmp_path):
    from loraprune.run.checkpoint import Checkpointer, fingerprint

    pruner = loraprune.LoRAPruner(tiny_model(), ratio=0.5)
    opt = torch.optim.AdamW(pruner.lora_parameters())
    Checkpointer(tmp_path, every=1, fingerprint=fingerprint(tiny_model(), ["some text"])).save(pruner, opt, 1)
    Checkpointer(tmp_path, fingerprint=fingerprint(tiny_model(), ["other text"])).restore(pruner, opt)


CASES.append(Case("checkpoint-resume-other-data", _resume_with_other_data,
                  r"written for other data than this run; .*allow_mismatch=True \(CLI: --force-resume\)"))


# ---- the command line: one line "loraprune: error: ...", exit status 2 ---------------------------
class CLIRefused(loraprune.errors.LoRAPruneError):
    """What a CLI case raises: the one error line the command printed."""


def run_cli(argv):
    """Run ``loraprune.apps.cli.main(argv)``; a refusal must be exit 2 with one ``loraprune: error:`` line (raised here)."""
    import contextlib
    import io

    from loraprune.apps.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("loraprune: error: ")]
    if code != 2 or len(errors) != 1 or lines[-1] != errors[0]:
        raise AssertionError(f"expected exit 2 and one 'loraprune: error:' line; got {code}: {err.getvalue()!r}")
    raise CLIRefused(errors[0])


def _inputs(tmp_path: Path) -> dict:
    """Paths that exist (the model directory's content is never read by these cases)."""
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "data.txt").write_text("some text " * 50)
    return {"model": tmp_path / "model", "data": tmp_path / "data.txt", "out": tmp_path / "out"}


def _prune(*extra, model=None, data=None, out=None):
    """A CLI case: ``loraprune prune`` with the given inputs (defaults: existing paths) and extra options."""
    def call(tmp_path):
        p = _inputs(tmp_path)
        out_dir = out(tmp_path) if callable(out) else p["out"]
        argv = ["prune", "--model", str(model(tmp_path) if model else p["model"]),
                "--data", str(data(tmp_path) if data else p["data"]), "--output", str(out_dir), *extra]
        run_cli([a(tmp_path) if callable(a) else a for a in argv])
    return call


def _finished_model(tmp_path):
    out = _nonempty(tmp_path)
    (out / "config.json").write_text("{}")
    return out


def _other_runs_checkpoints(tmp_path):
    step = tmp_path / "out" / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "state.safetensors").write_text("{}")
    (step / "meta.json").write_text(json.dumps({"format": 1, "settings": {"ratio": 0.25}, "fingerprint": None}))
    return tmp_path / "out"


def _not_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"\0" * 32)
    return tmp_path / "m.gguf"


def _eval(*argv):
    def call(tmp_path):
        p = _inputs(tmp_path)
        run_cli(["eval", *[str(a(p) if callable(a) else a) for a in argv]])
    return call


CASES += [
    Case("cli-output-not-empty", _prune(out=_nonempty), r"^loraprune: error: --output .* is not empty; pass --overwrite"),
    Case("cli-output-is-a-file", _prune(out=lambda p: _a_file(p)), r"--output .* exists and is not a directory"),
    Case("cli-resume-a-finished-model", _prune("--resume", out=_finished_model),
         r"holds config\.json, notes\.txt besides checkpoints/ \(it holds a finished model\): nothing to resume"),
    Case("cli-resume-another-run", _prune("--resume", out=_other_runs_checkpoints),
         r"was written with other settings \{'ratio': \(0\.25, 0\.5\)\} \(saved, now\); resume with the same options"),
    Case("cli-resume-without-checkpoints", _prune("--resume", "--checkpoint-every", "0"),
         r"--resume needs checkpoints: drop --checkpoint-every 0"),
    Case("cli-force-resume-alone", _prune("--force-resume"), r"--force-resume only applies with --resume"),
    Case("cli-model-missing", _prune(model=lambda p: p / "no-model"), r"--model .*no-model does not exist"),
    Case("cli-model-is-a-file", _prune(model=lambda p: _a_file(p)), r"--model .* is a file, not a model directory"),
    Case("cli-model-gguf-missing", _prune(model=lambda p: p / "x.gguf"), r"--model .*x\.gguf does not exist"),
    Case("cli-model-not-a-gguf", _prune(model=_not_gguf), r"m\.gguf is not a GGUF file"),
    Case("cli-data-missing", _prune(data=lambda p: p / "corpus.txt"), r"--data .*corpus\.txt does not exist"),
    Case("cli-tokenizer-missing", _prune("--tokenizer", lambda p: str(p / "tok")), r"--tokenizer .*tok does not exist"),
    Case("cli-eval-data-missing", _prune("--eval-data", "./held-out.txt"), r"--eval-data \./held-out\.txt does not"),
    Case("cli-ratio-zero", _prune("--ratio", "0"), r"ratio must be > 0, got 0\.0 \(--ratio\)"),
    Case("cli-ratio-above-one", _prune("--ratio", "1.5"), r"ratio must be < 1, got 1\.5 \(--ratio\)"),
    Case("cli-ratio-not-a-number", _prune("--ratio", "half"), r"argument --ratio: invalid float value: 'half'"),
    Case("cli-criterion-unknown", _prune("--criterion", "taylr"), r"argument --criterion: invalid choice: 'taylr'"),
    Case("cli-skip-layers-garbage", _prune("--skip-layers", "first"), r"pass 'paper', 'none' or comma-separated"),
    Case("cli-prune-end-garbage", _prune("--prune-end", "late"), r"a step number \(150\) or a fraction"),
    Case("cli-uniform-with-skip-layers", _prune("--uniform", "--skip-layers", "0"), r"uniform=True needs every layer"),
    Case("cli-eval-windows-zero", _prune("--eval-windows", "0"), r"--eval-windows must be >= 1"),
    Case("cli-unknown-option", _prune("--ratoi", "0.3"), r"unrecognized arguments: --ratoi"),
    Case("cli-missing-required", lambda p: run_cli(["prune", "--model", "m"]),
         r"the following arguments are required: --data, --output \(see 'loraprune prune --help'\)"),
    Case("cli-inspect-not-a-model", lambda p: _inputs(p) and run_cli(["inspect", str(p)]), r"has no config\.json"),
    Case("cli-inspect-missing", lambda p: run_cli(["inspect", str(p / "gone")]), r"gone does not exist"),
    Case("cli-eval-data-missing-file", _eval("--model", lambda p: p["model"], "--data", "/no/such/test.txt"),
         r"--data /no/such/test\.txt does not exist"),
    Case("cli-eval-model-missing", _eval("--model", "./nothing", "--data", lambda p: p["data"]),
         r"--model \./nothing does not exist"),
    Case("cli-eval-baseline-missing", _eval("--model", lambda p: p["model"], "--data", lambda p: p["data"],
                                            "--baseline", "./dense"), r"--baseline \./dense does not exist"),
]


# ---- issue 20: file-system failures, wrong types, load-time values, advice ----------------------------
def _file_at(tmp_path, name="f"):
    (tmp_path / name).write_text("not a directory")
    return tmp_path / name


def _os_error(code):
    import os

    return OSError(code, os.strerror(code))


def _save_with_failing(target, code):
    """save_pruned while ``target`` (a function save_pruned calls) fails with OSError ``code``."""
    from unittest import mock

    def call(tmp_path):
        with mock.patch(target, side_effect=_os_error(code)):
            return save_pruned(pruned_model(), tmp_path / "out")
    return call


def _edit_tensor(edit, name="model.layers.0.mlp.down_proj.weight"):
    from safetensors.torch import load_file, save_file

    def tamper(d):
        tensors = load_file(d / "model.safetensors")
        tensors[name] = edit(tensors[name])
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return tamper


def _block(edit):
    return _config(lambda c: edit(c["loraprune"]))


def _pruned_and_saved(tmp_path):
    """A model pruned by prune() (its loraprune block has the parameter totals), saved in ``tmp_path/p``."""
    from tiny import random_batches

    model = loraprune.prune(tiny_model(), random_batches(n=1), ratio=0.4, steps=1, progress=False)
    return save_pruned(model, tmp_path / "p")


def _load_with(**kw):
    return lambda tmp_path: load_pruned(saved(tmp_path), **kw)


def _write_json_under_a_file(tmp_path):
    from loraprune.utils.atomic import write_json

    return write_json(_file_at(tmp_path) / "r.json", {"a": 1})


_ERRNO = __import__("errno")

CASES += [
    # file-system failures: a LoRAPruneError (OutputPathError) naming the path and the cause
    Case("fs-save-under-a-file", lambda p: save_pruned(pruned_model(), _file_at(p) / "out"),
         r"cannot write the output directory .*/f/out: .*/f is a file, not a directory"),
    Case("fs-save-under-a-file-deeper", lambda p: save_pruned(pruned_model(), _file_at(p) / "a" / "b"),
         r"/f is a file, not a directory"),
    Case("fs-save-read-only", _save_with_failing("tempfile.mkstemp", _ERRNO.EROFS),
         r"cannot write the output directory .*/out: the file system is read-only"),
    Case("fs-save-permission-denied", _save_with_failing("tempfile.mkstemp", _ERRNO.EACCES),
         r"cannot write the output directory .*/out: permission denied"),
    Case("fs-save-disk-full", _save_with_failing("loraprune.export.save.write_masks", _ERRNO.ENOSPC),
         r"cannot write the output .*/out: the disk is full"),
    Case("fs-save-quota", _save_with_failing("loraprune.export.save.write_masks", _ERRNO.EDQUOT), r"disk quota is exceeded"),
    Case("fs-write-json-under-a-file", _write_json_under_a_file, r"cannot write the file .*/f/r\.json: .*/f is a file, "
                                                                 r"not a directory"),
    Case("fs-export-adapter-under-a-file", lambda p: loraprune.export_adapter(_unmerged(), _file_at(p) / "ad"),
         r"/f is a file, not a directory"),
    # wrong types
    Case("type-save-tokenizer-is-a-path", lambda p: save_pruned(pruned_model(), p / "o", tokenizer="tok_dir"),
         r"tokenizer must be a tokenizer object.*AutoTokenizer\.from_pretrained\('tok_dir'\)", raises=TypeError),
    Case("type-save-out-dir-none", lambda p: save_pruned(pruned_model(), None), r"out_dir must be a path",
         raises=TypeError),
    Case("type-save-overwrite-string", lambda p: save_pruned(pruned_model(), p / "o", overwrite="yes"),
         r"overwrite must be True or False", raises=TypeError),
    Case("type-save-extra-json-numpy", lambda p: save_pruned(pruned_model(), p / "o",
                                                             extra_json={"r.json": {"x": __import__("numpy").float32(1)}}),
         r"extra_json\['r\.json'\] cannot be written as JSON.*float\(x\)", raises=TypeError),
    Case("type-export-adapter-overwrite-string", lambda p: loraprune.export_adapter(_unmerged(), p / "ad",
                                                                                   overwrite="no"),
         r"overwrite must be True or False", raises=TypeError),
    Case("type-save-extra-json-own-file", lambda p: save_pruned(pruned_model(), p / "o", extra_json={"config.json": {}}),
         r"extra_json names config\.json, which save_pruned writes itself"),
    Case("type-load-path-int", lambda p: load_pruned(123), r"path must be a path", raises=TypeError),
    Case("type-load-device-map-int", _load_with(device_map=5), r"device_map must be a string", raises=TypeError),
    # load-time values
    Case("load-nan-weight", _load_after(_edit_tensor(lambda t: torch.full_like(t, float("nan")))),
         r"1 weight tensor\(s\) hold NaN or inf \(e\.g\. model\.layers\.0\.mlp\.down_proj\.weight\)"),
    Case("load-one-inf-value", _load_after(_edit_tensor(lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))),
         r"hold NaN or inf"),
    Case("load-block-removed-edited", lambda p: (lambda d: _block(lambda b: b.update(
        removed_params=b["removed_params"] // 2))(d) or load_pruned(d))(_pruned_and_saved(p)),
        r"loraprune block says .* remain .*the weights hold .*edited"),
    Case("inspect-block-total-edited", lambda p: (lambda d: _block(lambda b: b.update(
        projection_params=b["projection_params"] * 2))(d) or inspect_dir(d))(_pruned_and_saved(p)),
        r"loraprune block says .*the weights hold"),
    # right error, right advice
    Case("advice-load-dtype-bf16", _load_with(dtype="bf16"), r"dtype='bf16' is not a torch dtype \(did you mean "
                                                              r"torch\.bfloat16\?\)"),
    Case("advice-load-dtype-unknown", _load_with(dtype="float99"), r"dtype='float99' is not a torch dtype; pass e\.g\."),
]
if not torch.cuda.is_available():
    CASES += [
        Case("advice-load-device-map-cuda", _load_with(device_map="cuda"),
             r"device_map='cuda' needs a CUDA GPU, but torch sees none.*device_map='cpu'"),
        Case("advice-load-device-map-gpu-index", _load_with(device_map={"": 0}), r"needs a CUDA GPU"),
    ]
