"""PNG figures from the benchmark JSON (matplotlib, no display needed).

* ``kept_per_layer.png``: kept KV heads and MLP channels per layer (``lora``,
  each ratio), and which channels survive (layer x channel map).
* ``scores_per_layer.png``: distribution of the final EMA channel and head
  scores per layer, ``lora`` beside ``grad``.
* ``schedule.png``: removed share of the projection parameters over the
  steps (cubic schedule as followed), per ratio.
* ``ppl_vs_ratio.png``: perplexity / dense against the removed ratio, per
  criterion and eval set (mean over seeds, min-max bars).
* ``memory.png`` and ``speed.png`` if those results exist.
"""
from __future__ import annotations

from pathlib import Path

from .common import read_json


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _first_detail(q: dict, method: str) -> dict[str, dict]:
    """``{ratio: details}`` of ``method``'s first-seed run at each ratio."""
    out = {}
    for key, d in q.get("details", {}).items():
        m, rest = key.split("@", 1)
        if m == method:
            out[rest.split("#", 1)[0]] = d
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


def kept_per_layer(q: dict, path: Path) -> Path | None:
    plt = _plt()
    det = _first_detail(q, "lora")
    if not det:
        return None
    fig, axes = plt.subplots(1 + len(det), 2, figsize=(11, 3 + 2.2 * len(det)), squeeze=False)
    n_layers = len(next(iter(det.values()))["masks"]["layers"])
    width = 0.8 / len(det)
    for i, (ratio, d) in enumerate(det.items()):
        layers = d["masks"]["layers"]
        kv = [len(l["kv_groups"]) for l in layers]
        ch = [len(l["mlp_channels"]) for l in layers]
        xs = [j + i * width for j in range(n_layers)]
        axes[0][0].bar(xs, kv, width, label=f"{float(ratio):.0%} removed")
        axes[0][1].bar(xs, ch, width, label=f"{float(ratio):.0%} removed")
    axes[0][0].axhline(layers[0]["n_kv_groups"], color="k", lw=0.8, ls="--", label="dense")
    axes[0][1].axhline(layers[0]["n_mlp_channels"], color="k", lw=0.8, ls="--", label="dense")
    for ax in axes[0]:
        ax.set_xticks([j + width * (len(det) - 1) / 2 for j in range(n_layers)], range(n_layers))
    axes[0][0].set(title="kept KV-head groups per layer (lora)", xlabel="layer", ylabel="groups")
    axes[0][1].set(title="kept MLP channels per layer (lora)", xlabel="layer", ylabel="channels")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    for i, (ratio, d) in enumerate(det.items(), start=1):
        layers = d["masks"]["layers"]
        import numpy as np

        kept = np.zeros((len(layers), layers[0]["n_mlp_channels"]))
        heads = np.zeros((len(layers), layers[0]["n_kv_groups"]))
        for j, l in enumerate(layers):
            kept[j, l["mlp_channels"]] = 1
            heads[j, l["kv_groups"]] = 1
        for ax in axes[i]:
            ax.set_yticks(range(len(layers)))
        axes[i][0].set_xticks(range(heads.shape[1]))
        axes[i][0].imshow(heads, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        axes[i][0].set(title=f"kept KV groups (green), {float(ratio):.0%} removed", xlabel="KV group", ylabel="layer")
        axes[i][1].imshow(kept, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        axes[i][1].set(title=f"kept MLP channels (green), {float(ratio):.0%} removed", xlabel="channel", ylabel="layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scores_per_layer(q: dict, path: Path) -> Path | None:
    import math

    plt = _plt()
    lora, grad = _first_detail(q, "lora"), _first_detail(q, "grad")
    if not lora:
        return None
    ratio = max(lora, key=float)
    shown = {"lora": lora[ratio]}
    if ratio in grad:
        shown["grad"] = grad[ratio]
    fig, axes = plt.subplots(len(shown), 2, figsize=(11, 3.2 * len(shown)), squeeze=False)
    for row, (name, d) in enumerate(shown.items()):
        for col, key in enumerate(("mlp_scores", "attn_scores")):
            data = [[math.log10(max(v, 1e-30)) for v in layer] for layer in d[key]]
            ax = axes[row][col]
            if col == 0:
                ax.boxplot(data, showfliers=False)
            else:
                for j, layer in enumerate(data, start=1):
                    ax.scatter([j] * len(layer), layer, s=14)
            what = "MLP channel" if col == 0 else "KV-group"
            ax.set(title=f"{name}: final EMA {what} scores ({float(ratio):.0%} run)", xlabel="layer (1-based)",
                   ylabel="log10 score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def schedule(q: dict, path: Path) -> Path | None:
    plt = _plt()
    det = _first_detail(q, "lora")
    if not det:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for ratio, d in det.items():
        steps = [t for t, _ in d["trace"]]
        removed = [r for _, r in d["trace"]]
        ax.step(steps, removed, where="post", label=f"target {float(ratio):.0%}")
        ax.axhline(float(ratio), color="gray", lw=0.6, ls=":")
    ax.set(title="pruning schedule followed (lora)", xlabel="optimizer step",
           ylabel="removed share of projection params")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ppl_vs_ratio(q: dict, path: Path) -> Path | None:
    plt = _plt()
    summ = q.get("summary", {})
    if not summ:
        return None
    sets = [s for s in ("shakespeare", "wikitext2", "ptb") if any(s in c for m in summ.values() for c in m.values())]
    windows = list(q["reference"]["windows"])
    fig, axes = plt.subplots(len(windows), len(sets), figsize=(4.2 * len(sets), 3.4 * len(windows)), squeeze=False)
    for wi, w in enumerate(windows):
        for si, s in enumerate(sets):
            ax = axes[wi][si]
            for method, cells in sorted(summ.items()):
                xs, ys, lo, hi = [0.0], [1.0], [0.0], [0.0]
                for ratio, cell in sorted(cells.items(), key=lambda kv: float(kv[0])):
                    st = cell[s][w]
                    xs.append(float(ratio))
                    ys.append(st["mean"])
                    lo.append(st["mean"] - st["min"])
                    hi.append(st["max"] - st["mean"])
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method)
            ax.set(title=f"{s}, {w} ({q['reference']['windows'][w]} tokens)", xlabel="removed ratio",
                   ylabel="perplexity / dense")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_plot(m: dict, path: Path) -> Path | None:
    plt = _plt()
    summ = m.get("summary", {})
    crit, step = summ.get("criterion", {}), summ.get("step", {})
    if not crit and not step:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(crit)
    mib = 2**20
    axes[0].bar([i - 0.2 for i in range(len(names))], [crit[n]["eager_extra_bytes"] / mib for n in names], 0.4,
                label="eager (G and BA formed)")
    axes[0].bar([i + 0.2 for i in range(len(names))], [crit[n]["ours_extra_bytes"] / mib for n in names], 0.4,
                label="ours (row blocks)")
    axes[0].set_xticks(range(len(names)), names, fontsize=8)
    axes[0].set(title="criterion alone: peak extra memory", ylabel="MiB", yscale="log")
    axes[0].legend(fontsize=8)
    names = list(step)
    axes[1].bar([i - 0.2 for i in range(len(names))], [step[n]["lora_extra_bytes"] / mib for n in names], 0.4, label="lora")
    axes[1].bar([i + 0.2 for i in range(len(names))], [step[n]["grad_extra_bytes"] / mib for n in names], 0.4, label="grad")
    axes[1].set_xticks(range(len(names)), names, fontsize=8)
    axes[1].set(title="one pruning step: peak extra memory", ylabel="MiB", yscale="log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speed_plot(s: dict, path: Path) -> Path | None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, mode in zip(axes, ("prefill", "decode")):
        models = {k: v for k, v in s.get(mode, {}).get("models", {}).items() if k != "dense"}
        names = list(models)
        ax.bar([i - 0.2 for i in range(len(names))], [models[n]["speedup"] for n in names], 0.4, label="measured")
        ax.bar([i + 0.2 for i in range(len(names))], [models[n]["ideal_speedup"] for n in names], 0.4, label="ideal (FLOPs)")
        ax.set_xticks(range(len(names)), [f"{float(n):.0%} removed" for n in names])
        ax.axhline(1.0, color="k", lw=0.7)
        ax.set(title=f"{mode} speed-up over dense", ylabel="x")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(setup, settings=None, log=print) -> dict:
    out = setup.out
    made = {}
    q_path, m_path, s_path = out / "quality.json", out / "memory.json", out / "speed.json"
    if q_path.is_file():
        q = read_json(q_path)
        for name, fn in (("kept_per_layer", kept_per_layer), ("scores_per_layer", scores_per_layer),
                         ("schedule", schedule), ("ppl_vs_ratio", ppl_vs_ratio)):
            p = fn(q, out / f"{name}.png")
            if p:
                made[name] = str(p)
    if m_path.is_file():
        p = memory_plot(read_json(m_path), out / "memory.png")
        if p:
            made["memory"] = str(p)
    if s_path.is_file():
        p = speed_plot(read_json(s_path), out / "speed.png")
        if p:
            made["speed"] = str(p)
    for k, v in made.items():
        log(f"plots: {k} -> {v}")
    if not made:
        log(f"plots: no results in {out}; run quality/memory/speed first")
    return made
