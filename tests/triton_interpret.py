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
_KERNEL_MODULES = ("lora_fast.kernels.dropout", "lora_fast.kernels.lora_fwd", "lora_fast.kernels.lora_bwd")


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


@pytest.fixture
def interpret(monkeypatch):
    """TRITON_INTERPRET=1 for one test (CPU only), so that dispatch accepts CPU tensors."""
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
