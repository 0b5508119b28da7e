"""The autograd Function and dispatch: ``lora_linear(..., backend="triton"/"auto")`` and ``LinearWithLoRA`` on the
Triton path against the float64 reference (with the kernels' own dropout mask), plus seeds, checkpointing,
autocast, saved-activation bytes (vs PEFT) and a 20-step GPT-2 run compared with the reference path.

CPU-only machines run the kernels through triton's interpreter (see ``tests/triton_interpret.py``).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lora_fast import LinearWithLoRA, apply_lora
from lora_fast.functional import dropout_mask, lora_linear
from lora_fast.reference import lora_linear_ref
from tests.triton_interpret import DEVICE, HAS_CUDA, TF32_TOL, fp32_tol, interpret  # noqa: F401  (fixture)
from tests.utils import assert_half_precision, assert_rel_close, rel_err

pytestmark = pytest.mark.usefixtures("interpret")
FP32_TOL = fp32_tol()  # exact fp32 dots: the interpreter's, or a GPU's IEEE ones (torch's default)


def _params(K, N, r, fifo=False, bias=True, dtype=torch.float32):
    w = (torch.randn((K, N) if fifo else (N, K), dtype=dtype, device=DEVICE) / K**0.5)
    b = torch.randn(N, dtype=dtype, device=DEVICE) if bias else None
    a = (torch.randn(r, K, device=DEVICE) / K**0.5).requires_grad_()
    bb = torch.randn(N, r, device=DEVICE).requires_grad_()
    return w, b, a, bb


def _grads_vs_reference(x, w, b, a, bb, s, p, seed, fifo, tol=FP32_TOL):
    """Run lora_linear on the Triton path, backprop a random dy, compare y, dx, dA, dB with fp64 + the same mask."""
    x = x.detach().requires_grad_()
    y = lora_linear(x, w, b, a, bb, s, dropout_p=p, seed=seed, fan_in_fan_out=fifo, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    K = x.shape[-1]
    mask = dropout_mask(seed, x.numel() // K, K, p, x.device).reshape(x.shape) if p > 0 else None
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, bb))
    ref = lora_linear_ref(x64, w, b, a64, b64, s, dropout_p=p, keep_mask=mask, fan_in_fan_out=fifo, upcast=True)
    ref.backward(dy.double())
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert a.grad.dtype == a.dtype and bb.grad.dtype == bb.dtype
    for name, o, r in (("y", y, ref), ("dx", x.grad, x64.grad), ("dA", a.grad, a64.grad), ("dB", bb.grad, b64.grad)):
        assert_rel_close(o, r, tol, name)


@pytest.mark.parametrize(
    "shape, N, r, fifo, bias, p",
    [
        ((37, 40), 33, 3, False, True, 0.0),  # 2-D
        ((3, 7, 40), 33, 8, True, False, 0.3),  # 3-D, Conv1D layout
        ((2, 3, 5, 24), 20, 16, False, True, 0.1),  # 4-D
        ((5,), 9, 1, True, True, 0.5),  # 1-D input, rank 1
    ],
)
def test_every_gradient_matches_reference(shape, N, r, fifo, bias, p):
    x = torch.randn(*shape, device=DEVICE)
    _grads_vs_reference(x, *_params(shape[-1], N, r, fifo, bias), s=16.0 / r, p=p, seed=4321, fifo=fifo)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True), (False, True, True), (True, True, False)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_every_gradient_subset_through_the_function(needs, p):
    """Any subset of (x, A, B) requiring grad — frozen adapters with a trainable input (an inference adapter inside a
    trained model), LoRA-FA (A frozen), a first layer (x without grad) — gets exactly those gradients, each equal to
    the float64 reference with the kernels' mask, and None for the others."""
    K, N, r, s, seed = 24, 20, 4, 2.0, 11
    w, b, a, bb = _params(K, N, r)
    x = torch.randn(9, K, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, a, bb), needs, strict=True)]
    y = lora_linear(*leaves[:1], w, b, *leaves[1:], s, dropout_p=p, seed=seed, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = dropout_mask(seed, 9, K, p, x.device) if p > 0 else None
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    ref = lora_linear_ref(ref_leaves[0], w, b, *ref_leaves[1:], s, dropout_p=p, keep_mask=mask, upcast=True)
    ref.backward(dy.double())
    assert_rel_close(y, ref, FP32_TOL, "y")
    for name, need, t, rt in zip(("dx", "dA", "dB"), needs, leaves, ref_leaves, strict=True):
        if need:
            assert_rel_close(t.grad, rt.grad, FP32_TOL, name)
        else:
            assert t.grad is None, f"{name} computed for a tensor that needs no grad"


def test_noncontiguous_and_permuted_inputs():
    """A permuted 3-D input (reshape copies) and a sliced 2-D view (strides) give the reference's gradients."""
    x3 = torch.randn(6, 24, 5, device=DEVICE).permute(0, 2, 1)  # (6, 5, 24), not viewable as 2-D
    _grads_vs_reference(x3, *_params(24, 18, 4), s=2.0, p=0.2, seed=8, fifo=False)
    x2 = torch.randn(30, 48, device=DEVICE)[:, 3:27]  # (30, 24), row stride 48
    _grads_vs_reference(x2, *_params(24, 18, 4), s=2.0, p=0.2, seed=8, fifo=False)


def test_rank_128():
    x = torch.randn(20, 32, device=DEVICE)
    _grads_vs_reference(x, *_params(32, 24, 128, fifo=True), s=0.1, p=0.1, seed=3, fifo=True)


def test_fp16_through_function():
    """fp16 end to end (x, W₀ fp16; A, B fp32 as LinearWithLoRA keeps them): error <= 1e-2 and <= 2× PyTorch's."""
    x = torch.randn(33, 40, device=DEVICE, dtype=torch.float16)  # fp16 dots are right in the interpreter
    w, b, a, bb = _params(40, 36, 8, dtype=torch.float16)
    x.requires_grad_()
    y = lora_linear(x, w, b, a, bb, 2.0, backend="triton")
    y.backward(dy := torch.randn_like(y))
    # PyTorch's own error in fp16: adapters given as fp16 (with fp32 ones the reference computes the term in fp32)
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, a.half(), bb.half()))
    yr = lora_linear_ref(xr, w, b, ar, br, 2.0)
    yr.backward(dy)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, bb))
    y64 = lora_linear_ref(x64, w, b, a64, b64, 2.0, upcast=True)
    y64.backward(dy.double())
    for name, o, t, r in (("y", y, yr, y64), ("dx", x.grad, xr.grad, x64.grad), ("dA", a.grad, ar.grad, a64.grad),
                          ("dB", bb.grad, br.grad, b64.grad)):
        err, torch_err = rel_err(o, r), rel_err(t, r)
        assert_half_precision(err, torch_err, name)
    assert a.grad.dtype == torch.float32 and x.grad.dtype == torch.float16


