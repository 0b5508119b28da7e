"""Dropout without stored masks: the shared keep-mask RNG helper, its mask kernel, and launch helpers.

The keep-mask of an (M, K) LoRA input is a pure function of (seed, global row, global column):

    keep[m, k] = draw(seed, m, k) >= t,   t = round(p·2¹⁶)      (``keep_threshold``; kept values scaled by 1/(1−p))
    draw(seed, m, 8g + j) = 16-bit half j % 2 of word j // 2 of Philox-4x32-10(key = seed, counter = (g, m_lo, m_hi, 0))

The counter is the element's *logical* (row, column), never a memory offset or a tile coordinate, so the mask does
not depend on strides, block sizes or the launch grid: the forward kernels, the backward kernel and
``dropout_mask`` all regenerate the same bits (``lora_fast.rng.keep_mask_numpy`` is an independent numpy
implementation the tests compare with). One Philox call (10 rounds of 32-bit multiplies: what regenerating a mask
costs) yields 8 draws: measured on an H100, one draw per call made a single pass over a 8192×768 mask cost about
half of a cuBLAS GEMM of that x (benchmarks/PERF_NOTES.md). Nothing is stored between
forward and backward but the seed. The idea of regenerating dropout from a counter-based RNG instead of saving the
mask is the one of triton's ``tutorials/04-low-memory-dropout.py`` and of FlashAttention's dropout.

The seed travels as a 1-element int64 tensor on the input's device and is loaded inside the kernels: drawing it
from the CUDA generator (``torch.randint(..., device=x.device)``) then needs no host synchronisation, and
``torch.utils.checkpoint`` (which stashes and restores the device RNG state) recomputes the same seed.

Also here (shared by the launchers): ``interpreting()``, ``input_precision``, ``bucket_m``, ``block_r``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lora_fast.functional import SEED_HIGH, seed_tensor  # noqa: F401  (re-exported for the launchers)
from lora_fast.rng import keep_threshold  # noqa: F401  (re-exported for the launchers)

MAX_RANK = 128  # the rank tile (BLOCK_R) lives in registers next to the output tile; 128 is the largest we allow


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set: kernels run on CPU tensors through triton's numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    """False when ``LORA_FAST_AUTOTUNE=0``: the GPU kernels then launch one fixed, everywhere-valid tile instead of
    timing their config lists on each new (shape, rank, M-bucket) key — for tests of many small shapes, and for
    launches that must not spend the first call of each shape on tuning."""
    return os.environ.get("LORA_FAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def fixed_stages(dtype: torch.dtype, r: int) -> int:
    """Pipeline depth of the fixed 64×64×64 tile: 3, or 2 for fp32 at rank > 64 (whose rank tile would otherwise
    exceed the ~99 KiB of shared memory of consumer GPUs)."""
    return 2 if dtype == torch.float32 and r > 64 else 3


def fixed_meta(tile: dict, dtype: torch.dtype, r: int) -> dict:
    """Launch meta for a kernel run without autotuning: the tile, plus warps and pipeline depth on a GPU (the
    interpreter takes neither)."""
    return dict(tile) if interpreting() else {**tile, "num_warps": 4, "num_stages": fixed_stages(dtype, r)}


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


def bucket_m(m: int) -> int:
    """Autotune key for the row count: the next power of two (capped), so that each new sequence length does not
    re-tune (as Liger's ``get_bucket_m`` and flash-attention's ``CACHE_KEY_M``)."""
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def block_r(r: int) -> int:
    """The rank padded to a power of two >= 16: a GPU ``tl.dot`` needs every dimension >= 16; the padding columns
    are masked to zero on load, so they contribute nothing."""
    return max(16, triton.next_power_of_2(r))


# Philox-4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), as in tl.rand.
_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
_PHILOX_ROUNDS = tl.constexpr(10)
_UINT_TO_UNIFORM = tl.constexpr(4.6566127342e-10)  # max int32 · this < 1.0 in fp32, as tl.rand's scale

DRAWS_PER_PHILOX = 8  # one Philox-4x32 call gives 4 words = 8 draws of 16 bits
DRAW_BITS = 16


@triton.jit
def philox(seed, c0, c1, c2, c3):
    """Philox-4x32-10 of the counter words (c0, c1, c2, c3) (uint32 tensors of one shape) under the int64 ``seed``
    (key = its low and high words): the 4 uint32 output words, the rounds of ``tl.randint4x``. Written out rather
    than calling triton's library because triton's own library functions are fixed to compiled mode when triton is
    imported before ``TRITON_INTERPRET=1`` is set (any process that imported peft first), while functions of this
    module follow the variable at their own import. For the same reason the kernels here use only builtins
    (``tl.full``, not the library's ``tl.zeros``/``tl.cdiv``)."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(_PHILOX_ROUNDS):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(_PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = tl.mul(_PHILOX_ROUND_B, _c2, sanitize_overflow=False)
        c3 = tl.mul(_PHILOX_ROUND_A, _c0, sanitize_overflow=False)
        k0 = tl.add(k0, _PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def uniform(seed, offset):
    """U[0, 1) fp32 for int64 counters ``offset``: bit-identical to ``tl.rand(seed, offset)`` (Philox-4x32-10 on
    (offset_lo, offset_hi, 0, 0), first word mapped to [0, 1)). Not used by the LoRA kernels (``keep_mask`` draws
    8 masks per Philox call); kept as the check that ``philox`` is triton's generator."""
    c0 = offset.to(tl.uint32)  # low word (truncation)
    c1 = (offset >> 32).to(tl.uint32)  # high word: counters past 2**32 stay distinct
    r0, _, _, _ = philox(seed, c0, c1, c0 * 0, c0 * 0)
    x = r0.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)  # fold the sign: uniform over [0, 2**31)
    return x * _UINT_TO_UNIFORM


@triton.jit
def _halves(w):
    """The low and high 16 bits of uint32 words, as int32."""
    return (w & 0xFFFF).to(tl.int32), (w >> 16).to(tl.int32)


@triton.jit
def keep_mask(seed, offs_m, k_start, thr, BLOCK_C: tl.constexpr):
    """Boolean keep-mask tile (len(offs_m), BLOCK_C) of rows ``offs_m`` (int64) and columns k_start ..
    k_start + BLOCK_C − 1 (k_start a multiple of 8, BLOCK_C of 8): keep[m, k] = draw(m, k) >= thr.

    The 16-bit draws: Philox-4x32-10 keyed by the seed, counter (k // 8, m_lo, m_hi, 0), gives words w0..w3;
    draw(m, 8g + j) = bits 16(j % 2) .. 16(j % 2) + 15 of w_{j // 2}. One Philox call serves 8 elements (the costly
    part of regenerating a mask: ~10 integer multiply rounds) and the counter is the element's logical (row,
    column), so the mask does not depend on strides, tiles or K.
    """
    tl.static_assert(BLOCK_C % 8 == 0, "keep_mask: BLOCK_C must be a multiple of 8 (one Philox call per 8)")
    G: tl.constexpr = BLOCK_C // 8
    rows = offs_m.to(tl.int64)[:, None] + tl.full((1, G), 0, tl.int64)  # (BM, G)
    groups = (k_start // 8 + tl.arange(0, G)).to(tl.uint32)[None, :] + tl.full(rows.shape, 0, tl.uint32)
    r0, r1, r2, r3 = philox(seed, groups, rows.to(tl.uint32), (rows >> 32).to(tl.uint32), groups * 0)
    h0, h1 = _halves(r0)
    h2, h3 = _halves(r1)
    h4, h5 = _halves(r2)
    h6, h7 = _halves(r3)
    # tl.join adds a new minor dimension: this nesting puts draw j at position j of each group of 8
    draws = tl.join(tl.join(tl.join(h0, h4), tl.join(h2, h6)), tl.join(tl.join(h1, h5), tl.join(h3, h7)))
    return tl.reshape(draws, (offs_m.shape[0], BLOCK_C)) >= thr  # (BM, G, 2, 2, 2) → (BM, BLOCK_C)


@triton.jit
def _dropout_mask_kernel(
    # pointers
    seed_ptr, out_ptr,
    # sizes
    M, K,
    # strides
    stride_om, stride_ok,
    # dropout threshold (keep_threshold(p))
    thr,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = keep_mask(seed, offs_m, pid_k * BLOCK_K, thr, BLOCK_K)  # (BM, BK)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok
    out_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptrs, keep.to(tl.uint8), mask=out_mask)


def dropout_keep_mask(seed: int | torch.Tensor, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """Launcher: the (rows, cols) boolean keep-mask the LoRA kernels use for an input of that shape."""
    for name, v in (("rows", rows), ("cols", cols)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    thr = keep_threshold(p)
    device = torch.device(device)
    if device.type == "cpu" and not interpreting():
        raise RuntimeError("dropout_mask on CPU needs TRITON_INTERPRET=1 (the mask comes from a Triton kernel)")
    if seed is None:  # a mask "for no seed" would be a fresh random one: never what a caller comparing masks wants
        raise ValueError("seed must be an int (or a 1-element int64 tensor), got None")
    seed_t = seed_tensor(seed, device)
    out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    if rows and cols:
        block_m, block_k = 64, 64  # any tile works: the mask is tile-size independent
        grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))
        _dropout_mask_kernel[grid](seed_t, out, rows, cols, out.stride(0), out.stride(1), thr,
                                   BLOCK_M=block_m, BLOCK_K=block_k)
    return out.view(torch.bool)


# Shared-memory budget for autotune pruning. On a GPU: the device's own per-block limit (H100 ~227 KiB, A100 ~163,
# consumer Ampere/Ada ~99); elsewhere 96 KiB, which every recent NVIDIA GPU allows. Estimate per config:
# (num_stages − 1) × (A-tile + B-tile + rank tile) × element size — the buffers the software pipeline keeps in flight.
SMEM_BUDGET = 96 * 1024


def smem_budget(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (``SMEM_BUDGET`` when it cannot be queried)."""
    if device.type != "cuda":
        return SMEM_BUDGET
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or SMEM_BUDGET)


def smem_estimate(num_stages: int, tiles: tuple[int, ...], elem_bytes: int) -> int:
    """Bytes of shared memory a pipelined tile loop needs: (stages − 1) × Σ tile elements × element size."""
    return max(num_stages - 1, 1) * sum(tiles) * elem_bytes


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
