"""Markdown tables of the measured results, written into ``bench/README.md``.

``python -m bench.run report`` replaces the text between the
``<!-- NAME:begin -->`` / ``<!-- NAME:end -->`` markers of the README with
tables rendered from the JSON files, so the README never disagrees with them.
"""
from __future__ import annotations

import re
from pathlib import Path

from .common import read_json

README = Path(__file__).resolve().parent / "README.md"
SET_NAMES = {"shakespeare": "Shakespeare held-out", "wikitext2": "WikiText-2 test", "ptb": "PTB test"}


def _pm(cell: dict) -> str:
    if cell["n"] > 1:
        return f"{cell['mean']:.3f} ± {cell['std']:.3f}"
    return f"{cell['mean']:.3f}"


def provenance(p: dict) -> str:
    m = p["machine"]
    return (f"`{p['command']}` — {p['date']} — {m['cpu']}, {m['nproc']} cores visible, "
            f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}")


def quality_tables(q: dict) -> str:
    ref = q["reference"]
    windows = ref["windows"]
    cfg = ref["config"]
    tr = ref["training"]
    lines = [
        f"Reference model: {ref['num_parameters'] / 1e6:.2f}M parameters, {cfg['num_hidden_layers']} layers, hidden "
        f"{cfg['hidden_size']}, {cfg['num_attention_heads']} query heads sharing {cfg['num_key_value_heads']} KV heads "
        f"(head_dim {cfg['head_dim']}), MLP {cfg['intermediate_size']}, vocab {cfg['vocab_size']} (BPE), context "
        f"{cfg['max_position_embeddings']}; held-out Shakespeare perplexity {tr['heldout_perplexity']:.2f} "
        f"({tr['heldout_bits_per_byte']:.3f} bits/byte, {tr['heldout_tokens']} tokens, {windows['full']}-token "
        f"windows) after {tr['train_wall_time_s'] / 60:.1f} min of training.",
        "",
        "Dense perplexity on the evaluation windows: " + "; ".join(
            f"{SET_NAMES[s]} {ref['dense'][s]['w128']:.2f} ({windows['w128']} tok) / {ref['dense'][s]['full']:.2f} "
            f"({windows['full']} tok)" for s in SET_NAMES if s in ref["dense"]) + ".",
        "",
    ]
    s = q["settings"]
    seeds = len(s["seeds"])
    for w in windows:
        lines += [f"**Perplexity / dense, {windows[w]}-token windows** (mean ± std over {seeds} seed"
                  f"{'s' if seeds > 1 else ''}; removed share of decoder-projection parameters actually reached in "
                  "the last column):", ""]
        ratios = sorted({float(r) for m in q["summary"].values() for r in m}, key=float)
        head = "| method | " + " | ".join(f"{SET_NAMES[x]} @{r:.0%}" for r in ratios for x in SET_NAMES) + " | reached |"
        lines += [head, "|" + "---|" * (2 + len(ratios) * len(SET_NAMES))]
        order = [m for m in ("lora", "grad", "magnitude", "random", "oneshot-flap", "oneshot-wanda-sp") if m in q["summary"]]
        for method in order:
            cells = q["summary"][method]
            row = [method]
            reached = []
            for r in ratios:
                c = cells.get(f"{r:g}")
                for x in SET_NAMES:
                    row.append(_pm(c[x][w]) if c and x in c else "—")  # a set the run had no text for
                if c:
                    reached.append(f"{c['achieved_ratio']['mean']:.3f}")
            lines.append("| " + " | ".join(row) + " | " + " / ".join(reached) + " |")
        lines.append("")
    anchors = q.get("paper_anchors", {})
    if anchors:
        lines += ["Paper anchors (LLaMA-7B, WikiText-2, 128-token windows, ratio to dense 12.62): " + "; ".join(
            f"{float(r):.0%}: " + ", ".join(f"{k} {v:.2f}" for k, v in anchors[r].items())
            for r in ("0.2", "0.5") if r in anchors) + ".", ""]
    lines += ["Targets:", ""]
    for ratio, per in q["targets"].items():
        for key, t in per.items():
            if "lora_over_grad" not in t:
                continue
            bits = [f"lora/grad = {t['lora_over_grad']:.3f} ({'within' if t['within_10pct_of_grad'] else 'NOT within'} 10 %)"]
            for other in ("magnitude", "random"):
                k = f"clearly_better_than_{other}"
                if k in t:
                    bits.append(f"{'clearly better' if t[k] else 'NOT clearly better'} than {other} "
                                f"({t['lora']:.3f} vs {t[other]:.3f})")
            lines.append(f"- {float(ratio):.0%}, {key}: " + "; ".join(bits))
    lines += ["", provenance(q)]
    return "\n".join(lines)


