"""The Triton path: ``LoRALinearFn`` (autograd Function over the fused kernels), ``lora_linear_triton`` and
``unsupported_reason``. Importing this module raises ImportError when triton is missing.

Math (x (M, K) after flattening leading dims; keep is the regenerated dropout mask, p its probability):

    forward   xa = (x ⊙ keep)·Aᵀ/(1−p)                  (M, r)   saved, fp32
              y  = x·W₀ᵀ + b + s·xa·Bᵀ                   (M, N)
    backward  gb = dy·B                                  (M, r)
              dx = dy·W₀ + s/(1−p)·keep ⊙ (gb·A)         (M, K)   skipped when x needs no grad
              dA = s/(1−p)·gbᵀ·(x ⊙ keep)                (r, K)
              dB = s·dyᵀ·xa                              (N, r)
              no gradient for the frozen W₀ and b.

Saved for backward: x, xa (4·M·r bytes), the 8-byte seed tensor, and W₀, A, B (parameters, not activations).
PEFT's layer keeps the dropped copy of x as well (its nn.Dropout output), i.e. about twice the activations.

Autocast: handled here rather than with ``torch.amp.custom_fwd`` (whose device type is fixed at decoration, while
this path serves CUDA and interpreter CPU tensors alike): under autocast x, W₀ and b are cast to the autocast
dtype with ordinary (differentiable) casts, A and B stay in their dtype (fp32) and are cast tile by tile inside
the kernels, and dA, dB come back in the parameters' dtype.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here is how functional.py learns that triton is missing)

from lora_fast.functional import (
    TRITON_TOO_OLD,
    autocast_inputs,
    base_dtype_mismatch,
    device_mismatch,
    functorch_active,
    has_tangent,
    seed_tensor,
)
from lora_fast.kernels import dropout as _drop
from lora_fast.kernels import launch as _launch
from lora_fast.kernels import lora_bwd as _bwd
from lora_fast.kernels import lora_fwd as _fwd
from lora_fast.reference import autocast_enabled
from lora_fast.rng import keep_threshold

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The oldest triton the kernels compile with. Before 3.4 triton's JIT fails on names their source holds
# (``tl.make_tensor_descriptor``, looked up even in a branch a constexpr switches off) and on None accumulators passed
# through jit helpers; 3.4 and 3.5 lack ``tl.mul``, for which the dropout RNG has a uint64 body. Found by compiling
# every kernel for sm_90 without a GPU (``benchmarks.compile_check``) with triton 3.0 to 3.6; run on a GPU: 3.6 only.
TRITON_MIN = (3, 4)


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``3.4.0`` or ``3.5.0+git1234``."""
    parts = [int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit()]
    return tuple(parts + [0] * (2 - len(parts)))


def triton_too_old(version: str | None = None) -> str | None:
    """Why this triton (``triton.__version__`` by default) cannot build the kernels, or None."""
    version = triton.__version__ if version is None else version
    if version_tuple(version) < TRITON_MIN:
        return (f"{TRITON_TOO_OLD} ({version}): the fused kernels need triton >= {'.'.join(map(str, TRITON_MIN))}"
                " (torch >= 2.8 ships it)")
    return None


TOO_OLD = triton_too_old()  # read once: unsupported_reason runs on every call


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# Largest relative bias of E[dropout(x)] the kernels' 16-bit keep threshold may introduce (lora_fast.rng): 2⁻¹⁷/(1−p)
# is 7.6e-5 at p = 0.9; only p within ~1 % of 1 exceeds this and runs on the reference path instead.
MAX_DROPOUT_BIAS = 1e-3


def dropout_bias(p: float) -> float:
    """|E[dropout(x)]/x − 1| on the kernels' path: keep probability 1 − t/2¹⁶ (t = ``keep_threshold(p)``), scale
    1/(1 − p)."""
    return abs((1.0 - keep_threshold(p) / 2.0**16) / (1.0 - p) - 1.0)


def unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, bias: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None, dropout_p: float = 0.0,
) -> str | None:
    """Why the fused kernels cannot run this case (a sentence), or None when they can.

    Besides device/dtype/rank limits, a base weight or bias that requires grad is refused: the kernels treat W₀ and
    b as frozen and would silently return no gradient for them (the reference path differentiates them) — under
    no_grad too when dropout is on, so that a reentrant checkpoint's forward and recompute take the same path. So are a
    bias in another dtype than x and W₀ outside autocast (PyTorch's F.linear raises there; the kernels would cast
    it) and a dropout probability so close to 1 that the 16-bit keep threshold would bias E[dropout(x)] by more
    than ``MAX_DROPOUT_BIAS``.
    """
    if TOO_OLD is not None:
        return TOO_OLD
    if functorch_active():
        return ("torch.func transforms (grad, vmap, jacrev, ...) are active: the fused kernels' autograd Function "
                "does not support them")
    if has_tangent(x, weight, lora_A, bias, lora_B):
        return "forward-mode AD (dual tensors) is active: the fused kernels' autograd Function has no jvp"
    dev = x.device
    if dev.type == "cpu":
        if not _launch.interpreting():
            return "CPU tensors run on the Triton path only with TRITON_INTERPRET=1"
        if not _launch.kernels_interpreted(_fwd._lora_fwd_kernel):
            return "TRITON_INTERPRET=1 was set after lora_fast.kernels was imported (set it before)"
    elif dev.type != "cuda":
        return f"the Triton kernels run on CUDA tensors, got a {dev.type} tensor"
    off = device_mismatch(x, weight, bias, lora_A, lora_B)
    if off is not None:
        return off
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
        return f"x ({x.dtype}) and weight ({weight.dtype}) must be fp32, fp16 or bf16"
    dtype = _compute_dtype(x)
    if dtype not in SUPPORTED_DTYPES:
        return f"compute dtype {dtype} is not one of {SUPPORTED_DTYPES}"
    mismatch = base_dtype_mismatch(x, weight, bias)
    if mismatch is not None:
        return mismatch
    if dropout_p > 0.0 and (bias_p := dropout_bias(dropout_p)) > MAX_DROPOUT_BIAS:
        return (f"dropout p={dropout_p} is too close to 1 for the kernels' 16-bit keep threshold (E[dropout(x)] "
                f"off by {bias_p:.1e})")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} is not supported (fp32/fp16/bf16)"
    if dtype == torch.bfloat16 and dev.type == "cpu":
        return "bf16 is not supported under TRITON_INTERPRET (the interpreter's bf16 tl.dot is wrong); use a GPU"
    if lora_A.shape[0] > _launch.MAX_RANK:
        return f"rank {lora_A.shape[0]} > {_launch.MAX_RANK}"
    if x.shape[-1] == 0:
        return "in_features is 0"
    # With dropout the choice must not depend on grad mode: reentrant checkpointing runs the forward under no_grad
    # and recomputes it with grad on, and the two paths draw their masks differently (gradients 40–90 % off).
    if (torch.is_grad_enabled() or dropout_p > 0.0) and (
            weight.requires_grad or (bias is not None and bias.requires_grad)):
        return "the base weight/bias requires grad, but the kernels treat them as frozen (no gradient for them)"
    return None


class LoRALinearFn(torch.autograd.Function):
    """y = x·W₀ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ on 2-D x with the fused kernels (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
        y, xa = _fwd.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out,
                                     write_xa=ctx.needs_input_grad[4])
        ctx.save_for_backward(x, xa, seed, weight, lora_A, lora_B)
        ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out = scaling, dropout_p, fan_in_fan_out
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, seed, weight, lora_A, lora_B = ctx.saved_tensors
        needs_dx, needs_dA, needs_dB = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if not (needs_dx or needs_dA or needs_dB):
            return (None,) * 9
        if torch.is_grad_enabled() or _batched(dy):  # create_graph=True (a gradient penalty, ...), or a batch of
            # upstream gradients (is_grads_batched: the vectorized jacobian), which the kernels cannot read: aten ops
            return _differentiable_backward(ctx, dy, x, seed, weight, lora_A, lora_B)
        dx, dA, dB = _bwd.lora_linear_bwd(
            dy, x, xa, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, ctx.fan_in_fan_out,
            needs_dx=needs_dx, needs_dA=needs_dA, needs_dB=needs_dB,
        )
        return dx, None, None, dA, dB, None, None, None, None


def _batched(dy: torch.Tensor) -> bool:
    """Whether ``dy`` is a batch of upstream gradients (``autograd.grad(..., is_grads_batched=True)``, as
    ``autograd.functional.jacobian(vectorize=True)`` calls it): a legacy vmap tensor, with no storage to launch
    kernels on. torch.func's transforms are not active there, so ``functorch_active`` does not see it."""
    probe = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return bool(probe is not None and probe(dy))


