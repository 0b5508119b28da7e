"""Host-side launch helpers shared by the LoRA launchers: environment switches, tile and autotune helpers, and
``TunedKernel`` (an autotuned kernel whose steady-state launches skip the autotuner's per-launch bookkeeping).

No Triton kernels here: ``lora_fwd.py``, ``lora_bwd.py`` and ``dropout.py`` hold those.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

MAX_RANK = 128  # the rank tile (BLOCK_R) lives in registers next to the output tile; 128 is the largest we allow


# The values triton itself reads as true in TRITON_INTERPRET (triton 3.9 ``knobs.runtime.interpret``: any case, no
# surrounding blanks): the launchers must agree with triton on whether its kernels are being interpreted.
_TRITON_TRUE = ("1", "true", "yes", "on", "y")


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set: kernels run on CPU tensors through triton's numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRITON_TRUE


def autotune_enabled() -> bool:
    """False when ``LORA_FAST_AUTOTUNE=0``: the GPU kernels then launch one fixed, everywhere-valid tile instead of
    timing their config lists on each new (shape, rank, M-bucket) key — for tests of many small shapes, and for
    launches that must not spend the first call of each shape on tuning."""
    return os.environ.get("LORA_FAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def variant_override(env: str, allowed: tuple[str, ...]) -> str | None:
    """The kernel variant forced by the environment variable ``env`` (None when unset or empty): how a benchmark
    times a variant through the whole module path. An unknown name is an error, never ignored."""
    value = os.environ.get(env, "").strip().lower()
    if not value:
        return None
    if value not in allowed:
        raise ValueError(f"{env}={value!r} is not one of {allowed}")
    return value


def fixed_stages(dtype: torch.dtype, r: int) -> int:
    """Pipeline depth of the fixed 64×64×64 tile: 3, or 2 for fp32 at rank > 64 (whose rank tile would otherwise
    exceed the ~99 KiB of shared memory of consumer GPUs)."""
    return 2 if dtype == torch.float32 and r > 64 else 3


def fixed_meta(tile: dict, dtype: torch.dtype, r: int) -> dict:
    """Launch meta for a kernel run without autotuning: the tile, plus warps and pipeline depth on a GPU (the
    interpreter takes neither)."""
    return dict(tile) if interpreting() else {**tile, "num_warps": 4, "num_stages": fixed_stages(dtype, r)}


def fixed_rungs(tile: dict, dtype: torch.dtype, r: int, fallbacks: tuple[dict, ...]) -> list[dict]:
    """The launch metas ``launch_fitting`` tries, in order: the fixed tile (``fixed_meta``), then ``fallbacks``
    (smaller tiles / shallower pipelines, each a full meta with ``num_warps`` and ``num_stages``). The interpreter
    has no shared memory to run out of: the fixed tile alone."""
    first = fixed_meta(tile, dtype, r)
    return [first] if interpreting() else [first, *fallbacks]


# Compile options of every launch. ``enable_fp_fusion``: triton contracts ``a * b + c`` into one FMA unless told
# not to, and triton 3.9 warns at a process's first compile that this default flips to off in 3.10. Pinned on: the
# kernels were tested and measured with contraction (one rounding instead of two, fewer instructions in the
# epilogues and in fp32's FMA dots), and a drop-in layer must not change its numbers or speed with a triton upgrade.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

_FITTED: dict[tuple, dict] = {}  # (kernel, launch key, *meta) -> the rung that fitted the device


def launch_fitting(kernel, rungs, key: tuple, grid, *args, **meta) -> dict:
    """Launch ``kernel`` with the first of ``rungs()`` whose compiled kernel fits the device, and return that rung.

    Why: the shared memory a Triton kernel needs is known only once it is compiled, and it is well above any
    tile-size estimate (the fused backward at rank 128 in bf16: 160 KiB on sm_90, 96 KiB on sm_86, against 64 KiB
    from the tiles alone; ``benchmarks/compile_check.py``), while GPUs allow 64 KiB (T4) to 227 KiB (H100) per
    block. Triton raises ``OutOfResources`` before anything runs when a kernel does not fit; the next rung is then
    tried. The rung that launched is remembered per ``key`` and launch meta — together they must determine the
    compiled kernel apart from the tile, and the rung list: the key holds the tensors' dtypes and the device, the
    meta the rank tile — so later launches go straight to it (one dict lookup; ``rungs`` is not called).

    ``rungs``: a callable returning the metas to try (``fixed_rungs``). ``grid`` must be a callable of the launch
    meta, since the rungs' tiles differ; rungs that change ``BLOCK_M`` are not allowed where a buffer was sized by
    it (the deterministic backward keeps it fixed).
    """
    full_key = (kernel, key, *meta.values())
    rung = _FITTED.get(full_key)
    if rung is not None:
        kernel[grid](*args, **meta, **rung, **COMPILE_OPTIONS)
        return rung
    from triton.runtime.errors import OutOfResources

    todo = rungs()
    for i, rung in enumerate(todo):
        try:
            kernel[grid](*args, **meta, **rung, **COMPILE_OPTIONS)
        except OutOfResources:
            if i + 1 == len(todo):
                raise
            continue
        _FITTED[full_key] = rung
        return rung
    raise ValueError("launch_fitting needs at least one rung")


def device_current(device: torch.device):
    """A context in which ``device`` is torch's current CUDA device (a no-op off CUDA, or when it already is).

    Why: a Triton launch runs on the *current* device and its current stream (``JITFunction.run`` asks the driver
    for them), whatever tensors it is given, whereas torch ops follow their tensors. A layer on cuda:1 while cuda:0
    is current — a model split over GPUs by ``device_map="auto"``, or a process that never called
    ``torch.cuda.set_device`` — would be launched on the wrong GPU and stream. Entering the context is skipped in
    the common case (one cheap ``current_device()`` query)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_input_device(launcher):
    """Decorator for a launcher whose first argument is a tensor: run it with that tensor's CUDA device current
    (``device_current``), so its kernels, the stream they go to and its allocations agree with the inputs."""

    @functools.wraps(launcher)
    def run(t: torch.Tensor, *args, **kwargs):
        with device_current(t.device):
            return launcher(t, *args, **kwargs)

    return run


