"""Launchers (``lora_linear_fwd``, ``lora_linear_bwd``, ``dropout_keep_mask``) against the float64 reference.

Dropout parity is exact: the reference is given the kernels' own keep-mask (``dropout_keep_mask``), so with
dropout on, forward and every gradient are compared element by element, not statistically. On a CPU-only machine
everything runs through triton's interpreter (fp32 dots are exact there: tolerance 1e-5); with a GPU the same
tests compile for real (``fp32_tol``: 1e-5 with torch's default IEEE fp32, which the kernels follow; TF32's
tolerance only where torch allows TF32).
"""

# ruff: noqa: I001  (the kernels are imported after tests.triton_interpret has set up the interpreter)
from __future__ import annotations

import pytest
import torch

from lora_fast.reference import lora_linear_ref
from tests.triton_interpret import DEVICE, HAS_CUDA, fp32_tol, interpret  # noqa: F401  (fixture)
from tests.utils import assert_half_precision, assert_rel_close, ref_grads64, rel_err

from lora_fast.kernels.dropout import dropout_keep_mask, seed_tensor, uniform
from lora_fast.kernels.lora_bwd import lora_linear_bwd
from lora_fast.kernels.lora_fwd import FWD_VARIANTS, lora_linear_fwd

pytestmark = pytest.mark.usefixtures("interpret")

# (M, K, N, r, fan_in_fan_out, bias, p): odd sizes (K, N not multiples of any block), every listed rank and M,
# both layouts, with/without bias, dropout off/on — covered without the full cross product (interpreter time).
CASES = [
    (1, 97, 75, 1, False, True, 0.0),
    (37, 97, 75, 3, True, True, 0.2),
    (37, 50, 130, 8, False, False, 0.5),
    (128, 70, 33, 16, True, False, 0.0),
    (128, 33, 70, 64, False, True, 0.1),
    (64, 40, 24, 128, True, True, 0.3),
]


def _make(M, K, N, r, fifo, has_bias, dtype=torch.float32, device=DEVICE):
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn((K, N) if fifo else (N, K), dtype=dtype, device=device) / K**0.5
    b = torch.randn(N, dtype=dtype, device=device) if has_bias else None
    a = torch.randn(r, K, device=device) / K**0.5  # fp32 adapters, as LinearWithLoRA keeps them
    bb = torch.randn(N, r, device=device) / r**0.5
    return x, w, b, a, bb


# Backward modes: the fused kernel with fp32 atomics or deterministic partials, with TMA loads (where the layout
# allows; tests/test_tma.py checks which path ran), after a dy pass (gb_first), and the cublas variant.
BWD_MODES = (("fused", False), ("fused", True), ("tma", False), ("gb_first", False), ("cublas", False))


def _run(x, w, b, a, bb, s, p, seed, fifo, dy, variant=None, deterministic=None, bwd_variant=None):
    st = seed_tensor(seed, x.device) if p > 0 else None
    y, xa = lora_linear_fwd(x, w, b, a, bb, s, p, st, fifo, variant=variant)
    dx, da, db = lora_linear_bwd(dy, x, xa, w, a, bb, s, p, st, fifo, deterministic=deterministic,
                                 variant=bwd_variant)
    return y, xa, dx, da, db


@pytest.mark.parametrize("M, K, N, r, fifo, has_bias, p", CASES)
def test_forward_backward_match_fp64_reference(M, K, N, r, fifo, has_bias, p):
    """Every forward variant (``FWD_VARIANTS``) and every backward mode (``BWD_MODES``: fused with fp32 atomics or
    deterministic per-block partials, tma, gb_first, cublas) against the float64 reference with the kernels' own
    mask, at every case (dropout on and off, both layouts, ranks 1–128; the odd sizes here mostly keep the TMA
    variants on their pointer loads — tests/test_tma.py covers the descriptors)."""
    x, w, b, a, bb = _make(M, K, N, r, fifo, has_bias)
    dy = torch.randn(M, N, device=x.device)
    seed, s = 1234 + M, 2.0 / r
    st = seed_tensor(seed, x.device) if p > 0 else None
    mask = dropout_keep_mask(seed, M, K, p, x.device) if p > 0 else None
    if p > 0:  # the mask really drops something, so parity below is not vacuous
        assert 0 < mask.sum() < mask.numel() or M * K < 8
    ref = ref_grads64(x, w, b, a, bb, s, p, mask, fifo, dy)
    xa = None
    for variant in FWD_VARIANTS:
        y, xa = lora_linear_fwd(x, w, b, a, bb, s, p, st, fifo, variant=variant)
        for name, o, rf in (("y", y, ref[0]), ("xa", xa, ref[1])):
            assert o.dtype == (torch.float32 if name == "xa" else x.dtype), (variant, name)
            assert_rel_close(o, rf, fp32_tol(), f"{variant}: {name}")
    for bwd_variant, deterministic in BWD_MODES:
        out = lora_linear_bwd(dy, x, xa, w, a, bb, s, p, st, fifo, deterministic=deterministic, variant=bwd_variant)
        for name, o, rf in zip(("dx", "dA", "dB"), out, ref[2:], strict=True):
            assert o.dtype == {"dA": a.dtype, "dB": bb.dtype}.get(name, x.dtype), name
            assert_rel_close(o, rf, fp32_tol(), f"{bwd_variant} (deterministic={deterministic}): {name}")


