"""Least-squares repair (loraprune.surgery.repair) against closed-form references on small layers."""
import pytest
import torch

from loraprune.surgery.repair import SecondMoments, output_error, repair_columns, ridge_solve


def _correlated(n_tokens=400, n=12, seed=0, shift=0.5):
    """Inputs with correlated features (a random mixing of independent ones) and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    return z @ mix + shift * torch.randn(n, generator=g, dtype=torch.float64)


def _stats(x, chunks=3, dtype=torch.float64):
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
    assert SecondMoments(3).xtx.dtype == st32.xtx.dtype == torch.float32  # solved in float64 (a small layer)
    new32, _ = repair_columns(W.float(), torch.arange(5), st32)
    new64, _ = repair_columns(W.float(), torch.arange(5), _stats(x.double(), dtype=torch.float64))
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


# ---- the one-shot mode: oneshot_prune(..., repair=True) -------------------------------------------
def _tiny():
    from tiny import tiny_model

    return tiny_model(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4)


def _layer_inputs(model, batches):
    """Every o_proj / down_proj input of every layer of the dense model, concatenated over tokens."""
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, mod in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            seen[i, name] = []
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, key=(i, name): seen[key].append(a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


@pytest.mark.parametrize("bias", [True, False])
def test_oneshot_repair_equals_layerwise_lstsq_on_dense_inputs(bias):
    """sequential=False: every consumer's kept columns (and bias) are the least-squares fit on the dense
    model's own activations, computed here with torch.linalg.lstsq from the captured token matrices."""
    import copy

    from loraprune.run.oneshot import oneshot_plan, oneshot_prune
    from tiny import random_batches

    model = _tiny()
    calib = random_batches(n=4, batch=2, seq=24, seed=1)  # 192 tokens > 96 inputs: full-rank fits
    plan = oneshot_plan(copy.deepcopy(model), calib, 0.5, method="flap", calib_batches=4)
    X = _layer_inputs(model, calib)
    pruned = oneshot_prune(copy.deepcopy(model), calib, 0.5, method="flap", calib_batches=4, repair=True,
                           damp=0.0, sequential=False, bias_compensation=bias)
    assert pruned.config.loraprune["settings"]["repair"] is True
    for i, (lg, a_keep, m_keep) in enumerate(zip(plan.layers, plan.masks.attn_keep, plan.masks.mlp_keep)):
        dense = model.model.layers[i]
        cut = pruned.model.layers[i]
        for name, W, keep, mod in (("o", dense.self_attn.o_proj.weight, lg.q_index(a_keep), cut.self_attn.o_proj),
                                   ("down", dense.mlp.down_proj.weight, lg.channel_index(m_keep), cut.mlp.down_proj)):
            x = X[i, name]
            design = x[:, keep]
            if bias:
                design = torch.cat([design, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            target = x @ W.double().T
            sol = torch.linalg.lstsq(design, target).solution.T
            got = mod.weight.double()
            if bias:
                got = torch.cat([got, mod.bias.double()[:, None]], 1)
            else:
                assert mod.bias is None

            def err(w):
                return float((target - design @ w.T).pow(2).mean())

            # float32 sums (solved in float64): the fit reaches the optimum's error, not its every digit
            assert err(got) == pytest.approx(err(sol), rel=1e-3)
            torch.testing.assert_close(got, sol, rtol=0.05, atol=5e-3)


def test_oneshot_repair_beats_plain_cut_and_reloads(tmp_path):
    """Sequential repair with fisher scores: the logits stay closer to the dense model's than the plain cut
    and FLAP's mean bias do, on held-out tokens; save/reload gives the same logits."""
    import copy

    from loraprune import load_pruned, save_pruned
    from loraprune.run.oneshot import oneshot_prune
    from tiny import random_batches

    model = _tiny()
    calib = random_batches(n=6, batch=2, seq=32, seed=3)
    x = random_batches(n=1, batch=2, seq=32, seed=11)[0]["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=x).logits

    def err(m):
        with torch.no_grad():
            return float((m(input_ids=x).logits - ref).pow(2).mean())

    kw = dict(method="fisher", calib_batches=2, repair_batches=6)
    plain = oneshot_prune(copy.deepcopy(model), calib, 0.4, **kw)
    repaired = oneshot_prune(copy.deepcopy(model), calib, 0.4, repair=True, **kw)
    assert repaired.config.loraprune["layers"] == plain.config.loraprune["layers"]  # the same groups cut
    assert repaired.config.loraprune["settings"]["calib_tokens"] == 6 * 2 * 32
    assert err(repaired) < err(plain)
    save_pruned(repaired, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, repaired(input_ids=x).logits)


def test_oneshot_repair_exports_to_gguf_with_and_without_bias(tmp_path):
    """bias_compensation=False: no bias anywhere, so the GGUF export takes it (a biased one it refuses)."""
    pytest.importorskip("gguf")
    import copy

    import loraprune
    from gguf_export_cases import gpt2_tokenizer
    from loraprune.export.gguf_read import load_gguf
    from tiny import random_batches, tiny_model

    tok = gpt2_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    calib = random_batches(n=3, vocab=len(tok), seed=4)
    pruned = loraprune.oneshot_prune(copy.deepcopy(model), calib, 0.4, method="fisher", calib_batches=2,
                                     repair=True, bias_compensation=False)
    assert not any(m.bias is not None for m in pruned.modules() if isinstance(m, torch.nn.Linear))
    path = loraprune.save_gguf(pruned, tmp_path / "m.gguf", tok, dtype="f32")
    ids = tok("the quick brown fox")["input_ids"]
    if pruned.config.loraprune["uniform"]:
        again = load_gguf(path, tokenizer=False)[0]
        with torch.no_grad():
            a = again(input_ids=torch.tensor([ids])).logits
            b = pruned(input_ids=torch.tensor([ids])).logits
        assert (a - b).abs().max() <= 1e-4
    # with the affine fit's biases: llama.cpp reads o_proj/down_proj biases, so the file carries them
    import gguf

    biased = loraprune.oneshot_prune(copy.deepcopy(model), calib, 0.4, method="fisher", calib_batches=2, repair=True)
    path = loraprune.save_gguf(biased, tmp_path / "b.gguf", tok, dtype="f32")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    written = 0
    for i, layer in enumerate(biased.model.layers):
        for module, name in ((layer.self_attn.o_proj, "attn_output"), (layer.mlp.down_proj, "ffn_down")):
            if module.bias is not None and module.bias.abs().max() > 0:  # exactly-zero biases are left out
                assert f"blk.{i}.{name}.bias" in names
                written += 1
    assert written > 0


def test_oneshot_repair_bad_arguments():
    from loraprune.run.oneshot import oneshot_prune
    from tiny import random_batches

    with pytest.raises(ValueError, match="damp"):
        oneshot_prune(_tiny(), random_batches(n=1), 0.3, repair=True, damp=-1.0)
    with pytest.raises(ValueError, match="repair_batches"):
        oneshot_prune(_tiny(), random_batches(n=1), 0.3, repair=True, repair_batches=0)
    with pytest.raises(TypeError, match="repair"):
        oneshot_prune(_tiny(), random_batches(n=1), 0.3, repair="yes")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_oneshot_repair_on_other_architectures_fits_without_bias(arch):
    """Architectures whose configs cannot hold an o_proj/down_proj bias get the plain (unbiased) fit."""
    import copy

    from loraprune.run.oneshot import oneshot_prune
    from tiny import random_batches, tiny_model

    model = tiny_model(arch)
    calib = random_batches(n=3, batch=2, seq=24, seed=2)
    pruned = oneshot_prune(copy.deepcopy(model), calib, 0.4, method="fisher", calib_batches=2, repair=True)
    settings = pruned.config.loraprune["settings"]
    assert settings["repair"] and not settings["bias_compensation"]
    assert pruned.model.layers[0].mlp.down_proj.bias is None