def kernels_interpreted(fn) -> bool:
    """Whether a ``@triton.jit`` object was built by the interpreter (decided once, when its module was imported)."""
    return type(fn).__name__ == "InterpretedFunction"


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands: IEEE unless torch itself allows TF32 for matmuls (a drop-in must
    give the numbers ``F.linear`` gives). fp16/bf16 dots are unaffected by this flag."""
    if dtype != torch.float32:
        return "tf32"  # ignored for fp16/bf16 operands
    matmul = torch.backends.cuda.matmul
    try:  # torch >= 2.9 prefers fp32_precision; reading the legacy flag after it was set raises
        precision = getattr(matmul, "fp32_precision", None)
        if precision is not None and precision != "none":
            return "tf32" if precision == "tf32" else "ieee"
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:
        return "tf32" if getattr(matmul, "fp32_precision", "ieee") == "tf32" else "ieee"


@contextlib.contextmanager
def matmul_tf32(enabled: bool):
    """A context in which torch allows (``enabled``) or forbids TF32 for fp32 matmuls — the switch
    ``input_precision`` reads, so the kernels follow it — restored on exit. Set and restored through one API:
    ``fp32_precision`` where torch has it (>= 2.9; reading the legacy ``allow_tf32`` after it was set raises),
    else ``allow_tf32``. For the training CLI's ``--tf32``, the tests and the benchmarks."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        name, value = "fp32_precision", "tf32" if enabled else "ieee"
    else:
        name, value = "allow_tf32", bool(enabled)
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def fma_dots(dtype: torch.dtype, precision: str) -> bool:
    """Whether ``tl.dot`` runs on FMA units rather than tensor cores: fp32 operands with IEEE precision (TF32 off,
    torch's default). Triton's FMA lowering holds each thread's rows and columns of both operands over the whole
    reduction length in registers, so long reductions (a rank of 128, BLOCK_K = 64) spill kilobytes per thread
    and take ptxas ~1 min per kernel (benchmarks/compile_check.py; PERF_NOTES "fp32 with IEEE dots"). Kernels
    then take small tiles and reduce the rank in ``FMA_RANK_CHUNK`` pieces."""
    return dtype == torch.float32 and precision == "ieee"


