"""The loraprune command: a prune -> inspect -> eval session on a tiny model saved
to disk, the help text, the bench dispatcher, and every bad input with its fix."""
import json

import pytest
import torch

import loraprune
from loraprune import cli
from loraprune.cli import main
from loraprune.eval import perplexity
from loraprune.reference import train_tokenizer
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
    for option, default in [("--ratio", "0.5"), ("--steps", "200"), ("--criterion", "lora"),
                            ("--checkpoint-every", "100"), ("--seq-len", "128")]:
        assert option in text and f"(default: {default})" in text
    assert "--resume" in text and "--overwrite" in text and "--uniform" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(c in top for c in ("prune", "eval", "inspect", "bench"))


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
    masks = loraprune.Masks.from_dict(saved_masks)
    assert masks.kept_kv() == [2, 2]

    model = loraprune.load_pruned(out)
    info = loraprune.io.inspect_dir(out)  # headers only; checked against the loaded model
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
    tok = loraprune.cli.load_tokenizer(str(out))
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
    for name in ("meta.json", "state.safetensors"):
        (ck / "checkpoints" / "step-00000002" / name).write_text("{}")
    (ck / "checkpoints" / "run.json").write_text(json.dumps({"model": "m", "data": "d", "tokenizer": None}))
    assert "belong to another run" in error_of(capsys, prune_argv(work, ck, "--resume"))
    assert "not a directory" in error_of(capsys, prune_argv(work, work / "data" / "a.txt"))


@pytest.mark.parametrize("ratio", ["0", "1", "-0.2", "1.5"])
def test_bad_ratio(work, tmp_path, capsys, ratio):
    assert "not in (0, 1)" in error_of(capsys, prune_argv(work, tmp_path / "o", "--ratio", ratio))


def test_bad_data(work, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    argv = prune_argv(work, tmp_path / "o")
    argv[argv.index("--data") + 1] = str(tmp_path / "empty.txt")
    assert "empty" in error_of(capsys, argv)
    argv[argv.index("--data") + 1] = str(tmp_path / "nothing-here")
    assert "neither a local file/folder nor a loadable hub dataset" in error_of(capsys, argv)
    long_ = prune_argv(work, tmp_path / "o2")
    long_[long_.index("--seq-len") + 1] = "65"
    assert "pass seq_len<=64" in error_of(capsys, long_)


def test_unsupported_architecture_and_missing_modules(tmp_path, capsys, work):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=120)).save_pretrained(tmp_path / "gpt2")
    argv = prune_argv(work, tmp_path / "o", "--tokenizer", str(work / "model"))
    argv[argv.index("--model") + 1] = str(tmp_path / "gpt2")
    assert "no group definition for model_type='gpt2'" in error_of(capsys, argv)
    argv[argv.index("--model") + 1] = str(work / "data" / "a.txt")
    assert "not a directory" in error_of(capsys, argv)


def test_nan_loss_stops_with_the_fix(work, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(work / "model")
    with torch.no_grad():
        m.model.norm.weight.fill_(float("nan"))
    m.save_pretrained(tmp_path / "nan")
    argv = prune_argv(work, tmp_path / "o", "--max-bad-steps", "2", "--tokenizer", str(work / "model"))
    argv[argv.index("--model") + 1] = str(tmp_path / "nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert "lower lr" in error_of(capsys, argv)
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
