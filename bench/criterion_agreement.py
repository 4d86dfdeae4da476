"""How well the paper's LoRA criterion (and ``fisher``) rank groups like full-gradient Taylor, on SmolLM2-135M.

The evidence behind the SmolLM2 table's "``lora`` is not within 10 % of
``grad``": on the same model, the same batches and the same backward pass of a
LoRA run (the ``paper`` settings: LM loss, lr 1e-3 with the linear schedule of a
30-step run, gradient clipping 1.0, no masks), each step scores every attention
KV group and MLP channel with

* ``lora`` (paper Eq. 10, from the LoRA gradients only),
* ``grad`` (``|∇W ⊙ W'|``, the full-gradient Taylor reference),
* ``fisher`` (the default criterion: squared per-sequence mask gradient),

and reports the Spearman rank correlation with ``grad`` — pooled over all
layers, and the mean of the per-layer correlations (``ranking="layer"``
decides within a layer) — for the whole group score and, for the projection
criteria, separately for the row-owned part (q/k/v rows; gate/up rows) and the
column-owned part (o_proj / down_proj columns). Also: the same for the EMA
(0.9, from zero) of the scores, which is what the masks are decided from, and
the share of each layer's lower half of MLP channels on which the two agree.

    python -m bench.criterion_agreement --steps 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .smollm2 import RESULTS, load_smollm2, train_batches


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), float64."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inv = torch.unique(x, return_inverse=True)
    if len(uniq) < len(x):  # average the ranks of ties
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        r = (sums / counts)[inv]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (Pearson of the ranks); NaN if either is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = ra.norm() * rb.norm()
    return float((ra @ rb) / den) if den > 0 else float("nan")


def _nanmean(xs: list[float]) -> float:
    v = [x for x in xs if x == x]
    return sum(v) / len(v) if v else float("nan")


def agreement(test: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
    """``pooled``: Spearman over all layers' groups together; ``per_layer``: mean of per-layer Spearman."""
    return {"pooled": spearman(torch.cat(test), torch.cat(ref)),
            "per_layer": _nanmean([spearman(t, r) for t, r in zip(test, ref)])}


