"""The loraprune command: a prune -> inspect -> eval session on a tiny model saved
to disk, the help text, the bench dispatcher, and every bad input with its fix."""
import json

import pytest
import torch

import loraprune
from loraprune.apps import cli, cli_prune
from loraprune.apps.cli import main
from loraprune.apps.toy_shakespeare import train_tokenizer
from loraprune.config import PruneConfig
from loraprune.errors import PrunedModelError
from loraprune.eval import perplexity
from loraprune.structure.masks import Masks
from tiny import tiny_model

TEXT = "the quick brown fox jumps over the lazy dog; a stitch in time saves nine. " * 120


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text(TEXT, encoding="utf-8")
    (root / "data" / "b.jsonl").write_text('{"text": "the lazy dog sleeps"}\n"a fox"\n', encoding="utf-8")
    tok = train_tokenizer([TEXT], vocab_size=120)
    model = tiny_model(vocab_size=len(tok), intermediate_size=64, num_attention_heads=4, num_key_value_heads=4)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def prune_argv(work, out, *extra, steps=4):
    return ["prune", "--model", str(work / "model"), "--data", str(work / "data"), "--output", str(out),
            "--steps", str(steps), "--seq-len", "16", "--batch-size", "2", "--no-progress", *extra]


def error_of(capsys, argv) -> str:
    """Run the CLI expecting a user error; return its message."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejects the option itself
        code = exit_.code
    assert code == 2
    return capsys.readouterr().err


def test_help_explains_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--ratio", "0.5"), ("--steps", "200"), ("--criterion", "fisher"),
                            ("--lr-schedule", "linear"), ("--seq-len", "128"), ("--ranking", "adaptive")]:
        assert option in text and f"(default: {default})" in text
    assert "--resume" in text and "--overwrite" in text and "--uniform" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(c in top for c in ("prune", "eval", "inspect", "bench"))


@pytest.mark.slow
def test_prune_inspect_eval_session(work, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(prune_argv(work, out, "--uniform", "--eval-data", str(work / "data" / "a.txt"),
                           "--eval-windows", "4")) == 0
    printed = capsys.readouterr().out
    assert "kv heads" in printed and "4 -> 2" in printed and "perplexity" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "loraprune_report.json",
            "loraprune_masks.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "loraprune_report.json").read_text())
    assert report["achieved_ratio"] == pytest.approx(0.5, abs=0.01)
    assert report["eval"]["ppl_after"] > 1
    saved_masks = json.loads((out / "loraprune_masks.json").read_text())
    # the full file of save_pruned, not a bare copy of the indices (issue 11)
    assert (saved_masks["head_dim"], saved_masks["q_per_kv"]) == (8, 1) and "KV group g owns" in saved_masks["description"]
    masks = Masks.from_dict(saved_masks)
    assert masks.kept_kv() == [2, 2]

    model = loraprune.load_pruned(out)
    info = loraprune.export.load.inspect_dir(out)  # headers only; checked against the loaded model
    for i, layer in enumerate(model.model.layers):
        row = info["layers"][i]
        assert row["params"] == sum(p.numel() for p in layer.parameters())
        assert row["num_key_value_heads"] == layer.self_attn.k_proj.out_features // 8 == 2
        assert row["intermediate_size"] == layer.mlp.gate_proj.out_features
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert main(["inspect", str(out)]) == 0
    assert "kv heads" in capsys.readouterr().out

    assert main(["eval", "--model", str(out), "--data", str(work / "data" / "a.txt"), "--seq-len", "16",
                 "--baseline", str(work / "model")]) == 0
    printed = capsys.readouterr().out
    tok = loraprune.apps.cli_inputs.load_tokenizer(str(out))
    want = perplexity(model, [TEXT], tok, window=16)
    assert f"{want:.4g}" in printed and "ratio pruned / baseline" in printed


def test_output_directory_rules(work, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert "pass --overwrite" in error_of(capsys, prune_argv(work, out))
    assert (out / "keep.txt").read_text() == "precious"
    assert "nothing to resume" in error_of(capsys, prune_argv(work, out, "--resume"))
    assert main(prune_argv(work, out, "--overwrite", steps=2)) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    capsys.readouterr()
    assert "finished model" in error_of(capsys, prune_argv(work, out, "--resume"))
    # checkpoints of another run are not resumed with other data
    ck = tmp_path / "ck"
    (ck / "checkpoints" / "step-00000002").mkdir(parents=True)
    (ck / "checkpoints" / "step-00000002" / "state.safetensors").write_text("{}")
    meta = {"format": 1, "settings": {"ratio": 0.5, "steps": 999}, "fingerprint": {"data": {"kind": "other"}}}
    (ck / "checkpoints" / "step-00000002" / "meta.json").write_text(json.dumps(meta))
    assert "written with other settings {'steps': (999," in error_of(capsys, prune_argv(work, ck, "--resume"))
    meta["settings"] = {"ratio": 0.5}  # same options, other data (a moved folder would be the same data)
    (ck / "checkpoints" / "step-00000002" / "meta.json").write_text(json.dumps(meta))
    assert "written for other data than this run" in error_of(capsys, prune_argv(work, ck, "--resume"))
    assert "not a directory" in error_of(capsys, prune_argv(work, work / "data" / "a.txt"))


@pytest.mark.parametrize("ratio, message", [("0", "ratio must be > 0, got 0.0 (--ratio)"),
                                            ("1", "ratio must be < 1, got 1.0 (--ratio)"),
                                            ("-0.2", "ratio must be > 0"), ("x", "argument --ratio: invalid float")])
def test_bad_ratio(work, tmp_path, capsys, ratio, message):
    assert message in error_of(capsys, prune_argv(work, tmp_path / "o", "--ratio", ratio))
    assert not (tmp_path / "o").exists()


def test_bad_data(work, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    argv = prune_argv(work, tmp_path / "o")
    argv[argv.index("--data") + 1] = str(tmp_path / "empty.txt")
    assert "empty" in error_of(capsys, argv)
    argv[argv.index("--data") + 1] = str(tmp_path / "nothing-here")
    assert "nothing-here does not exist" in error_of(capsys, argv)
    long_ = prune_argv(work, tmp_path / "o2")
    long_[long_.index("--seq-len") + 1] = "65"
    assert "pass seq_len<=64" in error_of(capsys, long_)


def test_unsupported_architecture_and_missing_modules(tmp_path, capsys, work):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=120)).save_pretrained(tmp_path / "gpt2")
    argv = prune_argv(work, tmp_path / "o", "--tokenizer", str(work / "model"))
    argv[argv.index("--model") + 1] = str(tmp_path / "gpt2")
    assert "no group definition for model_type='gpt2'" in error_of(capsys, argv)
    assert not (tmp_path / "o").exists()  # a failed run leaves no output directory behind
    argv[argv.index("--model") + 1] = str(work / "data" / "a.txt")
    assert "is a file, not a model directory" in error_of(capsys, argv)


def test_nan_loss_stops_with_the_fix(work, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(work / "model")
    with torch.no_grad():
        m.model.norm.weight.fill_(float("nan"))
    m.save_pretrained(tmp_path / "nan")
    argv = prune_argv(work, tmp_path / "o", "--max-bad-steps", "2", "--tokenizer", str(work / "model"))
    argv[argv.index("--model") + 1] = str(tmp_path / "nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert "lower the learning rate" in error_of(capsys, argv)
    assert not (tmp_path / "o" / "config.json").exists()


def test_corrupted_and_mixed_up_directories(work, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(prune_argv(work, out, steps=2)) == 0
    capsys.readouterr()
    cfg = json.loads((out / "config.json").read_text())
    bad = tmp_path / "mixed"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    assert "mixed up" in error_of(capsys, ["inspect", str(bad)])
    assert "mixed up" in error_of(capsys, ["eval", "--model", str(bad), "--data", str(work / "data"),
                                                 "--tokenizer", str(work / "model")])
    (bad / "config.json").write_text('{"model_type": "llama", ')
    assert "corrupted" in error_of(capsys, ["inspect", str(bad)])
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(b"\x01\x02")
    assert "not a readable safetensors file" in error_of(capsys, ["inspect", str(bad)])


def test_bench_dispatcher(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "bench_roots", lambda: [tmp_path])
    assert "source checkout" in error_of(capsys, ["bench"])
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "run.py").write_text(
        "import sys, pathlib\npathlib.Path('argv.json').write_text(__import__('json').dumps(sys.argv[1:]))\n")
    assert main(["bench", "--quick", "--out", "x.json"]) == 0
    assert json.loads((tmp_path / "argv.json").read_text()) == ["--quick", "--out", "x.json"]


# ---- the options are PruneConfig's fields ----------------------------------------------------
def test_every_config_field_is_an_option_with_its_default_and_help():
    import argparse
    import dataclasses

    parser = cli.build_parser()
    prune_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    actions = {a.dest: a for a in prune_parser._actions}
    for f in dataclasses.fields(PruneConfig):
        if not f.metadata["cli"]:  # progress, checkpoint_dir, resume: the CLI has its own (--no-progress, ...)
            continue
        action = actions[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        assert action.default == default and action.help == f.metadata["help"], f.name
        if "choices" in f.metadata:
            assert action.choices == list(f.metadata["choices"])


def test_option_values_reach_the_config(work, tmp_path):
    args = cli.build_parser().parse_args(prune_argv(work, tmp_path / "o", "--skip-layers", "0,1", "--prune-start",
                                                   "1", "--prune-end", "0.5", "--normalize", "none", "--square",
                                                   "--max-grad-norm", "none", "--lr-schedule", "cosine"))
    cfg = cli_prune.config_from_args(args, checkpoint_dir=str(tmp_path / "o"))
    assert cfg == PruneConfig(steps=4, seq_len=16, batch_size=2, skip_layers=[0, 1], prune_start=1, prune_end=0.5,
                              normalize=None, square=True, max_grad_norm=None, lr_schedule="cosine",
                              checkpoint_dir=str(tmp_path / "o"))
    assert type(cfg.prune_start) is int and type(cfg.prune_end) is float
    args = cli.build_parser().parse_args(prune_argv(work, tmp_path / "o", "--skip-layers", "paper",
                                                   "--normalize", "l2", "--no-merge"))
    cfg = cli_prune.config_from_args(args)
    assert (cfg.skip_layers, cfg.normalize, cfg.merge) == ("paper", "l2", False)


# ---- user errors are one line and exit 2; bugs show their traceback --------------------------
def test_user_errors_exit_2_but_bugs_raise(monkeypatch, capsys):
    def user_error(args):
        raise PrunedModelError("the directory is mixed up;\n save the model again")

    def bug(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setitem(cli.COMMANDS, "inspect", user_error)
    assert main(["inspect", "x"]) == 2
    assert capsys.readouterr().err == "loraprune: error: the directory is mixed up; save the model again\n"
    monkeypatch.setitem(cli.COMMANDS, "inspect", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["inspect", "x"])
    assert main(["inspect"]) == 2  # usage errors are user errors too: one line, no usage dump
    assert capsys.readouterr().err.splitlines() == [
        "loraprune: error: the following arguments are required: dir (see 'loraprune inspect --help')"]


# ---- GGUF files as --model -------------------------------------------------------------------
def test_prune_and_eval_a_gguf_file(work, tmp_path, capsys):
    pytest.importorskip("gguf")
    from gguf_file import write_tiny_gguf

    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    argv = prune_argv(work, out, steps=2)
    argv[argv.index("--model") + 1] = str(tmp_path / "tiny.gguf")
    assert main(argv) == 0
    pruned = loraprune.load_pruned(out)
    assert pruned.config.loraprune["achieved_ratio"] == pytest.approx(0.5, abs=0.05)
    assert pruned.config.vocab_size == source.config.vocab_size
    tok = loraprune.apps.cli_inputs.load_tokenizer(str(out))  # the GGUF's tokenizer, saved beside the model
    assert tok.decode(tok("the tea")["input_ids"]) == "the tea"
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "tiny.gguf"), "--data", str(work / "data" / "a.txt"),
                 "--seq-len", "16", "--max-windows", "2", "--baseline", str(out), "--no-progress"]) == 0
    assert "ratio pruned / baseline" in capsys.readouterr().out


# ---- device and dtype ----------------------------------------------------------------------------
@pytest.mark.parametrize("cuda,bf16,device,dtype,want", [
    (False, False, None, "auto", ("cpu", "float32")),
    (True, True, None, "auto", ("cuda", "bfloat16")),
    (True, False, None, "auto", ("cuda", "float16")),  # a GPU without bf16
    (True, True, "cpu", "auto", ("cpu", "float32")),
    (True, True, "cuda:1", "float32", ("cuda:1", "float32")),  # explicit values win
    (True, True, "auto", "auto", ("auto", "bfloat16")),
    (False, False, "auto", "auto", ("auto", "float32")),
    (False, False, "CPU", "bfloat16", ("cpu", "bfloat16")),
])
def test_device_and_dtype_defaults_follow_the_machine(monkeypatch, cuda, bf16, device, dtype, want):
    from loraprune.apps.cli_inputs import resolve_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    placement = resolve_placement(device, dtype)
    assert (placement.device, placement.dtype) == want
    assert placement.device_map == ("auto" if want[0] == "auto" else None)


def test_cuda_without_a_gpu_names_the_fix(monkeypatch, capsys, work, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = error_of(capsys, prune_argv(work, tmp_path / "o", "--device", "cuda"))
    assert err == ("loraprune: error: --device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                   "pass --device cpu, or install a CUDA build of torch on a GPU machine\n")
    assert not (tmp_path / "o").exists()  # refused before anything was loaded or written


@pytest.mark.slow
def test_prune_summary_names_device_dtype_and_checkpointing(work, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(prune_argv(work, out, "--device", "cpu", "--dtype", "bfloat16", "--gradient-checkpointing",
                           steps=2)) == 0
    printed = capsys.readouterr().out
    assert "device / dtype" in printed and "cpu / bfloat16 / gradient checkpointing" in printed
    report = json.loads((out / "loraprune_report.json").read_text())
    assert (report["device"], report["dtype"], report["options"]["gradient_checkpointing"]) == ("cpu", "bfloat16", True)
    model = loraprune.load_pruned(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # the default on this machine, and device_map="auto" (accelerate) for eval
    default = "cuda:0 / bfloat16" if torch.cuda.is_available() else "cpu / float32"
    assert main(["eval", "--model", str(out), "--data", str(work / "data" / "a.txt"), "--seq-len", "16",
                 "--max-windows", "2", "--no-progress"]) == 0
    assert default in capsys.readouterr().out
    assert main(["eval", "--model", str(out), "--data", str(work / "data" / "a.txt"), "--seq-len", "16",
                 "--max-windows", "2", "--no-progress", "--device", "auto"]) == 0
    assert ("auto: " + ("cuda:0" if torch.cuda.is_available() else "cpu")) in capsys.readouterr().out


@pytest.mark.gpu
def test_prune_runs_on_the_gpu_in_bf16_by_default(work, tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(prune_argv(work, out, steps=2)) == 0
    report = json.loads((out / "loraprune_report.json").read_text())
    assert report["device"].startswith("cuda:") and report["dtype"] in ("bfloat16", "float16")