def test_autocast_fp32_params_half_compute():
    """Under autocast: fp32 x/W₀/A/B, half compute; y in the autocast dtype, dx/dA/dB fp32; y and every gradient
    within 1e-2 of float64 (same mask) and at most twice the error of PyTorch's own autocast computation."""
    half = torch.float16 if DEVICE == "cpu" else torch.bfloat16  # interpreter: bf16 dots are wrong
    x = torch.randn(2, 17, 40, device=DEVICE, requires_grad=True)
    w, b, a, bb = _params(40, 36, 8)
    keep = dropout_mask(5, 34, 40, 0.2, DEVICE).reshape(2, 17, 40)
    with torch.autocast(DEVICE, dtype=half):
        y = lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.2, seed=5, backend="triton")
        yr = lora_linear_ref(x, w, b, a, bb, 2.0, dropout_p=0.2, keep_mask=keep)
    assert y.dtype == half and yr.dtype == half
    dy = torch.randn_like(y)
    ga = torch.autograd.grad(y, (x, a, bb), dy)
    gr = torch.autograd.grad(yr, (x, a, bb), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    y64 = lora_linear_ref(leaves64[0], w, b, *leaves64[1:], 2.0, dropout_p=0.2, keep_mask=keep, upcast=True)
    g64 = torch.autograd.grad(y64, leaves64, dy.double())
    assert [g.dtype for g in ga] == [torch.float32] * 3
    for name, g, t, r in zip(("y", "dx", "dA", "dB"), (y, *ga), (yr, *gr), (y64, *g64), strict=True):
        err, torch_err = rel_err(g, r), rel_err(t, r)
        assert_half_precision(err, torch_err, name)


def test_cublas_variant_through_the_module(monkeypatch):
    """The cublas variant forced through the environment, as a benchmark runs it: every gradient against fp64 with
    dropout on and off (off: the merged-weight GEMMs), both layouts, under autocast and under no_grad."""
    monkeypatch.setenv("LORA_FAST_FWD_VARIANT", "cublas")
    monkeypatch.setenv("LORA_FAST_BWD_VARIANT", "cublas")
    for shape, N, r, fifo, p in (((3, 7, 40), 33, 8, True, 0.3), ((37, 40), 33, 3, False, 0.0)):
        x = torch.randn(*shape, device=DEVICE)
        _grads_vs_reference(x, *_params(shape[-1], N, r, fifo), s=16.0 / r, p=p, seed=99, fifo=fifo)
    half = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    layer = LinearWithLoRA(nn.Linear(40, 36), rank=8, dropout=0.0, backend="triton").to(DEVICE)
    nn.init.normal_(layer.lora.lora_B)
    ref = LinearWithLoRA(nn.Linear(40, 36), rank=8, dropout=0.0, backend="reference").to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 17, 40, device=DEVICE)
    with torch.autocast(DEVICE, dtype=half):
        y, yr = layer(x), ref(x)
    y64 = lora_linear_ref(x.double(), layer.linear.weight.double(), layer.linear.bias.double(),
                          layer.lora.lora_A.double(), layer.lora.lora_B.double(), layer.scaling)
    assert y.dtype == half
    assert_half_precision(rel_err(y, y64), rel_err(yr, y64), "autocast y")
    with torch.no_grad():
        assert_rel_close(layer.eval()(x), y64, FP32_TOL, "no_grad")


def test_dispatch_auto_and_triton(monkeypatch, caplog):
    x = torch.randn(8, 16, device=DEVICE)
    w, b, a, bb = _params(16, 12, 4)
    monkeypatch.setattr("lora_fast.functional._logged", set())  # the choice is logged once per message
    with caplog.at_level(logging.DEBUG, logger="lora_fast"):
        lora_linear(x, w, b, a, bb, 1.0, backend="auto")
    assert any("Triton path" in m for m in caplog.messages), caplog.messages
    with pytest.raises(RuntimeError, match="rank 129"):
        lora_linear(x, w, b, torch.randn(129, 16, device=DEVICE), torch.randn(12, 129, device=DEVICE), 1.0,
                    backend="triton")
    with pytest.raises(RuntimeError, match="frozen"):  # a trainable base would silently get no gradient
        lora_linear(x, w.clone().requires_grad_(), b, a, bb, 1.0, backend="triton")
    layer = LinearWithLoRA(nn.Linear(16, 12), rank=4, backend="triton").to(DEVICE)
    with pytest.raises(RuntimeError, match="fp32, fp16 or bf16"):  # the module refuses as the function does
        layer.double()(x.double())
    layer.float()
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="bf16"):  # never silently garbage on the interpreter
            xb = x.bfloat16()
            lora_linear(xb, w.bfloat16(), None, a, bb, 1.0, backend="triton")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            lora_linear(x, w, b, a, bb, 1.0, backend="triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            layer(x)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="lora_fast"):
            y = lora_linear(x, w, b, a, bb, 1.0, backend="auto")  # falls back to the reference
        assert any("reference path" in m for m in caplog.messages), caplog.messages
        assert_rel_close(y, lora_linear_ref(x, w, b, a, bb, 1.0, upcast=True), 1e-5, "y")
    with pytest.raises(ValueError, match="seed"):
        lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, seed=-3, backend="triton")


