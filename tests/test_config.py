"""PruneConfig: one home for the options; the README's table is generated from it."""
import dataclasses
import re
from pathlib import Path

import pytest

import loraprune
from loraprune.config import RUN_DEFINING, PruneConfig, options_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_options_table_is_generated_from_the_fields():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- options:begin -->\n(.*?)\n<!-- options:end -->", text, re.S)
    assert block, "README lost its options markers"
    assert block.group(1) == options_markdown(), "run: python -c 'from loraprune.config import options_markdown; print(options_markdown())'"


def test_every_field_has_help_and_prune_accepts_it():
    for f in dataclasses.fields(PruneConfig):
        assert f.metadata["help"], f.name
    # keyword overrides and a config object are the same run
    a = PruneConfig.from_kwargs(ratio=0.3, steps=7)
    b = PruneConfig(ratio=0.3, steps=7)
    assert a == b and a.to_dict()["steps"] == 7
    assert PruneConfig.from_kwargs(a, steps=9).steps == 9 and a.steps == 7  # overrides copy, never mutate


def test_run_defining_options_leave_out_only_bookkeeping():
    names = {f.name for f in dataclasses.fields(PruneConfig)}
    # loss_chunk and gradient_checkpointing change memory, not results (tests/test_loss.py,
    # tests/test_gradient_checkpointing.py): a run may be resumed with or without them
    assert names - set(RUN_DEFINING) == {"progress", "merge", "checkpoint_dir", "checkpoint_every", "resume",
                                             "force_resume", "loss_chunk", "gradient_checkpointing"}


@pytest.mark.slow
def test_prune_takes_a_config_or_a_float_ratio_positionally():
    from tiny import random_batches, tiny_model

    cfg = PruneConfig(ratio=0.3, steps=2, progress=False, lora_dropout=0.0)
    a = loraprune.prune(tiny_model(), random_batches(n=2), cfg)
    b = loraprune.prune(tiny_model(), random_batches(n=2), 0.3, steps=2, progress=False, lora_dropout=0.0)
    assert a.config.loraprune["settings"] == b.config.loraprune["settings"]
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and v.equal(v2)


@pytest.mark.parametrize("bad", [dict(ratio=True), dict(steps=True), dict(grad_accum=2.0)])
def test_bools_are_not_numbers(bad):
    with pytest.raises(ValueError):
        PruneConfig(**bad)
