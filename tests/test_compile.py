"""torch.compile: the ``lora_fast::lora_linear`` custom op, compiled ``LinearWithLoRA`` and a LoRA-injected GPT-2.

Compile time on CPU dominates (inductor calls gcc): most variants use ``backend="aot_eager"``, which still runs
dynamo, AOTAutograd (the op's fake implementation and its autograd formula, forward and backward graphs) and
functionalisation — everything but inductor's code generation; one test compiles with inductor.

Routing: ``LinearWithLoRA`` goes through ``lora_fast.functional.lora_linear``, which hands over to
``lora_fast.ops.lora_linear_op`` under ``torch.compiler.is_compiling()``: these tests exercise the real module path.
Behind the op the fused Triton kernels run where eager would run them: the tests of that path run on ``DEVICE``
(CUDA, or CPU under TRITON_INTERPRET=1); the others on CPU tensors, where the op takes the reference path.

Dropout masks: the op draws its seed with ``torch.randint`` and regenerates the mask from it; eager
``functional.lora_linear`` (reference backend) draws the mask with ``torch.rand`` directly. The two agree for an
explicit seed (tested) but not for seed=None, so compiled modules with dropout are compared with the op in eager
mode at the same ``torch.manual_seed`` (``aot_eager`` and inductor with ``fallback_random`` draw what eager draws,
the generator's next draw included); on the Triton path the eager module itself draws so.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import lora_fast.functional as functional
from lora_fast import apply_lora, lora_layers
from lora_fast.layer import LinearWithLoRA
from lora_fast.ops import lora_linear_op
from lora_fast.reference import lora_linear_ref
from tests.triton_interpret import DEVICE, interpret  # noqa: F401  (fixture)
from tests.utils import assert_half_precision, assert_rel_close, rel_err

FP32_TOL = 1e-5  # fp32 matmuls (CPU; a GPU's IEEE dots, torch's default) against float64 at these small shapes: ~1e-7


@pytest.fixture
def routed():
    """A clean dynamo state around a compile test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(M, K, N, r, fan_in_fan_out, bias=True, dtype=torch.float32, device="cpu"):
    kw = {"dtype": dtype, "device": device}
    x = torch.randn(M, K, **kw, requires_grad=True)
    w = torch.randn(K, N, **kw) if fan_in_fan_out else torch.randn(N, K, **kw)
    b = torch.randn(N, **kw) if bias else None
    a = (torch.randn(r, K, **kw) / K**0.5).requires_grad_()
    bb = torch.randn(N, r, **kw).requires_grad_()
    return x, w, b, a, bb


def _kernel_calls(monkeypatch) -> list[str]:
    """Records each launch of the fused forward and backward (the op imports the launchers at call time): proof that
    a test of the Triton path ran the kernels, not the reference (whose seeded mask is the kernels' own on a GPU)."""
    from lora_fast.kernels import lora_bwd, lora_fwd

    calls = []
    for module, name in ((lora_fwd, "lora_linear_fwd"), (lora_bwd, "lora_linear_bwd")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    return calls


# --- the custom op -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "M, K, N, r, fan_in_fan_out, bias, p",
    [(37, 97, 45, 3, False, True, 0.0), (16, 32, 24, 4, True, False, 0.3), (5, 8, 8, 16, False, True, 0.5)],
)
def test_opcheck(M, K, N, r, fan_in_fan_out, bias, p):
    """Schema, fake tensor, AOT dispatch (with and without dynamic shapes) and autograd registration."""
    x, w, b, a, bb = _inputs(M, K, N, r, fan_in_fan_out, bias)
    seed = torch.tensor([1234]) if p > 0 else None
    args = (x, w, b, a, bb, 0.5, p, seed, fan_in_fan_out, "auto")
    torch.library.opcheck(torch.ops.lora_fast.lora_linear.default, args)
    with torch.no_grad():
        _, xa = torch.ops.lora_fast.lora_linear(x, w, b, a, bb, 0.5, p, seed, fan_in_fan_out, "auto")
    dy = torch.randn(M, N)
    for needs in ((True, True, True), (False, True, True), (True, False, False), (False, False, True)):
        args = (dy, x.detach(), w, a.detach(), bb.detach(), xa, 0.5, p, seed, fan_in_fan_out, "auto", *needs)
        torch.library.opcheck(torch.ops.lora_fast.lora_linear_backward.default, args)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_op_matches_reference(fan_in_fan_out, p):
    """Forward and every LoRA gradient vs the float64 reference with the same mask (seeded generator)."""
    x, w, b, a, bb = _inputs(2 * 19, 97, 45, 3, fan_in_fan_out)
    x3 = x.detach().reshape(2, 19, 97).requires_grad_()  # leading dims are flattened and restored by the entry
    y = lora_linear_op(x3, w, b, a, bb, 0.7, dropout_p=p, seed=99, fan_in_fan_out=fan_in_fan_out)
    gen = torch.Generator().manual_seed(99)
    y_ref = lora_linear_ref(x3, w, b, a, bb, 0.7, p, fan_in_fan_out=fan_in_fan_out, upcast=True, generator=gen)
    assert y.shape == (2, 19, 45) and y.dtype == torch.float32
    assert_rel_close(y, y_ref, FP32_TOL, "y")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x3, a, bb), dy)
    grads_ref = torch.autograd.grad(y_ref, (x3, a, bb), dy.double())
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref, strict=True):
        assert_rel_close(g, g_ref, FP32_TOL, name)
    # Same seed, same mask as the eager reference backend of functional.lora_linear.
    y_fn = functional.lora_linear(x3, w, b, a, bb, 0.7, p, seed=99, fan_in_fan_out=fan_in_fan_out,
                                  backend="reference")
    torch.testing.assert_close(y, y_fn, rtol=0, atol=1e-6)


