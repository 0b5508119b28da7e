"""Functional entry of lora_fast: ``lora_linear`` — every LoRA module goes through it.

Dispatch (``backend``):
    "reference"  plain PyTorch (``lora_fast.reference``), any device, any dtype autograd supports.
    "triton"     the fused Triton kernels; an unsupported case raises instead of falling back silently.
    "auto"       Triton when it can run the case, the reference otherwise (the choice is logged once at DEBUG).
The default comes from the environment variable ``LORA_FAST_BACKEND`` (``auto`` when unset).
"auto" picks Triton for CUDA tensors when triton imports, and for CPU tensors only when ``TRITON_INTERPRET=1`` is
set (triton's numpy interpreter: correct but slow, meant for tests).

Dropout seeds: the Triton path's keep-mask is a pure function of (seed, row, column) — ``dropout_mask`` returns it —
so backward and checkpoint recomputation regenerate it instead of storing it; without a seed one is drawn with
``torch.randint`` from torch's generator for x's device. The reference path without a seed draws ``torch.rand(x.shape)``
from that generator (as ``nn.Dropout``: it works under torch.func transforms, on meta and fake tensors); with an
explicit seed it takes the mask from ``seeded_keep_mask`` — the kernels' own wherever triton can build it (unless
``backend="reference"``), else ``torch.rand`` from a ``torch.Generator`` seeded with the seed.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import torch

from lora_fast.reference import autocast_enabled, lora_linear_ref

logger = logging.getLogger("lora_fast")

BACKENDS = ("auto", "reference", "triton")
_logged: set[str] = set()


def default_backend() -> str:
    """The backend named by ``LORA_FAST_BACKEND`` (``auto`` when unset)."""
    backend = os.environ.get("LORA_FAST_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"LORA_FAST_BACKEND={backend!r} is not one of {BACKENDS}")
    return backend


SEED_HIGH = 2**62  # drawn seeds lie in [0, 2**62); any int in [0, 2**63) is a valid seed (a Philox key)


def check_seed(seed) -> None:
    """A seed is None, an int in [0, 2**63), or a 1-element int64 tensor. A tensor's value is not read (that would
    sync its device on every call): its 64 bits are the Philox key as they are, a negative value included."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"a seed tensor must hold one int64, got {seed.dtype} with {seed.numel()} elements")
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None, an int in [0, 2**63) or an int64 tensor, got {seed!r}")


def functorch_active() -> bool:
    """Whether a torch.func transform is running (the reference path, plain aten ops, supports them all)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is entered (``forward_ad.dual_level``). Under torch.compile this is what can
    be known: dynamo traces with tensors that carry no tangent, and guards on the level."""
    from torch.autograd import forward_ad as fwad

    return getattr(fwad, "_current_level", -1) >= 0


def has_tangent(*tensors) -> bool:
    """Whether any tensor carries a forward-mode AD tangent (``torch.autograd.forward_ad``): neither the fused
    kernels' autograd Function nor the torch.library op has a ``jvp``; the reference path's aten ops have one."""
    from torch.autograd import forward_ad as fwad

    if not forward_ad_active():  # no dual level entered: nothing can carry a tangent (cheap test)
        return False
    return any(t is not None and fwad.unpack_dual(t).tangent is not None for t in tensors)


