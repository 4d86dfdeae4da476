"""Least-squares repair of an output projection after some of its inputs are cut.

When a group is cut, the input columns it owned in ``o_proj`` (a KV group's
heads) or ``down_proj`` (an MLP channel) stop arriving. Plain removal drops
``W_c x_c`` from the layer's output; FLAP replaces it by its calibration mean
(a bias). The repair goes one order further: it re-fits the *kept* columns so
that ``W_k' x_k (+ b)`` reproduces the dense ``W x`` as well as any linear
function of the kept inputs can, over calibration tokens:

* without a bias (``bias=False``): minimise ``E||W x - W_k' x_k||²`` over ``W_k'``;
  with ``S = E[x xᵀ]`` the optimum is ``W_k' = W_k + W_c S_ck (S_kk + λI)⁻¹``;
* with a bias: minimise ``E||W x - W_k' x_k - b||²`` over ``W_k'`` and ``b``; the
  same formula on the covariance ``C = S - μμᵀ``, and
  ``b = W_c (μ_c - C_ck (C_kk + λI)⁻¹ μ_k)``. With uncorrelated kept and cut
  inputs (``C_ck = 0``) this is FLAP's mean bias exactly.

``λ`` is ``damp`` times the mean of ``diag(S_kk)`` (ridge regression: few
calibration tokens against a wide layer leave ``S_kk`` near singular; Olica
uses a relative damping of 0.5 for the same reason). The system is solved by
Cholesky in float64 for layers up to :data:`FP64_MAX` inputs and float32 above
(the sums themselves are float32 unless asked: float64 sums took a third of
the one-shot repair's time on SmolLM2 for no measurable gain),
and retried with ten times the damping when the factorisation fails; if it
still fails the columns are left as they are (plain removal, never worse than
the cut) with a warning.

Statistics (:class:`SecondMoments`) are sums of ``x`` and ``xᵀx`` over tokens,
merged batch by batch from forward hooks; their memory is one ``n × n`` matrix
per consumer (``docs/memory.md``).
"""
from __future__ import annotations

import warnings

import torch

#: Consumers with at most this many inputs are solved in float64.
FP64_MAX = 4096
#: Default relative damping: λ = DAMP · mean(diag Σ_kk). Chosen on SmolLM2 (bench/README.md, "Cut with repair").
DAMP = 0.01
#: Cholesky retries, each at ten times the damping of the previous try.
RETRIES = 4


class SecondMoments:
    """Running ``Σ x`` and ``Σ x xᵀ`` of a projection's ``n`` inputs over tokens.

    Float32 unless ``dtype`` says otherwise (an 8B ``down_proj`` input: 14336² fp32
    = 784 MiB). The sums are taken around the first batch's mean (``shift``), so
    the covariance does not come from subtracting two large float32 numbers.
    They move to the device of the first batch they see.
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float32):
        self.n = n
        self.count = 0
        self.dtype = dtype
        self.shift = torch.zeros(n, dtype=dtype)
        self.sum = torch.zeros(n, dtype=dtype)  # of x - shift
        self.xtx = torch.zeros(n, n, dtype=dtype)  # of (x - shift)(x - shift)ᵀ

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` (``... x n``)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"expected inputs with {self.n} features, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.n)
        if x.shape[0] == 0:
            return
        if self.count == 0:
            self.sum, self.xtx = self.sum.to(x.device), self.xtx.to(x.device)
            self.shift = x.to(self.dtype).mean(0)
        y = x.to(self.dtype) - self.shift
        self.sum += y.sum(0)
        self.xtx.addmm_(y.T, y)
        self.count += y.shape[0]

    def _wide(self) -> torch.dtype:
        return torch.float64 if self.n <= FP64_MAX else torch.promote_types(self.dtype, torch.float32)

    @property
    def mean(self) -> torch.Tensor:
        return self.shift.to(self._wide()) + self.sum.to(self._wide()) / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """``E[x xᵀ] - μ μᵀ`` (the population covariance), float64 for ``n <= FP64_MAX``."""
        m = self.sum.to(self._wide()) / max(self.count, 1)
        return self.xtx.to(self._wide()) / max(self.count, 1) - torch.outer(m, m)

    def second(self) -> torch.Tensor:
        """``E[x xᵀ]``."""
        mu = self.mean
        return self.covariance() + torch.outer(mu, mu)


def _as_index(keep: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept column indices, cut column indices)`` from a boolean mask or an index tensor."""
    keep = torch.as_tensor(keep)
    mask = torch.zeros(n, dtype=torch.bool)
    if keep.dtype == torch.bool:
        if keep.numel() != n:
            raise ValueError(f"a boolean keep mask needs {n} entries, got {keep.numel()}")
        mask = keep.cpu().clone()
    else:
        mask[keep.cpu().long()] = True
    idx = torch.arange(n)
    return idx[mask], idx[~mask]


