"""The project's own small reference LLaMA, trained on Shakespeare.

The demo and the benchmarks need a LLaMA-architecture model *with grouped-query
attention* that has actually learned something, without any download.  This
module trains one on the fixed Shakespeare training split (see the shared data
README), deterministically under a seed, and caches it on disk:

    model, tokenizer = load_or_train_reference()          # fast preset (~3-4 min)
    model, tokenizer = load_or_train_reference(preset="bench")

Finding the data folder (the shared corpora, else the sample shipped with the
package) and the fixed Shakespeare split live in :mod:`loraprune.data.corpora`;
reading text in :mod:`loraprune.data.text_files`, tokenizing it in :mod:`loraprune.data.windows`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.corpora import shakespeare_split
from ..data.text_files import DOC_SEPARATOR, read_texts
from ..data.windows import token_stream
from ..eval import perplexity

__all__ = [
    "PRESETS",
    "TrainSettings",
    "train_tokenizer",
    "reference_config",
    "train_reference",
    "reference_cache_dir",
    "load_or_train_reference",
    "reference_stats",
]

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2

STATS_FILE = "training_stats.json"
_CACHE_FORMAT = 1  # bump when the on-disk layout or training code changes


# ---------------------------------------------------------------------- tokenizer
def train_tokenizer(paths_or_texts: Any, vocab_size: int = 4096, min_frequency: int = 2,
                    model_max_length: int = 1 << 20) -> Any:
    """Train a byte-level BPE tokenizer; returns a ``PreTrainedTokenizerFast``.

    Special tokens ``<s>``/``</s>``/``<pad>`` get ids 0/1/2.  No template adds
    them automatically (``add_special_tokens`` is a no-op), so tokenizing text
    gives exactly the text's tokens.  Training is deterministic for the same
    input and settings.

    Args:
        paths_or_texts: any :func:`loraprune.data.text_files.read_texts` source.
        vocab_size: target vocabulary size (small corpora may stop short of it).
        min_frequency: merges seen fewer times are not learned.
        model_max_length: the tokenizer's ``model_max_length``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = read_texts(paths_or_texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


