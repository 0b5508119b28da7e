"""``torch.library`` registration of the LoRA linear: ``torch.ops.lora_fast.lora_linear`` and its backward op.

Why: ``torch.compile`` cannot trace into Triton launchers, ``torch.Generator`` objects or Python-side dispatch; a
custom op is opaque to dynamo and AOTAutograd, which see only its schema, a fake (meta) implementation that gives
output shapes, and a registered autograd formula. So ``torch.compile(LinearWithLoRA(...), fullgraph=True)``
traces forward *and* backward without graph breaks, and the compiled graph calls the same implementation eager
code calls. The pattern is the one of PyTorch's "Python custom operators" tutorial (``custom_op`` +
``register_fake`` + ``register_autograd``, the backward being a custom op too).

Ops (x is 2-D: the entry ``lora_linear_op`` flattens leading dims; keep is the dropout keep-mask, p its probability):

    lora_fast::lora_linear(x (M,K), W₀, b?, A (r,K), B (N,r), s, p, seed?, fan_in_fan_out, backend)
        xa = (x ⊙ keep)·Aᵀ/(1−p)                 (M, r)  returned in fp32 (fp64 for fp64 x): saved with x
        y  = x·W₀ᵀ + b + s·xa·Bᵀ                  (M, N)
    lora_fast::lora_linear_backward(dy, x, W₀, A, B, xa, s, p, seed?, fan_in_fan_out, backend, needs_dx, needs_dA,
                                    needs_dB)
        g  = s·dy·B                               (M, r)  dL/dxa
        dx = dy·W₀ + (g·A) ⊙ keep/(1−p)           (M, K)  (each gradient not needed: an empty tensor, not computed)
        dA = gᵀ·(x ⊙ keep)/(1−p)                  (r, K)
        dB = s·dyᵀ·xa                             (N, r)
    The chain rule: y depends on A only through xa and on B through s·xa·Bᵀ; dropout is a fixed diagonal
    scaling of x once the mask is fixed, so it appears once in dx and once in dA. xa is returned only to be saved
    for backward: it is marked non-differentiable (``lora_linear_op`` drops it). Gradients of a trainable
    (unfrozen) W₀ or b, dW₀ = dyᵀ·x (or xᵀ·dy in Conv1D layout) and db = Σ_rows dy, are plain aten ops in the
    autograd formula, so they compile too.

Dropout is deterministic given the seed: ``seed`` is a 1-element int64 tensor (as the Triton kernels take it) and
the keep-mask is a pure function of it. The reference implementation takes it from ``seeded_keep_mask`` — the
same mask eager ``lora_fast.functional.lora_linear(..., seed=s)`` uses on its reference path: the kernels' own mask
where triton can build it and the backend is not "reference" (read from the seed on the device: no host sync, so a
captured CUDA graph stays valid), else ``torch.rand(M, K) >= p`` from a ``torch.Generator`` seeded with the seed's
value. Backward regenerates it from
the seed: nothing of size M×K is kept beyond x. Because the seed is drawn from torch's generator for x's device
when the caller gives none, ``torch.manual_seed`` reproduces a run and ``torch.utils.checkpoint`` (which stashes
and restores the CPU and device RNG states) recomputes the same mask.

Seeds and dynamo (what ``lora_linear_op`` does with ``seed``):
    None      drawn with ``torch.randint(..., device=x.device)``: a tensor op, traced into the graph (no graph
              break, no host sync, no recompilation per step). Under inductor the draw itself uses inductor's
              RNG, so the masks differ from eager's unless ``torch._inductor.config.fallback_random = True``
              (``aot_eager`` and eager agree draw for draw).
    Tensor    used as is (one int64): the way to pass a changing seed into a compiled region without recompiling.
    int       fine in eager; under compile a Python int starts as a graph constant: the first new value costs
              one recompilation (dynamo then treats it as a dynamic SymInt). Prefer a tensor there.

Autocast: as on the Triton path, x, W₀ and b are cast to the autocast dtype by the entry (ordinary,
differentiable casts), A and B stay in their dtype (fp32 adapters) and are cast inside the op, dA and dB come back
in the parameters' dtype; the op itself runs with autocast off. The reference behind the op computes the LoRA term
in ``lora_compute_dtype`` (fp32 for fp16 x with fp32 adapters, as the eager reference does outside autocast), so
under fp16 autocast its term is fp32 where eager autocast computes it in fp16: more precise, not bit-equal.

Behind the op, ``_impl_fwd``/``_impl_bwd`` run the fused Triton kernels wherever eager ``lora_linear`` would (CUDA,
or CPU under TRITON_INTERPRET=1; ``_use_triton``), with the same Philox mask and seed draw as the eager Triton path,
and the reference elsewhere (on CUDA with ``backend="reference"``, without triton, or with p within ~1 % of 1, the
reference reads the dropout seed with ``.item()``: one host sync per call, and no CUDA-graph capture).

Known limits: no double backward through the op (the eager Triton path has one). On a GPU the compiled Triton path is
unverified (no GPU in the building session).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_fast.functional import (  # noqa: F401  (SEED_HIGH re-exported: the range drawn seeds lie in)
    SEED_HIGH,
    autocast_inputs,
    check_devices,
    check_dropout_p,
    check_float_input,
    check_float_scaling,
    check_scaling,
    check_seed,
    check_shapes,
    forward_ad_active,
    functorch_active,
    has_tangent,
    resolve_backend,
    seed_tensor,
    seeded_keep_mask,
    triton_unsupported_reason,
)
from lora_fast.reference import lora_compute_dtype

# ----------------------------------------------------------------------------------------------------------------
# Implementations behind the ops: the fused Triton kernels where they run, the reference otherwise.
# ----------------------------------------------------------------------------------------------------------------


def _dropped(x: torch.Tensor, p: float, seed: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x ⊙ keep/(1−p) (a temporary, never saved; the keep-mask (M, K) regenerated from the seed by
    ``functional.seeded_keep_mask``, as the eager reference path with that seed uses it); x itself when dropout is
    off."""
    if seed is None or p == 0.0:
        return x
    return x * seeded_keep_mask(seed, x, p, backend).to(x.dtype) / (1.0 - p)  # (M, K)