@pytest.mark.parametrize("fifo", [False, True])
def test_trainable_base_with_dropout_on_auto_equals_float64(fifo):
    """backend="auto" with a trainable W₀ and bias (the kernels refuse it) falls back to the reference: every
    gradient — dx, dW₀, db, dA, dB — equals the float64 reference with the seed's mask, dropout on."""
    torch.manual_seed(0)
    x = torch.randn(9, 12, device=DEVICE, requires_grad=True)
    w = torch.randn((12, 10) if fifo else (10, 12), device=DEVICE, requires_grad=True)
    b = torch.randn(10, device=DEVICE, requires_grad=True)
    a = torch.randn(2, 12, device=DEVICE, requires_grad=True)
    bb = torch.randn(10, 2, device=DEVICE, requires_grad=True)
    y = lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, seed=3, fan_in_fan_out=fifo, backend="auto")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b, a, bb), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, a, bb)]
    keep = dropout_mask(3, 9, 12, 0.3, DEVICE)
    y64 = lora_linear_ref(*leaves, 0.5, 0.3, keep_mask=keep, fan_in_fan_out=fifo)
    assert_rel_close(y, y64, 1e-5, "y")
    for name, g, r in zip(("dx", "dW", "db", "dA", "dB"), got, torch.autograd.grad(y64, leaves, dy.double()),
                          strict=True):
        assert_rel_close(g, r, 1e-5, name)


def test_seeds_reproduce_and_differ():
    layer = LinearWithLoRA(nn.Linear(24, 20), rank=4, dropout=0.3, backend="triton").to(DEVICE)
    nn.init.normal_(layer.lora.lora_B)
    x = torch.randn(16, 24, device=DEVICE)
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    y3 = layer(x)  # the generator moved on: another seed, another mask
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    args = (x, layer.linear.weight, layer.linear.bias, layer.lora.lora_A, layer.lora.lora_B, layer.scaling)
    e1 = lora_linear(*args, dropout_p=0.3, seed=77, backend="triton")
    e2 = lora_linear(*args, dropout_p=0.3, seed=77, backend="triton")
    e3 = lora_linear(*args, dropout_p=0.3, seed=78, backend="triton")
    assert torch.equal(e1, e2) and not torch.allclose(e1, e3)
    # eval mode: no dropout, equal to dropout 0
    layer.eval()
    assert_rel_close(layer(x), lora_linear(*args, dropout_p=0.0, backend="triton"), 1e-6, "eval")
    # keep-rate of the mask the kernels use, within 4σ of 1 − p
    m = dropout_mask(123, 256, 200, 0.3, DEVICE)
    assert abs(m.float().mean().item() - 0.7) < 4 * (0.3 * 0.7 / m.numel()) ** 0.5


def test_dropout_module_decides_on_the_triton_path():
    """The kernels follow the LoRA dropout module (``lora.lora_dropout``): its p set to 0 by module type (TRL's
    ``disable_dropout_in_model``) gives the eval output in train mode, its own eval() turns the mask off, its
    train() under an eval model (MC dropout) turns it on."""
    layer = LinearWithLoRA(nn.Linear(24, 20), rank=4, dropout=0.3, backend="triton").to(DEVICE)
    nn.init.normal_(layer.lora.lora_B)
    x = torch.randn(16, 24, device=DEVICE)
    want = layer.eval()(x)
    layer.train()
    for module in layer.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    layer.lora.dropout = 0.3
    assert not torch.equal(layer(x), want)
    layer.lora.lora_dropout.eval()
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    layer.eval()
    layer.lora.lora_dropout.train()
    assert not torch.equal(layer(x), want)

