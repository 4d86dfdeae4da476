"""bench/smollm2.py's tables and curves, on hand-written run records (no model is run).

The report's whole-model share and the curves' grouping are checked against
values worked out by hand: a run whose overrides equal today's PruneConfig()
defaults counts as a default run, one with another lr does not.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import smollm2  # noqa: E402


def _run(out, method, ratio, steps, seed, extra, ppl, params, round_to=1):
    """A run record as bench.smollm2 writes it; ``round_to`` is what the run resolved (its config)."""
    config = {"lr": extra.get("lr", 0.002), "round_to": round_to}
    rec = {"method": method, "ratio": ratio, "steps": steps, "seed": seed, "extra": extra, "achieved_ratio": ratio,
           "seconds": 60.0, "peak_extra_mib": 100.0, "ppl": ppl, "params": params, "config": config}
    (out / "runs" / (smollm2.key(method, ratio, steps, seed, extra) + ".json")).write_text(json.dumps(rec))


@pytest.fixture
def results(tmp_path):
    (tmp_path / "runs").mkdir()
    dense = {"ptb@512": 50.0, "shakespeare@512": 40.0}
    (tmp_path / "dense.json").write_text(json.dumps({"ppl": dense, "params": 1000, "projection_params": 800}))
    # 50 % of 800 projection parameters = 400 removed = 40 % of the 1000 in the model
    _run(tmp_path, "default", 0.5, 30, 0, {"lr": 0.002}, {"ptb@512": 100.0, "shakespeare@512": 120.0}, 600)
    _run(tmp_path, "default", 0.5, 30, 1, {}, {"ptb@512": 110.0, "shakespeare@512": 100.0}, 600)
    _run(tmp_path, "default", 0.5, 30, 0, {"lr": 0.001}, {"ptb@512": 500.0, "shakespeare@512": 500.0}, 600)
    _run(tmp_path, "default", 0.5, 30, 2, {"round_to": 32}, {"ptb@512": 900.0, "shakespeare@512": 900.0}, 600, 32)
    # today's defaults exactly (round_to=None resolved to blocks of 32): the shipped series, not the curves'
    _run(tmp_path, "default", 0.5, 200, 0, {}, {"ptb@512": 60.0, "shakespeare@512": 48.0}, 600, 32)
    _run(tmp_path, "default", 0.5, 100, 0, {}, {"ptb@512": 75.0, "shakespeare@512": 60.0}, 600)
    _run(tmp_path, "grad-adaptive-kd", 0.2, 30, 0, {}, {"ptb@512": 60.0, "shakespeare@512": 48.0}, 840)
    _run(tmp_path, "flap", 0.2, 30, 0, {}, {"ptb@512": 150.0}, 840)
    return tmp_path


def test_curve_points_take_default_runs_only(results):
    pts = smollm2.curve_points(results)
    # seeds 0 (lr=0.002, today's default) and 1 (no override) together; lr=0.001 and round_to=32 left out
    (s30, st30), (s100, st100) = pts["steps"]["default"]
    assert (s30, s100) == (30, 100)
    assert st30["ptb@512"] == pytest.approx((2.1, 2.0, 2.2))
    assert st30["shakespeare@512"] == pytest.approx((2.75, 2.5, 3.0))
    assert st100["ptb@512"] == pytest.approx((1.5, 1.5, 1.5))
    assert "flap" not in pts["steps"]  # one-shot: no steps
    # the defaults as shipped (blocks of 32, given explicitly or resolved from round_to=None) are their own series
    (b30, bst30), (b200, bst200) = pts["steps"]["default, blocks of 32"]
    assert (b30, b200) == (30, 200)
    assert bst30["ptb@512"] == pytest.approx((18.0, 18.0, 18.0)) and bst200["shakespeare@512"][0] == pytest.approx(1.2)
    proj, whole, st = pts["ratio"]["grad-adaptive-kd"][0]
    assert (proj, whole) == (0.2, pytest.approx(0.16)) and st["ptb@512"][0] == pytest.approx(1.2)
    assert pts["ratio"]["flap"][0][2] == {"ptb@512": pytest.approx((3.0, 3.0, 3.0))}
    assert pts["proj_over_model"] == pytest.approx(0.8)


def test_curves_write_the_figure_and_table(results):
    path, table = smollm2.curves(results)
    assert path.is_file() and path.stat().st_size > 10_000
    assert "| ratio, 30 steps | default | 30 | 0.50 / 0.400 | 2.10× (2.00–2.20) | 2.75× (2.50–3.00) |" in table
    assert "| steps, 50 % | default | 100 | 0.50 / 0.400 | 1.50× | 1.50× |" in table
    assert "| ratio, 30 steps | flap | 30 | 0.20 / 0.160 | 3.00× | - |" in table


def test_report_gives_both_shares(results):
    table = smollm2.report(results)
    # each row names what differs from today's PruneConfig(): an explicit lr=0.002 is the default, round_to=1 is not
    assert "| default | lr=0.001,round_to=1 | 0.5 | 30 | 0 | 500.00 (10.00×) | 500.00 (12.50×) | 0.500 / 0.400 |" in table
    assert "| default | round_to=1 | 0.5 | 30 | 0,1 | 105.00 ± 5.00 (2.10 ± 0.10×) |" in table
    assert "| default | - | 0.5 | 30 | 2 | 900.00 (18.00×) |" in table


def test_smollm2_round_to_is_what_none_resolves_to():
    from types import SimpleNamespace

    from loraprune.method.allocation import resolve_round_to

    smollm2_layers = [SimpleNamespace(n_channels=1536)] * 30  # SmolLM2-135M: 30 MLPs of 1536 channels
    assert resolve_round_to(None, smollm2_layers) == smollm2.SMOLLM2_ROUND_TO