def seed_tensor(seed, device: torch.device | str) -> torch.Tensor:
    """The dropout seed as the 1-element int64 tensor on ``device`` that the kernels and the op read.

    None draws one from torch's generator for ``device`` (no host sync on CUDA; ``torch.manual_seed`` reproduces
    it and checkpoint recomputation, which restores the device RNG state, draws it again).
    """
    check_seed(seed)
    if seed is None:
        return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):  # a copy (8 bytes): the caller may advance its seed in place before backward
        return seed.reshape(1).to(device, copy=True)
    # a fill kernel with the value as its argument: no host-to-device copy (torch.tensor([seed]) would copy from
    # pageable memory and synchronise on CUDA, which also breaks CUDA-graph capture)
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def autocast_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Under autocast, cast x, W₀ and b to the autocast dtype (differentiable casts) as ``F.linear`` would: only
    floating-point tensors other than float64 (autocast leaves fp64 alone). The adapters keep their dtype (fp32) and
    are cast tile by tile by the kernels. Returns (x, weight, bias)."""
    dev = x.device.type
    if autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)

        def cast(t):
            return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

        x, weight, bias = cast(x), cast(weight), cast(bias)
    return x, weight, bias


def resolve_backend(backend: str | None) -> str:
    """The backend to use: ``backend``, or ``LORA_FAST_BACKEND`` when None; an unknown name is an error."""
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.debug(msg)


def _interpret_env() -> bool:
    """TRITON_INTERPRET read as triton reads it: one rule, ``kernels.launch.interpreting`` (launch imports only torch).
    Without ``lora_fast.kernels`` it answers True, so that the caller's import of the kernels comes next and reports
    that (the real reason) instead of the interpreter switch."""
    try:
        from lora_fast.kernels.launch import interpreting
    except ImportError:
        return True
    return interpreting()


def dropout_mask(seed: int | torch.Tensor, rows: int, cols: int, p: float, device: torch.device | str) -> torch.Tensor:
    """The boolean keep-mask (rows, cols) the Triton kernels apply to an (M, K) = (rows, cols) LoRA input.

    ``lora_linear(x, ..., dropout_p=p, seed=seed)`` on the Triton path computes exactly
    ``lora_linear_ref(x, ..., dropout_p=p, keep_mask=dropout_mask(seed, M, K, p, x.device))`` (x flattened to
    (M, K)): this is how tests compare the kernels with the reference bit for bit in the mask.

    Args:
        seed: non-negative int (< 2**63), the per-call dropout seed (or a 1-element int64 tensor holding it).
        rows: M, the number of input rows (all leading dims flattened). cols: K, in_features.
        p: dropout probability in [0, 1); an element is kept when its 16-bit draw is >= round(p·2¹⁶)
            (``lora_fast.rng.keep_threshold``); kept elements are scaled by 1/(1 − p).
        device: where to build the mask (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Returns:
        torch.bool tensor (rows, cols), True where the element is kept.
    """
    try:
        from lora_fast.kernels.dropout import dropout_keep_mask
    except ImportError as e:
        raise RuntimeError(f"dropout_mask needs triton ({e}; pip install 'lora-fast[triton]')") from e
    return dropout_keep_mask(seed, rows, cols, p, device)


def _fake(x: torch.Tensor) -> bool:
    """Whether x is a FakeTensor (torch.compile's tracing, FakeTensorMode): its device is not real storage."""
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover (older torch)
        return False
    return is_fake(x)


def triton_mask_runs(x: torch.Tensor, p: float) -> bool:
    """Whether the kernels' mask (``dropout_mask``) can be built for ``p`` on x's device: triton imports (a version
    the kernels build with: ``triton_fn.TRITON_MIN``), x is a real
    CUDA tensor (or CPU under TRITON_INTERPRET=1 with the kernels built for the interpreter; not meta, not fake), no
    torch.func transform is active, and the 16-bit keep threshold biases E[dropout(x)] by at most
    ``triton_fn.MAX_DROPOUT_BIAS``."""
    device = x.device
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and not _interpret_env()) or _fake(x):
        return False
    try:
        from lora_fast import triton_fn
        from lora_fast.kernels import dropout, launch
    except ImportError:
        return False
    if device.type == "cpu" and not launch.kernels_interpreted(dropout._dropout_mask_kernel):
        return False
    if triton_fn.TOO_OLD is not None:
        return False
    return not functorch_active() and triton_fn.dropout_bias(p) <= triton_fn.MAX_DROPOUT_BIAS


def seeded_keep_mask(seed: int | torch.Tensor, x: torch.Tensor, p: float, backend: str) -> torch.Tensor:
    """The reference path's keep-mask, shaped like x (..., K), for an explicit seed (an int, or a 1-element int64
    tensor); eager ``lora_linear(..., seed=s)`` on the reference path and the compiled op's reference fallback use
    it, so both apply the same mask for a seed.

    Unless ``backend == "reference"``, and where ``triton_mask_runs(x, p)``: the kernels' own mask,
    ``dropout_mask(seed, M, K, p)``, read from a seed tensor on the device — no host sync, capturable in a CUDA graph
    (a rank-256 adapter under ``torch.compile(mode="reduce-overhead")`` falls back to the reference there), and the
    mask the fused path would apply. Otherwise — ``backend="reference"`` (plain PyTorch, no Triton), no triton, CPU,
    p within ~1 % of 1 — ``torch.rand((M, K)) >= p`` from a ``torch.Generator`` seeded with the seed (a tensor seed
    is read with ``.item()``: one host sync on CUDA). The CPU generator (mt19937) keeps only a seed's low 32 bits,
    so there a seed of 2**32 or more adds a second stream seeded with its high bits, u = frac(u_low + u_high) (still
    uniform): seeds s and s + k·2**32 gave one mask, and of the 62-bit seeds drawn per layer call two in ~10**5
    shared one (a review found such a pair in 200 000 draws)."""
    rows, cols = math.prod(x.shape[:-1]), x.shape[-1]
    if backend != "reference" and triton_mask_runs(x, p):
        keep = dropout_mask(seed, rows, cols, p, x.device)
    else:
        value = seed if isinstance(seed, int) else int(seed.item())
        if x.device.type == "cpu" and value >> 32:
            low = torch.Generator().manual_seed(value & 0xFFFFFFFF)
            high = torch.Generator().manual_seed(value >> 32)
            u = torch.rand((rows, cols), generator=low, dtype=torch.float64)
            u = (u + torch.rand((rows, cols), generator=high, dtype=torch.float64)) % 1.0
        else:  # CUDA's generator (Philox) takes all 64 bits
            gen = torch.Generator(device=x.device).manual_seed(value)
            u = torch.rand((rows, cols), device=x.device, generator=gen)
        keep = u >= p  # (M, K)
    return keep.reshape(x.shape)


def triton_unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, bias: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None, dropout_p: float = 0.0,
) -> str | None:
    """Why the Triton path cannot run this case, or None when it can."""
    if x.device.type == "cpu" and not _interpret_env():
        return "CPU tensor without TRITON_INTERPRET=1"
    try:
        from lora_fast import triton_fn  # noqa: F401  (imports triton)
    except ImportError as e:  # triton missing, or the kernels not installed
        return _import_reason(e)
    return triton_fn.unsupported_reason(x, weight, lora_A, bias, lora_B, dropout_p)


