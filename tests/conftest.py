"""Shared test set-up: every test starts from the same seed; the Triton kernels are built for the interpreter.

peft imports triton, and triton fixes interpreter-vs-compiled mode when a ``@triton.jit`` function is defined, so
the kernel modules are imported here first, under ``TRITON_INTERPRET=1`` on a CPU-only machine (see
``tests/triton_interpret.py``): the interpreter is then used only where a test sets the variable, and every other
CPU test stays on the reference path.
"""

import gc
import os
import signal

import pytest
import torch

try:  # triton is optional: without it the Triton tests skip themselves
    import tests.triton_interpret  # noqa: F401
except ImportError:
    pass

if torch.distributed.is_available():
    # peft >= 0.21 reads torch.distributed.tensor.DTensor without importing the submodule; transformers 5 imports it,
    # transformers 4 does not (AttributeError in get_peft_model on an nn.Linear target, depending on test order)
    import torch.distributed.tensor  # noqa: F401


_PYTEST_PID = os.getpid()
_real_os_exit = os._exit


def _os_exit_outside_pytest(status):
    """``os._exit`` in pytest's own process ends the session with that status and no summary: ``os._exit(0)``
    would read as a passing suite to CI (mutation round 7a's C43: a torchrun rank's exit taken by every process).
    There it fails the test that called it; a forked child (multiprocessing, DataLoader workers) still exits."""
    if os.getpid() == _PYTEST_PID:
        pytest.fail(f"os._exit({status}) called in the pytest process itself: the suite would end there, "
                    f"unreported (lora_fast leaves by os._exit only as a rank of a multi-process launch)")
    _real_os_exit(status)


os._exit = _os_exit_outside_pytest

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # A shell without job control starts a background job (`pytest &`, `nohup pytest`) with SIGINT ignored, and
    # Python then keeps it ignored, as do the processes the tests start. lora_fast rightly leaves an ignored stop
    # signal ignored, so the tests of its Ctrl-C handling would fail there: they run under Python's usual handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group (file store: no port), destroyed afterwards (in-process tests of collectives,
    DDP and FSDP2)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
    # what still holds the destroyed group (FSDP2 models, DTensors, device meshes in reference cycles) is freed now:
    # left to a later garbage collection, that ran inside a process forked afterwards (a DataLoader worker of
    # test_dataloader_workers_ignore_sigint_under_torchrun), which then died of a segmentation fault
    gc.collect()
