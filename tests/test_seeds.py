"""Dropout seeds at the functional and op level: an int, a seed tensor and the seed drawn from torch's generator give
the masks they promise, on the fused path and where the op falls back to the reference — without reading a seed on
the host where the kernels' mask can be built (a host sync on CUDA, and illegal in CUDA-graph capture)."""

from __future__ import annotations

import pytest
import torch

import lora_fast.functional as functional
from lora_fast.ops import lora_linear_op
from lora_fast.reference import lora_linear_ref
from tests.test_compile import FP32_TOL, _inputs
from tests.triton_interpret import DEVICE, interpret  # noqa: F401  (fixture)
from tests.utils import assert_rel_close


def _path_inputs(triton_path: bool, request, *shape):
    """``_inputs`` on CPU for the reference path; for the Triton path on ``DEVICE`` (CUDA, or CPU with the
    interpreter: the ``interpret`` fixture), where backend="triton" runs the kernels or raises."""
    if not triton_path:
        return _inputs(*shape)
    request.getfixturevalue("interpret")
    return _inputs(*shape, device=DEVICE)


@pytest.mark.parametrize("triton_path", [False, True])
def test_eager_seed_tensor_equals_its_int(triton_path, request):
    """Eager ``lora_linear`` takes a seed tensor as the compiled op does (one function for both modes): the same
    output as the int seed, on the reference path and on the Triton path."""
    x, w, b, a, bb = _path_inputs(triton_path, request, 16, 32, 24, 4, False)
    backend = "triton" if triton_path else "reference"
    y_int = functional.lora_linear(x, w, b, a, bb, 2.0, 0.5, seed=7, backend=backend)
    y_t = functional.lora_linear(x, w, b, a, bb, 2.0, 0.5, seed=torch.tensor([7]), backend=backend)
    assert torch.equal(y_int, y_t)
    assert not torch.allclose(y_int, functional.lora_linear(x, w, b, a, bb, 2.0, 0.5, seed=8, backend=backend))
    with pytest.raises(ValueError, match="one int64"):
        functional.lora_linear(x, w, b, a, bb, 2.0, 0.5, seed=torch.tensor([7.0]), backend=backend)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("r", [3, 130])
