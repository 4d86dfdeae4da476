"""PruneConfig: one home for the options; the docs' option tables are generated from it."""
import argparse
import dataclasses
import re
from pathlib import Path

import pytest

import loraprune
from loraprune.config import RUN_DEFINING, PruneConfig, cli_options_markdown, options_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _block(path: Path, name: str) -> str:
    text = path.read_text(encoding="utf-8")
    block = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert block, f"{path.name} lost its {name} markers"
    return block.group(1)


def test_options_table_is_generated_from_the_fields():
    assert _block(DOCS / "options.md", "options") == options_markdown(), (
        "regenerate docs/options.md's table: python -c 'from loraprune.config import options_markdown; "
        "print(options_markdown())'")


def test_cli_doc_flag_table_is_generated_from_the_fields():
    assert _block(DOCS / "cli_and_trainer.md", "cli-options") == cli_options_markdown(), (
        "regenerate docs/cli_and_trainer.md's flag table: python -c 'from loraprune.config import "
        "cli_options_markdown; print(cli_options_markdown())'")


def _prune_parser() -> argparse.ArgumentParser:
    from loraprune.apps.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["prune"]


def _as_typed(value) -> str:
    """A parser default as the doc tables write it."""
    return "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else str(value)


def _table_rows(table: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    return [r for r in rows[2:] if r and r[0]]


def test_cli_doc_tables_agree_with_the_parser_of_loraprune_prune():
    """The generated flag table against the real parser (flag names, defaults, choices), and the hand-written
    table of the command line's own options against it too: the doc says what `loraprune prune` does."""
    actions = {s: a for a in _prune_parser()._actions for s in a.option_strings}
    doc = (DOCS / "cli_and_trainer.md").read_text(encoding="utf-8")
    own = doc.split("### Options of the command line only", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    generated, own = _table_rows(_block(DOCS / "cli_and_trainer.md", "cli-options")), _table_rows(own)
    assert len(generated) > 25 and len(own) > 10
    rows = [(flag, default, choices) for flag, default, choices in generated] + [(r[0], r[1], None) for r in own]
    for flag, default, choices in rows:
        names = re.findall(r"`([^`]+)`", flag)[0]
        if names.startswith("--[no-]"):
            names = [f"--{names[7:]}", f"--no-{names[7:]}"]
            assert isinstance(actions[names[0]], argparse.BooleanOptionalAction), names
        else:
            names = [names]
        action = actions.get(names[0])
        assert action is not None and all(n in action.option_strings for n in names), f"{names}: not a flag"
        if default == "required":
            assert action.required, names
            continue
        assert default.strip("`") == _as_typed(action.default), (names, default, action.default)
        if choices is not None:  # the generated rows: their choices, or none
            assert re.findall(r"`([^`]+)`", choices) == [_as_typed(c) for c in action.choices or ()], names
    # every PruneConfig flag of the parser is in the doc
    documented = {re.findall(r"`([^`]+)`", r[0])[0].replace("[no-]", "") for r in rows}
    config_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(PruneConfig)
                    if f.metadata.get("cli", True)}
    assert config_flags <= documented and config_flags <= set(actions)


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
