"""Tests written against mutants that survived the rest of the suite (round 5 of mutation testing: the core
numerical path — ``layer.py``, ``ops.py``, ``functional.py``, ``triton_fn.py``, ``reference.py`` and ``rng.py``).
Each pins a documented property, against PEFT or a float64 derivation where there is one, and names the mutation it
kills. Tiny shapes only: the tests that run the kernels do so through triton's interpreter on a CPU."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_fast import LinearWithLoRA
from lora_fast.layer import LoRALayer
from tests.utils import MISSING, rel_err

try:  # the kernels through triton's interpreter (CPU) or compiled (GPU), for the tests marked with `interpret`
    from tests.triton_interpret import DEVICE, interpret  # noqa: F401  (fixture)
except ImportError:  # pragma: no cover (no triton: those tests skip)
    DEVICE, interpret = "cpu", None

needs_triton = pytest.mark.skipif(interpret is None, reason=MISSING["triton"])


class _One(nn.Module):
    def __init__(self, k=16, n=8, dtype=None):
        super().__init__()
        self.lin = nn.Linear(k, n, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def _random_adapter(layer: LinearWithLoRA) -> LinearWithLoRA:
    """A trained-looking adapter: B non-zero (a fresh one is zero, which hides every term)."""
    with torch.no_grad():
        layer.lora.lora_B.normal_()
    return layer


def _expected64(layer: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor:
    """y = x·W₀ᵀ + b + s·x·Aᵀ·Bᵀ in float64, from the layer's tensors (Conv1D's W₀ is (in, out))."""
    w = layer.linear.weight.detach().double()
    w = w.t() if layer.fan_in_fan_out else w
    b = None if layer.linear.bias is None else layer.linear.bias.detach().double()
    a, bb = layer.lora.lora_A.detach().double(), layer.lora.lora_B.detach().double()
    x = x.detach().double()
    return F.linear(x, w, b) + layer.scaling * (x @ a.t() @ bb.t())


# ------------------------------------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize("flag", [False, np.bool_(False)])
def test_a_bool_dropout_is_refused(flag):
    """``_check_hparams``: "bools ... are not" accepted — ``dropout=False`` is a mistake (a flag where a
    probability belongs), refused as ``dropout=True`` is, on both modules and on the ``dropout`` setter.
    Kills ``_check_dropout``: the ``isinstance(dropout, (bool, np.bool_))`` test dropped."""
    with pytest.raises(ValueError, match="dropout"):
        LoRALayer(4, 4, rank=2, dropout=flag)
    with pytest.raises(ValueError, match="dropout"):
        LinearWithLoRA(nn.Linear(4, 4), rank=2, dropout=flag)
    layer = LoRALayer(4, 4, rank=2)
    with pytest.raises(ValueError, match="dropout"):
        layer.dropout = flag


# ------------------------------------------------------------------------------------------------ fp16 vs PEFT
@pytest.mark.parametrize("hooked", [False, True])
def test_fp16_base_output_is_peft_s_bit_for_bit(hooked):
    """A fp16 base with fp32 adapters, outside autocast: the LoRA term is computed in fp32 and added to the fp16
    base output in fp32, rounded to fp16 once — PEFT's ``result + lora_B(lora_A(x))·s`` then ``.to(fp16)``. So
    the layer's output equals PEFT's bit for bit, on the fused entry (CPU: the reference path, ``lora_linear_ref``)
    and on the unfused one (a hook on the base: ``base(x) + lora(x, cast_back=False)``).
    Kills ``lora_linear_ref``: the term rounded to y's dtype before the sum (``y + term.to(y.dtype)``); and
    ``LinearWithLoRA.forward``'s unfused path: ``cast_back=False`` dropped, or ``y + term.to(y.dtype)``."""
    peft = pytest.importorskip("peft", reason=MISSING["peft"])
    torch.manual_seed(0)
    base = _One(32, 24).half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    pl = theirs.base_model.model.lin
    with torch.no_grad():
        pl.lora_B["default"].weight.normal_()
    assert pl.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    layer = LinearWithLoRA(copy.deepcopy(base.lin), rank=4, alpha=8.0, backend="reference")
    with torch.no_grad():
        layer.lora.lora_A.copy_(pl.lora_A["default"].weight)
        layer.lora.lora_B.copy_(pl.lora_B["default"].weight)
    if hooked:
        layer.linear.register_forward_hook(lambda m, i, o: None)
        assert not layer.fusable()
    x = torch.randn(64, 32).half()
    with torch.no_grad():
        ours, want = layer(x), theirs(x)
    assert ours.dtype == want.dtype == torch.float16
    assert torch.equal(ours, want), f"{(ours != want).sum().item()} of {ours.numel()} elements differ from PEFT's"