def tf32_dots(dtype: torch.dtype, precision: str) -> bool:
    """Whether the dots are TF32 tensor-core dots on fp32 operands (torch allows TF32): the kernels then round the
    frozen GEMMs' operands and run the rank-r products in "tf32x3" (``kernels/dots.py``), and the default route is
    the ``cublas`` variant, whose frozen GEMMs are torch's own."""
    return dtype == torch.float32 and precision == "tf32"


def wide_tf32(dtype: torch.dtype, precision: str, br: int) -> bool:
    """Whether a skinny pass's rank-r dots are "tf32x3" over a rank tile wider than 32: each operand is held as two
    TF32 parts, and the 64-wide fixed tiles spilled there (sm_90, r = 128: dy pass 1056 B, xa 48–112 B, dx pass
    with dropout 112 B); the passes take narrower tiles (PERF_NOTES "TF32")."""
    return tf32_dots(dtype, precision) and br > 32


FMA_FUSED_MAX_RANK = 32  # fp32 with IEEE dots above this rank: the cublas variant (``fwd_variant``, ``bwd_variant``)
FMA_RANK_CHUNK = 16  # rank chunk of an FMA dot over the rank (sm_90, r = 128: 0 spill with 32-wide tiles)


def rank_chunk(br: int, fma: bool) -> int:
    """Width of the pieces a kernel reduces the (padded) rank ``br`` in: ``FMA_RANK_CHUNK`` for FMA dots, else all
    of it in one ``tl.dot`` (tensor cores take a 128-long reduction in stride)."""
    return min(br, FMA_RANK_CHUNK) if fma else br


# Host-side integer helpers. Plain Python on purpose: ``triton.cdiv`` and ``triton.next_power_of_2`` are
# ConstexprFunction objects costing ~3 µs per host call (triton 3.9, measured with timeit) — a dozen of them per
# layer call was a measurable part of the launch overhead (benchmarks/host_overhead.py).


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for non-negative a and positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def bucket_m(m: int) -> int:
    """Autotune key for the row count: the next power of two (capped), so that each new sequence length does not
    re-tune (as Liger's ``get_bucket_m`` and flash-attention's ``CACHE_KEY_M``)."""
    return min(next_pow2(m), 1 << 16)


def block_r(r: int) -> int:
    """The rank padded to a power of two >= 16: a GPU ``tl.dot`` needs every dimension >= 16; the padding columns
    are masked to zero on load, so they contribute nothing."""
    return max(16, next_pow2(r))


# Shared-memory budget for autotune pruning. On a GPU: the device's own per-block limit (H100 ~227 KiB, A100 ~163,
# consumer Ampere/Ada ~99); elsewhere 96 KiB, which every recent NVIDIA GPU allows. Estimate per config:
# num_stages × (A-tile + B-tile + rank tile) × element size: one buffer per pipeline stage. Against the sizes the
# compiler allocates (benchmarks/compile_check.py --autotune: sm_90, bf16, r = 16, the 18 configs of both lists
# with their flag combinations) this is 0.88× of them or more (the rest is epilogue scratch; it over-estimates
# only the smallest tiles); the earlier (num_stages − 1) × ... was as low as 0.63×. A config that still does not
# fit is skipped by the autotuner itself (OutOfResources, raised before anything runs).
SMEM_BUDGET = 96 * 1024