def test_op_reference_fallback_reads_no_seed_on_the_host(monkeypatch, r):
    """On the fused path (r = 3) and where the op falls back to the reference (rank 130 > the kernels' 128, which is
    how a rank-256 adapter runs on a GPU) with dropout, the mask is the kernels' own, read from the seed tensor on
    the device: no ``.item()`` (a host sync on CUDA, illegal inside CUDA-graph capture, and a seed frozen into a
    captured graph). Forward and backward equal the float64 reference with ``dropout_mask(seed)``, and eager
    ``lora_linear`` with the same seed applies the same mask. The path each direction took is spied."""
    from lora_fast.kernels.launch import MAX_RANK

    from lora_fast import ops
    from lora_fast.functional import dropout_mask

    x, w, b, a, bb = _inputs(29, 40, 24, r, False, device=DEVICE)
    seed = torch.tensor([4321], device=DEVICE)
    fused, real = [], ops._use_triton
    monkeypatch.setattr(ops, "_use_triton", lambda *args, **kw: fused.append(real(*args, **kw)) or fused[-1])

    def no_item(self):
        raise AssertionError("a tensor was read on the host (.item())")

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "item", no_item)
        y = lora_linear_op(x, w, b, a, bb, 0.5, dropout_p=0.3, seed=seed)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, a, bb), dy)
    keep = dropout_mask(4321, 29, 40, 0.3, x.device)
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), bb.detach().double().requires_grad_()
    ref = lora_linear_ref(x64, w.double(), b.double(), a64, b64, 0.5, dropout_p=0.3, keep_mask=keep)
    assert_rel_close(y, ref, FP32_TOL, "y")
    grads_ref = torch.autograd.grad(ref, (x64, a64, b64), dy.double())
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref, strict=True):
        assert_rel_close(g, g_ref, FP32_TOL, name)
    assert fused == [r <= MAX_RANK] * 2  # forward, backward: the kernels up to their rank limit, else the reference
    y_fn = functional.lora_linear(x, w, b, a, bb, 0.5, 0.3, seed=4321)  # eager, same path (fused, or reference)
    torch.testing.assert_close(y, y_fn, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("interpret")
def test_reference_seeded_mask_near_p_one_keeps_the_generator():
    """Where the kernels' 16-bit threshold would bias the mask (p within ~1 % of 1) the seeded reference mask stays
    ``torch.rand >= p`` from a generator seeded with the seed, in the op and in eager alike."""
    x, w, b, a, bb = _inputs(16, 32, 24, 4, False)
    p = 0.997
    y = lora_linear_op(x, w, b, a, bb, 2.0, dropout_p=p, seed=7)
    keep = torch.rand(16, 32, generator=torch.Generator().manual_seed(7)) >= p
    ref = lora_linear_ref(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0, dropout_p=p,
                          keep_mask=keep)
    assert_rel_close(y, ref, FP32_TOL, "y")
    torch.testing.assert_close(y, functional.lora_linear(x, w, b, a, bb, 2.0, p, seed=7), rtol=0, atol=1e-6)


def test_cpu_reference_masks_of_seeds_equal_in_their_low_32_bits_differ():
    """torch's CPU generator keeps a seed's low 32 bits: seeds s and s + k·2**32 gave one mask, so of the 62-bit
    seeds drawn per layer call two in ~10**5 calls shared a mask (a review found the pair 1903782170126793033 and
    2347067016057272649 in 200 000 draws). Each still gives one mask, and its keep rate is 1 − p."""
    x = torch.zeros(256, 256)
    pair = (1903782170126793033, 2347067016057272649)
    assert pair[0] % 2**32 == pair[1] % 2**32  # the premise
    for a, b in (pair, (5, 5 + 2**32), (7, 7 + 3 * 2**40)):
        ka, kb = (functional.seeded_keep_mask(s, x, 0.5, "reference") for s in (a, b))
        assert torch.equal(ka, functional.seeded_keep_mask(a, x, 0.5, "reference"))  # a seed is one mask
        agree = (ka == kb).double().mean().item()
        assert abs(agree - 0.5) < 0.01, (a, b, agree)  # independent masks agree on half the elements at p = 0.5
    keep = functional.seeded_keep_mask(pair[1], torch.zeros(1024, 1024), 0.1, "reference").double().mean().item()
    assert abs(keep - 0.9) < 5 * (0.9 * 0.1 / 2**20) ** 0.5  # 5 standard deviations
    for seed in (0, 5, 2**31 + 5, 2**32 - 1):  # below 2**32: the documented mask of one generator, as before
        expected = torch.rand((256, 256), generator=torch.Generator().manual_seed(seed)) >= 0.5
        assert torch.equal(functional.seeded_keep_mask(seed, x, 0.5, "reference"), expected), seed


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("seed", [None, 7])
def test_fake_tensors_with_dropout_trace_on_the_reference_fallback(seed):
    """FakeTensorMode (how torch.compile and export trace) through eager ``lora_linear`` on the reference fallback
    (rank 130) with dropout: the mask is never built by a kernel launch on fake tensors (no storage there)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, b, a, bb = _inputs(8, 16, 8, 130, False)
        y = functional.lora_linear(x, w, b, a, bb, 0.5, 0.3, seed=seed)
    assert y.shape == (8, 8)


@pytest.mark.parametrize("bad", [-1, 2**63, True, 7.0, torch.tensor([7], dtype=torch.int32), torch.tensor([1, 2])])
def test_bad_seeds_are_errors_in_eager_and_op_even_without_dropout(bad):
    """A seed outside [0, 2**63), a bool, a float or a wrong tensor is a clear error on both entries, also when
    dropout is off or in eval mode (where it would otherwise be silently ignored)."""
    x, w, b, a, bb = _inputs(4, 8, 6, 2, False)
    for fn in (functional.lora_linear, lora_linear_op):
        for p, training in ((0.3, True), (0.0, True), (0.3, False)):
            with pytest.raises(ValueError, match="seed"):
                fn(x, w, b, a, bb, 1.0, p, seed=bad, training=training)


@pytest.mark.parametrize("triton_path", [False, True])
def test_eval_mode_with_a_seed_has_no_dropout(triton_path, request):
    """training=False turns dropout off whatever seed is given (a module in eval mode still passes its seed): the
    output is the dropout-free one, on the reference path and on the Triton path."""
    x, w, b, a, bb = _path_inputs(triton_path, request, 16, 32, 24, 4, False)
    backend = "triton" if triton_path else "reference"
    plain = functional.lora_linear(x, w, b, a, bb, 2.0, 0.0, backend=backend)
    for seed in (5, torch.tensor([5])):
        assert torch.equal(functional.lora_linear(x, w, b, a, bb, 2.0, 0.5, seed=seed, training=False,
                                                  backend=backend), plain)