def memory_tables(m: dict) -> str:
    mib = 2**20
    summ = m["summary"]
    lines = ["| criterion alone (fp32, r = 8) | weight | eager peak extra | ours peak extra | eager / ours | ≥ 100× "
             "| public path (score_module) peak extra | eager / public path |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in summ["criterion"].items():
        pub = r.get("public_path_extra_bytes")
        lines.append(f"| {name} | {r['weight_bytes'] / mib:.0f} MiB | {r['eager_extra_bytes'] / mib:.1f} MiB | "
                     f"{r['ours_extra_bytes'] / mib:.2f} MiB | {r['eager_over_ours']:.0f}× | "
                     f"{'met' if r['target_100x_met'] else 'NOT met'} | "
                     + (f"{pub / mib:.2f} MiB | {r['eager_over_public_path']:.0f}× |" if pub is not None else "— | — |"))
    lines += ["", "| one pruning step (fwd + bwd + score) | weights | lora peak extra | grad peak extra | "
              "extra lora / grad | lora peak total | grad peak total | total lora vs grad |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in summ["step"].items():
        lines.append(f"| {name} | {r['model_bytes'] / mib:.0f} MiB | {r['lora_extra_bytes'] / mib:.1f} MiB | "
                     f"{r['grad_extra_bytes'] / mib:.1f} MiB | {r['extra_lora_over_grad']:.3f} | "
                     f"{r['lora_total_bytes'] / mib:.0f} MiB | {r['grad_total_bytes'] / mib:.0f} MiB | "
                     f"{100 * r['total_change_lora_vs_grad']:+.1f} % |")
    lines += ["", "Paper anchor: −52.6 % GPU memory, LoRA criterion against full gradient, LLaMA-7B.", "", provenance(m)]
    return "\n".join(lines)


def speed_tables(s: dict) -> str:
    lines = ["| mode | model | params | tokens/s (median) | speed-up vs dense | ideal (FLOPs) | measured / ideal |",
             "|---|---|---|---|---|---|---|"]
    for mode in ("prefill", "decode"):
        st = s[mode]["setting"]
        desc = (f"prefill {st['batch_size']}×{st['seq_len']}" if mode == "prefill"
                else f"decode batch 1, {st['new_tokens']} new tokens")
        for name, r in s[mode]["models"].items():
            label = "dense" if name == "dense" else f"{float(name):.0%} removed"
            lines.append(f"| {desc} | {label} | {r['params'] / 1e6:.2f}M | {r['median_tokens_per_s']:.0f} | "
                         f"{r['speedup']:.2f}× | {r['ideal_speedup']:.2f}× | {r['speedup_over_ideal']:.2f} |")
    lines += ["", "| one pruning step (fwd + bwd + score + AdamW) | batch | lora median | grad median | lora / grad |",
              "|---|---|---|---|---|"]
    for name, r in s["pruning_step"].items():
        lines.append(f"| {name} | {r['batch'][0]}×{r['batch'][1]} | {r['median_s']['lora']:.3f} s | "
                     f"{r['median_s']['grad']:.3f} s | {r['lora_over_grad']:.2f} |")
    t = s["targets"]
    if t.get("prefill_50pct_speedup_over_ideal") is not None:
        lines += ["", f"Target (prefill speed-up at 50 % ≥ 0.9 of ideal): measured / ideal = "
                      f"{t['prefill_50pct_speedup_over_ideal']:.2f} — "
                      f"{'met' if t['prefill_50pct_target_0.9_of_ideal_met'] else 'NOT met'}."]
    lines += ["", "Paper anchor: −24.7 % / −49.5 % latency at 20 % / 50 % (GPU).", "", provenance(s)]
    return "\n".join(lines)


def render(out: Path) -> dict[str, str]:
    blocks = {}
    for name, fn in (("quality", quality_tables), ("memory", memory_tables), ("speed", speed_tables)):
        path = out / f"{name}.json"
        if path.is_file():
            blocks[name] = fn(read_json(path))
    return blocks


def run(setup, settings=None, log=print, readme: Path = README) -> dict[str, str]:
    """Tables into ``<out>/tables.md``; into the README too for the real results folder."""
    from .common import RESULTS_DIR

    blocks = render(setup.out)
    (setup.out / "tables.md").write_text("\n\n".join(f"## {k}\n\n{v}" for k, v in blocks.items()) + "\n",
                                         encoding="utf-8")
    if setup.smoke or setup.out.resolve() != RESULTS_DIR.resolve() or not readme.is_file():
        log(f"report: tables in {setup.out / 'tables.md'} (README untouched: not the real results folder)")
        return blocks
    text = readme.read_text(encoding="utf-8")
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda mt: mt.group(1) + body + mt.group(2), text)
            log(f"report: {name} table written into {readme}")
    readme.write_text(text, encoding="utf-8")
    return blocks
