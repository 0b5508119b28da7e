"""Triton device functions for the two LoRA terms that every backward computes per (row block, K block), shared
by the fused backward (``lora_bwd.py``) and the cublas variant's second pass (``lora_bwd_cublas.py``)::

    dx term   keep ⊙ (gb·A[:, k])          (BM, BK)   added to dx with the scale s/(1−p)
    dA part   gbᵀ·(keep ⊙ x[m, k])         (R, BK)    reduced over row blocks into dA, scaled likewise

gb = g·B (BM, R) arrives rounded to the activations' dtype (as F.linear rounds its input); ``keep`` is the tile's
dropout mask (``keep_mask``, drawn once by the caller for both terms), None when HAS_DROPOUT is off. Both return
fp32 tiles; the caller scales and stores or reduces them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dx_lora_term(gb, keep, a_ptr, offs_r, offs_k, r_mask, k_mask, stride_ar, stride_ak,
                 HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """keep ⊙ (gb·A[:, k]): gb (BM, R), A's (R, BK) tile loaded here in gb's dtype → (BM, BK) fp32."""
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(gb.dtype)  # (R, BK)
    lora = tl.dot(gb, a, input_precision=INPUT_PRECISION)  # (BM, BK)
    if HAS_DROPOUT:
        lora = tl.where(keep, lora, 0.0)
    return lora


@triton.jit
def da_part(gb, keep, x_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, stride_xk,
            HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """gbᵀ·(keep ⊙ x[m, k]): gb (BM, R), x's (BM, BK) tile loaded here → (R, BK) fp32."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
    if HAS_DROPOUT:
        x = tl.where(keep, x, 0.0)
    return tl.dot(tl.trans(gb), x, input_precision=INPUT_PRECISION)  # (R, BK)