def test_noncontiguous_inputs_use_strides():
    """x as a transposed view, W₀, dy and the bias strided: the same result as the reference on these views."""
    M, K, N, r, p, s = 37, 45, 29, 8, 0.25, 0.5
    x = torch.randn(K, M, device=DEVICE).t()  # (M, K), column-major
    w = torch.randn(N, 2 * K, device=DEVICE)[:, ::2]  # (N, K) with stride 2
    bias = torch.randn(N, 3, device=DEVICE)[:, 1]  # (N,) with stride 3
    a, bb = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    dy = torch.randn(N, M, device=DEVICE).t()
    assert not (x.is_contiguous() or w.is_contiguous() or dy.is_contiguous() or bias.is_contiguous())
    mask = dropout_keep_mask(7, M, K, p, DEVICE)
    ref = ref_grads64(x, w, bias, a, bb, s, p, mask, False, dy)
    for fwd, bwd in ((None, None), ("one_pass", None), ("cublas", "cublas")):
        out = _run(x, w, bias, a, bb, s, p, 7, False, dy, variant=fwd, bwd_variant=bwd)
        for name, o, rf in zip(("y", "xa", "dx", "dA", "dB"), out, ref, strict=True):
            assert_rel_close(o, rf, fp32_tol(), f"{fwd or 'default'}: {name}")


def test_zero_output_features_still_give_xa():
    """N = 0 (an empty projection): y is (M, 0) and xa = x·Aᵀ is still computed by every forward variant."""
    x, w, _, a, bb = _make(9, 20, 0, 4, True, False)
    for variant in FWD_VARIANTS:
        y, xa = lora_linear_fwd(x, w, None, a, bb, 1.0, fan_in_fan_out=True, variant=variant)
        assert y.shape == (9, 0)
        assert_rel_close(xa, x.double() @ a.double().t(), fp32_tol(), f"{variant}: xa")


def test_backward_skips_unneeded_gradients():
    """Only the requested gradients are produced (dx skipped for a first layer; dB alone for a frozen A)."""
    M, K, N, r = 16, 24, 20, 4
    x, w, b, a, bb = _make(M, K, N, r, False, True)
    dy = torch.randn(M, N, device=DEVICE)
    y, xa = lora_linear_fwd(x, w, b, a, bb, 1.0)
    ref = ref_grads64(x, w, b, a, bb, 1.0, 0.0, None, False, dy)
    dx, da, db = lora_linear_bwd(dy, x, xa, w, a, bb, 1.0, needs_dx=False)
    assert dx is None
    assert_rel_close(da, ref[3], fp32_tol(), "dA")
    assert_rel_close(db, ref[4], fp32_tol(), "dB")
    dx, da, db = lora_linear_bwd(dy, x, xa, w, a, bb, 1.0, needs_dx=False, needs_dA=False)
    assert dx is None and da is None
    assert_rel_close(db, ref[4], fp32_tol(), "dB")


def _dtype_errors(dtype, device, M=48, K=80, N=72, r=16, p=0.2, variants=(None, None), half_adapters=False):
    """(kernel error, PyTorch's own error) against fp64 for y, dx, dA, dB in ``dtype``; ``variants``: (forward,
    backward) variant, None for the default rule; ``half_adapters``: A and B in ``dtype`` too (fp32 otherwise)."""
    x, w, b, a, bb = _make(M, K, N, r, False, True, dtype=dtype, device=device)
    if half_adapters:
        a, bb = a.to(dtype), bb.to(dtype)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    mask = dropout_keep_mask(99, M, K, p, device)
    out = _run(x, w, b, a, bb, 0.5, p, 99, False, dy, variant=variants[0], bwd_variant=variants[1])
    ref = ref_grads64(x, w, b, a, bb, 0.5, p, mask, False, dy)
    # PyTorch in the same dtype (adapters cast to it, as the reference does outside autocast)
    xt, at, bt = (t.detach().clone().requires_grad_() for t in (x, a.to(dtype), bb.to(dtype)))
    yt = lora_linear_ref(xt, w, b, at, bt, 0.5, dropout_p=p, keep_mask=mask)
    yt.backward(dy)
    torch_out = (yt, xt.grad, at.grad, bt.grad)
    pairs = zip(out[:1] + out[2:], torch_out, ref[:1] + ref[2:], strict=True)  # (y, dx, dA, dB)
    return [(rel_err(o, rf), rel_err(t, rf)) for o, t, rf in pairs]


