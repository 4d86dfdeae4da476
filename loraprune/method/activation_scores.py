"""Activation statistics and the FLAP / Wanda-sp score formulas.

Shared by the one-shot baselines (:mod:`loraprune.run.oneshot`, statistics of a
calibration pass) and the ``flap`` / ``wanda-sp`` criteria
(:class:`loraprune.method.criterion.ActivationImportance`, statistics of the training
forwards). A group's score is read from the input columns it owns in
``o_proj`` / ``down_proj``:

* ``flap``: column score ``Var_n(X[n, j]) · ||W[:, j]||²``, summed over the
  group, then standardised per layer and per structure kind;
* ``wanda-sp``: column score ``||X[:, j]||₂ · Σ_i |W[i, j]|``, summed over the group.
"""
from __future__ import annotations

import torch

METHODS = ("flap", "wanda-sp")


class InputStats:
    """Per-feature mean, sample variance and squared norm of a projection's
    inputs over all calibration tokens (float64, merged batch by batch with
    Chan's parallel update, so no token matrix is ever kept)."""

    def __init__(self, n_features: int):
        self.count = 0
        self.mean = torch.zeros(n_features, dtype=torch.float64)
        self.m2 = torch.zeros(n_features, dtype=torch.float64)  # sum of squared deviations from the mean
        self.sumsq = torch.zeros(n_features, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the tokens of ``x`` (``... x n_features``). The statistics move to the
        device of the first tensor they see, so a GPU run never waits on a copy."""
        if self.count == 0 and self.mean.device != x.device:
            self.mean, self.m2, self.sumsq = (t.to(x.device) for t in (self.mean, self.m2, self.sumsq))
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.mean.device, dtype=torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum(0)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2_b + delta.pow(2) * (self.count * n / total)
        self.sumsq += x.pow(2).sum(0)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance (FLAP's fluctuation)."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def norm(self) -> torch.Tensor:
        """``||X[:, j]||₂`` over all tokens (Wanda's activation norm)."""
        return self.sumsq.sqrt()


def column_scores(weight: torch.Tensor, stats: InputStats, method: str) -> torch.Tensor:
    """Score of each input column of an output projection (``o_proj`` / ``down_proj``), float64."""
    W = weight.detach().to(device=stats.mean.device, dtype=torch.float64)
    if method == "flap":
        return stats.variance * W.pow(2).sum(0)
    if method == "wanda-sp":
        return stats.norm * W.abs().sum(0)
    raise ValueError(f"unknown one-shot method {method!r}; choose one of {', '.join(METHODS)}")


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` over one layer's groups of one kind (FLAP); constant scores map to 0."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    std = scores.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / std


def layer_scores(o_weight: torch.Tensor, o_stats: InputStats, down_weight: torch.Tensor, d_stats: InputStats,
                 width: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's ``(attention group scores, MLP channel scores)``, float32.

    The o_proj column scores are summed over blocks of ``width`` consecutive
    columns (``q_per_kv * head_dim``: the columns one KV group owns), so the
    number of groups is read from the weight, not assumed: a layer already
    narrowed gets the scores of the groups it still has. A down_proj column
    is one channel. FLAP then standardises each kind within the layer.
    """
    a = column_scores(o_weight, o_stats, method).view(-1, width).sum(1)
    m = column_scores(down_weight, d_stats, method)
    if method == "flap":
        a, m = standardize(a), standardize(m)
    return a.float(), m.float()