def test_op_dropout_seed_semantics():
    x, w, b, a, bb = _inputs(16, 32, 24, 4, False)
    args = (x, w, b, a, bb, 2.0)
    y1 = lora_linear_op(*args, dropout_p=0.5, seed=7)
    assert torch.equal(y1, lora_linear_op(*args, dropout_p=0.5, seed=torch.tensor([7])))
    assert not torch.allclose(y1, lora_linear_op(*args, dropout_p=0.5, seed=8))  # the mask depends on the seed
    y_off = lora_linear_op(*args, dropout_p=0.0)
    assert not torch.allclose(y1, y_off)  # dropout really acts
    assert torch.equal(lora_linear_op(*args, dropout_p=0.5, seed=7, training=False), y_off)  # eval: no dropout
    torch.manual_seed(5)
    y_a = lora_linear_op(*args, dropout_p=0.5)  # seed=None: drawn from torch's generator
    torch.manual_seed(5)
    assert torch.equal(y_a, lora_linear_op(*args, dropout_p=0.5))


def test_op_saves_no_mask():
    """Backward regenerates the mask: besides x nothing of size M×K is saved (reference autograd saves x⊙keep)."""
    M, K, N, r = 64, 48, 8, 4
    x, w, b, a, bb = _inputs(M, K, N, r, False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear_op(x, w, b, a, bb, 1.0, dropout_p=0.3, seed=1)
    big = [tuple(t.shape) for t in saved if t.numel() >= M * K]
    assert big == [(M, K)], f"saved activations of size >= M×K: {big} (only x expected)"
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear_ref(x, w, b, a, bb, 1.0, 0.3)
    assert len([t for t in saved if t.numel() >= M * K]) > 1  # the check can tell the difference


def test_op_unfrozen_base_gradients():
    """A trainable W₀ / bias (not the LoRA default) gets its gradient, in both layouts — never silently None."""
    for fan_in_fan_out in (False, True):
        x, w, b, a, bb = _inputs(9, 12, 10, 2, fan_in_fan_out)
        w.requires_grad_(), b.requires_grad_()
        y = lora_linear_op(x, w, b, a, bb, 0.5, fan_in_fan_out=fan_in_fan_out)
        y_ref = lora_linear_ref(x, w, b, a, bb, 0.5, fan_in_fan_out=fan_in_fan_out, upcast=True)
        dy = torch.randn_like(y)
        for name, g, g_ref in zip("WbAB", torch.autograd.grad(y, (w, b, a, bb), dy),
                                  torch.autograd.grad(y_ref, (w, b, a, bb), dy.double()), strict=True):
            assert_rel_close(g, g_ref, FP32_TOL, f"d{name}")


@pytest.mark.usefixtures("interpret")
def test_op_trainable_base_with_dropout_keeps_the_fused_kernels(monkeypatch):
    """The op differentiates a trainable W₀ with aten ops, so W₀ never vetoes the kernels behind it, dropout on or
    off (eager's grad-mode-independent veto is for its own autograd Function): backend="triton" runs, and every
    gradient, dW₀ included, equals the float64 reference with the kernels' mask."""
    from lora_fast.functional import dropout_mask

    x, w, b, a, bb = _inputs(9, 12, 10, 2, True, device=DEVICE)
    w.requires_grad_(), b.requires_grad_()
    calls = _kernel_calls(monkeypatch)
    y = lora_linear_op(x, w, b, a, bb, 0.5, dropout_p=0.3, seed=3, fan_in_fan_out=True, backend="triton")
    keep = dropout_mask(3, 9, 12, 0.3, x.device)
    y_ref = lora_linear_ref(x, w, b, a, bb, 0.5, 0.3, keep_mask=keep, fan_in_fan_out=True, upcast=True)
    dy = torch.randn_like(y)
    assert_rel_close(y, y_ref, FP32_TOL, "y")
    for name, g, g_ref in zip("xWbAB", torch.autograd.grad(y, (x, w, b, a, bb), dy),
                              torch.autograd.grad(y_ref, (x, w, b, a, bb), dy.double()), strict=True):
        assert_rel_close(g, g_ref, FP32_TOL, f"d{name}")
    assert calls == ["lora_linear_fwd", "lora_linear_bwd"]


def test_op_autocast_bf16():
    """Under CPU autocast: bf16 compute, fp32 adapters get fp32 grads; y, dx, dA, dB within 1e-2 of float64 and at
    most twice the error of the eager reference under the same autocast."""
    x, w, b, a, bb = _inputs(32, 64, 48, 8, False)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    exact = lora_linear_ref(leaves64[0], w, b, *leaves64[1:], 0.5, upcast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear_op(x, w, b, a, bb, 0.5)
        y_ref = lora_linear_ref(x, w, b, a, bb, 0.5)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(32, 48)
    grads = torch.autograd.grad(y, (x, a, bb), dy.bfloat16())
    grads_ref = torch.autograd.grad(y_ref, (x, a, bb), dy.bfloat16())
    grads64 = torch.autograd.grad(exact, leaves64, dy.double())
    assert grads[1].dtype == grads[2].dtype == torch.float32
    for name, g, t, r in zip(("y", "dx", "dA", "dB"), (y, *grads), (y_ref, *grads_ref), (exact, *grads64),
                             strict=True):
        err, torch_err = rel_err(g, r), rel_err(t, r)
        assert_half_precision(err, torch_err, name)


def test_op_fp16_backward_scales_before_rounding():
    """fp16, s = 1/4 and a GradScaler-sized dy: dy·B passes fp16's 65504 (inf) while s·dy·B does not. The op's
    reference backward must scale first, as autograd of the eager path does: finite dx and dB, equal to eager's."""
    x = torch.randn(4, 8, dtype=torch.float16, requires_grad=True)
    w = torch.randn(32, 8, dtype=torch.float16)
    a = torch.full((4, 8), 0.25, dtype=torch.float16, requires_grad=True)
    bb = torch.ones(32, 4, dtype=torch.float16, requires_grad=True)
    dy = torch.full((4, 32), 3000.0, dtype=torch.float16)  # s·dy·B = 24000 per rank column; dy·B = 96000
    y = lora_linear_op(x, w, None, a, bb, 0.25, backend="reference")
    y_ref = lora_linear_ref(x, w, None, a, bb, 0.25)  # PyTorch's own fp16 (eager autograd)
    # dA is left out: its exact value passes 65504 itself (fp16 A cannot hold it; eager's is inf there too)
    got = (y, *torch.autograd.grad(y, (x, bb), dy))
    theirs = (y_ref, *torch.autograd.grad(y_ref, (x, bb), dy))
    leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    y64 = lora_linear_ref(leaves[0], w.double(), None, leaves[1], leaves[2], 0.25)
    exact = (y64, *torch.autograd.grad(y64, (leaves[0], leaves[2]), dy.double()))
    for name, g, t, r in zip(("y", "dx", "dB"), got, theirs, exact, strict=True):
        assert torch.isfinite(t).all(), f"the premise: eager's fp16 {name} stays finite"
        assert torch.isfinite(g).all(), name
        assert_half_precision(rel_err(g, r), rel_err(t, r), name)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_op_fp16_with_fp32_adapters_computes_the_lora_term_in_fp32(p):
    """fp16 x and W₀ with fp32 adapters (the default for a fp16 base) and a GradScaler-sized dy: dA and dB pass
    fp16's range. The op's reference path computes the LoRA term in fp32, as the eager reference (and PEFT) does:
    finite, and equal to eager's with the same seed's mask, every gradient."""
    from lora_fast.functional import lora_linear

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 32, generator=g) + 0.5).half().requires_grad_()
    w = (torch.randn(40, 32, generator=g) * 0.01).half()
    a = torch.full((4, 32), 0.02, requires_grad=True)
    bb = torch.full((40, 4), 0.5, requires_grad=True)
    dy = torch.full((64, 40), 2048.0, dtype=torch.float16)
    y = lora_linear_op(x, w, None, a, bb, 1.0, dropout_p=p, seed=5, backend="reference")
    y_eager = lora_linear(x, w, None, a, bb, 1.0, dropout_p=p, seed=5, backend="reference")
    assert y.dtype == torch.float16
    assert_rel_close(y, y_eager, 1e-3, "y")
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    grads_eager = torch.autograd.grad(y_eager, (x, a, bb), dy)
    assert grads[1].abs().max() > 65504 and grads[2].abs().max() > 65504
    for name, gr, ge in zip(("dx", "dA", "dB"), grads, grads_eager, strict=True):
        assert torch.isfinite(gr).all() and gr.dtype == ge.dtype, name
        assert_rel_close(gr, ge, 1e-3 if name == "dx" else 1e-6, name)


