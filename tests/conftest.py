"""Shared test set-up: every test starts from the same seed; the Triton kernels are built for the interpreter.

peft imports triton, and triton fixes interpreter-vs-compiled mode when a ``@triton.jit`` function is defined, so
the kernel modules are imported here first, under ``TRITON_INTERPRET=1`` on a CPU-only machine (see
``tests/triton_interpret.py``): the interpreter is then used only where a test sets the variable, and every other
CPU test stays on the reference path.
"""

import pytest
import torch

try:  # triton is optional: without it the Triton tests skip themselves
    import tests.triton_interpret  # noqa: F401
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: tiny matmuls, where a loaded 2-core machine's thread pool spins
    far more than it computes (training runs of the CLI tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
