"""group_importance and merge_gather: Triton (interpreter) and torch twins vs eager references."""
import pytest
import torch

from kernel_oracles import assert_close_rel, importance_ref, merge_gather_ref
from loraprune.kernels import group_importance, merge_gather, torch_ops, triton_interpreting, use_backend

INTERP = triton_interpreting()  # Triton on CPU tensors needs the interpreter (see conftest)
BACKENDS = ["torch", "triton"] if INTERP else ["torch"]
OUT, IN = 37, 53


def _factors(rank, weight_dtype, lora_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g).to(weight_dtype)
    A = torch.randn(rank, IN, generator=g).to(lora_dtype)
    B = torch.randn(OUT, rank, generator=g).to(lora_dtype)
    gA = torch.randn(rank, IN, generator=g).to(lora_dtype)
    gB = torch.randn(OUT, rank, generator=g).to(lora_dtype)
    return W, A, B, gA, gB


IMP_CASES = [
    (3, torch.float32, torch.float32, False),
    (8, torch.float32, torch.float32, True),
    (16, torch.float16, torch.float32, False),
    (8, torch.float16, torch.float16, True),
    (3, torch.bfloat16, torch.bfloat16, False),
    (8, torch.bfloat16, torch.float32, False),
    # ranks above one rank chunk (16): the chunked path, fp32 factors
    (64, torch.bfloat16, torch.float32, False),
    (33, torch.float16, torch.float32, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank,wdtype,ldtype,square", IMP_CASES)
def test_importance_matches_eager(backend, rank, wdtype, ldtype, square):
    W, A, B, gA, gB = _factors(rank, wdtype, ldtype)
    with use_backend(backend):
        rows, cols = group_importance(W, A, B, gA, gB, 0.5, square=square)
    ref_rows, ref_cols = importance_ref(W, A, B, gA, gB, 0.5, square)
    assert rows.dtype == torch.float32 and cols.dtype == torch.float32
    assert rows.shape == (OUT,) and cols.shape == (IN,)
    # inputs are exact in fp64; only fp32 accumulation differs -> tight tolerance for every dtype
    assert_close_rel(rows, ref_rows, torch.float32, "row_sums")
    assert_close_rel(cols, ref_cols, torch.float32, "col_sums")


@pytest.mark.skipif(not INTERP, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_importance_triton_deterministic_and_equal_to_twin():
    W, A, B, gA, gB = _factors(8, torch.float32, torch.float32, seed=5)
    with use_backend("triton"):
        r1, c1 = group_importance(W, A, B, gA, gB, 2.0)
        r2, c2 = group_importance(W, A, B, gA, gB, 2.0)
    assert torch.equal(r1, r2) and torch.equal(c1, c2)
    with use_backend("torch"):
        rt, ct = group_importance(W, A, B, gA, gB, 2.0)
    torch.testing.assert_close(r1, rt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c1, ct, rtol=1e-5, atol=1e-5)


def test_importance_twin_many_row_blocks(monkeypatch):
    """Force 1-row blocks: the block loop and col_sums accumulation must agree with eager."""
    monkeypatch.setattr(torch_ops, "MIN_BLOCK_ELEMS", 1)
    monkeypatch.setattr(torch_ops, "BLOCK_FRACTION", 1e-9)
    assert torch_ops.rows_per_block(OUT, IN) == 1
    W, A, B, gA, gB = _factors(8, torch.bfloat16, torch.float32)
    rows, cols = torch_ops.group_importance_torch(W, A, B, gA, gB, 0.5)
    ref_rows, ref_cols = importance_ref(W, A, B, gA, gB, 0.5)
    assert_close_rel(rows, ref_rows, torch.float32, "rows")
    assert_close_rel(cols, ref_cols, torch.float32, "cols")


def test_importance_shape_errors():
    W, A, B, gA, gB = _factors(8, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"grad_B must have shape \(out, r\) = \(37, 8\)"):
        group_importance(W, A, B, gA, gB[:, :3], 1.0)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(r, in\) = \(r, 53\)"):
        group_importance(W, A[:, :7], B, gA, gB, 1.0)


def _index(kind, n, seed=0):
    if kind is None:
        return None
    if kind == "empty":
        return torch.empty(0, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: max(1, n // 2)]


MG_CASES = [
    (torch.float32, 3, None, None),
    (torch.float32, 8, "subset", "subset"),
    (torch.float16, 16, "subset", None),
    (torch.bfloat16, 8, None, "subset"),
    (torch.float32, 8, "empty", "subset"),
    (torch.float32, 8, "subset", "empty"),
    (torch.float16, None, "subset", "subset"),  # pure gather
    (torch.bfloat16, 64, "subset", "subset"),  # rank walked in chunks
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rank,rows_kind,cols_kind", MG_CASES)
def test_merge_gather_matches_eager(backend, dtype, rank, rows_kind, cols_kind):
    W, A, B, _, _ = _factors(rank or 4, dtype, torch.float32, seed=2)
    if rank is None:
        A = B = None
    rows, cols = _index(rows_kind, OUT, 1), _index(cols_kind, IN, 2)
    with use_backend(backend):
        Wm = merge_gather(W, A, B, 0.25, rows=rows, cols=cols)
    ref = merge_gather_ref(W, A, B, 0.25, rows, cols)
    assert Wm.dtype == dtype and Wm.is_contiguous()
    assert Wm.shape == ref.shape
    if A is None:
        assert torch.equal(Wm.double(), ref)
    else:
        assert_close_rel(Wm, ref, dtype, "merged")


def test_merge_gather_twin_is_row_blocked(monkeypatch):
    monkeypatch.setattr(torch_ops, "MIN_BLOCK_ELEMS", 1)
    monkeypatch.setattr(torch_ops, "BLOCK_FRACTION", 1e-9)
    W, A, B, _, _ = _factors(8, torch.float32, torch.float32)
    rows = _index("subset", OUT)
    Wm = torch_ops.merge_gather_torch(W, A, B, 1.5, rows=rows)
    assert_close_rel(Wm, merge_gather_ref(W, A, B, 1.5, rows), torch.float32, "blocked merge")


def test_merge_gather_errors():
    W, A, B, _, _ = _factors(8, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="both"):
        merge_gather(W, A, None, 1.0)
    with pytest.raises(IndexError, match="rows"):
        merge_gather(W, A, B, 1.0, rows=torch.tensor([OUT]))
    with pytest.raises(TypeError, match="cols"):
        merge_gather(W, A, B, 1.0, cols=torch.tensor([0.5]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_importance_and_merge_native_gpu(dtype):
    W, A, B, gA, gB = (t.cuda() for t in _factors(8, dtype, dtype))
    rows, cols = group_importance(W, A, B, gA, gB, 0.5)
    ref_rows, ref_cols = importance_ref(*(t.cpu() for t in (W, A, B, gA, gB)), 0.5)
    assert_close_rel(rows.cpu(), ref_rows, dtype, "gpu rows")  # tf32 dots on GPU
    assert_close_rel(cols.cpu(), ref_cols, dtype, "gpu cols")
    Wm = merge_gather(W, A, B, 0.5, rows=torch.arange(0, OUT, 2, device="cuda"))
    assert_close_rel(Wm.cpu(), merge_gather_ref(W.cpu(), A.cpu(), B.cpu(), 0.5, torch.arange(0, OUT, 2)), dtype, "gpu mg")