# ------------------------------------------------------------------------------------------------ hooks see the base
def test_a_backward_pre_hook_on_the_base_runs():
    """``calls_more_than_forward``: full backward (pre-)hooks on the base make the layer call the base, so that the
    hook sees its gradient, as under PEFT (which always calls it); the fused entry never runs the module.
    Kills ``calls_more_than_forward``: ``module._backward_pre_hooks`` left out."""
    layer = _random_adapter(LinearWithLoRA(nn.Linear(8, 6), rank=2))
    seen = []
    layer.linear.register_full_backward_pre_hook(lambda m, grad_out: seen.append(grad_out[0].detach().clone()))
    assert not layer.fusable()
    x = torch.randn(3, 8, requires_grad=True)
    dy = torch.randn(3, 6)
    layer(x).backward(dy)
    assert len(seen) == 1 and torch.equal(seen[0], dy)  # the base's output gradient is the layer's
    want = dy.double() @ (layer.weight.double() + layer.lora.delta_weight().double())  # dx = dy·(W₀ + ΔW)
    assert rel_err(x.grad, want) < 1e-6


def test_a_global_backward_hook_sees_the_base():
    """``_global_hooks``: a global full backward hook (``register_module_full_backward_hook``) must see the base
    module run, so the layer calls it instead of the fused entry.
    Kills ``_global_hooks``: ``_global_backward_hooks`` left out of the names read."""
    layer = _random_adapter(LinearWithLoRA(nn.Linear(8, 6), rank=2))
    seen = []
    handle = nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: seen.append(m))
    try:
        assert not layer.fusable()
        x = torch.randn(3, 8, requires_grad=True)
        layer(x).sum().backward()
    finally:
        handle.remove()
    assert any(m is layer.linear for m in seen)
    assert rel_err(x.grad, torch.ones(3, 6).double() @ (layer.weight.double() + layer.lora.delta_weight())) < 1e-6


# ------------------------------------------------------------------------------------------------ merge bookkeeping
def test_merging_a_merged_layer_changes_nothing():
    """``merge_weights`` on a merged layer "warns and does nothing": W₀ + ΔW stays, and so does the record of what
    was added — after an update of the adapter while merged, unmerging still subtracts the ΔW that was merged and
    gives W₀ back (subtracting the new ΔW would leave W₀ + ΔW_old − ΔW_new in the base).
    Kills ``merge_weights``: the ``return`` after the warning dropped (the record overwritten with the new A, B)."""
    layer = _random_adapter(LinearWithLoRA(nn.Linear(8, 6), rank=2))
    w0 = layer.weight.detach().double().clone()
    want = w0 + layer.lora.delta_weight().double()
    layer.merge_weights()
    with torch.no_grad():
        layer.lora.lora_B.add_(1.0)  # an optimizer step while merged
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge_weights()
    assert rel_err(layer.weight, want) < 1e-6
    layer.unmerge_weights()
    assert rel_err(layer.weight, w0) < 1e-6


def test_merged_weight_of_a_merged_layer_is_a_copy():
    """``merged_weight``: "a new tensor; W₀ is not touched" — on a merged layer too ("a copy of the weight"): a
    caller writing into it (a quantiser, an export) leaves the layer alone.
    Kills ``merged_weight``: ``w.detach()`` returned without ``.clone()``."""
    layer = _random_adapter(LinearWithLoRA(nn.Linear(8, 6), rank=2))
    layer.merge_weights()
    before = layer.weight.detach().clone()
    got = layer.merged_weight()
    assert torch.equal(got, before)
    got.zero_()
    assert torch.equal(layer.weight, before)


def test_a_float64_base_merges_in_float64_with_float32_adapters():
    """``merged_weight``: ΔW "computed in fp32 — fp64 for a fp64 W₀": a fp64 base whose adapters are fp32 (cast on
    their own) merges in fp64, so W₀ keeps its fp64 digits (through fp32, ~1e-8 relative would be lost).
    Kills ``merged_weight``: ``dtype=w.dtype`` not passed to ``lora_delta_weight`` (ΔW, and W₀ with it, in fp32)."""
    layer = _random_adapter(LinearWithLoRA(nn.Linear(8, 6, dtype=torch.float64), rank=2))
    layer.lora.float()
    assert layer.lora.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.float64
    w0 = layer.weight.detach().clone()
    want = w0 + layer.scaling * (layer.lora.lora_B.detach().double() @ layer.lora.lora_A.detach().double())
    got = layer.merged_weight()
    assert got.dtype == torch.float64 and rel_err(got, want) < 1e-14
    layer.merge_weights()
    layer.unmerge_weights()
    assert rel_err(layer.weight, w0) < 1e-14