def test_op_autocast_leaves_fp64_alone():
    """Autocast never casts float64 tensors (F.linear stays fp64 under bf16 autocast); neither does the op."""
    x, w, b, a, bb = _inputs(5, 16, 8, 4, False, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear_op(x, w, b, a, bb, 0.5)
        y_ref = lora_linear_ref(x, w, b, a, bb, 0.5)
    assert y.dtype == y_ref.dtype == torch.float64
    assert_rel_close(y, y_ref, 1e-12, "fp64 under bf16 autocast")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_half_precision(dtype):
    """fp16/bf16 x with fp32 adapters: the fake implementation must promise the real one's dtypes (y in x's dtype,
    xa in fp32), forward and backward."""
    x, w, b, a, bb = _inputs(6, 8, 5, 3, False)
    x, w, b = (t.detach().to(dtype).requires_grad_(t.requires_grad) for t in (x, w, b))
    torch.library.opcheck(torch.ops.lora_fast.lora_linear.default,
                          (x, w, b, a, bb, 0.5, 0.2, torch.tensor([7]), False, "reference"))
    with torch.no_grad():
        y, xa = torch.ops.lora_fast.lora_linear(x, w, b, a, bb, 0.5, 0.2, torch.tensor([7]), False, "reference")
    assert y.dtype == dtype and xa.dtype == torch.float32
    dy = torch.randn(6, 5, dtype=dtype)
    torch.library.opcheck(torch.ops.lora_fast.lora_linear_backward.default,
                          (dy, x.detach(), w, a.detach(), bb.detach(), xa, 0.5, 0.2, torch.tensor([7]), False,
                           "reference", True, True, True))


def test_opcheck_noncontiguous_adapters():
    """The fake backward must promise the strides the real one returns (contiguous dA, dB)."""
    x, w, b, _, _ = _inputs(6, 8, 5, 3, False)
    a = torch.randn(8, 3).t().requires_grad_()  # (r, K) view with transposed strides
    bb = torch.randn(3, 5).t().requires_grad_()
    torch.library.opcheck(torch.ops.lora_fast.lora_linear.default,
                          (x, w, b, a, bb, 0.5, 0.2, torch.tensor([7]), False, "reference"))


@pytest.mark.parametrize("entry", ["eager", "eager-triton", "op"])
def test_bad_input_is_refused_by_name_on_every_entry(entry):
    """What the module API refuses, the functional entries refuse alike, naming the problem: feature size, dropout
    outside [0, 1), adapter and bias shapes, rank 0 (a (0, K) A gave the base alone, silently), an integer input (the
    fp32 adapters were cast to it and truncated to zeros: the base alone, silently), a tensor off x's device (a
    meta adapter gave uninitialised memory). "eager-triton" asks for the fused path: refused before it is chosen."""
    call = {"eager": functional.lora_linear, "op": lora_linear_op,
            "eager-triton": lambda *a, **k: functional.lora_linear(*a, backend="triton", **k)}[entry]
    x, w, b, a, bb = _inputs(4, 8, 6, 2, False)
    with pytest.raises(ValueError, match="in_features=8"):
        call(x[:, :7], w, b, a, bb, 1.0)
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout_p"):
            call(x, w, b, a, bb, 1.0, dropout_p=p)
    with pytest.raises(ValueError, match=r"lora_B must be \(out_features, rank\)=\(6, 2\)"):
        call(x, w, b, a, bb[:, :1], 1.0)
    with pytest.raises(ValueError, match=r"bias must be \(out_features,\)=\(6,\), got \(1,\)"):
        call(x, w, b[:1], a, bb, 1.0)
    with pytest.raises(ValueError, match=r"rank must be >= 1, got lora_A of shape \(0, 8\)"):
        call(x, w, b, a[:0], bb[:, :0], 1.0)
    xi, wi = torch.randint(-3, 4, (4, 8)), torch.randint(-3, 4, (6, 8))
    with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
        call(xi, wi, None, a, bb, 1.0)
    with pytest.raises(RuntimeError, match="x is on cpu but lora_A on meta"):
        call(x, w, b, a.to("meta"), bb, 1.0)


def test_op_errors():
    x, w, b, a, bb = _inputs(4, 8, 6, 2, False)
    with pytest.raises(ValueError, match="seed"):
        lora_linear_op(x, w, b, a, bb, 1.0, dropout_p=0.1, seed=-1)
    with pytest.raises(ValueError, match="int64"):
        lora_linear_op(x, w, b, a, bb, 1.0, dropout_p=0.1, seed=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_op(x, w, b, a, bb, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="in_features=8"):
        lora_linear_op(x[:, :7], w, b, a, bb, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear_op(x, w, b, a, bb[:, :1], 1.0)
    with pytest.raises(ValueError, match="dtype"):
        lora_linear_op(x.double(), w, b, a, bb, 1.0)
    with pytest.raises(ValueError, match=r"weight \(torch.float32\) and bias \(torch.float64\) must share a dtype"):
        lora_linear_op(x, w, b.double(), a, bb, 1.0)
    with pytest.raises(ValueError, match=r"bias must be \(out_features,\)=\(6,\), got \(1,\)"):
        lora_linear_op(x, w, b[:1], a, bb, 1.0)  # F.linear would broadcast it; the kernels would read past it
    with pytest.raises(ValueError, match="backend"):
        lora_linear_op(x, w, b, a, bb, 1.0, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this case"):
        lora_linear_op(x, w, b, a, bb, 1.0, backend="triton")  # CPU without TRITON_INTERPRET


# --- compiled LinearWithLoRA -----------------------------------------------------------------------------------


def _layer(fan_in_fan_out: bool, dropout: float) -> LinearWithLoRA:
    base = Conv1D(24, 32) if fan_in_fan_out else nn.Linear(32, 24)
    m = LinearWithLoRA(base, rank=4, alpha=8.0, dropout=dropout)
    nn.init.normal_(m.lora.lora_B)  # B = 0 at init would hide every error in A's path
    return m


def _run(fn, m, x, seed):
    """(y, dx, dA, dB, the next draw of torch's generator): that draw shows the run consumed the stream alike."""
    torch.manual_seed(seed)
    y = fn(x)
    dy = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)
    grads = torch.autograd.grad(y, (x, m.lora.lora_A, m.lora.lora_B), dy)
    return (y, *grads, torch.rand(4, device=y.device))  # the generator the op draws from: x's device


def _eager_op(m):
    """The eager op with the module's parameters (what the compiled module computes, seed drawn the same way)."""
    return lambda x: lora_linear_op(x, m.linear.weight, m.linear.bias, m.lora.lora_A, m.lora.lora_B, m.scaling,
                                    m.lora.dropout, training=m.training, fan_in_fan_out=m.fan_in_fan_out)


@pytest.mark.usefixtures("routed")
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compiled_layer_aot_eager(fan_in_fan_out, dropout):
    m = _layer(fan_in_fan_out, dropout)
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = _run(compiled, m, x, seed=11)
    ref = _run(m if dropout == 0 else _eager_op(m), m, x, seed=11)  # p = 0: the real eager module path
    for name, o, r in zip(("y", "dx", "dA", "dB", "next draw"), out, ref, strict=True):
        assert_rel_close(o, r, FP32_TOL, name)
    if dropout > 0:  # the mask is active and follows the RNG: another seed gives another output
        assert rel_err(_run(compiled, m, x, seed=12)[0], out[0]) > 1e-3


@pytest.mark.usefixtures("routed")
def test_compiled_layer_inductor():
    """One inductor build (gcc): forward and backward with dropout, vs eager at the same seed."""
    # fallback_random: draw the seed as eager does. force_disable_caches: inductor's on-disk caches key on the
    # graph, not on the custom op's schema, so a stale entry from an older lora_fast::lora_linear_backward would be
    # replayed against the new op; compile from scratch (a few s more). config.patch restores both afterwards
    # (monkeypatching the config module's attributes can delete its entries on undo).
    m = _layer(False, 0.2)
    x = torch.randn(3, 32, requires_grad=True)
    with torch._inductor.config.patch(fallback_random=True, force_disable_caches=True):
        out = _run(torch.compile(m, fullgraph=True), m, x, seed=5)
    ref = _run(_eager_op(m), m, x, seed=5)
    for name, o, r in zip(("y", "dx", "dA", "dB", "next draw"), out, ref, strict=True):
        assert_rel_close(o, r, FP32_TOL, name)


# --- compiled GPT-2 ------------------------------------------------------------------------------------------


def _tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


@pytest.mark.usefixtures("routed")
def test_compiled_gpt2_no_extra_graph_breaks_and_matches_eager():
    plain = _tiny_gpt2()
    model = _tiny_gpt2()
    model.load_state_dict(plain.state_dict())
    apply_lora(model, target_modules=["c_attn", "c_proj", "c_fc"], rank=4, alpha=8.0)
    for lyr in lora_layers(model).values():
        nn.init.normal_(lyr.lora.lora_B, std=0.05)
    ids = torch.randint(0, 101, (2, 12))

    plain_breaks = torch._dynamo.explain(plain)(input_ids=ids).graph_break_count
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids)
    assert explained.graph_break_count <= plain_breaks, [str(r.reason)[:300] for r in explained.break_reasons]
    torch._dynamo.reset()

    def step(fn):
        out = fn(input_ids=ids, labels=ids)
        params = [p for p in model.parameters() if p.requires_grad]
        return out.logits, out.loss, torch.autograd.grad(out.loss, params)

    logits, loss, grads = step(torch.compile(model, backend="aot_eager"))
    logits_ref, loss_ref, grads_ref = step(model)
    assert_rel_close(logits, logits_ref, FP32_TOL, "logits")
    assert_rel_close(loss, loss_ref, FP32_TOL, "loss")
    assert len(grads) == 2 * len(lora_layers(model)) == 2 * 8  # A, B of c_attn, attn/mlp c_proj, c_fc × 2 blocks
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_rel_close(g, g_ref, 1e-4, f"LoRA grad {i}")  # reduction order differs between graphs


# --- the Triton kernels behind the op (CPU: triton's interpreter) ---------------------------------------------


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_op_runs_the_triton_kernels_where_eager_would(monkeypatch, fan_in_fan_out):
    """Where eager runs the kernels (CUDA, or CPU with TRITON_INTERPRET=1) the op's forward and backward are the
    fused kernels (spied), with the kernels' Philox mask (``dropout_mask``), not a torch.Generator mask."""
    from lora_fast.functional import dropout_mask

    x, w, b, a, bb = _inputs(37, 40, 24, 3, fan_in_fan_out, device=DEVICE)
    calls = _kernel_calls(monkeypatch)
    y = lora_linear_op(x, w, b, a, bb, 0.5, dropout_p=0.3, seed=1234, fan_in_fan_out=fan_in_fan_out)
    keep = dropout_mask(1234, 37, 40, 0.3, x.device)
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), bb.detach().double().requires_grad_()
    ref = lora_linear_ref(x64, w.double(), b.double(), a64, b64, 0.5, dropout_p=0.3, keep_mask=keep,
                          fan_in_fan_out=fan_in_fan_out)
    assert_rel_close(y, ref, FP32_TOL, "y")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    grads_ref = torch.autograd.grad(ref, (x64, a64, b64), dy.double())
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref, strict=True):
        assert_rel_close(g, g_ref, FP32_TOL, name)
    assert calls == ["lora_linear_fwd", "lora_linear_bwd"]


