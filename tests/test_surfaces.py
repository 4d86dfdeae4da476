"""Issue 26, the surfaces: what is rightly accepted gives the right result (the refusals are in
tests/cases_surfaces.py). References: the masks' widths counted on the weights, perplexity of a prefix of
the stream, the parser's own defaults, a demo run's saved model reloaded."""
import json

import numpy as np
import pytest
import torch

import loraprune
from loraprune.config import PruneConfig
from loraprune.structure.groups import layer_projection_params
from tiny import random_batches, tiny_model


# ---- ratios: a round_to that reaches the ratio lands within 1 %; one-shot lands where prune() lands --------
@pytest.mark.parametrize("ranking", ["layer", "global", "adaptive"])
def test_a_reachable_round_to_lands_within_one_percent(ranking):
    model = tiny_model(num_hidden_layers=4, intermediate_size=256)
    before = sum(layer_projection_params(model))
    pruned = loraprune.prune(model, random_batches(n=2), ratio=0.5, round_to=64, ranking=ranking, steps=3,
                             progress=False)
    widths = [layer.mlp.down_proj.weight.shape[1] for layer in pruned.model.layers]
    assert all(w % 64 == 0 for w in widths), widths
    achieved = 1 - sum(layer_projection_params(pruned)) / before  # counted on the weights
    assert abs(achieved - 0.5) <= 0.01 and pruned.config.loraprune["achieved_ratio"] == pytest.approx(achieved)


@pytest.mark.parametrize("shape,ratio,round_to", [((4, 48), 0.5, None), ((4, 256), 0.5, 32), ((3, 512), 0.5, None),
                                                  ((4, 256), 0.7, None)])
def test_oneshot_adaptive_lands_where_prune_lands(shape, ratio, round_to):
    layers, width = shape
    make = lambda: tiny_model(num_hidden_layers=layers, intermediate_size=width)  # noqa: E731
    one = loraprune.oneshot_prune(make(), random_batches(n=2), ratio=ratio, ranking="adaptive", round_to=round_to,
                                  calib_batches=2).config.loraprune["achieved_ratio"]
    full = loraprune.prune(make(), random_batches(n=2), ratio=ratio, ranking="adaptive", round_to=round_to, steps=4,
                           progress=False).config.loraprune["achieved_ratio"]
    assert abs(one - ratio) <= 0.01 and abs(full - ratio) <= 0.01, (one, full)


# ---- evaluation: what the checker lets through is evaluated as asked ---------------------------------------
def test_eval_accepts_the_edges_and_numpy_counts():
    from loraprune.eval import perplexity, tokens_per_second

    model = tiny_model()
    ids = torch.arange(300) % 97
    first = perplexity(model, ids[:16], window=16)
    assert perplexity(model, ids, window=16, max_windows=1) == pytest.approx(first, rel=1e-6)  # one window, as asked
    assert perplexity(model, ids, window=16, max_windows=np.int64(1), batch_size=np.int32(4)) == pytest.approx(first)
    assert perplexity(model, ids, window=64) > 0  # the whole context is allowed
    assert perplexity(model, ids, window=16, device="cpu") == pytest.approx(perplexity(model, ids, window=16))
    assert tokens_per_second(model, mode="decode", new_tokens=1, prompt_len=63, repeats=1, warmup=0) > 0
    assert tokens_per_second(model, seq_len=64, repeats=1, warmup=0) > 0


def test_lm_eval_names_the_file_that_failed_to_parse_and_not_a_good_one(tmp_path):
    pytest.importorskip("lm_eval")
    from loraprune.eval import _unparsable_task_files

    (tmp_path / "good.yaml").write_text("task: good\ndataset_path: json\n")
    (tmp_path / "bad.yaml").write_text("task: bad\n\tx: 1\n")
    broken = _unparsable_task_files(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p, _ in broken] == ["bad.yaml"] and broken[0][1]


# ---- the CLI and the API agree ---------------------------------------------------------------------------
def _cli_config(*flags):
    from loraprune.apps.cli import build_parser
    from loraprune.apps.cli_prune import config_from_args

    return config_from_args(build_parser().parse_args(["prune", "--model", "m", "--data", "d", "--output", "o",
                                                       *flags]), checkpoint_dir="o")


@pytest.mark.parametrize("flags,api", [(("--uniform",), dict(uniform=True)),
                                       (("--uniform", "--ranking", "layer"), dict(uniform=True, ranking="layer")),
                                       (("--ranking", "global", "--seed", str(2**64 - 1)),
                                        dict(ranking="global", seed=2**64 - 1)),
                                       ((), {})])
def test_the_cli_builds_what_the_api_builds(flags, api):
    assert _cli_config(*flags) == PruneConfig(checkpoint_dir="o", **api)


def test_overrides_that_say_the_ranking_undo_uniform_as_asked():
    cfg = PruneConfig.from_kwargs(PruneConfig(uniform=True), uniform=False, ranking="adaptive")
    assert (cfg.uniform, cfg.ranking) == (False, "adaptive")
    pruned = loraprune.prune(tiny_model(), random_batches(n=2), PruneConfig(uniform=True, steps=2), seed=2**64 - 1,
                             uniform=False, ranking="global", progress=False)
    assert pruned.config.loraprune["settings"]["ranking"] == "global"


# ---- the demo: one line, exit 2; good flags run -------------------------------------------------------------
def test_demo_says_a_user_error_in_one_line_with_status_2(capsys):
    from loraprune.apps import demo

    assert demo.run(["--model", "reference", "--eval-windows", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "loraprune: error: --eval-windows must be >= 1, got 0"


@pytest.mark.slow
def test_demo_with_good_flags_runs_on_a_local_model_and_saves_it(tmp_path, capsys):
    from gguf_export_cases import TEXTS, gpt2_tokenizer
    from loraprune.apps import demo

    tok = gpt2_tokenizer()
    src = tmp_path / "dense"
    tiny_model(vocab_size=len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    for name in ("train", "held", "ood"):
        (tmp_path / f"{name}.txt").write_text(" ".join(TEXTS) * 20)
    out = tmp_path / "out"
    argv = ["--model", str(src), "--data", str(tmp_path / "train.txt"), "--eval-data", str(tmp_path / "held.txt"),
            "--ood-data", str(tmp_path / "ood.txt"), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
            "--eval-windows", "1", "--ratio", "0.3", "--output", str(out)]
    assert demo.run(argv) == 0
    saved = json.loads((out / "loraprune_demo.json").read_text())
    assert saved["after"]["params"] == sum(p.numel() for p in loraprune.load_pruned(out).parameters())
    assert demo.run(argv) == 0  # an earlier demo output is replaced, not refused