def _xa_dtype(dtype: torch.dtype) -> torch.dtype:
    """xa is kept in fp32 (fp64 for fp64 inputs): as the Triton path saves it, and it is only (M, r)."""
    return torch.promote_types(dtype, torch.float32)


def _ref_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, backend):
    w = weight.t() if fan_in_fan_out else weight  # (N, K) view
    dtype = lora_compute_dtype(x.dtype, lora_A.dtype, lora_B.dtype)  # fp32 for fp16 x: the eager reference's rule
    xa = F.linear(_dropped(x.to(dtype), dropout_p, seed, backend), lora_A.to(dtype))  # (M, r)
    y = (F.linear(x, w, bias) + scaling * F.linear(xa, lora_B.to(dtype))).to(x.dtype)  # (M, N)
    return y, xa.to(_xa_dtype(x.dtype))


def _ref_bwd(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, fan_in_fan_out, backend, needs):
    needs_dx, needs_dA, needs_dB = needs
    dtype = lora_compute_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    a, b = lora_A.to(dtype), lora_B.to(dtype)
    sdy = scaling * dy.to(dtype)  # (M, N): scaled before any product, as autograd of s·(xa·Bᵀ) does — in fp16,
    g = sdy @ b  # (M, r) = dL/dxa                    # dy·B may pass 65504 where s·dy·B does not
    dA = (g.t() @ _dropped(x.to(dtype), dropout_p, seed, backend)).to(lora_A.dtype) if needs_dA \
        else lora_A.new_empty(0)  # (r, K)
    dB = (sdy.t() @ xa.to(dtype)).to(lora_B.dtype) if needs_dB else lora_B.new_empty(0)  # (N, r)
    if not needs_dx:
        return x.new_empty(0), dA, dB
    dx = dy @ (weight.t() if fan_in_fan_out else weight)  # (M, K)
    dx = dx + _dropped(g @ a, dropout_p, seed, backend).to(x.dtype)  # the mask: a function of (seed, shape)
    return dx, dA, dB