def _check_dtype(dtype, device):
    # the cublas variant without dropout runs one GEMM with the merged weight (rounded to the dtype): p = 0 too
    for variants, p in (((None, None), 0.2), (("cublas", "cublas"), 0.2), (("cublas", "cublas"), 0.0),
                        (("tma", "tma"), 0.2), (("tma_persistent", "gb_first_tma"), 0.2), ((None, "gb_first"), 0.0)):
        _check_dtype_variants(dtype, device, variants, p)
    # odd sizes (no dimension a multiple of a tile or of 8, rank 5 padded) and adapters in the half dtype
    for kw in ({"M": 37, "K": 97, "N": 75, "r": 5}, {"half_adapters": True}, {"M": 37, "K": 97, "N": 75, "r": 5,
                                                                              "half_adapters": True, "p": 0.0}):
        errors = _dtype_errors(dtype, device, **kw)
        for name, (err, torch_err) in zip(("y", "dx", "dA", "dB"), errors, strict=True):
            assert_half_precision(err, torch_err, f"{name} {kw} {dtype}")


def _check_dtype_variants(dtype, device, variants, p):
    errors = _dtype_errors(dtype, device, p=p, variants=variants)
    for name, (err, torch_err) in zip(("y", "dx", "dA", "dB"), errors, strict=True):
        assert_half_precision(err, torch_err, f"{name} {variants} p={p} {dtype}")


@pytest.mark.skipif(HAS_CUDA, reason="interpreter fp16 check; on a GPU test_fp16_bf16_gpu covers fp16")
def test_fp16_interpreter():
    """The interpreter computes fp16 tl.dot correctly (unlike bf16), so fp16 is checked here too."""
    _check_dtype(torch.float16, "cpu")


@pytest.mark.skipif(not HAS_CUDA, reason="fp16/bf16 on real compilation needs a CUDA GPU (runs in the GPU job); "
                    "bf16 cannot run on CPU: the interpreter's bf16 tl.dot is garbage (fp16: test_fp16_interpreter)")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_bf16_gpu(dtype):
    """bf16 only on a GPU: the interpreter's bf16 tl.dot returns garbage (and dispatch refuses bf16 there)."""
    _check_dtype(dtype, "cuda")


@pytest.mark.parametrize("bwd_variant", ["fused", "cublas"])
def test_fp16_backward_scales_before_rounding(bwd_variant):
    """fp16 with s < 1 and a large dy (a GradScaler-scaled loss): autograd computes (s·dy)·B in fp16, finite here,
    while dy·B alone exceeds fp16's 65504. The kernels must round s·dy·B, not dy·B scaled afterwards (which gave
    inf in dx and dA), and stay within fp16 error of the fp64 result."""
    M, K, N, r, s = 8, 32, 40, 4, 0.25
    dev = DEVICE
    x, w, b, a, bb = _make(M, K, N, r, False, False, dtype=torch.float16, device=dev)
    bb = torch.full((N, r), 0.5, device=dev)  # every dy·B entry = 0.5·N·dy = 20·dy
    dy = torch.full((M, N), 6000.0, dtype=torch.float16, device=dev)  # dy·B = 1.2e5 > 65504; s·dy·B = 3e4
    assert (dy.double() @ bb.double()).abs().max() > 65504 > s * (dy.double() @ bb.double()).abs().max()
    out = _run(x, w, b, a, bb, s, 0.0, 0, False, dy, bwd_variant=bwd_variant)
    ref = ref_grads64(x, w, b, a, bb, s, 0.0, None, False, dy)
    xt, at, bt = (t.detach().clone().requires_grad_() for t in (x, a.half(), bb.half()))  # PyTorch's own fp16
    lora_linear_ref(xt, w, b, at, bt, s).backward(dy)
    for name, o, t, rf in zip(("dx", "dA", "dB"), out[2:], (xt.grad, at.grad, bt.grad), ref[2:], strict=True):
        assert torch.isfinite(o).all(), f"{bwd_variant}: {name} has inf/nan where fp64 is {rf.abs().max():.3g} at most"
        assert_half_precision(rel_err(o, rf), rel_err(t, rf), f"{bwd_variant}: {name}")


