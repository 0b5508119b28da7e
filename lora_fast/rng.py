"""The Triton kernels' dropout keep-mask, computed independently in numpy (the test oracle for ``keep_mask``).

    keep[m, k] = draw(seed, m, k) >= t,   t = keep_threshold(p) = min(round(p·2¹⁶), 2¹⁶ − 1)
    draw(seed, m, 8g + j) = bits 16(j % 2) .. 16(j % 2) + 15 of word j // 2 of
                            Philox-4x32-10(key = (seed_lo, seed_hi), counter = (g, m_lo, m_hi, 0))

Philox-4x32-10 as specified by Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011), with the
round and key constants Triton's ``tl.randint4x`` uses. No torch or triton here: numpy's uint64 arithmetic holds the
full 64-bit product of two 32-bit words, so ``mulhi`` is exact.
"""

from __future__ import annotations

import numpy as np

_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO32 = np.uint64(0xFFFFFFFF)
_ROUNDS = 10
DRAW_BITS = 16  # one Philox call: 4 words = 8 draws of 16 bits


def keep_threshold(p: float) -> int:
    """The integer form of p the kernels compare with: an element is kept when its 16-bit draw u >= t, t = round(p·2¹⁶)
    (capped at 2¹⁶ − 1, so that p < 1 keeps something), so P(keep) = 1 − t/2¹⁶, within 2⁻¹⁷ of 1 − p below
    the cap (p ≤ 1 − 2⁻¹⁷). Kept elements are scaled by 1/(1 − p), as in
    torch's dropout; E[dropout(x)] = x·(1 − t/2¹⁶)/(1 − p) differs from x by at most 2⁻¹⁷/(1 − p) relative
    (8.5e-6 at p = 0.1): far below one bf16 or fp32-accumulation rounding of the LoRA term."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    return min(int(round(p * (1 << DRAW_BITS))), (1 << DRAW_BITS) - 1)


def philox4x32(seed: int, c0, c1, c2, c3) -> tuple[np.ndarray, ...]:
    """Philox-4x32-10 of uint32 counter arrays (held in uint64) under a 64-bit seed: the four output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _LO32 for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(_ROUNDS):
        p0, p2 = _ROUND_A * c0, _ROUND_B * c2  # exact 64-bit products of 32-bit words
        c0, c1, c2, c3 = (p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & _LO32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _LO32
        k0, k1 = (k0 + _KEY_A) & _LO32, (k1 + _KEY_B) & _LO32
    return c0, c1, c2, c3


def keep_mask_numpy(seed: int, rows: int, cols: int, p: float) -> np.ndarray:
    """The (rows, cols) boolean keep-mask of the kernels (``lora_fast.dropout_mask``), computed in numpy."""
    thr = keep_threshold(p)
    groups = -(-cols // 8)
    m = np.arange(rows, dtype=np.uint64)[:, None] + np.zeros((1, groups), dtype=np.uint64)  # (rows, G)
    g = np.arange(groups, dtype=np.uint64)[None, :] + np.zeros((rows, 1), dtype=np.uint64)
    words = philox4x32(seed, g, m & _LO32, m >> np.uint64(32), np.zeros_like(g))
    draws = np.stack([h for w in words for h in (w & np.uint64(0xFFFF), w >> np.uint64(16))], axis=-1)  # (rows, G, 8)
    return (draws.reshape(rows, groups * 8)[:, :cols] >= thr)
