"""Every input a user can get wrong gets a clear error naming the fix.

One table, assembled from ``tests/cases_*.py`` (each area keeps its own cases
beside the code it checks); see ``tests/bad_input_table.py`` for the shape.
"""
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

from bad_input_table import Case

_HERE = Path(__file__).parent


def _all_cases() -> list[Case]:
    cases = []
    for info in sorted(pkgutil.iter_modules([str(_HERE)]), key=lambda i: i.name):
        if info.name.startswith("cases_"):
            cases += importlib.import_module(info.name).CASES
    return cases


CASES = _all_cases()


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_the_fix(case: Case, tmp_path):
    with pytest.raises(case.raises) as info:
        case.call(tmp_path)
    assert re.search(case.match, str(info.value), re.IGNORECASE), f"message was: {info.value}"
