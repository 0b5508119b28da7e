"""Packaging for lora-fast.

``kernels/`` is installed as ``lora_fast.kernels`` (never as a top-level ``kernels``: PyPI has a package of that
name and transformers >= 5 imports any top-level ``kernels`` it finds).

torch is required but not pinned, so that a GPU user keeps the CUDA build they already have. On a CPU-only
machine install ``torch==2.13.0`` first (the local CPU wheel); an unpinned install there would pull CUDA wheels.
Triton is optional at import time: without it everything runs on the plain-PyTorch reference path. It ships for
Linux only, hence the marker: ``[dev]`` and ``[triton]`` install on macOS and Windows too, without it.

Lower bounds are the versions the suite has run on, not guesses (README "Versions"): torch 2.4 failed at import and
2.5 lacks the public FSDP2 API; triton < 3.4 cannot compile the kernels (they fall back to the reference path
there); transformers 4.46, 4.51, 4.57, 5.0, 5.8, 5.17, 5.23 and 5.24 passed (CI runs the newest, 5.24 now, and 4.57
for the tests that touch transformers).

The version lives in ``lora_fast/__init__.py`` alone (read here without importing the package, which needs torch).
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
_INIT = (HERE / "lora_fast" / "__init__.py").read_text(encoding="utf-8")
VERSION = re.search(r'^__version__ = "([^"]+)"$', _INIT, re.M).group(1)

setup(
    name="lora-fast",
    version=VERSION,
    description="Drop-in LoRA layers for PyTorch with fused Triton kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lora_fast", "lora_fast.kernels"],
    package_dir={"lora_fast": "lora_fast", "lora_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "transformers>=4.46",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "packaging",
    ],
    extras_require={
        "triton": ['triton>=3.4; platform_system == "Linux"'],
        "train": ["datasets", "tokenizers", "matplotlib", "pyyaml", "tensorboard"],
        "dev": [
            'triton>=3.4; platform_system == "Linux"',
            "pytest>=7",
            "pytest-benchmark",
            "peft>=0.21",
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
    entry_points={"console_scripts": ["lora-fast=lora_fast.cli:console_main"]},
)
