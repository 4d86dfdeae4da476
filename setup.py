"""Packaging for loraprune: the metadata lives in pyproject.toml (PEP 621).

This file stays so that tools which call ``setup.py`` keep working. Note the
layout declared there: the top-level ``kernels/`` folder is installed as the
subpackage ``loraprune.kernels``; Hugging Face's ``kernels`` package owns the
top-level name ``kernels`` and transformers probes for it, so we must never
shadow it.
"""
from setuptools import setup

setup()