# ------------------------------------------------------------------------------------------------ rng
@pytest.mark.parametrize("p", [1.0, -0.25, 1.5])
def test_keep_threshold_refuses_p_outside_0_1(p):
    """``rng.keep_threshold``: p in [0, 1). p = 1 has no keep probability the capped threshold could give (it would
    keep 1/2¹⁶ of the elements, each scaled by 1/(1 − p) = inf).
    Kills ``keep_threshold``: the range test widened to ``0 <= p <= 1``."""
    from lora_fast.rng import keep_mask_numpy, keep_threshold

    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keep_threshold(p)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keep_mask_numpy(1, 2, 8, p)


# ------------------------------------------------------------------------------------------------ seeds
@pytest.mark.parametrize("seed", [2**63, True, False, "two elements"])
def test_bad_seeds_are_refused_on_every_entry(seed):
    """``check_seed``: a seed is None, an int in [0, 2**63) (a bool is not one), or a 1-element int64 tensor —
    refused with a ValueError by ``lora_linear`` and by the op's entry, also when dropout is off (no mask drawn).
    Kills ``check_seed``: the upper bound widened to ``<= 2**63``; the ``isinstance(seed, bool)`` test dropped;
    ``seed.numel() != 1`` dropped; ``lora_linear_op``: its own ``check_seed`` call dropped (the seed then checked
    only where dropout draws a mask)."""
    from lora_fast.functional import lora_linear
    from lora_fast.ops import lora_linear_op

    seed = torch.tensor([1, 2]) if seed == "two elements" else seed
    x, w, a, b = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    for call in (lambda: lora_linear(x, w, None, a, b, 1.0, dropout_p=0.5, seed=seed, backend="reference"),
                 lambda: lora_linear(x, w, None, a, b, 1.0, dropout_p=0.0, seed=seed, backend="reference"),
                 lambda: lora_linear_op(x, w, None, a, b, 1.0, dropout_p=0.5, seed=seed, backend="reference"),
                 lambda: lora_linear_op(x, w, None, a, b, 1.0, dropout_p=0.0, seed=seed, backend="reference")):
        with pytest.raises(ValueError, match="seed"):
            call()


def _generator_mask(seed: int, rows: int, cols: int, p: float) -> torch.Tensor:
    """The documented reference-path mask for a seed below 2**32: ``torch.rand((M, K)) >= p`` from a CPU
    ``torch.Generator`` seeded with it."""
    return torch.rand((rows, cols), generator=torch.Generator().manual_seed(seed)) >= p


def test_cpu_seeds_differing_in_high_bits_give_different_masks():
    """``seeded_keep_mask`` on the CPU reference path: mt19937 keeps a seed's low 32 bits only, so a seed of 2**32
    or more adds a second stream from its high bits — seeds s and s + 2**32 give different masks, and so do two seeds
    sharing their high bits; below 2**32 the mask is the generator's own. Checked through ``lora_linear``: its
    output with the mask equals the reference's with that mask given explicitly.
    Kills ``seeded_keep_mask``: the high-bits stream dropped (s and s + 2**32 alike), or used alone (s and s + 1
    alike above 2**32)."""
    from lora_fast.functional import lora_linear, seeded_keep_mask
    from lora_fast.reference import lora_linear_ref

    x = torch.randn(16, 32)
    masks = {s: seeded_keep_mask(s, x, 0.5, "reference") for s in (5, 6, 2**32 + 5, 2**32 + 6, 2**40 + 5)}
    assert torch.equal(masks[5], _generator_mask(5, 16, 32, 0.5))
    for s, m in masks.items():
        assert m.shape == x.shape and 0.35 < m.float().mean() < 0.65, s
        assert all(not torch.equal(m, other) for t, other in masks.items() if t != s), s
    w, a, b = torch.randn(8, 32), torch.randn(2, 32), torch.randn(8, 2)
    y = lora_linear(x, w, None, a, b, 1.0, dropout_p=0.5, seed=2**32 + 5, backend="reference")
    ref = lora_linear_ref(x.double(), w, None, a, b, 1.0, dropout_p=0.5, keep_mask=masks[2**32 + 5], upcast=True)
    assert rel_err(y, ref) < 1e-6