def _differentiable_backward(ctx, dy, x, seed, weight, lora_A, lora_B):
    """Under ``create_graph=True`` (a gradient penalty, ...) the gradients must themselves be differentiable: they
    are taken through the reference forward (``lora_linear_ref``, the test oracle) on the saved inputs with the
    kernels' own keep-mask regenerated from the seed, so they equal the kernels' to rounding. The bias needs no
    gradient (frozen); the forward is recomputed, only on this path. A batched ``dy`` (``_batched``) takes it too,
    without a graph of the gradients unless one was asked for."""
    from lora_fast.reference import lora_linear_ref

    create_graph = torch.is_grad_enabled()

    p = ctx.dropout_p
    keep = _drop.dropout_keep_mask(seed, x.shape[0], x.shape[1], p, x.device) if p > 0.0 else None
    wanted = [(i, t) for i, t in ((0, x), (3, lora_A), (4, lora_B)) if ctx.needs_input_grad[i]]
    with torch.enable_grad():
        y = lora_linear_ref(x, weight, None, lora_A, lora_B, ctx.scaling, dropout_p=p, keep_mask=keep,
                            fan_in_fan_out=ctx.fan_in_fan_out)
        grads = torch.autograd.grad(y, [t for _, t in wanted], dy, create_graph=create_graph)
    out = [None] * 9
    for (i, _), g in zip(wanted, grads, strict=True):
        out[i] = g
    return tuple(out)


def lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
    training: bool = True,
    fan_in_fan_out: bool = False,
    check: bool = True,
) -> torch.Tensor:
    """The fused Triton LoRA linear for x (..., K): same contract as ``lora_fast.functional.lora_linear``.

    Args:
        x: (..., K), any strides. weight: (N, K), or (K, N) with ``fan_in_fan_out``. bias: (N,) or None.
        lora_A: (r, K). lora_B: (N, r). scaling: s.
        dropout_p: dropout probability on the LoRA input, applied when ``training``.
        seed: dropout seed; None draws one from torch's generator for x's device (so ``torch.manual_seed`` and
            checkpoint recomputation reproduce the mask). The mask is ``dropout_mask(seed, M, K, p, device)``.
        training: whether dropout is active. fan_in_fan_out: Conv1D weight layout.
        check: verify the case with ``unsupported_reason`` first (the dispatcher, which has just done so, skips it).
    """
    if check and (reason := unsupported_reason(x, weight, lora_A, bias, lora_B,
                                               float(dropout_p) if training else 0.0)) is not None:
        raise RuntimeError(f"the Triton LoRA path cannot run this case: {reason}")
    p = float(dropout_p) if training else 0.0
    dev = x.device
    seed_t = seed_tensor(seed, dev) if p > 0.0 else None
    x, weight, bias = autocast_inputs(x, weight, bias)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # (M, K): a view where it can be; strides go to the kernels
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    # no autocast guard needed here: the launchers call no autocast-eligible op (only allocations and kernels)
    if torch.is_grad_enabled() and (x2.requires_grad or lora_A.requires_grad or lora_B.requires_grad):
        y = LoRALinearFn.apply(x2, weight, bias, lora_A, lora_B, float(scaling), p, seed_t, fan_in_fan_out)
    else:  # nothing to differentiate: no Function, nothing saved, xa not written
        y, _ = _fwd.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, float(scaling), p, seed_t,
                                    fan_in_fan_out, write_xa=False)
    return y if len(lead) == 1 else y.reshape(*lead, N)