def test_checkpoint_regenerates_the_same_masks():
    """With dropout on and seeds drawn from torch's RNG, checkpoint recomputation gives the same gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(LinearWithLoRA(nn.Linear(24, 32), rank=4, dropout=0.3, backend="triton"), nn.GELU(),
                          LinearWithLoRA(nn.Linear(32, 16), rank=4, dropout=0.3, backend="triton")).to(DEVICE)
    for m in model:
        if isinstance(m, LinearWithLoRA):
            nn.init.normal_(m.lora.lora_B)
    x = torch.randn(12, 24, device=DEVICE, requires_grad=True)
    params = [x] + [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(42)
    g_plain = torch.autograd.grad(model(x).square().sum(), params)
    torch.manual_seed(42)
    g_ckpt = torch.autograd.grad(checkpoint(model, x, use_reentrant=False).square().sum(), params)
    for i, (p, c) in enumerate(zip(g_plain, g_ckpt, strict=True)):
        assert torch.equal(p, c), f"gradient {i} differs under checkpoint (rel err {rel_err(c, p):.2e})"
    torch.manual_seed(43)  # another seed: another mask, other gradients (the comparison above is not vacuous)
    g_other = torch.autograd.grad(model(x).square().sum(), params)
    assert not torch.allclose(g_other[1], g_plain[1])


def test_no_grad_and_first_layer():
    """Under no_grad nothing is saved; a first layer (x without grad) gets dA, dB but no dx; merged = base only."""
    layer = LinearWithLoRA(nn.Linear(24, 20), rank=4, dropout=0.2, backend="triton").to(DEVICE)
    nn.init.normal_(layer.lora.lora_B)
    x = torch.randn(10, 24, device=DEVICE)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(3)
        y0 = layer(x)
    assert saved == [] and not y0.requires_grad
    torch.manual_seed(3)
    y = layer(x)
    assert torch.equal(y.detach(), y0)
    y.sum().backward()
    assert x.grad is None and layer.lora.lora_A.grad is not None and layer.linear.weight.grad is None
    layer.eval()
    y_unmerged = layer(x)
    layer.merge_weights()
    assert_rel_close(layer(x), y_unmerged, 1e-5, "merged")


def _saved_activation_bytes(module, x):
    """Bytes of the tensors autograd saves for backward, excluding those sharing storage with parameters/buffers
    (counted once per storage)."""
    param_ptrs = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total


def test_saved_activations_bounded_and_below_peft():
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    M, K, N, r = 64, 96, 80, 8
    ours = LinearWithLoRA(nn.Linear(K, N), rank=r, alpha=16, dropout=0.1, backend="triton").to(DEVICE).train()
    peft = PeftLinear(nn.Linear(K, N), "default", LoraConfig(r=r, lora_alpha=16, lora_dropout=0.1), r=r,
                      lora_alpha=16, lora_dropout=0.1).to(DEVICE).train()
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    ours_bytes, peft_bytes = _saved_activation_bytes(ours, x), _saved_activation_bytes(peft, x)
    bound = x.nbytes + 4 * M * r + 1024
    assert ours_bytes <= bound, f"ours saves {ours_bytes} B > bytes(x) + 4·M·r + 1 KiB = {bound}"
    assert ours_bytes < peft_bytes, f"ours {ours_bytes} B vs PEFT {peft_bytes} B"
    assert peft_bytes >= 2 * x.nbytes  # PEFT keeps x and its dropped copy


@pytest.mark.slow
def test_gpt2_20_steps_triton_matches_reference():
    """A 2-layer GPT-2 (random init), LoRA on c_attn (Conv1D), dropout 0: 20 AdamW steps on the Triton
    path and on the reference path give the same loss at every step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # small enough for the interpreter (~0.1 s per kernel launch there)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).to(DEVICE)
    ids = torch.randint(0, 97, (2, 16), device=DEVICE)
    losses = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(1)
        model = GPT2LMHeadModel(cfg).to(DEVICE)
        model.load_state_dict(base.state_dict())
        model = apply_lora(model, target_modules=["c_attn"], rank=8, alpha=16, dropout=0.0,
                           backend=backend)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[backend] = []
        for _ in range(20):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
    t, rf = torch.tensor(losses["triton"]), torch.tensor(losses["reference"])
    assert t[-1] < t[0] - 0.1, "training did not move the loss: the comparison would be vacuous"
    assert torch.allclose(t, rf, rtol=1e-4, atol=0), f"triton {t.tolist()}\nreference {rf.tolist()}"


@pytest.mark.parametrize("p, fifo", [(0.0, False), (0.3, True)])
def test_double_backward_matches_reference(p, fifo):
    """create_graph=True through the Triton path (a gradient penalty): first- and second-order gradients equal
    the reference path's with the kernels' own mask (the backward then runs differentiable aten ops)."""
    torch.manual_seed(0)
    w, b, a, bb = _params(16, 12, 3, fifo=fifo)
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    mask = dropout_mask(11, 5, 16, p, DEVICE) if p else None
    x64, a64, bb64 = (t.detach().double().requires_grad_() for t in (x, a, bb))  # the float64 oracle's leaves
    results = []
    for path in ("triton", "reference"):
        if path == "triton":
            leaves = (x, a, bb)
            y = lora_linear(x, w, b, a, bb, 1.5, dropout_p=p, seed=11, fan_in_fan_out=fifo, backend="triton")
        else:
            leaves = (x64, a64, bb64)
            y = lora_linear_ref(x64, w.double(), b.double(), a64, bb64, 1.5, dropout_p=p, keep_mask=mask,
                                fan_in_fan_out=fifo)
        gx, ga = torch.autograd.grad(y.pow(2).sum(), leaves[:2], create_graph=True)
        (y.sum() + gx.pow(2).sum() + ga.pow(2).sum()).backward()
        results.append((gx.detach(), ga.detach(), *(t.grad for t in leaves)))
    for name, t, r in zip(("gx", "gA", "dx", "dA", "dB"), *results, strict=True):
        assert r.dtype == torch.float64
        assert_rel_close(t, r, 1e-5, name)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_batched_upstream_gradients_match_reference(p):
    """``autograd.grad(..., is_grads_batched=True)`` — ``autograd.functional.jacobian(vectorize=True)`` — hands the
    backward a legacy vmap batch of gradients, which the kernels cannot read ("Cannot access storage of
    BatchedTensorImpl" before): it takes the aten backward, and each batch entry equals the reference's gradient."""
    torch.manual_seed(0)
    w, b, a, bb = _params(16, 12, 3)
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    mask = dropout_mask(7, 5, 16, p, DEVICE) if p else None
    cotangents = torch.randn(4, 5, 12, device=DEVICE)
    got = torch.autograd.grad(lora_linear(x, w, b, a, bb, 1.5, dropout_p=p, seed=7, backend="triton"), (x, a, bb),
                              cotangents, is_grads_batched=True)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    y64 = lora_linear_ref(leaves[0], w.double(), b.double(), leaves[1], leaves[2], 1.5, dropout_p=p, keep_mask=mask)
    for i in range(cotangents.shape[0]):
        ref = torch.autograd.grad(y64, leaves, cotangents[i].double(), retain_graph=True)
        for name, g, r in zip(("dx", "dA", "dB"), got, ref, strict=True):
            assert_rel_close(g[i], r, 1e-5, f"{name}[{i}]")