TRITON_TOO_OLD = "triton is too old"  # how triton_fn.unsupported_reason's version reason starts
# reasons that hold for every call on this machine (a GPU run taking them is warned about once, below)
_NOT_IMPORTABLE = ("triton is not available", "lora_fast.kernels is not importable", TRITON_TOO_OLD)


def _import_reason(e: ImportError) -> str:
    """Why the kernels cannot be imported: triton itself, or ``lora_fast.kernels`` (the repository's ``kernels/``,
    which only an install maps there: a source tree put on ``sys.path`` has no ``lora_fast.kernels``)."""
    if (e.name or "").startswith("lora_fast.kernels"):
        return (f"{_NOT_IMPORTABLE[1]} ({e}): lora_fast was imported from a source tree that is not installed "
                "editable (run from a clone's root, its lora_fast/ shadows an installed copy); `pip install -e .` "
                "there maps kernels/ to lora_fast.kernels")
    return f"{_NOT_IMPORTABLE[0]} ({e}; pip install 'lora-fast[triton]', or a torch that ships triton)"


def device_mismatch(x, weight, bias, lora_A, lora_B) -> str | None:
    """Which tensors are not on x's device, said as "x is on D but ...", or None."""
    off = {k: t.device for k, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias))
           if t is not None and t.device != x.device}
    return f"x is on {x.device} but {', '.join(f'{k} on {d}' for k, d in off.items())}" if off else None


def check_float_input(x: torch.Tensor) -> None:
    """A floating-point input: an integer one would cast the adapters to integers (fp32 A, B of magnitude < 1
    truncate to zeros) and return the base alone — the module's ``LoRALayer`` refuses it alike."""
    if not x.is_floating_point():
        raise TypeError(f"lora_linear expects a floating-point input, got {x.dtype} (the adapters would be cast to "
                        "it and truncated)")


