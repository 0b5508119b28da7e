"""Test helper for the Triton test modules: build the kernels under triton's CPU interpreter, scoped to them.

Triton decides interpreter-vs-GPU when a ``@triton.jit`` function is decorated (module import), and
``backend="auto"`` picks the Triton path for CPU tensors whenever ``TRITON_INTERPRET=1`` is in the environment.
Setting the variable for the whole pytest process would silently route every other CPU test through the (slow)
interpreter, so this module sets it only while importing the kernels, and the ``interpret`` fixture sets it
again (monkeypatch) for each test of the modules that use it. On a CUDA machine nothing changes: the kernels are
compiled for the GPU and the GPU tests use CUDA tensors.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# in import order: each module's jit helpers are bound by name into the modules after it (a reload must follow it)
_KERNEL_MODULES = ("lora_fast.kernels.dropout", "lora_fast.kernels.dots", "lora_fast.kernels.lora_terms",
                   "lora_fast.kernels.lora_bwd_cublas", "lora_fast.kernels.lora_fwd", "lora_fast.kernels.lora_bwd")


def _import_kernels_interpreted() -> None:
    if HAS_CUDA:  # real compilation; CPU tests are not run there (see DEVICE below)
        for name in _KERNEL_MODULES:
            importlib.import_module(name)
        return
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        stale = [n for n in _KERNEL_MODULES if n in sys.modules]  # imported earlier, maybe in compiled mode
        if stale and type(sys.modules[_KERNEL_MODULES[0]].keep_mask).__name__ != "InterpretedFunction":
            for name in stale:  # dropout first: the others import its jit helpers by name
                importlib.reload(sys.modules[name])
        for name in _KERNEL_MODULES:
            importlib.import_module(name)
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


_import_kernels_interpreted()

# Tests run where the kernels run: CUDA when present, else CPU through the interpreter.
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Relative error of fp32 kernel results against float64 with TF32 on a GPU: the project's standard, 5e-4. triton's
# tf32 dots do not round their fp32 operands — the tensor cores drop the 13 low mantissa bits, a bias where cuBLAS
# rounds (triton issue #4574) — which the H100 lease of 2026-11-22 measured as 7e-4 to 3.9e-3
# (benchmarks/results/h100_2026-11-22/fp32_check.log, tf32=True rows). The kernels now round the frozen GEMMs'
# operands and run the rank-r products in tf32x3 (kernels/dots.py): 1.9e-4–2.3e-4 with the truncation emulated on
# CPU (tests/test_tf32.py), not yet measured on a GPU.
TF32_TOL = 5e-4


def fp32_tol() -> float:
    """Tolerance of an fp32 kernel result against float64, for the dots the kernels run now: 1e-5 where they are
    fp32 (the interpreter's exact numpy dots; a GPU's IEEE dots, torch's default, which the kernels follow —
    errors ~1e-6 at these sizes), ``TF32_TOL`` where torch allows TF32 — on a CPU too: the kernels then round the
    frozen GEMMs' operands to TF32 in the interpreter as well (kernels/dots.py)."""
    from lora_fast.kernels.launch import input_precision

    return TF32_TOL if input_precision(torch.float32) == "tf32" else 1e-5


@pytest.fixture
def interpret(monkeypatch):
    """TRITON_INTERPRET=1 for one test (CPU only), so that dispatch accepts CPU tensors."""
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
