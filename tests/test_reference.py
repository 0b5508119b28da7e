"""The reference LoRA map against an independent fp64 computation (explicit transposed copies, einsum)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lora_fast.reference import lora_compute_dtype, lora_delta_weight, lora_linear_ref, lora_scaling
from tests.utils import assert_rel_close


def _manual(x, w_nk, b, a, bb, s, keep=None, p=0.0):
    """y = x W^T + b + s ((x*keep/(1-p)) A^T) B^T with einsum on an explicit (N, K) weight, all fp64."""
    x, w_nk, a, bb = x.double(), w_nk.double(), a.double(), bb.double()
    xd = x if keep is None else x * keep.double() / (1 - p)
    y = torch.einsum("...k,nk->...n", x, w_nk)
    if b is not None:
        y = y + b.double()
    return y + s * torch.einsum("...r,nr->...n", torch.einsum("...k,rk->...r", xd, a), bb)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("shape", [(5,), (7, 5), (2, 3, 5), (2, 2, 3, 5)])
def test_reference_matches_manual(fan_in_fan_out, has_bias, shape):
    K, N, r = shape[-1], 6, 3
    x = torch.randn(shape)
    w_nk = torch.randn(N, K)
    w = w_nk.t().contiguous() if fan_in_fan_out else w_nk  # Conv1D stores (K, N)
    b = torch.randn(N) if has_bias else None
    a, bb = torch.randn(r, K), torch.randn(N, r)
    y = lora_linear_ref(x, w, b, a, bb, 0.7, fan_in_fan_out=fan_in_fan_out, upcast=True)
    assert y.dtype == torch.float64 and y.shape == (*shape[:-1], N)
    assert_rel_close(y, _manual(x, w_nk, b, a, bb, 0.7), 1e-12, "y")
    y32 = lora_linear_ref(x, w, b, a, bb, 0.7, fan_in_fan_out=fan_in_fan_out)
    assert y32.dtype == torch.float32
    assert_rel_close(y32, _manual(x, w_nk, b, a, bb, 0.7), 1e-5, "y fp32")


def test_explicit_keep_mask_is_exact_dropout():
    x, w, a, bb = torch.randn(9, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    keep = torch.rand(9, 8) > 0.3
    y = lora_linear_ref(x, w, None, a, bb, 2.0, dropout_p=0.3, keep_mask=keep, upcast=True)
    assert_rel_close(y, _manual(x, w, None, a, bb, 2.0, keep, 0.3), 1e-12, "y")
    # the mask acts on the LoRA input only: with B = 0 the output is the base product whatever the mask
    y0 = lora_linear_ref(x, w, None, a, torch.zeros(4, 2), 2.0, dropout_p=0.3, keep_mask=keep, upcast=True)
    assert_rel_close(y0, x.double() @ w.double().t(), 1e-12, "base only")


def test_upcast_computes_in_float64():
    """``upcast=True`` is the float64 oracle: float64 inputs that need all 53 bits (dropout on) give the einsum's
    result to 1e-12 — no operand passes through float32 on the way."""
    x, w, a, bb, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((7, 9), (5, 9), (3, 9), (5, 3), (5,)))
    keep = torch.rand(7, 9) > 0.4
    y = lora_linear_ref(x, w, b, a, bb, 0.3, dropout_p=0.4, keep_mask=keep, upcast=True)
    assert_rel_close(y, _manual(x, w, b, a, bb, 0.3, keep, 0.4), 1e-12, "y")


def test_lora_term_dtype_rule():
    """Outside autocast the LoRA term runs in x's dtype — bf16 stays bf16 (fp32's range; the kernels' dtype) —
    except fp16, which takes wider adapters' dtype (a GradScaler-sized dA/dB overflows fp16's 65504)."""
    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    for x_dtype, adapters, expected in ((bf16, (f32, f32), bf16), (f32, (bf16, bf16), f32), (f16, (f32, f32), f32),
                                         (f16, (f16, f16), f16), (f16, (f16, f32), f32), (f64, (f32, f32), f64)):
        assert lora_compute_dtype(x_dtype, *adapters) == expected, (x_dtype, adapters)


def test_autocast_alone_casts_the_operands():
    """Under autocast the reference computes what PEFT's layer computes (``F.linear`` under autocast), bit for bit:
    the adapters go to autocast as they are — bf16 activations under fp16 autocast with fp32 adapters would
    otherwise round the adapters twice (to bf16, then to fp16)."""
    x, w, b = torch.randn(6, 16).bfloat16(), torch.randn(8, 16).bfloat16(), torch.randn(8).bfloat16()
    a, bb = torch.randn(4, 16), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        y = lora_linear_ref(x, w, b, a, bb, 0.5)
        peft = F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * 0.5
    assert y.dtype == torch.float16 and torch.equal(y, peft)


def test_keep_mask_in_eval_mode_is_an_error():
    x, w, a, bb = torch.randn(3, 4), torch.randn(2, 4), torch.randn(1, 4), torch.randn(2, 1)
    with pytest.raises(ValueError, match="training=False"):
        lora_linear_ref(x, w, None, a, bb, 1.0, dropout_p=0.5, keep_mask=torch.ones(3, 4, dtype=torch.bool),
                        training=False)


def test_dropout_only_in_training_and_keep_rate():
    x = torch.ones(400, 50)
    w, a, bb = torch.zeros(3, 50), torch.ones(1, 50), torch.ones(3, 1)
    p = 0.25
    y_eval = lora_linear_ref(x, w, None, a, bb, 1.0, dropout_p=p, training=False)
    assert torch.equal(y_eval, torch.full((400, 3), 50.0))
    y = lora_linear_ref(x, w, None, a, bb, 1.0, dropout_p=p, training=True)
    # each output row is (#kept / (1-p)); keep-rate over 20,000 Bernoulli draws within 4 sigma of 1-p
    kept = (y[:, 0] * (1 - p)).round().sum().item()
    n = x.numel()
    assert abs(kept / n - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    g = torch.Generator().manual_seed(3)
    y1 = lora_linear_ref(x, w, None, a, bb, 1.0, dropout_p=p, generator=g)
    y2 = lora_linear_ref(x, w, None, a, bb, 1.0, dropout_p=p, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)


def test_scaling_and_delta_weight():
    assert lora_scaling(8, 16.0) == 2.0
    assert lora_scaling(16, 32.0, use_rslora=True) == pytest.approx(32.0 / 4.0)
    a, bb = torch.randn(3, 5), torch.randn(4, 3)
    d = lora_delta_weight(a, bb, 0.5)
    assert d.shape == (4, 5) and d.dtype == torch.float32
    assert_rel_close(d, 0.5 * bb.double() @ a.double(), 1e-6, "delta")
    assert torch.equal(lora_delta_weight(a, bb, 0.5, fan_in_fan_out=True), d.t())  # Conv1D layout: (K, N)
    d64 = lora_delta_weight(a.double(), bb.double(), 0.5)
    assert d64.dtype == torch.float64 and lora_delta_weight(a.half(), bb.half(), 0.5).dtype == torch.float32
    # the delta is the map's LoRA part: x ΔWᵀ equals y − base
    x = torch.randn(6, 5)
    y = lora_linear_ref(x, torch.zeros(4, 5), None, a, bb, 0.5, upcast=True)
    assert_rel_close(y, x.double() @ d.double().t(), 1e-6, "x dW^T")


def test_gradients_flow_to_fp32_adapters_from_bf16_activations():
    """bf16 activations, fp32 adapters, no autocast: the casts are differentiable, so dA, dB arrive in fp32 and dx in
    bf16, each within bf16 rounding (1e-2) of float64."""
    x = torch.randn(40, 48, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(36, 48, dtype=torch.bfloat16) / 48**0.5
    a = (torch.randn(4, 48) / 48**0.5).requires_grad_()
    bb = torch.randn(36, 4, requires_grad=True)
    y = lora_linear_ref(x, w, None, a, bb, 1.0)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(40, 36, dtype=torch.bfloat16)
    y.backward(dy)
    assert (x.grad.dtype, a.grad.dtype, bb.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    y64 = lora_linear_ref(leaves[0], w, None, *leaves[1:], 1.0, upcast=True)
    y64.backward(dy.double())
    for name, g, r in (("y", y, y64), ("dx", x.grad, leaves[0].grad), ("dA", a.grad, leaves[1].grad),
                       ("dB", bb.grad, leaves[2].grad)):
        assert_rel_close(g, r, 1e-2, name)


def _scaled_case(adapter_dtype, p=0.0):
    """fp16 x and W₀, adapters in ``adapter_dtype``, and a GradScaler-sized dy (2¹¹): dA = s·((dy·B)ᵀ·x) and
    dB = s·(dyᵀ·xa) reach ~2.9e6 and ~8.4e4, past fp16's 65504, while y and dx stay in range.
    Returns (y, dx, dA, dB, the fp64 (y, dx, dA, dB))."""
    M, K, N, r, s = 64, 32, 40, 4, 1.0
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(M, K, generator=g) + 0.5).half()  # positive: the sums over M add up
    w = (torch.randn(N, K, generator=g) * 0.01).half()
    a = torch.full((r, K), 0.02)
    bb = torch.full((N, r), 0.5)
    dy = torch.full((M, N), 2048.0, dtype=torch.float16)
    keep = torch.rand(M, K, generator=g) >= p if p else None
    leaves = [t.clone().requires_grad_() for t in (x, a.to(adapter_dtype), bb.to(adapter_dtype))]
    y = lora_linear_ref(leaves[0], w, None, leaves[1], leaves[2], s, dropout_p=p, keep_mask=keep)
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    y64 = lora_linear_ref(ref_leaves[0], w, None, ref_leaves[1], ref_leaves[2], s, dropout_p=p, keep_mask=keep,
                          upcast=True)
    y64.backward(dy.double())
    return (y, *(t.grad for t in leaves)), (y64, *(t.grad for t in ref_leaves))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp16_lora_gradients_in_fp32_adapters_range(p):
    """fp16 activations with fp32 adapters (LinearWithLoRA's and PEFT's default), no autocast: the LoRA term is
    computed in fp32, as PEFT computes it, so a GradScaler-sized dA/dB past fp16's range stays finite and close to
    fp64; fp16 adapters (the whole term in fp16) overflow on the same input — the case is real."""
    out, ref = _scaled_case(torch.float32, p)
    assert ref[2].abs().max() > 65504 and ref[3].abs().max() > 65504 and ref[1].abs().max() < 65504
    assert out[0].dtype == out[1].dtype == torch.float16 and out[2].dtype == out[3].dtype == torch.float32
    for name, o, rf in zip(("y", "dx", "dA", "dB"), out, ref, strict=True):
        assert torch.isfinite(o).all(), f"{name} has inf/nan"
        assert_rel_close(o, rf, 1e-3 if name in ("y", "dx") else 1e-5, name)  # y, dx rounded to fp16 once
    half, _ = _scaled_case(torch.float16, p)
    assert not torch.isfinite(half[2]).all() and not torch.isfinite(half[3]).all()


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**62 - 1, 2**63 - 1])
def test_seed_tensor_holds_the_exact_seed(seed):
    """An int seed becomes a 1-element int64 tensor holding exactly that value (a fill, not a host copy), every
    64-bit Philox key included; a tensor seed is used as is."""
    from lora_fast.functional import seed_tensor

    t = seed_tensor(seed, "cpu")
    assert t.shape == (1,) and t.dtype == torch.int64 and int(t[0]) == seed
    assert torch.equal(seed_tensor(t, "cpu"), t)
