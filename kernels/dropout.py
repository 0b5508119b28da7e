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

The host-side launch helpers the launchers share (tiles, autotune, environment switches) are in ``launch.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lora_fast.kernels.launch import COMPILE_OPTIONS, cdiv, device_current, interpreting

from lora_fast.functional import SEED_HIGH, seed_tensor  # noqa: F401  (re-exported for the launchers)
from lora_fast.rng import keep_threshold  # noqa: F401  (re-exported for the launchers)

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
def _philox_key(seed):
    """The Philox key: the low and high uint32 words of the int64 ``seed``."""
    seed = seed.to(tl.uint64)
    return (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _philox_tl_mul(seed, c0, c1, c2, c3):
    """Philox-4x32-10 of the counter words (c0, c1, c2, c3) (uint32 tensors of one shape) under the int64 ``seed``
    (key = its low and high words): the 4 uint32 output words, the rounds of ``tl.randint4x``. Written out rather
    than calling triton's library because triton's own library functions are fixed to compiled mode when triton is
    imported before ``TRITON_INTERPRET=1`` is set (any process that imported peft first), while functions of this
    module follow the variable at their own import. For the same reason the kernels here use only builtins
    (``tl.full``, not the library's ``tl.zeros``/``tl.cdiv``)."""
    k0, k1 = _philox_key(seed)
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
def _philox_wide(seed, c0, c1, c2, c3):
    """``_philox_tl_mul`` for triton 3.4 and 3.5, which do not export ``tl.mul``/``tl.add``: the wrapping uint32
    products and sums are computed in uint64 (where they cannot overflow, so no overflow check applies) and
    truncated — the same words (tested against ``_philox_tl_mul`` and the numpy Philox). Not used where ``tl.mul``
    exists: only ``_philox_tl_mul`` has been timed on a GPU."""
    k0, k1 = _philox_key(seed)
    for _ in tl.static_range(_PHILOX_ROUNDS):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(_PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = (_c2.to(tl.uint64) * _PHILOX_ROUND_B).to(tl.uint32)
        c3 = (_c0.to(tl.uint64) * _PHILOX_ROUND_A).to(tl.uint32)
        k0 = (k0.to(tl.uint64) + _PHILOX_KEY_A).to(tl.uint32)
        k1 = (k1.to(tl.uint64) + _PHILOX_KEY_B).to(tl.uint32)
    return c0, c1, c2, c3


# Chosen once, by name: triton's JIT resolves every ``tl.<name>`` in the source of each function a kernel reaches
# (dead branches included), so a kernel that could reach ``_philox_tl_mul`` would not compile on triton < 3.6.
philox = _philox_tl_mul if hasattr(tl, "mul") and hasattr(tl, "add") else _philox_wide


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
        grid = (cdiv(rows, block_m), cdiv(cols, block_k))
        with device_current(device):  # triton launches on the current device (launch.device_current)
            _dropout_mask_kernel[grid](seed_t, out, rows, cols, out.stride(0), out.stride(1), thr,
                                       BLOCK_M=block_m, BLOCK_K=block_k, **COMPILE_OPTIONS)
    return out.view(torch.bool)
