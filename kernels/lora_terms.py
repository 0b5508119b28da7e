"""Triton device functions for the two LoRA terms the fused backward (``lora_bwd.py``) computes per (row block,
K block) from its register-resident ĝb (the cublas variant's second pass reads ĝb from memory and reduces the rank
in chunks instead, ``lora_bwd_cublas.py``)::

    dx term   keep ⊙ (ĝb·A[:, k])          (BM, BK)   added to dx's accumulator with the scale 1/(1−p)
    dA part   ĝbᵀ·(keep ⊙ x[m, k])         (R, BK)    reduced over row blocks into dA, scaled likewise

ĝb = s·g·B (BM, R) arrives rounded to the activations' dtype, s applied first (autograd rounds (s·g)·B, F.linear's
output; rounding g·B and scaling after could overflow fp16 where autograd does not); ``keep`` is the tile's
dropout mask (``keep_mask``, drawn once by the caller for both terms), None when HAS_DROPOUT is off. The dx term
is added to the caller's fp32 accumulator here; the dA part is returned as an fp32 tile for the caller to scale and
store or reduce.
"""

from __future__ import annotations

import triton
import triton.language as tl
from lora_fast.kernels.dots import lora_dot


@triton.jit
def add_dx_lora_term(acc, gb, keep, keep_scale, a_ptr, offs_r, offs_k, r_mask, k_mask, stride_ar, stride_ak,
                     HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + keep_scale · keep ⊙ (gb·A[:, k]): acc (BM, BK) fp32, gb (BM, R), A's (R, BK) tile loaded here in gb's
    dtype. Without dropout (keep_scale = 1) the product accumulates into acc itself — no second (BM, BK) fp32 tile
    beside acc, which made the 256-wide tiles spill (sm_90, benchmarks/compile_check.py --autotune)."""
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(gb.dtype)  # (R, BK)
    if HAS_DROPOUT:
        return acc + keep_scale * tl.where(keep, lora_dot(gb, a, None, INPUT_PRECISION), 0.0)
    return lora_dot(gb, a, acc, INPUT_PRECISION)


@triton.jit
def da_part(gb, keep, x_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, stride_xk,
            HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """gbᵀ·(keep ⊙ x[m, k]): gb (BM, R), x's (BM, BK) tile loaded here → (R, BK) fp32."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
    if HAS_DROPOUT:
        x = tl.where(keep, x, 0.0)
    return lora_dot(tl.trans(gb), x, None, INPUT_PRECISION)  # (R, BK)