# ------------------------------------------------------------------------------------------------ checks on input
@pytest.mark.parametrize("bad, word", [("bias", "bias must be"), ("lora_B", "lora_B must be")])
def test_shapes_that_broadcast_are_refused(bad, word):
    """``check_shapes``: a bias of shape (1,) or a lora_B of shape (1, r) broadcasts in ``F.linear`` (a silently
    wrong sum): each is refused by name, on the eager entry and on the op's.
    Kills ``check_shapes``: the bias test dropped; the lora_B test dropped."""
    from lora_fast.functional import lora_linear
    from lora_fast.ops import lora_linear_op

    x, w, bias, a, b = torch.randn(3, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 8), torch.randn(6, 2)
    if bad == "bias":
        bias = torch.randn(1)
    else:
        b = torch.randn(1, 2)
    for entry in (lora_linear, lora_linear_op):
        with pytest.raises(ValueError, match=word):
            entry(x, w, bias, a, b, 1.0, backend="reference")


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_eval_mode_runs_the_kernels_whatever_the_dropout_p():
    """Dropout is "applied only when ``training``": in eval mode a p the kernels refuse (too close to 1 for their
    16-bit threshold) plays no part, so ``backend="triton"`` runs — and gives the base plus the undropped term.
    Kills ``lora_linear``: the dispatch's reason computed with ``dropout_p`` instead of ``dropout_p if training
    else 0.0`` (backend="triton" then raises in eval mode)."""
    from lora_fast.functional import lora_linear

    x = torch.randn(5, 16, device=DEVICE)
    w, a, b = (torch.randn(s, device=DEVICE) for s in ((6, 16), (2, 16), (6, 2)))
    y = lora_linear(x, w, None, a, b, 0.5, dropout_p=0.9995, training=False, backend="triton")
    want = x.double() @ (w.double() + 0.5 * b.double() @ a.double()).t()
    assert rel_err(y, want) < 1e-5


def test_an_integer_input_is_refused_even_with_an_integer_base():
    """``check_float_input``: an integer x would cast the fp32 adapters to integers (|A|, |B| < 1 truncate to 0) and
    return the base alone. An integer base weight (which ``F.linear`` computes with) does not make it right: refused
    with a TypeError on the eager entry, as on the op's.
    Kills ``_check_call``: ``check_float_input`` left out."""
    from lora_fast.functional import lora_linear
    from lora_fast.ops import lora_linear_op

    x, w = torch.randint(-3, 3, (3, 8)), torch.randint(-3, 3, (6, 8))
    a, b = torch.rand(2, 8) - 0.5, torch.rand(6, 2) - 0.5
    for entry in (lora_linear, lora_linear_op):
        with pytest.raises(TypeError, match="floating-point input"):
            entry(x, w, None, a, b, 1.0, backend="reference")


@pytest.mark.parametrize("p", [1.0, -0.1])
def test_dropout_p_outside_0_1_is_refused(p):
    """``check_dropout_p``: p in [0, 1) on every entry; p = 1 would scale the kept elements by 1/(1 − p) = inf.
    Kills ``check_dropout_p``: the range widened to ``<= 1``."""
    from lora_fast.functional import lora_linear
    from lora_fast.ops import lora_linear_op

    x, w, a, b = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    for entry in (lora_linear, lora_linear_op):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            entry(x, w, None, a, b, 1.0, dropout_p=p, seed=1, backend="reference")


@pytest.mark.parametrize("scaling", ["requires grad", "nan"])
def test_the_op_refuses_a_scaling_tensor_it_would_read_as_a_wrong_float(scaling):
    """``check_float_scaling``: the op takes ``scaling`` as a float, so a tensor requiring grad would lose its
    gradient without a word, and a NaN tensor would reach the kernels (which split s into two finite factors):
    both refused by the op's entry, as by the eager fused path.
    Kills ``lora_linear_op``: its ``check_float_scaling`` call dropped."""
    from lora_fast.ops import lora_linear_op

    s = torch.tensor(2.0, requires_grad=True) if scaling == "requires grad" else torch.tensor(float("nan"))
    x, w, a, b = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="requires grad" if scaling == "requires grad" else "finite"):
        lora_linear_op(x, w, None, a, b, s, backend="reference")


