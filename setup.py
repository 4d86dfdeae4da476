"""Packaging for loraprune: the metadata lives in pyproject.toml (PEP 621).

This file stays so that tools which call ``setup.py`` keep working. The
Triton kernels live in ``loraprune/kernels/`` (imported as ``loraprune.kernels``):
Hugging Face's ``kernels`` distribution owns the top-level name ``kernels`` and
transformers imports it, so the repository root must never hold a package or
module of that name (``tests/test_layout.py`` checks every installed name).
"""
from setuptools import setup

setup()
