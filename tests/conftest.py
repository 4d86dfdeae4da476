import os

import torch  # importing torch does not import triton

# Must precede any triton import: @triton.jit picks the interpreter at decoration time.
# Interpret only where there is no GPU, so that gpu-marked tests run native kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Markers (gpu, slow) are declared in pyproject.toml and set in the test files themselves
# (`pytestmark = pytest.mark.slow` or `@pytest.mark.slow`): a renamed test keeps its marker.

def pytest_collection_modifyitems(config, items):
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
    from loraprune.data.corpora import resolve_data_dir

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