@pytest.mark.parametrize("where", ["bias", "lora_A"])
def test_a_tensor_left_on_meta_is_named(where):
    """``check_devices``: every tensor on x's device, on every path — ``F.linear`` of a CPU input with a meta
    operand returns uninitialised memory without an error (a layer built on meta and loaded in part). The error
    names the tensor.
    Kills ``device_mismatch``: the bias left out of the tensors compared; ``_check_call``: ``check_devices`` left
    out."""
    from lora_fast.functional import lora_linear

    t = {"x": torch.randn(3, 8), "w": torch.randn(6, 8), "bias": torch.randn(6), "lora_A": torch.randn(2, 8),
         "b": torch.randn(6, 2)}
    t[where] = t[where].to("meta")
    with pytest.raises(RuntimeError, match=f"x is on cpu but {where} on meta"):
        lora_linear(t["x"], t["w"], t["bias"], t["lora_A"], t["b"], 1.0, backend="reference")


# ------------------------------------------------------------------------------------------------ the Triton path
def _triton_case(M=5, K=16, N=6, r=2):
    x = torch.randn(M, K, device=DEVICE)
    w, bias = torch.randn(N, K, device=DEVICE) / K**0.5, torch.randn(N, device=DEVICE)
    a, b = torch.randn(r, K, device=DEVICE) / K**0.5, torch.randn(N, r, device=DEVICE)
    return x, w, bias, a, b


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_a_trainable_bias_alone_gets_its_gradient():
    """``unsupported_reason``: a base bias that requires grad (the base weight frozen: BitFit-style training beside
    the adapter) sends the call to the reference path, which differentiates it: db = Σ_rows dy.
    Kills ``unsupported_reason``: the bias's ``requires_grad`` left out of the veto (the kernels return no db)."""
    from lora_fast.functional import lora_linear

    x, w, bias, a, b = _triton_case()
    bias.requires_grad_()
    a.requires_grad_()
    y = lora_linear(x, w, bias, a, b, 0.5, backend="auto")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert bias.grad is not None and rel_err(bias.grad, dy.double().sum(0)) < 1e-6


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_reentrant_checkpoint_with_a_trainable_base_and_dropout_recomputes_the_same_mask():
    """``unsupported_reason``: with dropout on, a trainable base weight sends the call to the reference path under
    no_grad too, so that a reentrant checkpoint's forward (no_grad) and its recompute (grad on) take one path and
    one mask: the checkpointed output and gradients equal the plain call's under the same RNG state.
    Kills ``unsupported_reason``: the veto applied only with grad enabled (the forward's kernels mask, the
    recompute's ``torch.rand`` mask)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = _random_adapter(LinearWithLoRA(nn.Linear(16, 6, device=DEVICE), rank=2, dropout=0.3))
    layer.linear.weight.requires_grad_()
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)  # reentrant checkpointing needs an input that does
    runs = []
    for ckpt in (False, True):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(1)
        y = checkpoint(layer, x, use_reentrant=True) if ckpt else layer(x)
        y.sum().backward()
        runs.append((y.detach(), x.grad, layer.linear.weight.grad.clone(), layer.lora.lora_A.grad.clone()))
    for name, plain, ck in zip(("y", "dx", "dW", "dA"), *runs, strict=True):
        assert rel_err(ck, plain) < 1e-6, name


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_the_triton_entry_refuses_a_bias_in_another_dtype():
    """``unsupported_reason``: outside autocast, a bias in another dtype than x and W₀ is refused (``F.linear``
    raises there; the kernels would cast it silently) — on ``lora_linear_triton``'s own check too.
    Kills ``unsupported_reason``: the ``base_dtype_mismatch`` reason not returned."""
    from lora_fast.triton_fn import lora_linear_triton

    x, w, bias, a, b = _triton_case()
    with pytest.raises(RuntimeError, match="the base bias is torch.float16"):
        lora_linear_triton(x, w, bias.half(), a, b, 0.5)


# ------------------------------------------------------------------------------------------------ bases refused
def test_a_base_under_an_accelerate_hook_is_refused_with_its_weight_on_a_real_device():
    """``_check_base``: a base carrying accelerate's hook (``_hf_hook``: ``dispatch_model`` with a device map,
    ``cpu_offload``) is refused even when its weight is materialised — the hook moves the base's inputs and
    weights at each call, which the adapter built beside it does not follow.
    Kills ``_check_base``: the ``hasattr(base, "_hf_hook")`` test dropped (only a meta weight refused)."""
    accelerate = pytest.importorskip("accelerate", reason=MISSING["accelerate"])
    from accelerate.hooks import AlignDevicesHook

    lin = nn.Linear(8, 6)
    accelerate.hooks.add_hook_to_module(lin, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    assert lin.weight.device.type == "cpu"
    with pytest.raises(ValueError, match="offloaded or on the meta device"):
        LinearWithLoRA(lin, rank=2)
