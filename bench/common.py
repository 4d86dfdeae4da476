"""Shared plumbing of the benchmarks: the model under test, data, results files.

Every figure is a JSON file under ``bench/results/`` (or ``--out``) holding the
command that made it, the machine, the date and the measured numbers; numbers
that compare two things are ratios taken in one run, never absolute times
compared across runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: The smoke-size reference: a two-layer GQA LLaMA trained for a few steps on a
#: miniature copy of the data (seconds, for the test suite).
SMOKE_SETTINGS = dict(
    vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, seq_len=64, batch_size=4, steps=10, lr=3e-3,
)
SMOKE_BYTES = 15_000  # per file of the miniature data copy


# ------------------------------------------------------------------ provenance
def machine_info() -> dict:
    """CPU model, core count, thread count and library versions of this machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    import transformers

    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu": cpu,
        "nproc": cores,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def command_line() -> str:
    """The command as the user would retype it (``python -m bench.run ...``)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("run.py", "__main__.py")):
        argv = ["python", "-m", "bench.run"] + argv[1:]
    return " ".join(shlex.quote(a) for a in argv)


def write_json(path: Path, payload: dict) -> Path:
    """Atomic JSON write (:func:`loraprune.utils.atomic.write_atomic`): no half-written results."""
    from loraprune.utils.atomic import write_atomic

    return write_atomic(path, json.dumps(payload, indent=1, default=_jsonable))


def _jsonable(obj):
    if torch.is_tensor(obj):
        return obj.tolist()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def result_payload(figure: str, settings: dict, results: dict) -> dict:
    return {
        "figure": figure,
        "command": command_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": settings,
        **results,
    }


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------ the setup
@dataclass
class BenchSetup:
    """Where data, cache and results live, and how big the run is."""

    out: Path = RESULTS_DIR
    smoke: bool = False
    preset: str = "default"
    data_dir: Path | None = None
    cache_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def create(cls, out=None, smoke=False, preset="default", data_dir=None, cache_dir=None) -> "BenchSetup":
        from loraprune.data.corpora import resolve_data_dir

        # a smoke run never overwrites the real figures
        out = Path(out) if out else (RESULTS_DIR / "smoke" if smoke else RESULTS_DIR)
        data = resolve_data_dir(data_dir)
        if smoke:
            data = miniature_data(data, out / ".smoke-data")
            cache_dir = Path(cache_dir) if cache_dir else out / ".smoke-cache"
        return cls(out=out, smoke=smoke, preset=preset, data_dir=data, cache_dir=cache_dir)

    # -- the model under test
    def reference(self):
        """``(model, tokenizer, stats)`` of the cached reference model (trained on first use)."""
        from loraprune.apps.toy_shakespeare import (
            TrainSettings,
            load_or_train_reference,
            reference_cache_dir,
            reference_stats,
        )

        preset = TrainSettings(**SMOKE_SETTINGS) if self.smoke else self.preset
        model, tok = load_or_train_reference(cache_dir=self.cache_dir, data_dir=self.data_dir, preset=preset,
                                             progress=not self.smoke)
        stats = reference_stats(reference_cache_dir(self.cache_dir, preset=preset, data_dir=self.data_dir))
        return model.eval(), tok, stats

    # -- data
    def train_texts(self) -> list[str]:
        from loraprune.data.corpora import shakespeare_split
        from loraprune.data.text_files import read_texts

        train, _ = shakespeare_split(self.data_dir)
        return read_texts(train)

    def eval_text(self, name: str) -> str:
        from loraprune.data.corpora import load_eval_text

        return load_eval_text(name, "test", data_dir=self.data_dir)


def miniature_data(src: Path, dst: Path) -> Path:
    """A small copy of the shared data folder (first ``SMOKE_BYTES`` of each file) for smoke runs."""
    from loraprune.data.corpora import shakespeare_split

    train, held = shakespeare_split(src)
    for p in train[:4] + held:
        target = dst / "shakespeare" / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.write_text(p.read_text(encoding="utf-8")[:SMOKE_BYTES], encoding="utf-8")
    for folder in ("wikitext-2", "ptb"):
        source = src / folder / "test.txt"
        target = dst / folder / "test.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_file() and not target.exists():
            target.write_text(source.read_text(encoding="utf-8")[: 4 * SMOKE_BYTES], encoding="utf-8")
    return dst


def evenly_spaced_windows(stream: torch.Tensor, window: int, max_windows: int | None) -> torch.Tensor:
    """At most ``max_windows`` non-overlapping ``window``-token windows spread evenly over the
    stream, concatenated; :func:`loraprune.eval.perplexity` with the same ``window`` re-cuts
    exactly these windows. ``None`` keeps every window (the whole text)."""
    from loraprune.data.windows import cut_windows

    rows = cut_windows(stream, window)
    if max_windows is not None and rows.shape[0] > max_windows:
        pick = torch.linspace(0, rows.shape[0] - 1, max_windows).round().long()
        rows = rows[pick]
    return rows.reshape(-1)


# ------------------------------------------------------------- pruning traces
class PruneRecorder:
    """``on_step`` hook for :func:`loraprune.prune`: keeps the engine (final EMA
    scores, masks, schedule) and the removed-parameter fraction after every
    step, for the plots."""

    def __init__(self):
        self.pruner = None
        self.trace: list[tuple[int, float]] = []

    def __call__(self, step, pruner, loss):
        self.pruner = pruner
        self.trace.append((step, pruner.removed_params() / pruner.total_params))


def stats_summary(values: list[float]) -> dict:
    """Mean, sample standard deviation, min, max and count of a list of numbers."""
    import statistics

    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def importance_eager_fp32(weight, lora_A, lora_B, grad_A, grad_B, scaling, square=False, dtype=torch.float32):
    """The eager computation a PEFT user writes today (forms G and B A, out x in each), in ``dtype``.

    In fp32 it is the benchmarks' baseline; in fp64 the kernels' test oracle
    (``tests/kernel_oracles.importance_ref``): the plain formula has one home."""
    W, A, B, gA, gB = (t.to(dtype) for t in (weight, lora_A, lora_B, grad_A, grad_B))
    G = gB @ A + B @ gA - gB @ gA
    S = G * (W + scaling * (B @ A))
    S = S * S if square else S.abs()
    return S.sum(1), S.sum(0)


def run_fresh(cmd: list[str]) -> int:
    """Run one benchmark case in a fresh process (its own memory peak, nothing cached), echoing the
    command and the last line it printed; returns its exit code."""
    import subprocess

    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    print(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else f"failed ({res.returncode})", flush=True)
    return res.returncode
