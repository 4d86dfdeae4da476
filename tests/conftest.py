import os

import torch  # importing torch does not import triton

# Must precede any triton import: @triton.jit picks the interpreter at decoration time.
# Interpret only where there is no GPU, so that gpu-marked tests run native kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Markers (gpu, slow) are declared in pyproject.toml.

#: Tests that train, spawn subprocesses or compile: ``pytest -m "not slow"`` leaves
#: them out for a fast inner loop; CI runs everything. Listed here, by file or by
#: ``file::test`` (parametrised ids match by their base name), so the test files stay untouched.
SLOW_FILES = {
    "test_bench_smoke.py",
    "test_callback.py",
    "test_checkpoint.py",
    "test_kernels_compile_check.py",
    "test_kernels_memory.py",
    "test_quality.py",
    "test_prune_guarantees.py",  # prune() runs that fail or finish on purpose
    "test_gpu_check.py",
}
SLOW_TESTS = {
    "test_reference.py::test_tiny_training_deterministic_loss_decreases",
    "test_reference.py::test_cache_is_reused",
    "test_reference.py::test_atomic_write_on_failure",
    "test_reference.py::test_stale_temp_dir_from_killed_run_is_ignored",
    "test_criterion.py::test_lora_criterion_allocates_no_out_by_in_temporary",
    "test_kernels_backend.py::test_env_default_and_triton_on_cpu_needs_interpreter",
    "test_data.py::test_public_surface_is_small_and_lazy",
    "test_prune.py::test_triton_kernels_drive_the_same_run",
    "test_method.py::test_adaptive_ranking_end_to_end_gives_a_per_layer_model_at_the_ratio",
    "test_method.py::test_grad_accum_equals_one_big_batch_for_the_lora_gradients",
    "test_method.py::test_distillation_run_prunes_and_records_the_setting",
    "test_config.py::test_prune_takes_a_config_or_a_float_ratio_positionally",
    # prune() training runs (measured 6-43 s each on the shared 2-core machine)
    "test_prune.py::test_end_to_end_smaller_model_and_report",
    "test_prune.py::test_deterministic_under_seed",
    "test_prune.py::test_different_seed_changes_result",
    "test_prune.py::test_other_criteria_run",
    "test_prune.py::test_global_ranking_and_skip_layers_give_per_layer_model",
    "test_prune.py::test_text_data_with_tokenizer",
    "test_prune.py::test_on_step_hook_sees_every_step_and_the_schedule",
    "test_prune.py::test_global_ranking_honours_skip_layers",
    "test_prune.py::test_tokenized_dataset_is_accepted",
    "test_prune.py::test_user_batches_are_normalised",
    "test_cli.py::test_prune_inspect_eval_session",
    # per-layer round trips of every architecture (the uniform ones stay in the fast loop)
    "test_archs.py::test_per_layer_round_trip",
    "test_archs.py::test_round_to_reports_its_cost_on_the_parameter_target",
}


def _is_slow(item) -> bool:
    file = Path(str(item.fspath)).name
    return file in SLOW_FILES or f"{file}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ------------------------------------------------------------------ data folder
@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The text corpora: ``$LORAPRUNE_DATA``, ``../shared/data`` beside the repository,
    else the sample shipped in the package. Always holds ``shakespeare/``."""
    from loraprune.data import resolve_data_dir

    folder = resolve_data_dir()
    assert (folder / "shakespeare").is_dir(), f"{folder} has no shakespeare/; unset LORAPRUNE_DATA or fix it"
    return folder


@pytest.fixture(scope="session")
def eval_data_dir(data_dir) -> Path:
    """A data folder that also holds WikiText-2 and PTB (the shared corpora); skips when absent
    (a fresh clone has only the shipped Shakespeare sample)."""
    if not all((data_dir / sub / "test.txt").is_file() for sub in ("wikitext-2", "ptb")):
        pytest.skip(f"WikiText-2 / PTB not in {data_dir}; set LORAPRUNE_DATA to the shared data folder")
    return data_dir