def test_inputs_the_kernels_cannot_take_fall_back_or_raise():
    w, b, a, bb = _params(16, 12, 2)
    x = torch.randn(5, 16, device=DEVICE)
    w8 = w.to(torch.int8)
    x64, w64 = x.double(), w.double()
    with pytest.raises(RuntimeError, match="fp32, fp16 or bf16"):
        lora_linear(x64, w64, None, a, bb, 1.0, backend="triton")
    y = lora_linear(x64, w64, None, a, bb, 1.0, backend="auto")  # the reference takes fp64
    assert y.dtype == torch.float64
    with torch.autocast(DEVICE, dtype=torch.float16), pytest.raises(RuntimeError, match="int8"):
        lora_linear(x, w8, None, a, bb, 1.0, backend="triton")  # integer codes are never used as values
    with pytest.raises(RuntimeError, match="lora_B dtype"):
        lora_linear(x, w, None, a, bb.detach().to(torch.int32), 1.0, backend="triton")
    # a base weight or bias in another dtype outside autocast: F.linear refuses it (naming neither tensor), so the
    # kernels must not quietly cast it; every path names both
    for backend in ("triton", "auto", "reference"):
        with pytest.raises(RuntimeError, match=r"the input is torch.float32 but the base bias is torch.float64"):
            lora_linear(x, w, b.double(), a, bb, 1.0, backend=backend)
        with pytest.raises(RuntimeError, match=r"the input is torch.float16 but the base weight is torch.float32"):
            lora_linear(x.half(), w, None, a, bb, 1.0, backend=backend)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scaling_is_refused_on_every_path(bad):
    """A NaN or infinite scaling: the kernels split s into two finite factors, so a NaN forward silently computed
    s = 1 (and NaN gradients) and an inf gave NaN everywhere (0·inf in the padded rank) where the reference gives
    NaN/inf — a ValueError by name on every path instead, for a number and (where taken as a float) a tensor."""
    from lora_fast.ops import lora_linear_op

    w, _, a, bb = _params(16, 12, 2)
    x = torch.randn(5, 16, device=DEVICE)
    calls = [lambda s, b=b: lora_linear(x, w, None, a, bb, s, backend=b) for b in ("reference", "auto", "triton")]
    calls.append(lambda s: lora_linear_op(x, w, None, a, bb, s))
    for call in calls:
        with pytest.raises(ValueError, match="scaling must be a finite number"):
            call(bad)
    for call in calls[2:]:  # a tensor: read where the fused path and the op take it as a float
        with pytest.raises(ValueError, match="scaling must be a finite number"):
            call(torch.tensor(bad, device=DEVICE))


def test_arguments_no_path_computes_right_are_refused_by_name():
    """A ``scaling`` tensor requiring grad: the reference differentiates it, the fused path and the compiled op
    take it as a float and used to drop its gradient without a word — refused there, by name. A tensor
    ``dropout_p`` is a TypeError on every path (the Triton path's was a bare ``__round__`` error, the reference
    accepted it). A transposed lora_A is named as such, with the rank its message infers no longer K."""
    from lora_fast.ops import lora_linear_op

    w, _, a, bb = _params(16, 12, 2)
    x = torch.randn(5, 16, device=DEVICE)
    s = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    for call in (lambda: lora_linear(x, w, None, a, bb, s, backend="triton"),
                 lambda: lora_linear(x, w, None, a, bb, s, backend="auto"),
                 lambda: lora_linear_op(x, w, None, a, bb, s)):
        with pytest.raises(ValueError, match="scaling is a tensor that requires grad"):
            call()
    lora_linear(x, w, None, a, bb, s, backend="reference").sum().backward()
    assert s.grad is not None and s.grad.abs() > 0  # the path that differentiates it still does
    s.grad = None
    lora_linear(x.double(), w.double(), None, a, bb, s, backend="auto").sum().backward()  # auto's reference
    assert s.grad is not None and s.grad.abs() > 0  # fallback (fp64: no kernel) differentiates it too
    y = lora_linear(x, w, None, a, bb, s.detach(), backend="triton")  # a tensor without grad: its value
    assert_rel_close(y, lora_linear(x, w, None, a, bb, 2.0, backend="triton"), 1e-6, "tensor scaling")
    for backend in ("reference", "triton"):
        with pytest.raises(TypeError, match="dropout_p must be a Python float, got a tensor"):
            lora_linear(x, w, None, a, bb, 1.0, torch.tensor(0.1), seed=3, backend=backend)
    with pytest.raises(TypeError, match="dropout_p must be a Python float"):
        lora_linear_op(x, w, None, a, bb, 1.0, torch.tensor(0.1), seed=3)
    with pytest.raises(ValueError, match=r"lora_A must be \(rank, in_features=16\), got \(16, 2\) \(transposed\?\)"):
        lora_linear(x, w, None, a.t(), bb, 1.0, backend="reference")


