"""What the ``loraprune`` command reads: models (directories, GGUF files, hub ids), tokenizers, text.

Every problem a user can fix is a :class:`CLIError` (a
:class:`~loraprune.errors.LoRAPruneError`) whose message names the option and
the fix; paths are checked before any model is loaded.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import CLIError, ModelLoadError
from ..utils.paths import looks_like_path


def check_path_exists(option: str, value: str | None, what: str) -> None:
    """Refuse a path-like ``value`` that does not exist, naming ``option``."""
    if value is None or not looks_like_path(value):
        return
    if not Path(value).expanduser().exists():
        raise CLIError(f"{option} {value} does not exist; pass {what}")


# ------------------------------------------------------------------ device and dtype
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_HELP = ("where the model runs: cpu, cuda, cuda:N, or auto (device_map='auto': the layers spread over the "
               "visible GPUs, then CPU; needs accelerate). Default: cuda when a GPU is visible, else cpu")
DTYPE_HELP = ("dtype of the frozen weights: auto = bfloat16 on CUDA (float16 on GPUs without bf16), float32 on CPU; "
              "LoRA factors always train in float32")


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype the command loads the model (``--device``, ``--dtype``)."""

    device: str  # "cpu", "cuda", "cuda:N", or "auto" (device_map="auto")
    dtype: str  # float32 / bfloat16 / float16

    @property
    def device_map(self) -> str | None:
        return "auto" if self.device == "auto" else None

    def describe(self, model) -> str:
        """The device(s) the model's weights are on, e.g. ``cuda:0`` or ``auto: cuda:0, cuda:1``."""
        import torch

        if self.device == "auto":  # hf_device_map names GPUs by index
            placed = (getattr(model, "hf_device_map", None) or {}).values()
            used = sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed})
            return "auto: " + ", ".join(used or ["cpu"])

        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return str(device)


def resolve_placement(device: str | None, dtype: str = "auto") -> Placement:
    """Check ``--device``/``--dtype`` (before anything is loaded) and fill in the defaults."""
    import torch

    cuda = torch.cuda.is_available()
    if device is None:
        device = "cuda" if cuda else "cpu"
    device = device.strip().lower()
    if device == "auto":
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise CLIError("--device auto needs accelerate (pip install accelerate); or pass --device cuda / cpu")
    elif device != "cpu":
        kind, _, index = device.partition(":")
        if kind != "cuda" or (index and not index.isdigit()):
            raise CLIError(f"--device {device}: pass cpu, cuda, cuda:N or auto")
        if not cuda:
            raise CLIError(f"--device {device}: no CUDA GPU is visible (torch.cuda.is_available() is False); pass "
                           "--device cpu, or install a CUDA build of torch on a GPU machine")
        if index and int(index) >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pass one of them")
    if dtype not in DTYPES:
        raise CLIError(f"--dtype {dtype}: pass one of {', '.join(DTYPES)}")
    if dtype == "auto":
        on_gpu = device.startswith("cuda") or (device == "auto" and cuda)
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if on_gpu else "float32"
    return Placement(device, dtype)


def load_model_and_tokenizer(name: str, tokenizer_name: str | None = None, dtype: str = "float32",
                             need_tokenizer: bool = True, device: str = "cpu"):
    """``(model, tokenizer)`` for ``--model`` / ``--tokenizer``: :func:`loraprune.export.loader.load_model_and_tokenizer`,
    its errors said under the flags that were passed."""
    from ..export import loader

    with flag_errors():
        return loader.load_model_and_tokenizer(name, tokenizer_name, dtype, need_tokenizer, device)


def load_tokenizer(name: str):
    from ..export import loader

    with flag_errors():
        return loader.load_tokenizer(name)


@contextmanager
def flag_errors():
    """Say a loader's :class:`ModelLoadError` under the command line's flag (``--model x does not exist; ...``)."""
    try:
        yield
    except ModelLoadError as err:
        if err.field == "tokenizer":  # read from --model unless --tokenizer was given: name the flag that fixes it
            cause = f" ({type(err.__cause__).__name__})" if err.__cause__ is not None else ""
            raise CLIError(f"no tokenizer found at {err.value!r}{cause}; pass --tokenizer DIR_OR_HUB_ID") from err
        raise CLIError(f"--{err.field} {err.value} {err.detail}") from err


def eval_texts(data: str, split: str = "test", option: str = "--data"):
    """Texts for perplexity: local files/folders via :mod:`loraprune.data.corpora`, else named/hub sets."""
    from ..data.corpora import load_eval_text, load_texts

    check_path_exists(option, data, "a .txt/.jsonl file, a folder of them, or wikitext2 / ptb / shakespeare")
    if os.path.exists(data):
        p = Path(data)
        if p.is_dir() and (p / f"{split}.txt").is_file():
            return [load_eval_text(str(p), split)]
        return load_texts(data)
    try:
        return [load_eval_text(data, split)]
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"{option} {data}: {err}") from err
