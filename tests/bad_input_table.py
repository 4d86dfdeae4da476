"""The shape of one bad-input case, shared by the case tables ``tests/cases_*.py``.

Each table module defines ``CASES``: a list of :class:`Case`. ``tests/test_bad_inputs.py``
runs them all: every call must raise ``raises`` with a message matching ``match``
(a regular expression, searched case-insensitively), which names the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable  # call(tmp_path) -> anything; must raise
    match: str  # regex the message must contain (it names the cause or the fix)
    raises: type | tuple = ValueError  # loraprune.errors.LoRAPruneError subclasses are ValueErrors
