"""lora_linear: Triton kernels (interpreter) and torch twin vs naive eager references."""
import pytest
import torch

from loraprune.kernels import LoRALinearFunction, lora_linear, use_backend
from loraprune.kernels.reference import REL_TOL, assert_close_rel, lora_linear_ref

BACKENDS = ["torch", "triton"]
IN, OUT = 37, 53


def _keep(kind, out=OUT):
    if kind is None:
        return None
    if kind == "empty":
        return torch.empty(0, dtype=torch.long)
    if kind == "full":
        return torch.arange(out)
    g = torch.Generator().manual_seed(7)
    return torch.randperm(out, generator=g)[: out // 3]  # unsorted random subset


def _inputs(dtype, rank, x_shape, lora_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*x_shape, IN, generator=g).to(dtype)
    W = (torch.randn(OUT, IN, generator=g) / IN**0.5).to(dtype)
    A = (torch.randn(rank, IN, generator=g) / IN**0.5).to(lora_dtype)
    B = torch.randn(OUT, rank, generator=g).to(lora_dtype)
    bias = torch.randn(OUT, generator=g).to(dtype)
    return x, W, A, B, bias


FWD_CASES = [
    # dtype, rank, x_shape, keep, bias, lora_dtype
    (torch.float32, 3, (5,), None, True, None),
    (torch.float32, 8, (2, 3), "subset", True, None),
    (torch.float32, 16, (7,), "full", False, None),
    (torch.float32, 8, (4,), "empty", True, None),
    (torch.float16, 8, (2, 5), "subset", True, None),
    (torch.float16, 3, (6,), None, False, torch.float32),
    (torch.bfloat16, 16, (3, 2), None, True, None),
    (torch.bfloat16, 8, (5,), "subset", False, torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rank,x_shape,keep_kind,with_bias,lora_dtype", FWD_CASES)
def test_forward_matches_reference(backend, dtype, rank, x_shape, keep_kind, with_bias, lora_dtype):
    x, W, A, B, bias = _inputs(dtype, rank, x_shape, lora_dtype)
    bias = bias if with_bias else None
    keep = _keep(keep_kind)
    with use_backend(backend):
        y = lora_linear(x, W, A, B, 0.75, bias=bias, keep=keep)
    assert y.dtype == dtype and y.shape == (*x_shape, OUT)
    assert_close_rel(y, lora_linear_ref(x, W, A, B, 0.75, bias, keep), dtype, "y")
    if keep is not None:
        skipped = torch.ones(OUT, dtype=torch.bool)
        skipped[keep] = False
        assert torch.all(y[..., skipped] == 0), "skipped channels must be exact zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_twin(dtype):
    x, W, A, B, bias = _inputs(dtype, 8, (2, 4), seed=3)
    keep = _keep("subset")
    with use_backend("triton"):
        y_tr = lora_linear(x, W, A, B, 2.0, bias=bias, keep=keep)
    with use_backend("torch"):
        y_pt = lora_linear(x, W, A, B, 2.0, bias=bias, keep=keep)
    assert_close_rel(y_tr, y_pt.double(), dtype, "triton vs twin")


def test_keep_full_equals_none_and_empty_is_zero():
    x, W, A, B, bias = _inputs(torch.float32, 8, (6,))
    for backend in BACKENDS:
        with use_backend(backend):
            y_none = lora_linear(x, W, A, B, 0.5, bias=bias)
            y_full = lora_linear(x, W, A, B, 0.5, bias=bias, keep=torch.arange(OUT))
            y_empty = lora_linear(x, W, A, B, 0.5, bias=bias, keep=torch.empty(0, dtype=torch.long))
        torch.testing.assert_close(y_full, y_none, rtol=0, atol=1e-6)
        assert y_empty.shape == y_none.shape and torch.count_nonzero(y_empty) == 0


def _autograd_ref_grads(x, W, A, B, bias, keep, scaling, gy):
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    y = lora_linear_ref(xr, W, Ar, Br, scaling, bias, keep)
    (y * gy.double()).sum().backward()
    return xr.grad, Ar.grad, Br.grad


BWD_CASES = [
    (torch.float32, 3, (5,), None, True),
    (torch.float32, 8, (2, 3), "subset", True),
    (torch.float32, 16, (4,), "empty", False),
    (torch.float16, 8, (6,), "subset", False),
    (torch.bfloat16, 3, (2, 2), None, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rank,x_shape,keep_kind,with_bias", BWD_CASES)
def test_backward_matches_autograd(backend, dtype, rank, x_shape, keep_kind, with_bias):
    x, W, A, B, bias = _inputs(dtype, rank, x_shape, seed=11)
    bias = bias if with_bias else None
    keep = _keep(keep_kind)
    gy = torch.randn(*x_shape, OUT, generator=torch.Generator().manual_seed(5)).to(dtype)
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    W = W.clone().requires_grad_()  # frozen by contract: dW must never be formed
    with use_backend(backend):
        y = lora_linear(xg, W, Ag, Bg, 1.5, bias=bias, keep=keep)
    y.backward(gy)
    dx, dA, dB = _autograd_ref_grads(x, W.detach(), A, B, bias, keep, 1.5, gy)
    assert W.grad is None
    assert xg.grad.dtype == dtype and Ag.grad.dtype == A.dtype and Bg.grad.dtype == B.dtype
    assert_close_rel(xg.grad, dx, dtype, "dx")
    assert_close_rel(Ag.grad, dA, dtype, "dA")
    assert_close_rel(Bg.grad, dB, dtype, "dB")
    if keep is not None:
        skipped = torch.ones(OUT, dtype=torch.bool)
        skipped[keep] = False
        assert torch.count_nonzero(Bg.grad[skipped]) == 0, "skipped channels get no gradient"


def test_saves_only_x_and_xa():
    """Saved activations: x and the r-wide fp32 xa (plus frozen params / keep)."""
    x, W, A, B, bias = _inputs(torch.float32, 8, (9,))
    A.requires_grad_()
    B.requires_grad_()
    with use_backend("torch"):
        y = lora_linear(x.requires_grad_(), W, A, B, 1.0, bias=bias)
    node = y.grad_fn  # reshape node(s), then the custom Function
    while not isinstance(getattr(node, "_forward_cls", None), type) or node._forward_cls is not LoRALinearFunction:
        node = node.next_functions[0][0]
    activation_like = [t for t in node.saved_tensors if t is not None and t.shape[0] == 9]
    assert sorted(tuple(t.shape) for t in activation_like) == [(9, 8), (9, IN)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_deterministic_and_p0_is_plain(backend):
    x, W, A, B, bias = _inputs(torch.float32, 8, (2, 6), seed=2)
    with use_backend(backend):
        torch.manual_seed(123)
        y1 = lora_linear(x, W, A, B, 1.0, bias=bias, dropout=0.4)
        torch.manual_seed(123)
        y2 = lora_linear(x, W, A, B, 1.0, bias=bias, dropout=0.4)
        torch.manual_seed(124)
        y3 = lora_linear(x, W, A, B, 1.0, bias=bias, dropout=0.4)
        y0 = lora_linear(x, W, A, B, 1.0, bias=bias, dropout=0.0)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert_close_rel(y0, lora_linear_ref(x, W, A, B, 1.0, bias), torch.float32, "p=0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_rate_and_inverted_scaling(backend):
    """With W = 0, A = B = I the output is s * drop(x): zeros at rate p, else s / (1 - p)."""
    n, p = 16, 0.3
    x = torch.ones(64, n)
    eye = torch.eye(n)
    with use_backend(backend):
        torch.manual_seed(0)
        y = lora_linear(x, torch.zeros(n, n), eye, eye, 2.0, dropout=p)
    zero_frac = (y == 0).float().mean().item()
    assert abs(zero_frac - p) < 0.06
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 2.0 / (1 - p)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_backward_consistent_with_forward(backend):
    """Given its mask the layer is linear in x, in A and in B: L(v + dv) - L(v) = <grad, dv>.

    Reseeding before every call reproduces the mask, so this checks that
    backward recomputes exactly the forward's dropout mask.
    """
    x, W, A, B, bias = _inputs(torch.float32, 8, (3, 4), seed=4)
    keep = _keep("subset")
    gy = torch.randn(3, 4, OUT, generator=torch.Generator().manual_seed(9))

    def loss(x_, A_, B_):
        torch.manual_seed(77)
        return (lora_linear(x_, W, A_, B_, 1.25, bias=bias, keep=keep, dropout=0.5) * gy).sum()

    with use_backend(backend):
        xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
        loss(xg, Ag, Bg).backward()
        with torch.no_grad():
            base = loss(x, A, B).double()
            gen = torch.Generator().manual_seed(1)
            for name, grad, args in (
                ("x", xg.grad, lambda d: (x + d, A, B)),
                ("A", Ag.grad, lambda d: (x, A + d, B)),
                ("B", Bg.grad, lambda d: (x, A, B + d)),
            ):
                d = torch.randn(grad.shape, generator=gen) * 0.1
                lhs = loss(*args(d)).double() - base
                rhs = (grad.double() * d.double()).sum()
                assert abs(lhs - rhs) <= 2e-3 * max(abs(rhs.item()), 1.0), f"d{name}: {lhs} vs {rhs}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_errors_name_expected_shapes(backend):
    x, W, A, B, bias = _inputs(torch.float32, 8, (4,))
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"lora_B must have shape \(out, r\) = \(53, 8\)"):
            lora_linear(x, W, A, B[:, :4], 1.0)
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in\) = \(\.\.\., 37\)"):
            lora_linear(x[:, :5], W, A, B, 1.0)
        with pytest.raises(ValueError, match=r"bias must have shape \(out,\)"):
            lora_linear(x, W, A, B, 1.0, bias=bias[:3])
        with pytest.raises(IndexError, match="keep"):
            lora_linear(x, W, A, B, 1.0, keep=torch.tensor([0, OUT]))
        with pytest.raises(ValueError, match="dropout"):
            lora_linear(x, W, A, B, 1.0, dropout=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_low_precision_gpu_path(dtype):
    """On CUDA the big GEMMs feed bf16/fp16 tiles to tensor cores (NATIVE_DOT)."""
    x, W, A, B, bias = (t.cuda() for t in _inputs(dtype, 8, (64,)))
    keep = _keep("subset").cuda()
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    with use_backend("triton"):
        y = lora_linear(xg, W, Ag, Bg, 2.0, bias=bias, keep=keep)
    y.float().sum().backward()
    assert_close_rel(y.cpu(), lora_linear_ref(x.cpu(), W.cpu(), A.cpu(), B.cpu(), 2.0, bias.cpu(), keep.cpu()),
                     dtype, "gpu y")
    dx, dA, dB = _autograd_ref_grads(x.cpu(), W.cpu(), A.cpu(), B.cpu(), bias.cpu(), keep.cpu(), 2.0,
                                     torch.ones(64, OUT))
    assert_close_rel(xg.grad.cpu(), dx, dtype, "gpu dx")
    assert_close_rel(Ag.grad.cpu(), dA, dtype, "gpu dA")
    assert_close_rel(Bg.grad.cpu(), dB, dtype, "gpu dB")
    assert REL_TOL[dtype] > 0
