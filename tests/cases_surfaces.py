"""Issue 26, the surfaces: evaluation arguments, the demo's flags, options the CLI and the API must refuse
alike, and ratios that blocks cannot reach (exact or refused, before any work).

Demo cases run ``demo.main`` with the model loader (or the pruning) replaced by a guard that fails the case:
a flag must be refused before the model loads, not found after it was loaded, measured or pruned.
"""
from unittest import mock

import torch

import loraprune
from bad_input_table import Case
from loraprune.config import PruneConfig
from tiny import random_batches, tiny_model

TOO_BIG_SEED = 2**64  # torch.manual_seed takes [0, 2**64 - 1]


# ---- evaluation: one argument checker for perplexity, throughput and lm-eval ----------------------------
def _ppl(**kw):
    from loraprune.eval import perplexity

    return lambda tmp_path: perplexity(tiny_model(), torch.arange(300) % 97, **{"window": 16, **kw})


def _tps(**kw):
    from loraprune.eval import tokens_per_second

    return lambda tmp_path: tokens_per_second(tiny_model(), **{"repeats": 1, "warmup": 0, **kw})


def _lm_eval(yaml_text=None, **kw):
    def call(tmp_path):
        from loraprune.eval import lm_eval_tasks

        tasks = tmp_path / "tasks"
        tasks.mkdir()
        if yaml_text is not None:
            (tasks / "mytask.yaml").write_text(yaml_text)
        from gguf_export_cases import gpt2_tokenizer

        return lm_eval_tasks(tiny_model(), gpt2_tokenizer(), "mytask", include_path=str(tasks), **kw)
    return call


_NO_GPU = r"no CUDA GPU is visible|CUDA device\(s\) are visible"  # CPU machine, or a GPU machine with fewer GPUs

CASES = [
    Case("surf-ppl-batch-size-zero", _ppl(batch_size=0), r"batch_size must be >= 1, got 0"),
    Case("surf-ppl-batch-size-negative", _ppl(batch_size=-2), r"batch_size must be >= 1, got -2"),
    Case("surf-ppl-batch-size-float", _ppl(batch_size=2.5), r"batch_size must be an integer >= 1, got 2\.5"),
    Case("surf-ppl-batch-size-bool", _ppl(batch_size=True), r"batch_size must be an integer >= 1, got True"),
    Case("surf-ppl-batch-size-string", _ppl(batch_size="8"), r"batch_size must be an integer >= 1, got '8'"),
    Case("surf-ppl-max-windows-zero", _ppl(max_windows=0), r"max_windows must be >= 1, got 0.*None for all windows"),
    Case("surf-ppl-max-windows-negative", _ppl(max_windows=-1), r"max_windows must be >= 1, got -1"),
    Case("surf-ppl-max-windows-float", _ppl(max_windows=2.5), r"max_windows must be an integer"),
    Case("surf-ppl-device-missing-gpu", _ppl(device="cuda:99"), _NO_GPU),
    Case("surf-ppl-device-not-a-device", _ppl(device="gpu"), r"device='gpu' is not a device.*'cpu', 'cuda'"),
    Case("surf-ppl-device-bad-index", _ppl(device="cuda:x"), r"device='cuda:x' is not a device"),
    Case("surf-ppl-window-past-context", _ppl(window=65),
         r"window=65 exceeds the model's context \(max_position_embeddings=64\); pass window<=64"),
    Case("surf-ppl-window-far-past-context", _ppl(window=4096), r"window=4096 exceeds the model's context"),
    Case("surf-tps-batch-size-zero", _tps(batch_size=0), r"batch_size must be >= 1, got 0"),
    Case("surf-tps-decode-new-tokens-zero", _tps(mode="decode", new_tokens=0), r"new_tokens must be >= 1, got 0"),
    Case("surf-tps-decode-new-tokens-negative", _tps(mode="decode", new_tokens=-4), r"new_tokens must be >= 1"),
    Case("surf-tps-repeats-zero", _tps(repeats=0), r"repeats must be >= 1, got 0"),
    Case("surf-tps-warmup-negative", _tps(warmup=-1), r"warmup must be >= 0, got -1"),
    Case("surf-tps-decode-prompt-len-zero", _tps(mode="decode", prompt_len=0), r"prompt_len must be >= 1"),
    Case("surf-tps-prefill-past-context", _tps(seq_len=65), r"seq_len=65 exceeds the model's context"),
    Case("surf-tps-decode-past-context", _tps(mode="decode", prompt_len=60, new_tokens=8),
         r"prompt_len\+new_tokens=68 exceeds the model's context"),
    Case("surf-lm-eval-batch-size-zero", _lm_eval(batch_size=0), r"batch_size must be >= 1, got 0"),
    Case("surf-lm-eval-yaml-tab-indent", _lm_eval("task: mytask\n\tdataset_path: json\n"),
         r"failed to parse.*mytask\.yaml.*(tab|scan)"),
    Case("surf-lm-eval-yaml-unclosed", _lm_eval("task: mytask\nmetric_list: [acc\n"),
         r"failed to parse.*mytask\.yaml.*(flow|expected)"),
    Case("surf-lm-eval-yaml-not-a-mapping", _lm_eval("- task: mytask\n"),
         r"failed to parse.*mytask\.yaml.*Expected YAML dict"),
]