@pytest.mark.usefixtures("routed", "interpret")
def test_compiled_layer_on_the_triton_path_matches_eager():
    """torch.compile(fullgraph=True) of a layer on the Triton path: same seed draw, same kernels as eager."""
    m = _layer(True, 0.3).to(DEVICE)
    m.backend = "triton"
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    out = _run(torch.compile(m, backend="aot_eager", fullgraph=True), m, x, seed=3)
    ref = _run(m, m, x, seed=3)  # the eager module on the Triton path (lora_fast.triton_fn)
    for name, o, r in zip(("y", "dx", "dA", "dB", "next draw"), out, ref, strict=True):
        assert_rel_close(o, r, FP32_TOL, name)


@pytest.mark.usefixtures("interpret")
def test_op_refuses_what_eager_refuses_for_lora_b():
    """The op decides kernels-or-reference by eager's rule, lora_B included: an int32 (or fp64) lora_B is refused by
    backend="triton" in both (the op used to run the kernels on it) and, under "auto", takes the reference path."""
    from lora_fast.ops import _use_triton

    x, w, b, a = (torch.randn(*s, device=DEVICE) for s in ((6, 16), (5, 16), (5,), (2, 16)))
    for bad in (torch.randint(-3, 3, (5, 2), dtype=torch.int32, device=DEVICE), torch.randn(5, 2).double()):
        for run in (functional.lora_linear, lora_linear_op):
            with pytest.raises(RuntimeError, match=f"lora_B dtype {bad.dtype}"):
                run(x, w, b, a, bad.to(DEVICE), 0.5, backend="triton")
    fp64 = torch.randn(5, 2, dtype=torch.float64, device=DEVICE)
    assert not _use_triton(x, w, a, fp64, "auto")