@pytest.mark.parametrize("s, b_scale, x_scale", [(0.125, 1e-4, 1.0), (1 / 32, 1e-5, 1.0), (16.0, 1e-3, 3000.0),
                                                  (-0.125, 1e-4, 1.0), (-16.0, 1e-3, 3000.0)])
def test_fp16_forward_scaling_rounds_in_range(s, b_scale, x_scale):
    """fp16, where folding s into one operand of the up-projection before its rounding leaves fp16's range: |s| < 1
    with a young adapter (|B| ~ 1e-4 to 1e-5: s·B in the subnormals) and |s| = 16 with outlier activations (|xa| ~
    1e4: s·xa over 65504, though y is ~1e3). The kernels put |s| ≤ 1 on xa and |s| > 1 on B, the sign on xa (a
    negative s, e.g. an adapter subtracted, once went whole onto xa). W₀ = 0, so y is the LoRA term alone; every
    forward variant is finite and within twice the error of torch's own fp16 LoRA term."""
    M, K, N, r = 64, 48, 40, 16
    x = (torch.randn(M, K, device=DEVICE) * x_scale).half()
    w = torch.zeros(N, K, device=DEVICE).half()
    a = torch.randn(r, K, device=DEVICE) / K**0.5
    bb = torch.randn(N, r, device=DEVICE) * b_scale
    ref = (x.double() @ a.double().t() @ bb.double().t()) * s
    torch_y = lora_linear_ref(x, w, None, a.half(), bb.half(), s)
    torch_err = rel_err(torch_y, ref)
    assert torch.isfinite(torch_y).all()
    for variant in FWD_VARIANTS:
        y, _ = lora_linear_fwd(x, w, None, a, bb, s, variant=variant)
        assert torch.isfinite(y).all(), f"{variant}: inf/nan where torch's fp16 result is finite"
        err = rel_err(y, ref)
        # no 1e-2 bar here: these ranges are chosen where torch's own fp16 term loses digits (subnormal s·B)
        assert err <= 2 * torch_err, f"{variant}: fp16 error {err:.2e} > 2 x torch's {torch_err:.2e}"


def test_dropout_mask_properties():
    """Keep-rate within 4σ of 1−p; the mask is a function of (seed, row, col): prefix-stable in rows, reproducible,
    different for another seed."""
    M, K, p = 200, 150, 0.3
    m = dropout_keep_mask(5, M, K, p, DEVICE)
    assert m.dtype == torch.bool and m.shape == (M, K)
    n = m.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(m.float().mean().item() - (1 - p)) < 4 * sigma
    assert torch.equal(m, dropout_keep_mask(5, M, K, p, DEVICE))
    assert torch.equal(m[:37], dropout_keep_mask(5, 37, K, p, DEVICE))  # index-based, not tile/shape-based
    assert (m != dropout_keep_mask(6, M, K, p, DEVICE)).float().mean() > 0.2  # ≈ 2p(1−p) = 0.42 expected
    # the counter is the logical (row, column): a narrower matrix is the same mask's leading columns
    assert torch.equal(m[:, :37], dropout_keep_mask(5, M, 37, p, DEVICE))


@pytest.mark.parametrize("philox", ["tl_mul", "wide"])
@pytest.mark.parametrize("seed, rows, cols, p", [(5, 37, 50, 0.3), (2**40 + 7, 64, 203, 0.1), (0, 3, 8, 0.5),
                                                 (2**63 - 1, 130, 1, 0.9)])
def test_dropout_mask_equals_independent_numpy_philox(seed, rows, cols, p, philox, monkeypatch):
    """The kernels' mask (Triton: 8 draws of 16 bits per Philox-4x32-10 call) equals lora_fast.rng's numpy
    implementation of the documented formula bit for bit (seeds past 2³², column counts not multiples of 8) — with
    either Philox body: ``tl.mul`` (triton >= 3.6) and the uint64 one triton 3.4/3.5 get."""
    from lora_fast.kernels import dropout
    from lora_fast.rng import keep_mask_numpy

    active = "tl_mul" if dropout.philox is dropout._philox_tl_mul else "wide"
    if philox != active:
        if HAS_CUDA:  # a compiled kernel keeps the body it was first built with
            pytest.skip(f"on a GPU only the Philox body triton picks ({active}) is compiled; the other one is "
                        "checked under the interpreter (the CPU suite)")
        if philox == "tl_mul":
            pytest.skip(f"triton {dropout.triton.__version__} has no tl.mul (< 3.6): only the uint64 body runs "
                        "here; the tl_mul case runs with triton >= 3.6 (CI's)")
        monkeypatch.setattr(dropout, "philox", dropout._philox_wide)
    m = dropout_keep_mask(seed, rows, cols, p, DEVICE).cpu().numpy()
    assert (m == keep_mask_numpy(seed, rows, cols, p)).all()