def test_dropout_too_close_to_one_runs_unbiased():
    """p so close to 1 that the kernels' 16-bit keep threshold would bias E[dropout(x)] by > 1e-3: refused by
    backend="triton" with the reason, run by the (unbiased) reference under "auto"; ordinary p stays on the kernels."""
    from lora_fast import triton_fn

    assert triton_fn.dropout_bias(0.1) < 1e-5 and triton_fn.dropout_bias(0.9) < 1e-4  # resolution 2^-16
    assert triton_fn.dropout_bias(0.99999) > 0.1
    w, b, a, bb = _params(16, 12, 2)
    x = torch.randn(5, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="too close to 1"):
        lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.99999, backend="triton")
    assert triton_fn.unsupported_reason(x, w, a, b, bb, dropout_p=0.5) is None
    assert "too close to 1" in triton_fn.unsupported_reason(x, w, a, b, bb, dropout_p=0.99999)
    assert triton_fn.dropout_bias(0.997) > 1e-3  # "auto" takes the reference path, its mask included
    xs = torch.randn(4000, 16, device=DEVICE)  # ~190 kept elements: the mask decides the output
    ref = [lora_linear(xs, w, b, a, bb, 1.0, dropout_p=0.997, seed=s, backend="reference") for s in (5, 6)]
    assert not torch.equal(ref[0], ref[1])
    assert torch.equal(lora_linear(xs, w, b, a, bb, 1.0, dropout_p=0.997, seed=5, backend="auto"), ref[0])


def test_fp32_precision_api_is_honoured():
    """torch's newer fp32_precision API must not break the path (reading the legacy flag after it raises)."""
    from lora_fast.kernels.launch import input_precision

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API (torch < 2.9); nothing to check here")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert input_precision(torch.float32) == "tf32"
        w, b, a, bb = _params(16, 12, 2)
        x = torch.randn(3, 16, device=DEVICE)
        y = lora_linear(x, w, b, a, bb, 1.0, backend="triton")
        assert_rel_close(y, lora_linear_ref(x, w, b, a, bb, 1.0, upcast=True), TF32_TOL, "tf32")
        matmul.fp32_precision = "ieee"
        assert input_precision(torch.float32) == "ieee"
    finally:
        matmul.fp32_precision = before