def _use_triton(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, backend: str,
                dropout_p: float = 0.0) -> bool:
    """Whether the fused kernels run behind the op: the same rule as eager ``functional.lora_linear``.

    A pure function of (backend, device, dtypes, rank, dropout p, TRITON_INTERPRET), so forward and backward choose
    alike (the reference's mask equals the kernels' only where triton can build it: ``seeded_keep_mask``). The op
    runs with grad mode off, so a trainable W₀ does not veto the kernels here: its gradient is computed by the
    autograd formula with plain aten ops.
    """
    if backend == "reference":
        return False
    # weight.detach(): the op's autograd formula differentiates a trainable W₀ itself (plain aten ops), so it never
    # vetoes the kernels here — with dropout on, unsupported_reason would otherwise send it to the reference path
    # (lora_B too, as eager checks it; the bias is not an input of the backward, whose choice must equal the forward's)
    reason = triton_unsupported_reason(x, weight.detach(), lora_A, lora_B=lora_B, dropout_p=dropout_p)
    if reason is not None and backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run this case: {reason}")
    return reason is None


def _impl_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, backend):
    """Forward behind the op: the fused Triton forward where it runs (same kernels, Philox mask and fp32 xa as
    the eager Triton path), the reference otherwise."""
    if _use_triton(x, weight, lora_A, lora_B, backend, dropout_p):
        from lora_fast.kernels.lora_fwd import lora_linear_fwd

        return lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out,
                               write_xa=True)
    return _ref_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, backend)


def _impl_bwd(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, fan_in_fan_out, backend, needs):
    """Backward behind the op; makes ``_impl_fwd``'s choice again (same inputs, same rule, same mask). ``needs``:
    (dx, dA, dB) wanted; each one not wanted comes back as an empty tensor (a custom op returns tensors)."""
    if _use_triton(x, weight, lora_A, lora_B, backend, dropout_p):
        from lora_fast.kernels.lora_bwd import lora_linear_bwd

        grads = lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out,
                                needs_dx=needs[0], needs_dA=needs[1], needs_dB=needs[2])
        return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, (x, lora_A, lora_B), strict=True))
    return _ref_bwd(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, fan_in_fan_out, backend, needs)


def _check_seed_given(dropout_p: float, seed: torch.Tensor | None) -> None:
    if dropout_p > 0.0 and seed is None:  # lora_linear_op always passes one; a direct caller of the op may not
        raise ValueError(f"lora_fast::lora_linear: dropout_p={dropout_p} > 0 needs a seed tensor (the keep-mask is a "
                         "function of it)")


# ----------------------------------------------------------------------------------------------------------------
# The ops: schema, fake implementations, autograd formula.
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("lora_fast::lora_linear", mutates_args=())
def _lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    fan_in_fan_out: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_seed_given(dropout_p, seed)
    with torch.autocast(x.device.type, enabled=False):
        return _impl_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, backend)


@_lora_linear.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, backend):
    _check_seed_given(dropout_p, seed)
    n_out = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    return x.new_empty(x.shape[0], n_out), x.new_empty(x.shape[0], lora_A.shape[0], dtype=_xa_dtype(x.dtype))


@torch.library.custom_op("lora_fast::lora_linear_backward", mutates_args=())
def _lora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    fan_in_fan_out: bool,
    backend: str,
    needs_dx: bool,
    needs_dA: bool,
    needs_dB: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_seed_given(dropout_p, seed)
    with torch.autocast(x.device.type, enabled=False):
        return _impl_bwd(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, fan_in_fan_out,
                         backend, (needs_dx, needs_dA, needs_dB))