def test_keep_threshold_resolution():
    """p is resolved to 2⁻¹⁶: P(keep) = 1 − t/2¹⁶ within 2⁻¹⁷ of 1 − p (below the cap); p = 0 keeps all."""
    from lora_fast.rng import keep_threshold

    for p in (0.0, 0.1, 0.3, 1 / 3, 0.5, 0.9, 0.99999):
        t = keep_threshold(p)
        assert 0 <= t < 2**16 and abs(t / 2**16 - p) <= 2**-17 + 1e-12
    assert keep_threshold(0.0) == 0 and keep_threshold(1 - 2**-20) == 2**16 - 1  # capped: something is kept
    with pytest.raises(ValueError, match="p must be in"):
        keep_threshold(1.0)


@pytest.mark.parametrize("variant, deterministic", BWD_MODES)
@pytest.mark.parametrize("M, K, N", [(150, 200, 300), (65, 30, 130)])
def test_every_gradient_subset_and_reduction(M, K, N, variant, deterministic):
    """Every combination of needed gradients (dx skipped for a first layer, dB alone for a frozen A, ...), with
    atomic and deterministic reductions, at shapes with several K programs per row block and more N tiles than
    K programs (the round-robin dB ownership wraps) and with one K program (the dB-only grid)."""
    import itertools

    r, p, s = 5, 0.2, 0.7
    x, w, b, a, bb = _make(M, K, N, r, True, False)
    dy = torch.randn(M, N, device=DEVICE)
    st = seed_tensor(21, DEVICE)
    _, xa = lora_linear_fwd(x, w, b, a, bb, s, p, st, True)
    ref = ref_grads64(x, w, b, a, bb, s, p, dropout_keep_mask(21, M, K, p, DEVICE), True, dy)[2:]
    for need in itertools.product((False, True), repeat=3):
        if not any(need):
            continue
        out = lora_linear_bwd(dy, x, xa, w, a, bb, s, p, st, True, *need, deterministic=deterministic,
                              variant=variant)
        for name, n, o, rf in zip(("dx", "dA", "dB"), need, out, ref, strict=True):
            assert (o is not None) == n, (name, need)
            if n:
                assert_rel_close(o, rf, fp32_tol(), f"{name} {need}")