def test_backend_triton_under_a_compiled_transform_raises_as_eager():
    """backend="triton" on a case the kernels cannot run raises, eager or compiled: under torch.compile inside a
    torch.func transform (or a forward-AD level) every other backend takes the reference path, and "triton" used to
    take it too without a word."""
    from torch.func import grad

    x, w, a, b0 = (torch.randn(*s) for s in ((3, 8), (4, 8), (2, 8), (4, 2)))

    def loss(B):
        return functional.lora_linear(x, w, None, a, B, 0.5, backend="triton").sum()

    with pytest.raises(RuntimeError, match="backend='triton' cannot run this case"):
        grad(loss)(b0)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this case"):  # dynamo may run the
        torch.compile(grad(loss), backend="eager")(b0)  # frame eagerly at the raise: then eager's reason
    torch._dynamo.reset()


# --- edge cases of the op's entry (review) -------------------------------------------------------------------------
@pytest.mark.usefixtures("routed")
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compiled_torch_func_grad_equals_eager(dropout):
    """torch.compile(torch.func.grad(...)) over a LoRA layer: the op has no functorch rules, so under a transform
    the compiled entry takes the reference path, as eager does (it crashed inside dynamo)."""
    from torch.func import functional_call, grad

    m = _layer(True, dropout)
    x = torch.randn(3, 5, 32)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(B):
        return functional_call(m, {**params, "lora.lora_B": B}, (x,)).square().sum()

    B0 = params["lora.lora_B"]
    torch.manual_seed(3)  # dropout draws from torch's generator: the same draws in both runs
    eager = grad(loss)(B0)
    torch.manual_seed(3)
    compiled = torch.compile(grad(loss), backend="aot_eager", fullgraph=True)(B0)
    assert_rel_close(compiled, eager.double(), FP32_TOL, "compiled func.grad")
    # against the float64 reference's own gradient, with the mask replayed from the seed (nn.Dropout's draw)
    torch.manual_seed(3)
    keep = torch.rand(x.shape) >= dropout if dropout else None
    w, b = m.linear.weight.detach(), m.linear.bias.detach()
    B = B0.double().requires_grad_()
    y = lora_linear_ref(x.double(), w.double(), b.double(), m.lora.lora_A.detach().double(), B, m.scaling,
                        dropout_p=dropout, keep_mask=keep, fan_in_fan_out=True)
    assert_rel_close(compiled, torch.autograd.grad(y.square().sum(), B)[0], FP32_TOL, "vs float64")