def bottom_half_overlap(test: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Mean over layers of |lowest half by test ∩ lowest half by ref| / half."""
    out = []
    for t, r in zip(test, ref):
        k = len(t) // 2
        a = set(torch.argsort(t)[:k].tolist())
        b = set(torch.argsort(r)[:k].tolist())
        out.append(len(a & b) / k)
    return sum(out) / len(out)


def projection_parts(pruner, importance) -> dict[str, list[torch.Tensor]]:
    """Per-layer group scores of a projection criterion, whole and split by row- and column-owned parts."""
    s = pruner.spec
    parts = {"attn": [], "attn_rows": [], "attn_cols": [], "mlp": [], "mlp_rows": [], "mlp_cols": []}
    for lg, mods in zip(pruner.layers, pruner.modules):
        v = {name: importance.module_sums(mods[name]) for name in (s.q, s.k, s.v, s.o, s.gate, s.up, s.down)}
        zero_o = torch.zeros_like(v[s.o][1])
        rows = lg.attn_group_sums(v[s.q][0], v[s.k][0], v[s.v][0], zero_o)
        cols = v[s.o][1].view(-1, lg.q_per_kv * lg.head_dim).sum(1)
        parts["attn_rows"].append(rows.cpu())
        parts["attn_cols"].append(cols.cpu())
        parts["attn"].append((rows + cols).cpu())
        mrows, mcols = v[s.gate][0] + v[s.up][0], v[s.down][1]
        parts["mlp_rows"].append(mrows.cpu())
        parts["mlp_cols"].append(mcols.cpu())
        parts["mlp"].append((mrows + mcols).cpu())
    return parts


def run(steps: int, seed: int, lr: float, run_steps: int) -> dict:
    import loraprune
    from loraprune.config import PruneConfig
    from loraprune.method.criterion import GradImportance, LoRAImportance, make_importance
    from loraprune.run.prune import lr_factor

    torch.set_num_threads(int(os.environ.get("LORAPRUNE_THREADS", os.cpu_count() or 1)))
    model, tok = load_smollm2()
    cfg = PruneConfig.from_kwargs(ratio=0.5, steps=run_steps, seed=seed, lr=lr, criterion="grad", ranking="layer",
                                  distill=0.0, normalize=None, progress=False)
    batches = train_batches(tok, cfg.seq_len, cfg.batch_size, steps, seed)
    torch.manual_seed(seed)
    pruner = loraprune.LoRAPruner(model, cfg)  # grad criterion: the frozen weights get ∇W
    fisher = make_importance(cfg.replace(criterion="fisher"))
    fisher.attach(pruner)
    lora, grad = LoRAImportance(), GradImportance()
    params = pruner.lora_parameters()
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    ema = {k: None for k in ("lora", "grad", "fisher")}
    lam = cfg.ema
    rows = []
    t0 = time.time()
    for step, batch in enumerate(batches, 1):
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        with torch.no_grad():
            sc = {"lora": projection_parts(pruner, lora), "grad": projection_parts(pruner, grad)}
            fa, fm = fisher.scores(pruner)
            sc["fisher"] = {"attn": [t.cpu() for t in fa], "mlp": [t.cpu() for t in fm]}
        rec = {"step": step, "loss": float(out.loss.detach()),
               "B_norm": float(sum(m.lora_B.detach().norm() ** 2 for m in pruner.lora_modules()) ** 0.5)}
        for name in ("lora", "fisher"):
            for part in sc[name]:
                rec[f"{name}/{part}"] = agreement(sc[name][part], sc["grad"][part])
        rec["lora/mlp_bottom_half_overlap"] = bottom_half_overlap(sc["lora"]["mlp"], sc["grad"]["mlp"])
        rec["fisher/mlp_bottom_half_overlap"] = bottom_half_overlap(sc["fisher"]["mlp"], sc["grad"]["mlp"])
        for name in ema:  # the EMA the masks are decided from (starts at zero, as PruningState)
            prev = ema[name] or {p: [torch.zeros_like(c) for c in sc[name][p]] for p in ("attn", "mlp")}
            ema[name] = {p: [lam * e + (1 - lam) * c for e, c in zip(prev[p], sc[name][p])] for p in prev}
        for name in ("lora", "fisher"):
            for part in ("attn", "mlp"):
                rec[f"{name}/ema_{part}"] = agreement(ema[name][part], ema["grad"][part])
        rows.append(rec)
        for m in pruner.lora_modules():
            m.base.weight.grad = None
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(cfg.lr_schedule, step, run_steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(json.dumps({"step": step, "loss": round(rec["loss"], 3),
                          "lora/attn": rec["lora/attn"], "lora/mlp": rec["lora/mlp"],
                          "fisher/mlp": rec["fisher/mlp"]}), flush=True)
    fisher.detach(pruner)
    pruner.restore()
    return {"model": "SmolLM2-135M-Instruct", "steps": steps, "seed": seed, "lr": lr, "run_steps": run_steps,
            "batch": [cfg.batch_size, cfg.seq_len], "data": "WikiText-2 valid (as bench.smollm2)",
            "seconds": time.time() - t0, "per_step": rows}


COLUMNS = [("lora/attn", "lora attn"), ("lora/attn_rows", "lora attn q/k/v rows"), ("lora/attn_cols", "lora attn o cols"),
           ("lora/mlp", "lora mlp"), ("lora/mlp_rows", "lora mlp gate/up rows"), ("lora/mlp_cols", "lora mlp down cols"),
           ("lora/ema_mlp", "lora EMA mlp"), ("fisher/attn", "fisher attn"), ("fisher/mlp", "fisher mlp"),
           ("fisher/ema_mlp", "fisher EMA mlp")]


def table(res: dict, which: str = "per_layer") -> str:
    head = "| step | ‖B‖ | " + " | ".join(c for _, c in COLUMNS) + " | lora mlp low-half overlap |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in res["per_step"]:
        cells = [f"{r[k][which]:.2f}" for k, _ in COLUMNS]
        lines.append(f"| {r['step']} | {r['B_norm']:.2f} | " + " | ".join(cells)
                     + f" | {r['lora/mlp_bottom_half_overlap']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.criterion_agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="steps measured (each: one batch of 4 x 128 tokens)")
    p.add_argument("--run-steps", type=int, default=30, help="length of the run whose lr schedule is followed")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "criterion_agreement.json")
    p.add_argument("--table", action="store_true", help="print the tables of an existing --out file and stop")
    a = p.parse_args(argv)
    if not a.table:
        res = run(a.steps, a.seed, a.lr, a.run_steps)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, a.out)
    res = json.loads(a.out.read_text())
    print("Spearman with grad, mean of per-layer correlations:\n" + table(res, "per_layer"))
    print("\nSpearman with grad, pooled over layers:\n" + table(res, "pooled"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
