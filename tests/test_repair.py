"""Least-squares repair (loraprune.repair) against closed-form references on small layers."""
import pytest
import torch

from loraprune.repair import SecondMoments, output_error, repair_columns, ridge_solve


def _correlated(n_tokens=400, n=12, seed=0, shift=0.5):
    """Inputs with correlated features (a random mixing of independent ones) and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    return z @ mix + shift * torch.randn(n, generator=g, dtype=torch.float64)


def _stats(x, chunks=3, dtype=None):
    st = SecondMoments(x.shape[1], dtype=dtype)
    for part in x.chunk(chunks):
        st.update(part[None])  # a leading batch dimension is flattened away
    return st


def test_moments_equal_whole_matrix_statistics():
    x = _correlated()
    st = _stats(x)
    assert st.count == x.shape[0]
    torch.testing.assert_close(st.mean, x.mean(0))
    torch.testing.assert_close(st.second(), x.T @ x / x.shape[0])
    torch.testing.assert_close(st.covariance(), torch.cov(x.T, correction=0))


def test_repair_is_the_least_squares_optimum():
    x = _correlated()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, x.shape[1], generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    new, b = repair_columns(W, keep, _stats(x), damp=0.0)
    assert b is None
    ref = torch.linalg.lstsq(x[:, keep], x @ W.T).solution.T  # min over all W_k of ||X Wᵀ - X_k W_kᵀ||
    torch.testing.assert_close(new, ref, rtol=1e-6, atol=1e-8)
    best = output_error(W, ref, keep, x)
    assert output_error(W, new, keep, x) == pytest.approx(best, rel=1e-8)
    assert best < output_error(W, W[:, keep], keep, x)  # better than cutting alone


def test_repair_with_bias_is_the_affine_least_squares_optimum():
    x = _correlated(shift=3.0)
    g = torch.Generator().manual_seed(2)
    W = torch.randn(4, x.shape[1], generator=g, dtype=torch.float64)
    keep = torch.zeros(x.shape[1], dtype=torch.bool)
    keep[[1, 4, 5, 9]] = True
    new, b = repair_columns(W, keep, _stats(x), damp=0.0, bias=True)
    design = torch.cat([x[:, keep], torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(design, x @ W.T).solution.T
    torch.testing.assert_close(new, sol[:, :-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b, sol[:, -1], rtol=1e-6, atol=1e-8)


def test_uncorrelated_inputs_give_plain_removal_and_flaps_mean_bias():
    # kept and cut features in different coordinates of an exactly block-diagonal second moment
    x = torch.zeros(8, 4, dtype=torch.float64)
    x[:4, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0])
    x[4:, 1] = torch.tensor([3.0, -3.0, 1.0, -1.0])
    x[:4, 2] = torch.tensor([1.0, 1.0, -1.0, -1.0])
    x[4:, 3] = torch.tensor([1.0, 1.0, -1.0, -1.0])  # S_ck = 0 between {0, 1} and {2, 3}
    W = torch.arange(12, dtype=torch.float64).view(3, 4)
    keep = torch.tensor([0, 1])
    st = _stats(x, chunks=2)
    assert torch.count_nonzero(st.second()[:2, 2:]) == 0
    new, _ = repair_columns(W, keep, st, damp=0.0)
    torch.testing.assert_close(new, W[:, keep])
    # zero-mean cut inputs uncorrelated with the kept ones: covariance fit = FLAP = plain removal, zero bias
    new, b = repair_columns(W, keep, st, damp=0.0, bias=True)
    torch.testing.assert_close(new, W[:, keep])
    torch.testing.assert_close(b, W[:, 2:] @ st.mean[2:])


def test_damping_limit_and_large_damping():
    x = _correlated(n=10)
    W = torch.randn(3, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.arange(6)
    st = _stats(x)
    exact, _ = repair_columns(W, keep, st, damp=0.0)
    prev = None
    for damp in (1e-2, 1e-4, 1e-6, 1e-8):
        gap = (repair_columns(W, keep, st, damp=damp)[0] - exact).abs().max().item()
        assert prev is None or gap < prev
        prev = gap
    assert prev < 1e-6
    # infinite damping: no fit at all, the kept columns as they were
    huge, _ = repair_columns(W, keep, st, damp=1e12)
    torch.testing.assert_close(huge, W[:, keep], rtol=0, atol=1e-9)


def test_dtype_and_device_are_preserved():
    x = _correlated().float()
    W = torch.randn(6, x.shape[1], dtype=torch.bfloat16)
    new, b = repair_columns(W, torch.arange(5), _stats(x), bias=True)
    assert new.dtype == b.dtype == torch.bfloat16 and new.device == W.device
    assert new.shape == (6, 5) and b.shape == (6,)
    st32 = _stats(x, dtype=torch.float32)
    assert st32.xtx.dtype == torch.float32
    new32, _ = repair_columns(W.float(), torch.arange(5), st32)
    new64, _ = repair_columns(W.float(), torch.arange(5), _stats(x.double()))
    torch.testing.assert_close(new32, new64, rtol=1e-3, atol=1e-3)


def test_nothing_cut_and_failures():
    x = _correlated(n=6)
    W = torch.randn(2, 6, dtype=torch.float64)
    st = _stats(x)
    new, b = repair_columns(W, torch.ones(6, dtype=torch.bool), st, bias=True)
    torch.testing.assert_close(new, W)
    assert torch.count_nonzero(b) == 0
    with pytest.raises(ValueError, match="saw no tokens"):
        repair_columns(W, torch.arange(3), SecondMoments(6))
    with pytest.raises(ValueError, match="6 input columns"):
        repair_columns(W, torch.arange(3), SecondMoments(5))
    with pytest.raises(ValueError, match="damp"):
        repair_columns(W, torch.arange(3), st, damp=-1)
    # kept inputs that are all zero: nothing to fit from, plain removal with a warning
    z = x.clone()
    z[:, :3] = 0
    with pytest.warns(RuntimeWarning, match="without repair"):
        new, _ = repair_columns(W, torch.arange(3), _stats(z))
    torch.testing.assert_close(new, W[:, :3])


def test_ridge_solve_retries_at_larger_damping():
    # indefinite matrix: Cholesky fails at small damping and succeeds once λ dominates
    A = torch.diag(torch.tensor([1.0, 1.0, -0.3], dtype=torch.float64))
    B = torch.ones(3, 1, dtype=torch.float64)
    out = ridge_solve(A, B, 1e-3)
    assert out is not None and bool(torch.isfinite(out).all())
    lam = 1e-3 * float(A.diagonal().mean()) * 10 ** 3  # the first damping that makes A + λI positive
    torch.testing.assert_close(out, torch.linalg.solve(A + lam * torch.eye(3, dtype=A.dtype), B))