@pytest.mark.usefixtures("routed")
@pytest.mark.parametrize("backend, compiled", [("reference", False), ("auto", False), ("auto", True)])
def test_op_entry_forward_mode_ad_carries_the_tangent(backend, compiled):
    """Forward-mode AD through lora_linear_op (the op has no jvp: its autograd kernel used to drop the tangent
    silently, a JVP of 0): the entry takes the reference path, and the tangent is eager lora_linear's. Compiled
    too: there the tensors dynamo traces carry no tangent, so the dual level decides."""
    import torch.autograd.forward_ad as fwad

    x, w, b, a, bb = (t.detach() for t in _inputs(6, 16, 10, 3, False))
    t = torch.randn_like(x)

    def entry(run):
        def call(x):
            return run(x, w, b, a, bb, 0.5, backend=backend)
        return torch.compile(call, backend="aot_eager", fullgraph=True) if compiled else call

    with fwad.dual_level():
        outs = [fwad.unpack_dual(entry(run)(fwad.make_dual(x, t))) for run in (lora_linear_op, functional.lora_linear)]
    (y, jvp), (y_e, jvp_e) = outs
    assert jvp is not None and jvp_e is not None
    assert_rel_close(jvp, jvp_e.double(), FP32_TOL, "jvp")
    w_eff = w.double() + 0.5 * bb.double() @ a.double()  # the map is linear in x: its JVP is t·(W₀ + s·B·A)ᵀ
    assert_rel_close(jvp, t.double() @ w_eff.t(), FP32_TOL, "jvp vs float64")


