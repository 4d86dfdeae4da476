"""The whole-model share removed (embeddings, head and norms counted, a tied embedding once),
beside the decoder-projection share, against a hand count from the config and the pruned widths."""
import pytest

import loraprune
from loraprune.export.load import inspect_dir
from loraprune.run.report import PruneReport
from tiny import random_batches, tiny_model

V, H, HEADS, KV, HD, INTER, LAYERS = 97, 32, 4, 2, 8, 48, 2


def _layer_params(kv: int, inter: int) -> int:
    """One LLaMA decoder layer by hand: two norms, q/k/v/o at ``kv`` KV heads, gate/up/down at ``inter``."""
    q = kv * (HEADS // KV) * HD
    return 2 * H + H * q + 2 * H * kv * HD + q * H + 3 * H * inter


def _total(tied: bool, widths) -> int:
    return V * H * (1 if tied else 2) + H + sum(_layer_params(kv, inter) for kv, inter in widths)


@pytest.mark.parametrize("tied", [False, True])
def test_whole_model_ratio_matches_a_hand_count(tied, tmp_path):
    model = tiny_model(tie_word_embeddings=tied)
    dense = _total(tied, [(KV, INTER)] * LAYERS)
    assert sum(p.numel() for p in model.parameters()) == dense  # the hand count is right for the dense model
    pruned = loraprune.prune(model, random_batches(n=3), ratio=0.5, steps=3, progress=False)
    rep = pruned.config.loraprune
    widths = [(w["num_key_value_heads"], w["intermediate_size"]) for w in rep["layers"]]
    after = _total(tied, widths)
    assert sum(p.numel() for p in pruned.parameters()) == after
    want = (dense - after) / dense
    assert rep["achieved_ratio_model"] == pytest.approx(want)
    assert rep["model_params"] == dense
    proj = LAYERS * (_layer_params(KV, INTER) - 2 * H)
    assert rep["achieved_ratio"] == pytest.approx((dense - after) / proj)  # the projection share, as before
    assert want < rep["achieved_ratio"]  # embeddings and norms dilute it
    assert PruneReport.of(pruned).achieved_ratio_model == pytest.approx(want)
    # a reload round trip: inspect reads the saved weights' headers
    loraprune.save_pruned(pruned, tmp_path / "m")
    info = inspect_dir(tmp_path / "m")
    assert info["total_params"] == after
    assert info["achieved_ratio_model"] == pytest.approx(want)


def test_oneshot_reports_the_whole_model_ratio():
    model = tiny_model()
    dense = _total(False, [(KV, INTER)] * LAYERS)
    pruned = loraprune.oneshot_prune(model, random_batches(n=2), 0.4, method="wanda-sp", calib_batches=2, seq_len=16,
                                     batch_size=2)
    rep = pruned.config.loraprune
    after = sum(p.numel() for p in pruned.parameters())
    assert rep["achieved_ratio_model"] == pytest.approx(rep["removed_params"] / dense)
    assert rep["removed_params"] == dense - after
