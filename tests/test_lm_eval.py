"""Zero-shot tasks through lm-evaluation-harness, offline: a local task over a JSONL file.

The reference is the model's own log-likelihoods, computed here as lm-eval
defines them (continuation " choice" after the question, summed token
log-probabilities): one task's answers are the choices the model prefers
(accuracy must be 1), another's the choices it likes least (accuracy 0), so a
single document scored differently by the harness fails the test.
"""
import json

import pytest
import torch

import loraprune
from gguf_export_cases import gpt2_tokenizer, per_layer_llama

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install loraprune[eval]")

WORDS = "the quick brown fox jumps over lazy dog to be or not question whether nobler mind".split()


def _choice_loglik(model, tok, question: str, choice: str) -> float:
    ctx = tok(question)["input_ids"]
    whole = tok(question + " " + choice)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def _write_tasks(folder, model, tok, n_docs: int = 24) -> None:
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(n_docs):
        pick = torch.randint(len(WORDS), (7,), generator=g).tolist()
        question = " ".join(WORDS[i] for i in pick[:3])
        choices = [WORDS[i] for i in pick[3:]]
        scores = [_choice_loglik(model, tok, question, c) for c in choices]
        docs.append({"question": question, "choices": choices, "best": scores.index(max(scores)),
                     "worst": scores.index(min(scores))})
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name in ("best", "worst"):
        (folder / f"local_{name}.yaml").write_text(f"""task: local_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "docs.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: {name}
metric_list:
  - metric: acc
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = gpt2_tokenizer()
    model = per_layer_llama(len(tok))
    folder = tmp_path_factory.mktemp("tasks")
    _write_tasks(folder, model, tok)
    return model, tok, folder


def test_in_memory_pruned_model_scores_as_its_own_loglikelihoods(setup):
    model, tok, folder = setup
    res = loraprune.eval.lm_eval_tasks(model, tok, ["local_best", "local_worst"], include_path=str(folder))
    assert res["local_best"]["acc,none"] == 1.0
    assert res["local_worst"]["acc,none"] == 0.0


def test_saved_model_and_cli(setup, tmp_path, capsys):
    from loraprune.apps.cli import main

    model, tok, folder = setup
    loraprune.save_pruned(model, tmp_path / "m", tokenizer=tok)
    res = loraprune.eval.lm_eval_tasks(str(tmp_path / "m"), tasks="local_best", include_path=str(folder))
    assert res["local_best"]["acc,none"] == 1.0
    code = main(["eval", "--model", str(tmp_path / "m"), "--tasks", "local_worst", "--include-path", str(folder),
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "local_worst" in out and "acc" in out


def test_bad_task_requests_are_refused(setup, capsys):
    from loraprune.apps.cli import main

    model, tok, folder = setup
    with pytest.raises(loraprune.LoRAPruneError, match="unknown lm-eval task"):
        loraprune.eval.lm_eval_tasks(model, tok, ["no_such_task"], include_path=str(folder))
    with pytest.raises(loraprune.LoRAPruneError, match="not a folder"):
        loraprune.eval.lm_eval_tasks(model, tok, ["local_best"], include_path=str(folder / "missing"))
    assert main(["eval", "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--tasks" in err


def test_a_model_path_that_is_wrong_gets_a_library_error_not_a_flag(tmp_path):
    """From Python, the loader's error names the argument, never a command-line flag the caller did not pass."""
    from loraprune.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"model='\./no/such/model' does not exist; pass a model directory") as err:
        loraprune.eval.lm_eval_tasks("./no/such/model", tasks=["piqa"])
    assert "--" not in str(err.value)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        loraprune.eval.lm_eval_tasks(str(tmp_path / "weights.bin"), tasks=["piqa"])