def test_torch_func_transforms_take_the_reference_path():
    """torch.func.grad and vmap (per-sample gradients) over a layer: "auto" computes them on the reference path
    (the kernels' Function does not support functorch), equal to the same layer on the reference backend;
    backend="triton" refuses with the reason."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layers = {b: LinearWithLoRA(nn.Linear(16, 8), rank=4, dropout=0.0, backend=b).to(DEVICE)
              for b in ("auto", "reference", "triton")}
    nn.init.normal_(layers["auto"].lora.lora_B)
    for other in ("reference", "triton"):
        layers[other].load_state_dict(layers["auto"].state_dict())
    params = {k: v.detach() for k, v in layers["auto"].named_parameters() if "lora" in k}
    x = torch.randn(5, 16, device=DEVICE)

    def per_sample(layer):
        loss = lambda p, xi: functional_call(layer, p, (xi[None],)).square().sum()  # noqa: E731
        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    got, ref = per_sample(layers["auto"]), per_sample(layers["reference"])
    for k in params:
        assert got[k].shape == (5, *params[k].shape)
        assert_rel_close(got[k], ref[k].double(), 1e-6, k)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        per_sample(layers["triton"])


@pytest.mark.parametrize("seed", [None, 5])
def test_torch_func_transforms_with_dropout(seed):
    """With dropout, torch.func works too (the reference path's mask is drawn from torch's generator, or from a
    Generator seeded with an explicit seed, never read from a wrapped tensor): vmap with randomness="different"
    gives each sample its own mask, grad equals autograd's on the reference path (where "auto" sends torch.func)
    with the same mask."""
    from torch.func import grad, vmap

    from lora_fast.functional import lora_linear

    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 8), rank=4, dropout=0.5).to(DEVICE).train()
    nn.init.normal_(layer.lora.lora_B)
    x = torch.randn(6, 16, device=DEVICE)
    w, b = layer.linear.weight, layer.linear.bias
    a, bb = layer.lora.lora_A.detach(), layer.lora.lora_B.detach()

    def out(a_, xi, backend=None):
        return lora_linear(xi, w, b, a_, bb, layer.scaling, 0.5, seed=seed, backend=backend)

    ys = vmap(lambda xi: out(a, xi), randomness="different")(x)
    assert ys.shape == (6, 8) and torch.isfinite(ys).all()
    if seed is None:  # a mask per sample: outputs differ from one shared mask's
        torch.manual_seed(1)
        y_same = vmap(lambda xi: out(a, xi), randomness="same")(x)
        torch.manual_seed(1)
        assert not torch.allclose(vmap(lambda xi: out(a, xi), randomness="different")(x), y_same)
    torch.manual_seed(3)
    g = grad(lambda a_: out(a_, x).square().sum())(a)
    torch.manual_seed(3)
    a_ref = a.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(out(a_ref, x, "reference").square().sum(), a_ref)  # where torch.func runs
    assert_rel_close(g, g_ref.double(), 1e-6, "grad with dropout")


def test_forward_mode_ad_takes_the_reference_path():
    """Dual tensors (torch.autograd.forward_ad): the kernels' Function has no jvp, so "auto" runs the reference,
    whose JVP equals the float64 one; backend="triton" refuses with the reason."""
    import torch.autograd.forward_ad as fwad

    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 12), rank=4, backend="auto").to(DEVICE)
    nn.init.normal_(layer.lora.lora_B)
    x, t = torch.randn(3, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE)
    with fwad.dual_level():
        y, jvp = fwad.unpack_dual(layer(fwad.make_dual(x, t)))
    w, a, bb = layer.weight.double(), layer.lora.lora_A.double(), layer.lora.lora_B.double()
    exact = t.double() @ (w + layer.lora.scaling * bb @ a).t()  # the layer is linear in x
    assert_rel_close(jvp, exact, FP32_TOL, "jvp")
    assert_rel_close(y, layer(x).double(), FP32_TOL, "primal")
    layer.backend = "triton"
    with fwad.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        layer(fwad.make_dual(x, t))


def test_global_backward_hooks_see_the_base_module_run():
    """A global full backward hook (nn.modules.module.register_module_full_backward_hook) must fire for the base
    Linear, as it does for a plain model: the layer then runs the base module, not the fused kernels."""
    seen = []
    layer = LinearWithLoRA(nn.Linear(4, 3), rank=2).to(DEVICE)
    assert layer.fusable()
    handle = nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: seen.append(type(m).__name__))
    try:
        assert not layer.fusable()
        layer(torch.randn(2, 4, device=DEVICE, requires_grad=True)).sum().backward()
    finally:
        handle.remove()
    assert "Linear" in seen and "LinearWithLoRA" in seen
    assert layer.fusable()


def test_kernels_missing_from_a_source_tree_are_named():
    """lora_fast imported from a source tree that is not installed has no lora_fast.kernels (only an install maps
    kernels/ there): the reason says so, and how to fix it, instead of "triton is not available" with triton
    installed; backend="triton" raises it, "auto" falls back to the reference, and on a GPU warns once (a silent
    slowdown otherwise). Run in a subprocess whose importer refuses lora_fast.kernels."""
    import os
    import subprocess
    import sys

    script = r'''
import importlib.abc, sys, warnings
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lora_fast.kernels" or name.startswith("lora_fast.kernels."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Refuse())
import torch
from lora_fast.functional import lora_linear
dev = "cuda" if torch.cuda.is_available() else "cpu"
x, w, a, b = (torch.randn(*s, device=dev) for s in ((4, 8), (6, 8), (2, 8), (6, 2)))
try:
    lora_linear(x, w, None, a, b, 1.0, backend="triton")
except RuntimeError as e:
    print("RAISED", e)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        y = lora_linear(x, w, None, a, b, 1.0, backend="auto")
print("WARNED", len([w for w in caught if "fused kernels cannot run" in str(w.message)]))
ref = x.double() @ w.double().T + (x.double() @ a.double().T) @ b.double().T
print("OK", ((y.double() - ref).norm() / ref.norm()).item() <= 1e-5)
'''
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "RAISED backend='triton' cannot run this case: lora_fast.kernels is not importable" in out, out
    assert "source tree that is not installed editable" in out and "`pip install -e .` there" in out
    assert "triton is not available" not in out
    assert f"WARNED {1 if HAS_CUDA else 0}" in out and "OK True" in out, out


def test_a_triton_too_old_for_the_kernels_takes_the_reference_path(monkeypatch):
    """triton < 3.4 cannot compile the kernels (compile_check with triton 3.0-3.3: names their source holds, None
    accumulators in jit helpers): with such a triton, "auto" takes the reference path — never a compile error on the
    first forward — backend="triton" names the version and the one needed, and the seeded reference mask does not
    ask triton for its mask either. The version test itself: releases and local builds, 3.10 after 3.4."""
    from lora_fast import functional, triton_fn

    assert triton_fn.version_tuple("3.4.0") == (3, 4) and triton_fn.version_tuple("3.5.0+git1a2b") == (3, 5)
    assert triton_fn.triton_too_old("3.10.1") is None and triton_fn.triton_too_old("3.4.0") is None
    assert triton_fn.triton_too_old(triton_fn.triton.__version__) is None  # the suite's own triton builds them
    monkeypatch.setattr(triton_fn, "TOO_OLD", triton_fn.triton_too_old("3.3.1"))
    torch.manual_seed(0)
    x, w, a, b = (torch.randn(*s, device=DEVICE) for s in ((5, 16), (12, 16), (4, 16), (12, 4)))
    with pytest.raises(RuntimeError, match=r"triton is too old \(3\.3\.1\): the fused kernels need triton >= 3\.4"):
        lora_linear(x, w, None, a, b, 0.5, backend="triton")
    y = lora_linear(x, w, None, a, b, 0.5, backend="auto")
    assert torch.equal(y, lora_linear(x, w, None, a, b, 0.5, backend="reference"))
    assert not functional.triton_mask_runs(x, 0.1)
    yd = lora_linear(x, w, None, a, b, 0.5, dropout_p=0.5, seed=3, backend="auto")
    assert torch.equal(yd, lora_linear(x, w, None, a, b, 0.5, dropout_p=0.5, seed=3, backend="reference"))


def test_autocast_takes_base_tensors_in_other_float_dtypes():
    """Under autocast F.linear casts x, W₀ and b to the autocast dtype whatever their float dtypes (a half-cast
    base with an fp32 bias, or the other way round): the Triton path takes those too rather than refusing, and
    computes what the autocast reference computes (within 1e-2 of fp64, at most twice PyTorch's own error)."""
    half = torch.float16 if DEVICE == "cpu" else torch.bfloat16  # interpreter: bf16 dots are wrong
    x = torch.randn(2, 9, 40, device=DEVICE)
    w, b, a, bb = _params(40, 36, 8)
    for w_, b_ in ((w.to(half), b), (w, b.to(half))):
        with torch.autocast(DEVICE, dtype=half):
            y = lora_linear(x, w_, b_, a, bb, 2.0, backend="triton")
            yr = lora_linear_ref(x, w_, b_, a, bb, 2.0)
        y64 = lora_linear_ref(x.double(), w_.double(), b_.double(), a.double(), bb.double(), 2.0)
        err, torch_err = rel_err(y, y64), rel_err(yr, y64)
        assert y.dtype == half
        assert_half_precision(err, torch_err, f"y, {w_.dtype} weight")


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's bf16 limit; on a GPU bf16 autocast runs the kernels")
def test_bf16_autocast_on_the_interpreter_takes_the_reference_path():
    """fp32 tensors under bf16 autocast compute in bf16, which the interpreter's tl.dot gets wrong: backend="triton"
    refuses (it would return garbage), "auto" gives the reference's bf16 result."""
    x = torch.randn(5, 16, device=DEVICE)
    w, b, a, bb = _params(16, 12, 2)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="bf16"):
            lora_linear(x, w, b, a, bb, 1.0, backend="triton")
        y = lora_linear(x, w, b, a, bb, 1.0, backend="auto")
        yr = lora_linear_ref(x, w, b, a, bb, 1.0)
    assert y.dtype == torch.bfloat16 and torch.equal(y, yr)


