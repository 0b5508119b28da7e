"""The two kinds of ``tl.dot`` in the LoRA kernels, and how each treats fp32 operands when torch allows TF32.

    base_dot   the frozen GEMMs: x·W₀ᵀ (forward), g·W₀ (backward dgrad)          — ~96 % of the FLOPs at r = 16
    lora_dot   every rank-r product: xa = x·Aᵀ, s·xa·Bᵀ, g·B, gᵀ·xa, ĝb·A, ĝbᵀ·x  — the rest

``INPUT_PRECISION`` is what the launcher read from torch (``launch.input_precision``): "ieee" (torch's default for
fp32), "tf32" (torch allows TF32), and "tf32" for fp16/bf16 operands, where it means nothing. Only fp32 operands
with "tf32" are changed here:

- Why: a TF32 tensor-core dot keeps 10 of fp32's 23 mantissa bits, and triton hands it the fp32 operands as they
  are, so the hardware drops the 13 low bits — a truncation, always towards zero (triton's own ``tl.dot`` docstring
  warns of it; triton issue #4574) — where cuBLAS, and so torch's TF32 matmuls, round. Truncation errs by up to one
  TF32 unit (2⁻¹⁰ of the binade), ≈ 3.4e-4 of mean bias per operand, coherent over a dot's terms (≈ 7e-4 for a
  product of two); rounding errs by at most half a unit either way (≈ 2e-4 rms per operand) and averages out. The
  H100 measured xa 6.9e-4–7.7e-4, y 7.1e-4–8.0e-4, dx 8.7e-4–9.4e-4 and, where three dots chain, dA up to 3.9e-3
  (``benchmarks/results/h100_2026-11-22/fp32_check.log``), against the project's 5e-4 for fp32 with TF32.
- ``base_dot`` rounds both operands to the nearest TF32 value (ties to even, ``tf32_round``) before the dot: the
  hardware's truncation of a TF32 value is exact, so the product is what a rounding TF32 GEMM computes — torch's
  error level, for an integer pass over each operand tile (not timed yet).
- ``lora_dot`` runs "tf32x3" (each operand split into a TF32 high part and a TF32 low part, three dots: ~fp32
  accuracy, triton PR #4934) on the rank-r products: 3× the MMA work on ~4 % of the FLOPs, and dA = s·(g·B)ᵀ·x,
  a chain of three dots, keeps fp32 accuracy instead of compounding three TF32 errors.

With the interpreter's dots made to truncate as the tensor cores do (``tests/test_tf32.py``, r = 16): before, y
8.8e-4, dx 1.1e-3, dA 1.5e-3; after, y and dx 1.9e-4–2.3e-4, xa, dA, dB < 1e-6. The default route for fp32 with
TF32 is the ``cublas`` variant (``lora_fwd.fwd_variant``): its frozen GEMMs are torch's own TF32 matmuls and its
Triton passes hold only ``lora_dot`` products; ``base_dot`` serves the fused kernels — deterministic mode's
backward and the forced variants.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tf32_round(t):
    """fp32 tile → the nearest TF32 value of each element (10 mantissa bits kept, ties to even), still stored as
    fp32; Inf unchanged, NaN kept NaN (quiet), a finite value rounding past the largest TF32 becomes Inf (as IEEE
    rounding does).

    Bits: adding 0xFFF plus the lowest kept bit to the 32-bit pattern and clearing the 13 low bits rounds the
    mantissa to nearest, ties to even; a carry out of the mantissa increments the exponent, which is the correct
    result (the next binade, or Inf). The same arithmetic as a TMA load through a TFLOAT32 tensor map (triton's
    interpreter models it so), which leaves NaNs as they are."""
    bits = t.to(tl.uint32, bitcast=True)
    special = (bits & 0x7F800000) == 0x7F800000  # Inf or NaN: the carry would corrupt them
    rounded = (bits + (((bits >> 13) & 1) + 0xFFF)) & 0xFFFFE000
    # a NaN is made quiet (top mantissa bit set): a payload only in the 13 low bits would read as Inf to the dot
    kept = tl.where((bits & 0x7FFFFF) != 0, bits | 0x400000, bits)
    return tl.where(special, kept, rounded).to(tl.float32, bitcast=True)


@triton.jit
def base_dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """acc + a·b for the frozen GEMMs: fp32 with TF32 on rounded operands (module docstring), else as asked."""
    if INPUT_PRECISION == "tf32" and a.dtype == tl.float32:
        return tl.dot(tf32_round(a), tf32_round(b), acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def lora_dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """acc + a·b (acc None: a·b) for a rank-r product: fp32 with TF32 as "tf32x3" (module docstring), else as
    asked."""
    if INPUT_PRECISION == "tf32" and a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