def test_variant_rules_and_overrides(monkeypatch):
    """Default rules (fused backward; xa-first with dropout or above rank 32; cuBLAS for fp32 IEEE above rank 32
    and for fp32 with TF32 at every rank),
    the environment overrides a benchmark uses to time a
    variant through the module path (spied: on CPU every variant gives the same numbers), and their errors."""
    from lora_fast.kernels import lora_bwd, lora_fwd

    monkeypatch.delenv("LORA_FAST_FWD_VARIANT", raising=False)
    monkeypatch.delenv("LORA_FAST_BWD_VARIANT", raising=False)
    assert [lora_fwd.fwd_variant(64, 64, 64, 8, p) for p in (0.0, 0.1)] == ["one_pass", "xa_first"]
    assert lora_bwd.bwd_variant(64, 64, 64, 8, deterministic=False) == "fused"
    # above rank 32: xa computed once (bf16, or fp32 with TF32); fp32 with IEEE dots: cuBLAS (FMA dots spill)
    assert [lora_fwd.fwd_variant(64, 64, 64, r, 0.0) for r in (32, 33, 128)] == ["one_pass", "xa_first", "xa_first"]
    real_precision = lora_fwd.input_precision
    # (precision, rank 64, rank 16 with dropout): IEEE small ranks keep the fused kernels; TF32 takes cuBLAS's
    # rounding GEMMs at every rank (kernels/dots.py)
    for precision, fwd64, bwd64, fwd16, bwd16 in (("ieee", "cublas", "cublas", "xa_first", "fused"),
                                                  ("tf32", "cublas", "cublas", "cublas", "cublas")):
        monkeypatch.setattr(lora_fwd, "input_precision", lambda dtype, p=precision: p)
        monkeypatch.setattr(lora_bwd, "input_precision", lambda dtype, p=precision: p)
        assert lora_fwd.fwd_variant(64, 64, 64, 64, 0.0, torch.float32) == fwd64
        assert lora_bwd.bwd_variant(64, 64, 64, 64, False, torch.float32) == bwd64
        assert lora_fwd.fwd_variant(64, 64, 64, 16, 0.1, torch.float32) == fwd16
        assert lora_bwd.bwd_variant(64, 64, 64, 16, False, torch.float32) == bwd16
        assert lora_bwd.bwd_variant(64, 64, 64, 64, True, torch.float32) == "fused"  # deterministic: fused
        assert lora_fwd.fwd_variant(64, 64, 64, 16, 0.1, torch.bfloat16) == "xa_first"  # 16 bits: unaffected
    monkeypatch.setattr(lora_fwd, "input_precision", real_precision)
    monkeypatch.setattr(lora_bwd, "input_precision", real_precision)
    monkeypatch.setenv("LORA_FAST_FWD_VARIANT", "cublas")
    monkeypatch.setenv("LORA_FAST_BWD_VARIANT", "CUBLAS")
    assert lora_fwd.fwd_variant(64, 64, 64, 8, 0.0) == "cublas"
    assert lora_bwd.bwd_variant(64, 64, 64, 8, deterministic=False) == "cublas"
    assert lora_bwd.bwd_variant(64, 64, 64, 8, deterministic=True) == "fused"  # reproducible reduction wins
    seen, real = [], lora_bwd.lora_linear_bwd_cublas
    monkeypatch.setattr(lora_bwd, "lora_linear_bwd_cublas", lambda *a: seen.append(1) or real(*a))
    x, w, b, a, bb = _make(16, 24, 20, 4, True, True)
    y, xa = lora_linear_fwd(x, w, b, a, bb, 1.0, fan_in_fan_out=True)
    lora_linear_bwd(torch.randn(16, 20, device=DEVICE), x, xa, w, a, bb, 1.0, fan_in_fan_out=True)
    assert seen == [1]
    for atomic_only in ("cublas", "gb_first", "gb_first_tma"):
        with pytest.raises(ValueError, match="deterministic"):
            lora_linear_bwd(torch.randn(16, 20, device=DEVICE), x, xa, w, a, bb, 1.0, fan_in_fan_out=True,
                            deterministic=True, variant=atomic_only)
    for forced, chosen in (("gb_first", "fused"), ("gb_first_tma", "tma"), ("tma", "tma")):
        monkeypatch.setenv("LORA_FAST_BWD_VARIANT", forced)  # deterministic: the fused kernel, TMA kept if asked
        assert lora_bwd.bwd_variant(64, 64, 64, 8, deterministic=True) == chosen
    monkeypatch.setenv("LORA_FAST_BWD_VARIANT", "cublas")
    monkeypatch.setenv("LORA_FAST_FWD_VARIANT", "fast")
    with pytest.raises(ValueError, match="LORA_FAST_FWD_VARIANT='fast' is not one of"):
        lora_fwd.fwd_variant(64, 64, 64, 8, 0.0)
    with pytest.raises(ValueError, match="variant must be one of"):
        lora_linear_bwd(torch.randn(16, 20, device=DEVICE), x, xa, w, a, bb, 1.0, variant="split")


def test_dropout_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="p must be in"):
        dropout_keep_mask(1, 4, 4, 1.0, DEVICE)
    with pytest.raises(ValueError, match=r"seed must be None, an int in \[0, 2\*\*63\)"):
        dropout_keep_mask(-1, 4, 4, 0.5, DEVICE)
    with pytest.raises(ValueError, match="seed must be an int .*got None"):
        dropout_keep_mask(None, 4, 4, 0.5, DEVICE)
    with pytest.raises(ValueError, match="rows must be"):
        dropout_keep_mask(1, -4, 4, 0.5, DEVICE)


def test_launcher_rejects_unsupported_rank():
    x, w, b, a, bb = _make(4, 8, 8, 129, False, False)
    with pytest.raises(ValueError, match="rank 129"):
        lora_linear_fwd(x, w, b, a, bb, 1.0)


@pytest.fixture
def _release_cuda_memory():
    """Gives the GPU memory of a large test back afterwards: torch's caching allocator would keep it reserved for
    the rest of the session, away from the other pytest-xdist workers sharing the GPU (benchmarks/run_gpu.sh)."""
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.skipif(not HAS_CUDA, reason="M·K > 2**31 needs a CUDA GPU (~4 GiB fp16 input, too slow for the "
                    "interpreter): runs in the GPU job")