def test_in_features_zero_takes_the_reference_path():
    """in_features 0 (an empty input): the kernels are not launched on it (backend="triton" says why); "auto"
    gives y = b in every row, an empty dx and dA, and dB = 0."""
    x = torch.randn(5, 0, device=DEVICE, requires_grad=True)
    w, b, a, bb = _params(0, 6, 2)
    with pytest.raises(RuntimeError, match="in_features is 0"):
        lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    y = lora_linear(x, w, b, a, bb, 1.0, backend="auto")
    assert torch.equal(y, b.expand(5, 6))
    dx, da, db = torch.autograd.grad(y, (x, a, bb), torch.randn_like(y))
    assert dx.shape == x.shape and da.shape == a.shape and torch.equal(db, torch.zeros_like(bb))


# ------------------------------------------------------------------------------ the custom op behind torch.compile
@pytest.mark.parametrize("backend", ["reference", "auto"])  # auto: the fused kernels behind the op
def test_op_gradients_and_dx_only_when_x_needs_it(backend, monkeypatch):
    """``torch.ops.lora_fast.lora_linear`` (what compiled code calls) with dropout: y and every gradient equal eager
    ``lora_linear``'s for the same seed and backend (the same mask), with x, A or B requiring grad or not; the
    backward op is asked for exactly the gradients needed (a frozen first layer's dx, frozen adapters' dA/dB are
    never computed); its outputs have the shapes its fake implementation promises, on both paths (the kernels'
    path included)."""
    from lora_fast import ops
    from lora_fast.ops import lora_linear_op

    asked = []
    real_bwd = ops._impl_bwd
    monkeypatch.setattr(ops, "_impl_bwd", lambda *args: asked.append(args[-1]) or real_bwd(*args))
    w, b, a0, b0 = _params(24, 20, 4)
    cases = [(False, True, True), (True, True, True), (True, False, False), (False, False, True), (True, True, False)]
    for needs in cases:
        a, bb = (t.detach().requires_grad_(n) for t, n in zip((a0, b0), needs[1:], strict=True))
        x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=needs[0])
        y = lora_linear_op(x, w, b, a, bb, 0.5, dropout_p=0.3, seed=11, backend=backend)
        ye = lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.3, seed=11, backend=backend)
        dy = torch.randn_like(y)
        wrt, names = zip(*[(t, n) for t, n, need in zip((x, a, bb), ("dx", "dA", "dB"), needs, strict=True) if need],
                         strict=True)
        for name, g, ge in zip(("y", *names), (y, *torch.autograd.grad(y, wrt, dy)),
                               (ye, *torch.autograd.grad(ye, wrt, dy)), strict=True):
            assert_rel_close(g, ge.double(), FP32_TOL, f"{name} (x, A, B require grad: {needs})")
    assert asked == cases
    x2 = torch.randn(14, 24, device=DEVICE)
    seed = torch.tensor([11], device=DEVICE)
    with torch.no_grad():
        _, xa = torch.ops.lora_fast.lora_linear(x2, w, b, a0, b0, 0.5, 0.3, seed, False, backend)
    dy = torch.randn(14, 20, device=DEVICE)
    full = torch.ops.lora_fast.lora_linear_backward(dy, x2, w, a0.detach(), b0.detach(), xa, 0.5, 0.3, seed, False,
                                                    backend, True, True, True)
    for needs in cases:  # real outputs against the fake's shapes and dtypes; a gradient not asked for is empty
        args = (dy, x2, w, a0.detach(), b0.detach(), xa, 0.5, 0.3, seed, False, backend, *needs)
        torch.library.opcheck(torch.ops.lora_fast.lora_linear_backward.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        for name, g, g_full, need in zip(("dx", "dA", "dB"), torch.ops.lora_fast.lora_linear_backward(*args), full,
                                         needs, strict=True):
            assert torch.equal(g, g_full) if need else g.numel() == 0, f"{name} with needs {needs}"


def test_op_xa_output_takes_no_gradient():
    """The op's second output (xa, saved for backward) is not a result: it does not require grad, so a loss built on
    it is refused instead of silently getting no gradient through it."""
    w, b, a, bb = _params(24, 20, 4)
    x = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    y, xa = torch.ops.lora_fast.lora_linear(x, w, b, a, bb, 0.5, 0.0, None, False, "auto")
    assert y.requires_grad and not xa.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(xa.sum(), a)
