"""Packaging for loraprune.

The top-level ``kernels/`` folder is installed as the subpackage
``loraprune.kernels``: Hugging Face's ``kernels`` package owns the top-level
name ``kernels`` and transformers probes for it, so we must never shadow it.
"""
from setuptools import setup

setup(
    name="loraprune",
    version="0.1.0",
    description="LoRA-guided structured pruning of LLaMA-family models, accelerated by Triton kernels",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["loraprune", "loraprune.kernels"],
    package_dir={"loraprune": "loraprune", "loraprune.kernels": "kernels"},
    package_data={"loraprune.kernels": ["README.md"]},
    install_requires=[
        "torch>=2.3,<2.15",
        "triton>=3.0",
        "transformers>=4.48,<6",
        "peft>=0.13",
        "safetensors>=0.4",
        "datasets>=2.19",
        "tokenizers>=0.19",
        "accelerate>=0.30",
        "tqdm>=4.60",
    ],
    extras_require={
        "dev": ["pytest>=7", "psutil>=5.9", "matplotlib>=3.7"],
        "eval": ["lm-eval>=0.4"],
    },
    entry_points={"console_scripts": ["loraprune=loraprune.cli:main"]},
)