@pytest.mark.usefixtures("routed")
def test_a_seed_tensor_advanced_in_place_before_backward():
    """A training loop may keep one seed tensor and advance it in place (seed += 1) before the previous forward's
    backward: the entry hands the op its own copy of the seed, so backward regenerates the forward's mask, compiled
    and eager alike (both raised autograd's in-place error; the eager reference path accepted it)."""
    m = _layer(False, 0.3)
    x = torch.randn(5, 32, requires_grad=True)
    params = (m.linear.weight, m.linear.bias, m.lora.lora_A, m.lora.lora_B, m.scaling, 0.3)

    def compiled_fn(x, seed):
        return functional.lora_linear(x, *params, seed=seed)

    compiled = torch.compile(compiled_fn, backend="aot_eager", fullgraph=True)
    for name, fn in (("compiled", compiled), ("eager op", lambda x, seed: lora_linear_op(x, *params, seed=seed))):
        seed = torch.tensor([41])
        y = fn(x, seed)
        seed += 1  # before backward
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, m.lora.lora_A, m.lora.lora_B), dy)
        y_ref = lora_linear_op(x, *params, seed=41)
        ref = torch.autograd.grad(y_ref, (x, m.lora.lora_A, m.lora.lora_B), dy)
        assert_rel_close(y, y_ref.double(), FP32_TOL, f"{name} y")
        for g_name, g, r in zip(("dx", "dA", "dB"), got, ref, strict=True):
            assert_rel_close(g, r.double(), FP32_TOL, f"{name} {g_name}")
        assert rel_err(y, lora_linear_op(x, *params, seed=42)) > 1e-3  # the seed's value matters