def ridge_solve(A: torch.Tensor, B: torch.Tensor, damp: float) -> torch.Tensor | None:
    """``(A + λI)⁻¹ B`` with ``λ = damp · mean(diag A)`` by Cholesky, retried at 10× the damping
    up to :data:`RETRIES` times; ``None`` if every try fails."""
    scale = float(A.diagonal().mean()) if A.numel() else 0.0
    if not scale > 0:  # all kept inputs are (numerically) zero: nothing to fit from
        return None
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    lam = damp * scale
    for _ in range(RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(A + (lam if lam > 0 else scale * 1e-10) * eye)
        if int(info) == 0:
            out = torch.cholesky_solve(B, L)
            if bool(torch.isfinite(out).all()):
                return out
        lam = max(lam, scale * 1e-10) * 10
    return None


@torch.no_grad()
def repair_columns(weight: torch.Tensor, keep: torch.Tensor, stats: SecondMoments, damp: float = DAMP,
                   bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The repaired kept columns of ``weight`` (``out x n``), and the bias term if ``bias``.

    ``keep``: the kept input columns (boolean mask of ``n`` or indices). Returns
    ``(W_k', b)`` with ``W_k'`` of shape ``out x |kept|`` in the kept order, in
    ``weight``'s dtype and device; ``b`` (``out``, same dtype) or ``None``.
    Nothing cut: ``W_k`` unchanged and a zero bias.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    out_f, n = weight.shape
    if stats.n != n:
        raise ValueError(f"statistics of {stats.n} inputs for a weight with {n} input columns")
    if stats.count == 0:
        raise ValueError("the repair statistics saw no tokens: run calibration batches through the model first")
    k, c = _as_index(keep, n)
    dev = stats.sum.device
    k, c = k.to(dev), c.to(dev)
    mu = stats.mean
    dtype = mu.dtype
    W = weight.detach().to(device=dev, dtype=dtype)
    W_k, W_c = W[:, k], W[:, c]
    if c.numel() == 0:
        b = torch.zeros(out_f, dtype=weight.dtype, device=weight.device) if bias else None
        return weight.detach()[:, k.to(weight.device)].clone(), b
    S = stats.covariance() if bias else stats.second()
    M = ridge_solve(S[k][:, k], S[k][:, c], damp)  # |k| x |c|: cut inputs predicted from kept ones
    if M is None:
        warnings.warn(f"repair: the kept-input system ({k.numel()} columns) could not be factorised even with "
                      "more damping; these columns are cut without repair", RuntimeWarning, stacklevel=2)
        new_k = W_k
        b = W_c @ mu[c] if bias else None
    else:
        new_k = W_k + W_c @ M.T
        b = W_c @ (mu[c] - M.T @ mu[k]) if bias else None
    new_k = new_k.to(device=weight.device, dtype=weight.dtype)
    if b is not None:
        b = b.to(device=weight.device, dtype=weight.dtype)
    return new_k, b


def output_error(weight: torch.Tensor, new_kept: torch.Tensor, keep: torch.Tensor, x: torch.Tensor,
                 bias: torch.Tensor | None = None) -> float:
    """Mean squared error ``||W x - W_k' x_k - b||²`` per token over the rows of ``x`` (for tests and reports)."""
    k, _ = _as_index(keep, weight.shape[1])
    x = x.reshape(-1, weight.shape[1]).double()
    ref = x @ weight.double().T
    got = x[:, k] @ new_kept.double().T
    if bias is not None:
        got = got + bias.double()
    return float((ref - got).pow(2).sum(1).mean())
