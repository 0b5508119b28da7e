"""Packaging for lora-fast.

``kernels/`` is installed as ``lora_fast.kernels`` (never as a top-level ``kernels``: PyPI has a package of that
name and transformers >= 5 imports any top-level ``kernels`` it finds).

torch is required but left unpinned so that a GPU user keeps the CUDA build they already have. On a CPU-only
machine install ``torch==2.13.0`` first (the local CPU wheel); an unpinned install there would pull CUDA wheels.
Triton is optional at import time: without it everything runs on the plain-PyTorch reference path.
"""

from setuptools import setup

setup(
    name="lora-fast",
    version="0.1.0",
    description="Drop-in LoRA layers for PyTorch with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lora_fast", "lora_fast.kernels"],
    package_dir={"lora_fast": "lora_fast", "lora_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.40",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["datasets", "tokenizers", "matplotlib", "pyyaml"],
        "dev": [
            "triton>=3.0",
            "pytest>=7",
            "pytest-benchmark",
            "peft>=0.13",
            "datasets",
            "tokenizers",
            "matplotlib",
            "pyyaml",
            "tensorboard",
            "ruff",
            "setuptools>=64",
            "wheel",
        ],
    },
    entry_points={"console_scripts": ["lora-fast=lora_fast.cli:main"]},
)