@_lora_linear_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, fan_in_fan_out, backend, needs_dx, needs_dA,
      needs_dB):
    _check_seed_given(dropout_p, seed)
    # contiguous, as the real impls; an empty tensor for each gradient not wanted
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in ((x, needs_dx), (lora_A, needs_dA),
                                                                       (lora_B, needs_dB)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.mark_non_differentiable(output[1])  # xa is saved state, not a result: no gradient flows into it
    ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out, ctx.backend = scaling, dropout_p, fan_in_fan_out, backend


def _backward(ctx, dy, _dxa):
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad  # (x, weight, bias, lora_A, lora_B, ...)
    dx, dA, dB = torch.ops.lora_fast.lora_linear_backward(
        dy, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed, ctx.fan_in_fan_out, ctx.backend,
        needs[0], needs[3], needs[4],
    )
    dW = db = None
    if needs[1]:  # an unfrozen base weight: dW₀ = dyᵀ·x, (N, K), or its transpose in Conv1D layout
        dW = (x.t() @ dy if ctx.fan_in_fan_out else dy.t() @ x).to(weight.dtype)
    if needs[2]:
        db = dy.sum(0)
    return (dx if needs[0] else None, dW, db, dA if needs[3] else None, dB if needs[4] else None,
            None, None, None, None, None)


_lora_linear.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Python entry.
# ----------------------------------------------------------------------------------------------------------------


def _check(x, weight, bias, lora_A, lora_B, fan_in_fan_out) -> None:
    check_shapes(x, weight, bias, lora_A, lora_B, fan_in_fan_out)  # the eager entry's checks and messages
    check_devices(x, weight, bias, lora_A, lora_B)
    check_float_input(x)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x ({x.dtype}), weight ({weight.dtype}) and bias "
                         f"({None if bias is None else bias.dtype}) must share a dtype (or run under autocast)")


def lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    training: bool = True,
    fan_in_fan_out: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x·W₀ᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ through ``torch.ops.lora_fast.lora_linear`` (compile-friendly).

    Same contract as ``lora_fast.functional.lora_linear``; everything here traces under dynamo without graph
    breaks (no environment reads, imports or logging).

    Args:
        x: input (..., in_features), any rank >= 1; leading dims are flattened for the op and restored.
        weight: frozen W₀: (out, in), or (in, out) when ``fan_in_fan_out`` (transformers' Conv1D).
        bias: frozen bias (out,) or None.
        lora_A: (r, in). lora_B: (out, r). Kept in their dtype (fp32 adapters), cast inside the op.
        scaling: α/r (or α/√r with rsLoRA).
        dropout_p: dropout probability on the LoRA input, in [0, 1); applied only when ``training``.
        seed: None (drawn from torch's generator for x's device, inside the graph under compile), an int
            (eager; a constant under compile, so recompiles when it changes), or a 1-element int64 tensor.
        training: whether dropout is active.
        fan_in_fan_out: W₀ in Conv1D layout.
        backend: "auto", "reference" or "triton"; None reads ``LORA_FAST_BACKEND``. Behind the op the same rule
            as in eager mode picks the fused kernels or the reference ("triton" raises where they cannot run).

    Returns:
        y (..., out_features) in x's dtype (the autocast dtype under autocast).
    """
    backend = resolve_backend(backend)  # dynamo traces its os.environ read without a graph break
    check_dropout_p(dropout_p)
    check_scaling(scaling)  # a number; a tensor is read below, as a float
    check_float_scaling(scaling)
    check_seed(seed)  # also when dropout is off, as eager lora_linear checks it
    if functorch_active() or (forward_ad_active() if torch.compiler.is_compiling()
                              else has_tangent(x, weight, bias, lora_A, lora_B)):
        # torch.func transforms and forward-mode AD: the op has neither rules nor a jvp (its autograd kernel would
        # drop the tangent silently); eager lora_linear takes the reference path (aten ops) there, as here
        from lora_fast.functional import lora_linear

        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, training, fan_in_fan_out,
                           backend=backend)
    p = float(dropout_p) if training else 0.0
    seed_t = seed_tensor(seed, x.device) if p > 0.0 else None
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check(x, weight, bias, lora_A, lora_B, fan_in_fan_out)
    lead = x.shape[:-1]
    n_out = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    y, _ = torch.ops.lora_fast.lora_linear(
        x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0),  # (M, K): reshape(-1, K) cannot infer M when K = 0
        weight, bias, lora_A, lora_B, float(scaling), p, seed_t, bool(fan_in_fan_out), backend
    )  # (M, N), (M, r)
    return y.reshape(*lead, n_out)