def check_devices(x, weight, bias, lora_A, lora_B) -> None:
    """Every tensor on x's device, on every path: ``F.linear`` of a CPU input with a meta weight returns
    uninitialised memory without an error (a layer built under ``torch.device("meta")`` and loaded in part)."""
    reason = device_mismatch(x, weight, bias, lora_A, lora_B)
    if reason is not None:
        raise RuntimeError(f"lora_linear: {reason}; put them on one device (a meta tensor was never loaded)")


def check_shapes(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    fan_in_fan_out: bool,
) -> tuple[int, int, int]:
    """Validate shapes; returns (K, N, r). Errors name the offending sizes."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    n_out, k_in = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    if x.dim() < 1 or x.shape[-1] != k_in:
        raise ValueError(
            f"input feature size mismatch: the layer expects in_features={k_in} but the input's last dimension is "
            f"{x.shape[-1] if x.dim() else 'missing (0-d input)'} (input shape {tuple(x.shape)})"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != k_in:
        flipped = lora_A.dim() == 2 and lora_A.shape[0] == k_in
        raise ValueError(f"lora_A must be (rank, in_features={k_in}), got {tuple(lora_A.shape)}"
                         + (" (transposed?)" if flipped else ""))
    r = lora_A.shape[0]
    if r < 1:  # a (0, K) lora_A and (N, 0) lora_B would give the base alone, silently
        raise ValueError(f"rank must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_B.shape != (n_out, r):
        raise ValueError(f"lora_B must be (out_features, rank)=({n_out}, {r}), got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must be (out_features,)=({n_out},), got {tuple(bias.shape)}")
    return k_in, n_out, r


def lora_linear(
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
    """y = x·W₀ᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ.

    Args:
        x: input (..., in_features), any rank >= 1.
        weight: frozen W₀: (out, in), or (in, out) when ``fan_in_fan_out`` (transformers' Conv1D).
        bias: frozen bias (out,) or None.
        lora_A: (r, in). lora_B: (out, r).
        scaling: α/r (or α/√r with rsLoRA).
        dropout_p: dropout probability on the LoRA input, in [0, 1); applied only when ``training``.
        seed: dropout seed: None draws one from torch's generator for x's device (reproducible under
            ``torch.manual_seed``); an int in [0, 2**63), or a 1-element int64 tensor (the same mask as its value;
            under torch.compile a tensor changes without recompiling).
        training: whether dropout is active.
        fan_in_fan_out: W₀ in Conv1D layout.
        backend: "auto", "reference" or "triton"; None reads ``LORA_FAST_BACKEND``.

    Returns:
        y (..., out_features) in x's (or autocast's) dtype.
    """
    if torch.compiler.is_compiling():  # torch.compile: the torch.library op (no env reads, imports, logging here)
        if functorch_active() or forward_ad_active():  # torch.compile(torch.func.grad(...)), or inside a
            # forward-AD level: the op has no functorch rules nor a jvp; aten ops have both
            if backend == "triton":  # as eager: "triton" never falls back without a word
                raise RuntimeError("backend='triton' cannot run this case: a torch.func transform or forward-mode AD"
                                   " is active (the fused kernels support neither)")
            _check_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out)
            return _reference_path(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, training,
                                   fan_in_fan_out, "reference")
        from lora_fast.ops import lora_linear_op

        return lora_linear_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, training, fan_in_fan_out,
                              backend=backend)
    backend = resolve_backend(backend)
    _check_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out)

    if backend != "reference":
        reason = triton_unsupported_reason(x, weight, lora_A, bias, lora_B, dropout_p if training else 0.0)
        if reason is None:
            from lora_fast import triton_fn

            check_float_scaling(scaling)  # here only: auto's reference fallback differentiates it

            _log_once(f"lora_fast: Triton path for {x.device.type} {x.dtype}")
            return triton_fn.lora_linear_triton(
                x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, training, fan_in_fan_out, check=False
            )  # check=False: the case was just checked above
        if backend == "triton":
            raise RuntimeError(f"backend='triton' cannot run this case: {reason}")
        msg = f"lora_fast: reference path ({reason})"
        if x.device.type == "cuda" and reason.startswith(_NOT_IMPORTABLE) and msg not in _logged:
            warnings.warn(f"lora_fast: the fused kernels cannot run on this GPU, so every LoRA layer takes the "
                          f"(slower) reference path: {reason}", stacklevel=2)  # once: _log_once records msg
        _log_once(msg)

    return _reference_path(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, training, fan_in_fan_out,
                           backend)


def check_dropout_p(dropout_p) -> None:
    """``dropout_p`` a Python number in [0, 1) (a tensor would pass the range test on one path and fail on another)."""
    if isinstance(dropout_p, torch.Tensor):
        raise TypeError(f"dropout_p must be a Python float, got a tensor ({dropout_p!r})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def check_float_scaling(scaling) -> None:
    """Where ``scaling`` is taken as a float (the fused path, the torch.library op), a tensor requiring grad would
    lose its gradient without a word: refused. A NaN or infinite tensor is refused too (a number: ``check_scaling``,
    on every path): the kernels split s into
    two finite factors (``lora_fwd._fwd_tile``), which a NaN would silently turn into s = 1 in the forward and an
    inf into NaN where the padded rank columns meet it (0·inf). A tensor is read only in eager mode (one host
    sync, the same ``float(scaling)`` the fused path then takes), not under torch.compile."""
    if isinstance(scaling, torch.Tensor):
        if scaling.requires_grad:
            raise ValueError("scaling is a tensor that requires grad: the fused path and the compiled op take it as "
                             "a float and would drop its gradient; pass a float, or call lora_linear with "
                             "backend='reference' (eager) to train the scaling")
        if not torch.compiler.is_compiling():
            check_scaling(float(scaling))


def check_scaling(scaling) -> None:
    """A ``scaling`` number is finite (a tensor is checked where it is read as a float: ``check_float_scaling``).
    Written as ``abs(s) < inf`` (False for NaN too), which torch.compile traces on the symbolic float a scaling that
    changed between calls becomes (``math.isfinite`` cannot: ``fullgraph=True`` failed on a second adapter's α);
    traced, it is a guard, so a NaN or infinite scaling is refused in compiled calls too (fullgraph: as dynamo's
    error around this one)."""
    if not isinstance(scaling, torch.Tensor) and not abs(scaling) < math.inf:
        raise ValueError(f"scaling must be a finite number, got {scaling}")


def _check_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out) -> None:
    """Refuse what no path computes right: ``dropout_p`` not a number in [0, 1), a seed out of range, shapes that
    do not fit, a NaN or infinite ``scaling`` number (every path alike; a tensor is read where the fused path takes
    it as a float, ``check_float_scaling``, as a tensor requiring grad is refused there: ``lora_linear``)."""
    check_scaling(scaling)
    check_dropout_p(dropout_p)
    check_seed(seed)
    check_shapes(x, weight, bias, lora_A, lora_B, fan_in_fan_out)
    check_devices(x, weight, bias, lora_A, lora_B)
    check_float_input(x)
    check_base_dtypes(x, weight, bias)


def base_dtype_mismatch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Outside autocast the frozen base runs in x's dtype, as ``nn.Linear`` does: which of the base weight and
    bias has another dtype, said as "the input is D but ...", or None. The adapters may differ (fp32 adapters on a
    16-bit base)."""
    if autocast_enabled(x.device.type):
        return None
    for name, t in (("base weight", weight), ("base bias", bias)):
        if t is not None and t.dtype != x.dtype:
            return f"the input is {x.dtype} but the {name} is {t.dtype}"
    return None


def check_base_dtypes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``base_dtype_mismatch`` refused on every path with an error naming both dtypes (a RuntimeError, as torch's
    own, which reads "mat1 and mat2 must have the same dtype", naming neither the input nor the weight)."""
    reason = base_dtype_mismatch(x, weight, bias)
    if reason is not None:
        raise RuntimeError(f"lora_linear: {reason}; cast the input to the model's dtype (or the model to the "
                           "input's), or run under torch.autocast")


def _reference_path(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, training, fan_in_fan_out, backend):
    """``lora_linear_ref`` with the mask an explicit seed gives (``seeded_keep_mask``)."""
    keep = None  # seed None: lora_linear_ref draws torch.rand(x.shape) from torch's generator, as nn.Dropout does
    if seed is not None and training and dropout_p > 0.0:
        keep = seeded_keep_mask(seed, x, float(dropout_p), backend)
    return lora_linear_ref(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, training=training,
        fan_in_fan_out=fan_in_fan_out, keep_mask=keep,
    )