# ---- the demo: the CLI's loader and error printer; flags checked before the model loads ----------------
def _loaded(*a, **k):
    raise AssertionError("the model was loaded before the flags were checked")


def _demo(*argv, guard="_load", model="reference"):
    """``python -m loraprune.demo --model MODEL --steps 2 ARGV`` ({tmp} = the case's folder)."""
    def call(tmp_path):
        from loraprune.apps import demo

        (tmp_path / "file.txt").write_text("a file, not a folder")
        (tmp_path / "empty.txt").write_text("")
        (tmp_path / "no_text").mkdir()
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "notes.txt").write_text("someone's notes")
        (tmp_path / "not_a_model").mkdir()
        args = ["--model", model.format(tmp=tmp_path), "--steps", "2", "--output", str(tmp_path / "out"),
                *[a.format(tmp=tmp_path) for a in argv]]
        with mock.patch.object(demo, guard, side_effect=_loaded):
            return demo.main(args)
    return call


CASES += [
    Case("surf-demo-eval-windows-zero", _demo("--eval-windows", "0"), r"--eval-windows must be >= 1, got 0"),
    Case("surf-demo-eval-windows-negative", _demo("--eval-windows", "-3"), r"--eval-windows must be >= 1, got -3"),
    Case("surf-demo-data-missing", _demo("--data", "{tmp}/missing.txt"), r"--data .*missing\.txt does not exist"),
    Case("surf-demo-data-empty-file", _demo("--data", "{tmp}/empty.txt"), r"--data .*empty\.txt holds no text"),
    Case("surf-demo-data-folder-without-text", _demo("--data", "{tmp}/no_text"), r"--data: folder .*no_text holds no"),
    Case("surf-demo-eval-data-missing", _demo("--eval-data", "{tmp}/missing.txt"), r"--eval-data .*does not exist"),
    Case("surf-demo-eval-data-empty", _demo("--eval-data", "{tmp}/empty.txt"), r"--eval-data .*holds no text"),
    Case("surf-demo-ood-data-missing", _demo("--ood-data", "{tmp}/gone.txt"), r"--ood-data .*gone\.txt does not exist"),
    Case("surf-demo-output-is-a-file", _demo("--output", "{tmp}/file.txt"),
         r"--output .*file\.txt exists and is not a directory"),
    Case("surf-demo-output-under-a-file", _demo("--output", "{tmp}/file.txt/out"),
         r"cannot write --output .*file\.txt is a file"),
    Case("surf-demo-output-holds-other-files", _demo("--output", "{tmp}/busy"),
         r"--output .*busy exists and holds something other than an earlier pruned model"),
    Case("surf-demo-model-missing", _demo(model="{tmp}/no_such_model"), r"--model .*no_such_model does not exist"),
    Case("surf-demo-model-folder-not-a-model", _demo(model="{tmp}/not_a_model", guard="prune"),
         r"not_a_model has no config\.json"),
    Case("surf-demo-model-a-text-file", _demo(model="{tmp}/file.txt", guard="prune"),
         r"--model .*file\.txt is a file, not a model directory"),
    Case("surf-demo-uniform-adaptive", _demo("--uniform", "--ranking", "adaptive"),
         r"ranking='adaptive' contradicts uniform=True.*\(--ranking\)"),
    Case("surf-demo-seed-past-torch", _demo("--seed", str(TOO_BIG_SEED)), r"seed must be <= 18446744073709551615.*--seed"),
    Case("surf-demo-unknown-flag", _demo("--bogus"), r"unrecognized arguments: --bogus"),
    Case("surf-demo-ratio-not-a-number", _demo("--ratio", "half"), r"--ratio.*invalid float value: 'half'"),
]


# ---- the CLI builds its options through PruneConfig.from_kwargs; overrides that undo the config ----------
def _cli(*flags):
    def call(tmp_path):
        from loraprune.apps.cli import build_parser
        from loraprune.apps.cli_prune import config_from_args

        args = build_parser().parse_args(["prune", "--model", "m", "--data", "d", "--output", "o", *flags])
        return config_from_args(args, checkpoint_dir="o")
    return call


def _prune(model=None, data=None, config=None, **kw):
    kw.setdefault("steps", 2)
    kw.setdefault("progress", False)
    return lambda tmp_path: loraprune.prune((model or tiny_model)(), data or random_batches(n=2), config, **kw)