def smem_budget(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (``SMEM_BUDGET`` when it cannot be queried)."""
    if device.type != "cuda":
        return SMEM_BUDGET
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or SMEM_BUDGET)


def smem_estimate(num_stages: int, tiles: tuple[int, ...], elem_bytes: int) -> int:
    """Bytes of shared memory a pipelined tile loop needs: stages × Σ tile elements × element size."""
    return max(num_stages, 1) * sum(tiles) * elem_bytes


def prune_smem(configs, named_args, ptr: str, tiles) -> list:
    """Keep the autotune configs whose pipelined tiles fit the device's shared memory (the smallest if none does).

    Args:
        configs: triton.Config list with BLOCK_M, BLOCK_N, BLOCK_K. named_args: the launch's arguments.
        ptr: the argument whose element size and device set the estimate ("x_ptr", "dy_ptr").
        tiles: (BLOCK_M, BLOCK_N, BLOCK_K, padded rank) -> element counts of the tiles one pipeline stage holds.
    """
    r_pad, t = block_r(named_args["R"]), named_args[ptr]

    def estimate(c):
        kw = c.kwargs
        return smem_estimate(c.num_stages, tiles(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], r_pad), t.element_size())

    budget = smem_budget(t.device)
    return [c for c in configs if estimate(c) <= budget] or [min(configs, key=estimate)]


def per_thread(config, rows: str, cols: str) -> int:
    """Accumulator elements each thread of a program holds: BLOCK_rows × BLOCK_cols over 32·num_warps threads."""
    kw = config.kwargs
    return kw[rows] * kw[cols] // (32 * config.num_warps)


def tile_config(shape: tuple, fma_only: bool = False, **extra):
    """A ``triton.Config`` from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) plus ``extra`` constants;
    ``fma_only`` marks one kept only for FMA dots (``prune_for_dots``)."""
    import triton

    bm, bn, bk, w, s = shape
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra}, num_warps=w, num_stages=s)
    config.fma_only = fma_only
    return config


def prune_for_dots(configs, fma: bool, fits, cost) -> list:
    """The autotune configs for the kind of dots a launch runs. FMA dots (fp32 with IEEE precision, ``fma_dots``)
    hold each thread's operands over the whole reduction in registers, so large tiles spill kilobytes and take
    tens of seconds to compile: keep the configs ``fits`` accepts (the lowest ``cost`` if none does). Tensor-core
    dots: every config not marked ``fma_only``. The thresholds come from spills measured offline for sm_90
    (``benchmarks/compile_check.py``; PERF_NOTES "fp32 IEEE autotune lists")."""
    if fma:
        return [c for c in configs if fits(c)] or [min(configs, key=cost)]
    return [c for c in configs if not getattr(c, "fma_only", False)]


def config_meta(config) -> dict:
    """A ``triton.Config`` as launch keywords (its tile constants and num_warps/num_stages/...), as the autotuner
    itself passes them to the kernel (``Config.all_kwargs``; older triton: kwargs plus warps and stages)."""
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


class TunedKernel:
    """An autotuned Triton kernel whose launches, once the tuner has chosen a config for a launch key, go straight
    to the JIT kernel with that config.

    ``triton.autotune``'s wrapper redoes its bookkeeping on every launch — a dict of all arguments, a filter of it
    against the argument-name list, ``str(dtype)`` of each tensor — which cost ~29 µs per launch of the LoRA
    forward kernel (38 arguments) on a 2-core CPU even with the key cached (measured with a stubbed kernel;
    benchmarks/PERF_NOTES.md, "host overhead"). Here the first launch of each ``key`` goes through the tuner
    (timing the configs if the tuner has not seen its own key yet) and records ``tuner.best_config``, the config
    it just launched; later launches with that key call ``kernel[grid](..., **config)``: what the tuner itself
    would call.

    ``key`` must determine the tuner's key (it may be finer): the launchers use every autotune key argument plus
    the dtypes and presence of every tensor argument (the seed's included), and the device. One tuner per CUDA
    device (the current one: the launchers make their input's device current first): triton's autotuner caches
    its choice by its key alone, so a second GPU of another model would reuse a config tuned for the first, maybe
    one that does not fit its shared memory. Not thread-safe for the first launch of a key (two threads tuning at
    once could record each other's config; both are valid configs for either key, only not the best).
    """

    def __init__(self, kernel, build_tuner):
        self.kernel = kernel  # the @triton.jit function
        self._build_tuner = build_tuner  # () -> triton.autotune(...)(kernel), built on a device's first launch
        self.tuners: dict[int | None, object] = {}  # CUDA device index (None: CUDA not initialised) -> tuner
        self.chosen: dict[tuple, dict] = {}  # launch key -> launch keywords of the config the tuner chose

    def launch(self, key: tuple, grid, *args, **meta) -> None:
        chosen = self.chosen.get(key)
        if chosen is not None:
            self.kernel[grid](*args, **meta, **chosen, **COMPILE_OPTIONS)
            return
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        tuner = self.tuners.get(device)
        if tuner is None:
            tuner = self.tuners[device] = self._build_tuner()
        tuner[grid](*args, **meta, **COMPILE_OPTIONS)  # the tuner passes them on to each config it compiles
        best = getattr(tuner, "best_config", None)
        if best is not None:
            self.chosen[key] = config_meta(best)


# TMA (Hopper's tensor memory accelerator). The ``tma`` kernel variants load their large tiles through device-side
# tensor descriptors (``tl.make_tensor_descriptor``); a descriptor describes a 2-D tensor whose last dimension is
# contiguous, whose base address and other stride are multiples of 16 bytes, and whose sizes fit int32 (the hardware's
# rules, and triton's). Tensors that break them take the pointer path of the same kernel. Before sm_90 triton lowers
# the descriptors to pointer loads: correct, no faster.
TMA_ALIGN = 16


def tma_ok(t: torch.Tensor, contiguous_dim: int = 1) -> bool:
    """Whether the 2-D tensor ``t`` can back a TMA descriptor whose contiguous dimension is ``contiguous_dim``: unit
    inner stride; an outer stride that is a multiple of 16 bytes and at least a row long (rows neither broadcast —
    the stride-0 dy autograd hands over for ``y.sum(1)`` — nor overlapping, as in ``unfold``: the tensor-map rules,
    which nothing checks for a descriptor built on the device); a 16-byte aligned base; sizes in (0, 2**31)."""
    other = 1 - contiguous_dim
    size = t.element_size()
    return (t.stride(contiguous_dim) == 1 and t.stride(other) >= t.shape[contiguous_dim]
            and (t.stride(other) * size) % TMA_ALIGN == 0 and t.data_ptr() % TMA_ALIGN == 0
            and 0 < min(t.shape) and max(t.shape) < 2**31)


def tma_worth(dtype: torch.dtype, precision: str) -> bool:
    """Whether a TMA variant loads through descriptors at all for these dots: not for FMA dots (fp32 with IEEE
    precision, ``fma_dots``), whose operands are re-laid out from the descriptors' swizzled shared tiles into the FMA
    layout — the fixed 64×64×64 tiles then spilled 0.4–3.6 KB per thread at r = 16 (sm_90, compile_check) where
    the pointer loads spill nothing — and which are FMA-bound, not load-bound. The interpreter takes descriptors
    for every dtype (its dots are exact whatever the precision; the tests check the descriptor indexing there).
    Never with a triton that has no device-side descriptors (``tl.make_tensor_descriptor``, triton ≥ 3.4; setup.py
    allows older ones for the default kernels)."""
    import triton.language as tl

    return hasattr(tl, "make_tensor_descriptor") and (interpreting() or not fma_dots(dtype, precision))


def tma_weight(weight: torch.Tensor, fan_in_fan_out: bool) -> tuple[bool, bool]:
    """(usable, w_kn) for the frozen weight W₀ — (N, K), or (K, N) with ``fan_in_fan_out`` — as a descriptor: with
    N contiguous (``w_kn``: the (K, N) storage of a Conv1D, or a transposed Linear weight) or K contiguous."""
    n_dim = 1 if fan_in_fan_out else 0
    if tma_ok(weight, n_dim):
        return True, True
    return tma_ok(weight, 1 - n_dim), False


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``: the program count of a persistent grid (4 off CUDA, so that the
    interpreter's programs each loop over several tiles)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # torch's CUDA allocations are 512-byte aligned, above the 128 bytes a TMA descriptor asks for
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Give triton an allocator for the global scratch that device-side TMA descriptors are written to (128 bytes
    per descriptor per program; without one the launch fails: "no allocator was set"). triton keeps it in a
    ContextVar, unset by default and per thread — autograd's backward runs on a thread of its own — so this is
    called before each TMA launch; a user's own allocator is left in place."""
    import triton

    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # another triton layout: set ours
        pass
    triton.set_allocator(_torch_scratch)