# -------------------------------------------------------------------------- model
def reference_config(
    vocab_size: int = 4096,
    hidden_size: int = 256,
    intermediate_size: int = 768,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    **overrides: Any,
) -> Any:
    """A small LLaMA ``LlamaConfig`` with grouped-query attention.

    Defaults: 8 query heads sharing 2 KV heads (groups of 4), head_dim 32,
    ~3.9M parameters with tied embeddings (tying saves a vocab x hidden matrix
    that would otherwise be a quarter of this tiny model).

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers,
        num_attention_heads, num_key_value_heads, max_position_embeddings,
        tie_word_embeddings: as in ``LlamaConfig``.
        head_dim: ``None`` = ``hidden_size // num_attention_heads``.
        **overrides: any other ``LlamaConfig`` field.
    """
    from transformers import LlamaConfig

    if head_dim is None:
        head_dim = hidden_size // num_attention_heads
    if num_attention_heads % num_key_value_heads:
        raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads}).")
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained reference model (hashed for the cache key)."""

    vocab_size: int = 4096
    min_frequency: int = 2
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 32
    tie_word_embeddings: bool = True
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 400
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16_autocast: bool = False
    train_bytes: int | None = None  # cap on training text (tests); None = all

    def config(self):
        return reference_config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.seq_len,
            tie_word_embeddings=self.tie_word_embeddings,
        )


#: ``default`` fits the demo budget: ~3.9M params, 400 steps of 8 x 256 tokens
#: (~0.47 s/step, ~3.5 min in all on 2 idle EPYC cores).  fp32 on purpose: bf16
#: autocast is ~30% faster here (avx512_bf16) but slow on CPUs without native bf16.
#: ``bench`` is the larger model for the benchmarks (~8M params, same tokenizer
#: settings so perplexities are comparable; estimated ~25 min on 2 idle cores).
PRESETS: dict[str, TrainSettings] = {
    "default": TrainSettings(),
    "bench": TrainSettings(
        hidden_size=320,
        intermediate_size=896,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=40,
        seq_len=256,
        batch_size=16,
        steps=800,
        lr=2e-3,
    ),
}


def _lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    warmup = max(1, int(round(s.warmup_frac * s.steps)))
    if step < warmup:
        return s.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, s.steps - warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _param_groups(model, weight_decay: float):
    """Decay matrices only; norms (1-D) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _num_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def train_reference(settings: TrainSettings, train_ids: torch.Tensor, seed: int = 0,
                    progress: bool = True) -> tuple[Any, dict]:
    """Train a fresh reference model on a 1-D token stream; returns ``(model, stats)``.

    Each step samples ``batch_size`` random windows of ``seq_len`` tokens from
    the stream with a seeded generator, so the run is a pure function of
    (settings, data, seed) on a given machine/thread count.

    Args:
        settings: model size and optimiser settings.
        train_ids: the training text as one token stream.
        seed: seeds the initialisation and the window sampling.
        progress: show a tqdm bar.
    """
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    s = settings
    if train_ids.numel() <= s.seq_len + 1:
        raise ValueError(f"training text has {train_ids.numel()} tokens; need more than seq_len={s.seq_len}.")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(s.config())
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(s.seq_len)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(s.steps), desc="training reference LLaMA", disable=not progress, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s)
        starts = torch.randint(0, train_ids.numel() - s.seq_len, (s.batch_size,), generator=gen)
        batch = train_ids[starts[:, None] + offsets]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16_autocast):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == s.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{_lr_at(step, s):.2e}")
    bar.close()
    model.eval()
    tail = losses[-max(1, min(20, len(losses) // 10)):]
    stats = {
        "final_train_loss": sum(tail) / len(tail),
        "first_train_loss": losses[0],
        "tokens_seen": s.steps * s.batch_size * s.seq_len,
        "train_wall_time_s": time.perf_counter() - start,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, stats


# -------------------------------------------------------------------------- cache
def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LORAPRUNE_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "loraprune"
    return base / "reference"


def _resolve_settings(preset, steps) -> TrainSettings:
    if isinstance(preset, TrainSettings):
        s = preset
    elif preset in PRESETS:
        s = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or pass a TrainSettings.")
    return dataclasses.replace(s, steps=int(steps)) if steps is not None else s


def _cache_key(settings: TrainSettings, seed: int, train_names: Sequence[str]) -> str:
    """Short hash of everything that determines the weights (config, steps, seed, tokenizer, data)."""
    payload = {
        "format": _CACHE_FORMAT,
        "settings": dataclasses.asdict(settings),
        "model_config": {k: v for k, v in settings.config().to_diff_dict().items() if k != "transformers_version"},
        "seed": seed,
        "train_files": list(train_names),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def reference_cache_dir(cache_dir: str | os.PathLike | None = None, preset: str | TrainSettings = "default",
                        steps: int | None = None, seed: int = 0, data_dir: str | os.PathLike | None = None) -> Path:
    """The directory :func:`load_or_train_reference` uses for these arguments (same meaning)."""
    settings = _resolve_settings(preset, steps)
    train, _ = shakespeare_split(data_dir)
    return _cache_root(cache_dir) / _cache_key(settings, seed, [p.name for p in train])


def _is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in (STATS_FILE, "config.json", "model.safetensors", "tokenizer.json"))


def _load(path: Path):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tokenizer


def _remove_stale_tmp(root: Path, key: str) -> None:
    """Delete temp dirs of this key left by killed processes (pid in the name is dead)."""
    for tmp in root.glob(f".tmp-{key}-*"):
        try:
            pid = int(tmp.name.split("-")[2])  # .tmp-<key>-<pid>-<random>
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            pass


def _build(tmp: Path, settings: TrainSettings, seed: int, data_dir, progress: bool) -> None:
    """Train tokenizer + model into ``tmp`` (stats file written last)."""
    t0 = time.perf_counter()
    train_paths, heldout_paths = shakespeare_split(data_dir)
    raw = read_texts(train_paths)
    if settings.train_bytes is not None:
        per_file = max(1, settings.train_bytes // len(raw))
        raw = [t[:per_file] for t in raw]
    tokenizer = train_tokenizer(raw, vocab_size=settings.vocab_size, min_frequency=settings.min_frequency)
    tokenizer.model_max_length = settings.seq_len
    train_ids = token_stream(tokenizer, raw)
    model, stats = train_reference(settings, train_ids, seed=seed, progress=progress)

    held_texts = read_texts(heldout_paths)
    held_ids = token_stream(tokenizer, held_texts)
    eval_start = time.perf_counter()
    stats["heldout_perplexity"] = perplexity(model, held_ids, window=settings.seq_len, batch_size=16)
    stats["heldout_tokens"] = int(held_ids.numel())
    n_bytes = len(DOC_SEPARATOR.join(held_texts).encode("utf-8"))
    # Tokenizer-independent figure: bits per byte of held-out text (approximate:
    # the dropped tail window and each window's unscored first token are ignored).
    stats["heldout_bits_per_byte"] = math.log2(stats["heldout_perplexity"]) * held_ids.numel() / n_bytes
    stats["eval_wall_time_s"] = time.perf_counter() - eval_start
    stats.update(
        train_tokens_available=int(train_ids.numel()),
        total_wall_time_s=time.perf_counter() - t0,
        seed=seed,
        settings=dataclasses.asdict(settings),
        num_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True), encoding="utf-8")


def load_or_train_reference(
    cache_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    preset: str | TrainSettings = "default",
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` of the reference LLaMA, training it if not cached.

    The cache lives at ``<root>/<hash>/`` with root ``~/.cache/loraprune/reference``
    (``$LORAPRUNE_CACHE/reference`` if set, or ``cache_dir`` verbatim), the hash
    covering config, steps, seed, tokenizer settings and the training file list
    (so the shipped sample, with fewer files, never shares an entry with the full corpus).
    Training happens in a temporary sibling directory that is renamed into place
    only when complete, so an interrupted run never leaves a cache that looks valid.

    Args:
        cache_dir: the cache root (see above).
        data_dir: the data folder (:func:`loraprune.data.corpora.resolve_data_dir`: the
            shared corpora, else the sample shipped with the package).
        steps: overrides the preset's training steps.
        seed: seeds initialisation and sampling (part of the cache key).
        progress: show a tqdm bar while training.
        preset: ``"default"`` (fast, demo), ``"bench"`` or a :class:`TrainSettings`.
    """
    settings = _resolve_settings(preset, steps)
    train_paths, _ = shakespeare_split(data_dir)
    root = _cache_root(cache_dir)
    key = _cache_key(settings, seed, [p.name for p in train_paths])
    final = root / key
    if final.exists() and not _is_complete(final):
        # Only reachable if someone edited the cache by hand: rebuild it.
        shutil.rmtree(final, ignore_errors=True)
    if not _is_complete(final):
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=root))
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(_num_threads())
        try:
            _build(tmp, settings, seed, data_dir, progress)
            try:
                os.replace(tmp, final)
            except OSError:
                if not _is_complete(final):  # lost a race to a concurrent writer: theirs is equivalent
                    raise
        finally:
            torch.set_num_threads(prev_threads)
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)


def reference_stats(cache_path: str | os.PathLike) -> dict:
    """Read the training stats JSON stored beside a cached reference model."""
    return json.loads((Path(cache_path) / STATS_FILE).read_text(encoding="utf-8"))