CASES += [
    Case("surf-cli-uniform-ranking-adaptive", _cli("--uniform", "--ranking", "adaptive"),
         r"ranking='adaptive' contradicts uniform=True.*\(--ranking\)"),
    Case("surf-cli-uniform-ranking-global", _cli("--uniform", "--ranking", "global"), r"uniform=True needs every layer"),
    Case("surf-cli-seed-too-big", _cli("--seed", str(TOO_BIG_SEED)), r"seed must be <= 18446744073709551615, got .*\(--seed\)"),
    Case("surf-cli-seed-far-too-big", _cli("--seed", str(10**30)), r"seed must be <= 18446744073709551615"),
    Case("surf-config-seed-too-big", lambda p: PruneConfig(seed=TOO_BIG_SEED), r"seed must be <= 18446744073709551615"),
    Case("surf-api-prune-seed-too-big", _prune(seed=TOO_BIG_SEED), r"seed must be <= 18446744073709551615"),
    Case("surf-api-oneshot-seed-too-big", lambda p: loraprune.oneshot_prune(tiny_model(), random_batches(n=1),
                                                                            seed=TOO_BIG_SEED),
         r"seed must be <= 18446744073709551615"),
    Case("surf-api-pruner-seed-too-big", lambda p: loraprune.LoRAPruner(tiny_model(), seed=TOO_BIG_SEED),
         r"seed must be <= 18446744073709551615"),
    Case("surf-config-override-undoes-uniform",
         lambda p: PruneConfig.from_kwargs(PruneConfig(uniform=True), uniform=False),
         r"uniform=False overrides a config with uniform=True.*say the ranking too"),
    Case("surf-api-prune-override-undoes-uniform", _prune(config=PruneConfig(uniform=True), uniform=False),
         r"uniform=False overrides a config with uniform=True"),
    Case("surf-api-pruner-override-undoes-uniform",
         lambda p: loraprune.LoRAPruner(tiny_model(), PruneConfig(uniform=True), uniform=False),
         r"uniform=False overrides a config with uniform=True"),
    Case("surf-config-replace-undoes-uniform", lambda p: PruneConfig(uniform=True).replace(uniform=False),
         r"uniform=False overrides a config with uniform=True"),
]


# ---- ratios are exact or refused: blocks, KV groups and caps checked before any work --------------------
def _shaped(layers, width):
    return lambda: tiny_model(num_hidden_layers=layers, intermediate_size=width)


_UNREACHABLE = r"ratio=0\.\d+ cannot be reached within 0\.01 with ranking='{}' and round_to={}.*land at 0\.\d+"


def _unreachable(ranking, round_to):
    return _UNREACHABLE.format(ranking, round_to) + r".*(keep the ratio with (round_to|ranking)=|lower round_to)"


CASES += [
    Case(f"surf-ratio-{layers}x{width}-round-to-{r}-at-{ratio}-{ranking}",
         _prune(model=_shaped(layers, width), ratio=ratio, round_to=r, ranking=ranking), _unreachable(ranking, r))
    for layers, width, r, ratio in ((4, 128, 128, 0.5), (4, 128, 64, 0.7), (4, 256, 64, 0.7))
    for ranking in ("layer", "global", "adaptive")
] + [
    Case("surf-ratio-2x48-round-to-32-at-0.3-layer", _prune(ratio=0.3, round_to=32, ranking="layer"),
         _UNREACHABLE.format("layer", 32) + r".*keep the ratio with round_to=8"),
    Case("surf-ratio-adaptive-caps-at-0.7", _prune(ratio=0.7),
         _UNREACHABLE.format("adaptive", 1) + r".*keep the ratio with ranking='global'"),
    Case("surf-ratio-adaptive-caps-4-layers-at-0.7", _prune(model=_shaped(4, 48), ratio=0.7), _unreachable("adaptive", 1)),
    Case("surf-ratio-pruner-round-to-128", lambda p: loraprune.LoRAPruner(_shaped(4, 128)(), ratio=0.5, round_to=128),
         _unreachable("adaptive", 128)),
    Case("surf-ratio-oneshot-round-to-128", lambda p: loraprune.oneshot_prune(
        _shaped(4, 128)(), random_batches(n=1), ratio=0.5, round_to=128, calib_batches=1), _unreachable("layer", 128)),
    Case("surf-ratio-oneshot-adaptive-caps", lambda p: loraprune.oneshot_prune(
        tiny_model(), random_batches(n=1), ratio=0.7, ranking="adaptive", calib_batches=1), _unreachable("adaptive", 1)),
    Case("surf-ratio-oneshot-global-round-to-64", lambda p: loraprune.oneshot_prune(
        _shaped(4, 256)(), random_batches(n=1), ratio=0.7, round_to=64, ranking="global", calib_batches=1),
         _unreachable("global", 64)),
]