@pytest.mark.gpu
@pytest.mark.usefixtures("_release_cuda_memory")
@pytest.mark.parametrize("layout, bwd_variant", [("row-major", None), ("column-major", None), ("row-major", "cublas")])
def test_large_mk_int64_offsets_gpu(layout, bwd_variant):
    """M·K > 2³¹: int64 pointer offsets. Checks the last rows (beyond element 2³¹) against the reference with the
    kernels' mask, and dx/dA on them through the full backward. A column-major x (strides (1, M)) puts the offset
    k·M past 2³¹ as well (the K-index times its stride); the cuBLAS backward has its own dy/dx pass kernels.
    H100: ~9 GiB at the peak (x and dx, 4.3 GiB each; the mask's 2.2 GiB only while its tail is copied), so three
    of these on three xdist workers at once fit beside the rest; milliseconds of kernel time (~25 GB moved at
    ~3 TB/s), seconds of compilation."""
    K, N, r, p = 4096, 64, 16, 0.1
    M = 2**31 // K + 4096  # M·K > 2**31
    if layout == "row-major":
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    else:
        x = torch.randn(K, M, device="cuda", dtype=torch.float16).t()  # (M, K), strides (1, M)
    w = torch.randn(N, K, device="cuda", dtype=torch.float16) / K**0.5
    a, bb = torch.randn(r, K, device="cuda") / K**0.5, torch.randn(N, r, device="cuda")
    st = seed_tensor(3, "cuda")
    y, xa = lora_linear_fwd(x, w, None, a, bb, 0.5, p, st)
    tail = slice(M - 256, M)
    mask = dropout_keep_mask(3, M, K, p, "cuda")[tail].clone()  # the tail alone: not the 2 GiB mask beneath a view
    ref = lora_linear_ref(x[tail], w, None, a, bb, 0.5, dropout_p=p, keep_mask=mask, upcast=True)
    assert_rel_close(y[tail], ref, 1e-2, "y tail")
    dy = torch.zeros(M, N, device="cuda", dtype=torch.float16)
    dy[tail] = torch.randn(256, N, device="cuda", dtype=torch.float16)
    dx, da, db = lora_linear_bwd(dy, x, xa, w, a, bb, 0.5, p, st, variant=bwd_variant)
    rx, ra, rb = ref_grads64(x[tail], w, None, a, bb, 0.5, p, mask, False, dy[tail])[2:]
    assert_rel_close(dx[tail], rx, 1e-2, "dx tail")
    assert_rel_close(da, ra, 1e-2, "dA")
    assert_rel_close(db, rb, 1e-2, "dB")


def test_deterministic_reduction_is_reproducible_and_matches_atomics():
    """dA/dB through per-row-block partials (deterministic mode, also chosen by
    torch.use_deterministic_algorithms) are bitwise reproducible and agree with the fp32-atomics reduction."""
    M, K, N, r, p = 200, 70, 90, 5, 0.4
    x, w, b, a, bb = _make(M, K, N, r, False, False)
    dy = torch.randn(M, N, device=DEVICE)
    st = seed_tensor(11, DEVICE)
    _, xa = lora_linear_fwd(x, w, b, a, bb, 0.7, p, st)
    det1 = lora_linear_bwd(dy, x, xa, w, a, bb, 0.7, p, st, deterministic=True)
    det2 = lora_linear_bwd(dy, x, xa, w, a, bb, 0.7, p, st, deterministic=True)
    atom = lora_linear_bwd(dy, x, xa, w, a, bb, 0.7, p, st, deterministic=False)
    for name, d1, d2, at in zip(("dx", "dA", "dB"), det1, det2, atom, strict=True):
        assert torch.equal(d1, d2), name
        assert_rel_close(at, d1.double(), fp32_tol(), name)
    # torch.use_deterministic_algorithms(True) selects the partials (spied: on CPU both reductions are exact,
    # so equal results alone would not show which one ran)
    from lora_fast.kernels import lora_bwd

    seen, real = [], lora_bwd._bwd_fixed_meta

    def spy(deterministic, *args):
        seen.append(deterministic)
        return real(deterministic, *args)

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        lora_bwd._bwd_fixed_meta = spy
        auto = lora_linear_bwd(dy, x, xa, w, a, bb, 0.7, p, st)
    finally:
        lora_bwd._bwd_fixed_meta = real
        torch.use_deterministic_algorithms(prev)
    assert seen == [True]
    assert all(torch.equal(u, v) for u, v in zip(auto, det1, strict=True))


_TL_RAND_RUNS = HAS_CUDA or type(__import__("triton").language.rand).__name__ == "InterpretedFunction"


@pytest.mark.skipif(not _TL_RAND_RUNS, reason="tl.rand is in compiled mode (triton was imported before "
                    "TRITON_INTERPRET=1 was set, e.g. by peft): runs on a GPU, or on CPU with TRITON_INTERPRET=1 set "
                    "before pytest starts")