def test_raw_op_with_dropout_needs_a_seed():
    """torch.ops.lora_fast.lora_linear with p > 0 and no seed used to apply no dropout on the reference path (the
    kernels raised): both ops refuse it, the fake implementations too."""
    x, w, b, a, bb = (t.detach() for t in _inputs(4, 8, 6, 2, False))
    with pytest.raises(ValueError, match="dropout_p=0.5 > 0 needs a seed tensor"):
        torch.ops.lora_fast.lora_linear(x, w, b, a, bb, 1.0, 0.5, None, False, "reference")
    with pytest.raises(ValueError, match="needs a seed tensor"):
        torch.ops.lora_fast.lora_linear_backward(torch.randn(4, 6), x, w, a, bb, torch.randn(4, 2), 1.0, 0.5, None,
                                                 False, "reference", True, True, True)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(ValueError, match="needs a seed tensor"):
        fx, fw, fb, fa, fbb = (mode.from_tensor(t) for t in (x, w, b, a, bb))
        torch.ops.lora_fast.lora_linear(fx, fw, fb, fa, fbb, 1.0, 0.5, None, False, "reference")


@pytest.mark.usefixtures("routed")
def test_disable_adapter_costs_one_graph_per_state():
    """disable_adapter on a compiled layer: one new graph for the disabled state and none when it is re-enabled
    (``disabled`` lived on the class until first set, so the first state's guard failed once more)."""
    from torch._dynamo.testing import CompileCounter

    from lora_fast import disable_adapter

    m = _layer(False, 0.0)
    counter = CompileCounter()
    compiled = torch.compile(m, backend=counter)
    x = torch.randn(3, 32)
    y = compiled(x)
    with disable_adapter(m):
        y_off = compiled(x)
    y_again = compiled(x)
    assert counter.frame_count == 2
    assert torch.equal(y_again, y) and torch.allclose(y_off, m.linear(x))


@pytest.mark.usefixtures("routed")
@pytest.mark.parametrize("dynamic", [None, True])
def test_fullgraph_with_a_changing_scaling(dynamic):
    """A scaling that changes between calls (adapters of other α loaded in turn, or ``dynamic=True``) is a symbolic
    float under dynamo, which the finiteness check's ``math.isfinite`` could not trace: ``fullgraph=True`` raised
    from the second value on (and without fullgraph every layer broke the graph). The outputs equal eager's. A NaN
    or infinite scaling is still refused in compiled calls, after the changing values too (skipping the check while
    compiling let both through: NaN outputs, or s = 1 on the fused path)."""
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 12), rank=4, alpha=8)
    nn.init.normal_(layer.lora.lora_B)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    x = torch.randn(3, 16)
    for s in (2.0, 1.0, 0.5):
        layer.lora.scaling = s
        assert_rel_close(compiled(x), layer(x).double(), FP32_TOL, f"scaling {s}")
    with pytest.raises(ValueError, match="scaling must be a finite number"):  # eager still checks
        functional.lora_linear(x, layer.linear.weight, None, layer.lora.lora_A, layer.lora.lora_B, float("nan"))
    for bad in (float("nan"), float("inf")):
        layer.lora.scaling = bad
        with pytest.raises(Exception, match="scaling must be a finite number"):  # fullgraph: dynamo's error around it
            compiled(x)
        partial = torch.compile(layer, backend="aot_eager", dynamic=dynamic)  # graph breaks allowed: the ValueError
        with pytest.raises(ValueError, match="scaling must be a finite number"):
            partial(x)


@pytest.mark.usefixtures("routed")
def test_compiled_edge_cases_run_as_eager():
    """No input features (the op's ``x.reshape(-1, 0)`` failed: M cannot be inferred; eager returns the bias), and
    a merged layer in training mode under fullgraph (its warning, a skipped function inside the graph, raised;
    eager warns)."""
    w, b, a, bb = torch.randn(12, 0), torch.randn(12), torch.randn(4, 0), torch.randn(12, 4)
    x = torch.randn(3, 0)
    compiled = torch.compile(lambda x: functional.lora_linear(x, w, b, a, bb, 0.5), backend="aot_eager")
    assert torch.equal(compiled(x), b.expand(3, 12))
    layer = LinearWithLoRA(nn.Linear(16, 12), rank=4)
    layer.merge_weights()
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="training-mode forward of a merged layer"):
        eager = layer(x)
    assert torch.equal(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), eager)