def test_uniform_is_bit_identical_to_tl_rand():
    """The written-out Philox (``uniform``) equals ``tl.rand`` bit for bit, also for counters past 2³¹ and 2³²."""
    import triton
    import triton.language as tl

    @triton.jit  # decorated here, under the interpret fixture; ``uniform`` resolves through this module's globals
    def _both(seed_ptr, out_ref, out_ours, base, BLOCK: tl.constexpr):
        offs = base + tl.arange(0, BLOCK).to(tl.int64) * 7919
        seed = tl.load(seed_ptr)
        tl.store(out_ref + tl.arange(0, BLOCK), tl.rand(seed, offs))
        tl.store(out_ours + tl.arange(0, BLOCK), uniform(seed, offs))

    for seed in (0, 2**40 + 5):
        for base in (0, 2**31 - 100, 2**33 + 3):
            ref, ours = torch.empty(512, device=DEVICE), torch.empty(512, device=DEVICE)
            _both[(1,)](seed_tensor(seed, DEVICE), ref, ours, base, BLOCK=512)
            assert torch.equal(ref, ours), (seed, base)


@pytest.mark.parametrize("dtype, r", [(torch.float32, 128), (torch.float32, 16), (torch.float16, 128)])
def test_autotune_pruning_respects_the_shared_memory_budget(dtype, r):
    """GPU configs are pruned against the shared-memory budget (checked here on the config lists themselves; the
    configs are compiled only on a GPU). fp32 at rank 128 keeps only tiles every recent GPU can run."""
    from lora_fast.kernels.launch import SMEM_BUDGET, block_r, smem_estimate
    from lora_fast.kernels.lora_bwd import get_bwd_configs, prune_bwd_configs
    from lora_fast.kernels.lora_fwd import get_fwd_configs, prune_fwd_configs

    t = torch.empty(1, dtype=dtype)
    e, rp = t.element_size(), block_r(r)
    fwd = prune_fwd_configs(get_fwd_configs(), {"R": r, "x_ptr": t})
    dx = prune_bwd_configs(get_bwd_configs(), {"R": r, "dy_ptr": t})
    assert fwd and dx
    for c in fwd:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert smem_estimate(c.num_stages, (bm * bk, bk * bn, bk * rp), e) <= SMEM_BUDGET
    for c in dx:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert smem_estimate(c.num_stages, (bm * bn, bn * bk, bn * rp), e) <= SMEM_BUDGET
    if dtype == torch.float32 and r == 128:  # the case the budget is for: some configs go, a small one stays
        assert len(fwd) < len(get_fwd_configs()) and len(dx) < len(get_bwd_configs())


@pytest.mark.skipif(HAS_CUDA, reason="interpreter check of the fp32 fixed tile; on a GPU fp32 launches it directly "
                    "(the GPU job's test_kernels fp32 cases, test_tf32)")
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fp32_fixed_backward_tile(monkeypatch, deterministic, precision):
    """The fixed backward tile of fp32 (``FIXED_CONFIG_FMA``, 64×32×32: the 64×64×64 tile spills on sm_90, with
    IEEE's FMA dots and with TF32's rounded operands and "tf32x3" dots alike) is the one a GPU launches without
    autotuning; run here through the interpreter (its own choice is the 64×64×64 tile) at shapes with several K and
    N tiles: every gradient equals the float64 reference (TF32: within its tolerance, the operands being rounded)."""
    from lora_fast.kernels import lora_bwd

    from tests.triton_interpret import TF32_TOL

    monkeypatch.setattr(lora_bwd, "interpreting", lambda: False)  # the launcher's choice as on a GPU
    monkeypatch.setattr(lora_bwd, "input_precision", lambda dtype: precision)  # the launcher's reading of torch
    monkeypatch.setenv("LORA_FAST_AUTOTUNE", "0")
    rungs = lora_bwd._bwd_fixed_meta(deterministic, torch.float32, 8)
    assert {k: rungs[0][k] for k in lora_bwd.FIXED_CONFIG_FMA} == lora_bwd.FIXED_CONFIG_FMA
    M, K, N, r, p, s = 100, 72, 90, 8, 0.2, 0.7
    x, w, b, a, bb = _make(M, K, N, r, True, False)
    dy = torch.randn(M, N, device=DEVICE)
    st = seed_tensor(5, DEVICE)
    _, xa = lora_linear_fwd(x, w, b, a, bb, s, p, st, True)
    ref = ref_grads64(x, w, b, a, bb, s, p, dropout_keep_mask(5, M, K, p, DEVICE), True, dy)[2:]
    out = lora_linear_bwd(dy, x, xa, w, a, bb, s, p, st, True, deterministic=deterministic, variant="fused")
    for name, o, rf in zip(("dx", "dA", "dB"), out, ref, strict=True):
        assert_rel_close(o, rf, fp32_tol() if precision == "ieee" else TF32_TOL, name)
