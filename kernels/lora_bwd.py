"""Fused LoRA backward: dx, dA, dB from dy, x, xa and the seed (the dropout mask is regenerated, never stored).

Forward: y = x·W₀ᵀ + b + s·xa·Bᵀ with xa = (x ⊙ keep)·Aᵀ / (1 − p). Chain rule, with g = dy (M, N):

    dB = s·gᵀ·xa                                            (N, r)   reduction over M
    d(xa) = s·g·B                    =: s·gb, gb = g·B      (M, r)
    dA = d(xa)ᵀ·(x ⊙ keep)/(1 − p) = s/(1−p) · gbᵀ·(x ⊙ keep)  (r, K)   reduction over M, keep regenerated
    dx = g·W₀ + keep ⊙ (d(xa)·A)/(1 − p) = g·W₀ + s/(1−p) · keep ⊙ (gb·A)   (M, K)

No gradient for the frozen W₀ and b. The split into a dx kernel that also produces gb (the small shared factor)
and a weight-gradient kernel follows the usual "dgrad / wgrad" split of GEMM backward passes (e.g. unsloth's
``fast_lora.py`` derives the same three products; the fusion here is ours).

Kernels:
    ``_lora_bwd_dx_kernel``    grid (M/BM, K/BK): loops over N, acc += g·W₀ and gb_acc += g·B in the same loop
                               (each g tile is loaded once for both); epilogue: + s/(1−p)·keep ⊙ (gb·A).
                               With COMPUTE_DX off (x needs no grad) the grid is (M/BM, 1) and only gb is made.
    ``_lora_bwd_wgrad_kernel`` C (r, Q) = scale·Lᵀ·Rop for skinny fp32 L (M, r) and wide Rop (M, Q), the
                               optional dropout mask applied to Rop: dA (L = gb, Rop = x, masked) and
                               dBᵀ (L = xa, Rop = g), stored through strides straight into (N, r) for dB.
                               The M reduction may be split over programs into fp32 partials summed by torch
                               (deterministic, no atomics).
Everything accumulates in fp32; dA and dB are returned in the parameters' dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lora_fast.kernels.dropout import (
    block_r,
    bucket_m,
    input_precision,
    interpreting,
    keep_mask,
    prune_smem,
)


@triton.jit
def _lora_bwd_dx_kernel(
    # pointers
    dy_ptr, w_ptr, a_ptr, b_ptr, dx_ptr, gb_ptr, seed_ptr,
    # sizes (M_BUCKET is only an autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dxm, stride_dxk, stride_gbm, stride_gbr,
    # scalars
    lora_scale, p,
    # switches
    COMPUTE_DX: tl.constexpr, WRITE_GB: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # int64: k·stride may exceed 2**31
    offs_r = tl.arange(0, BLOCK_R)
    m_mask, k_mask, r_mask = offs_m < M, offs_k < K, offs_r < R
    dtype = dy_ptr.dtype.element_ty

    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)  # g·W₀
    gb_acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)  # g·B
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = offs_n < N
        g = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)  # (BM, BN)
        if COMPUTE_DX:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # (BN, BK)
            acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BN, R)
        gb_acc = tl.dot(g, b, gb_acc, input_precision=INPUT_PRECISION)

    if WRITE_GB:
        if pid_k == 0:
            tl.store(gb_ptr + offs_m[:, None] * stride_gbm + offs_r[None, :] * stride_gbr, gb_acc,
                     mask=m_mask[:, None] & r_mask[None, :])
    if COMPUTE_DX:
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(dtype)  # (R, BK)
        lora = tl.dot(gb_acc.to(dtype), a, input_precision=INPUT_PRECISION)  # (BM, BK) = gb·A
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            lora = tl.where(keep_mask(seed, offs_m, offs_k, K, p), lora, 0.0)
        acc += lora_scale * lora
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def _lora_bwd_wgrad_kernel(
    # pointers
    l_ptr, rop_ptr, out_ptr, seed_ptr,
    # sizes: L (M, R), Rop (M, Q), rows handled per split
    M, Q, R, ROWS_PER_SPLIT,
    # strides (out is indexed [split, r, q])
    stride_lm, stride_lr, stride_rm, stride_rq, stride_os, stride_or, stride_oq,
    # scalars
    scale, p,
    # switches
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_q, pid_s = tl.program_id(0), tl.program_id(1)
    offs_q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    q_mask, r_mask = offs_q < Q, offs_r < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    acc = tl.full((BLOCK_R, BLOCK_Q), 0.0, dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_mask = offs_m < m_end
        lt = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)  # (BM, R)
        rop = tl.load(rop_ptr + offs_m[:, None] * stride_rm + offs_q[None, :] * stride_rq,
                      mask=m_mask[:, None] & q_mask[None, :], other=0.0).to(tl.float32)  # (BM, BQ)
        if HAS_DROPOUT:
            rop = tl.where(keep_mask(seed, offs_m, offs_q, Q, p), rop, 0.0)
        acc = tl.dot(tl.trans(lt), rop, acc, input_precision=INPUT_PRECISION)  # (R, BQ)
    out_ptrs = out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_q[None, :] * stride_oq
    tl.store(out_ptrs, acc * scale, mask=r_mask[:, None] & q_mask[None, :])


# Interpreter: fixed tiles (autotune with several configs fails there). GPU: dx is a GEMM like the forward and
# gets the forward's small autotune list; wgrad is skinny (r rows) and uses one fixed tile.
INTERPRET_DX_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
WGRAD_BLOCK_M, WGRAD_BLOCK_Q = 64, 64


def get_dx_configs() -> list[triton.Config]:
    """GPU autotune space for the dx kernel. Unverified on a GPU in the building session."""
    shapes = [(128, 32, 128, 8, 3), (64, 32, 128, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
              (32, 32, 64, 4, 2)]  # the last: small enough for fp32 at rank 128 on any GPU
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def prune_dx_configs(configs, named_args, **kwargs):
    """Keep the configs whose pipelined tiles — dy (BM, BN), W₀ (BN, BK), B (BN, R) — fit the shared memory."""
    return prune_smem(configs, named_args, "dy_ptr", lambda bm, bn, bk, r: (bm * bn, bn * bk, bn * r))


_dx_tuned = None


def _dx_kernel():
    global _dx_tuned
    if interpreting():
        return _lora_bwd_dx_kernel, INTERPRET_DX_CONFIG
    if _dx_tuned is None:
        _dx_tuned = triton.autotune(get_dx_configs(), key=["N", "K", "R", "M_BUCKET", "COMPUTE_DX"],
                                    prune_configs_by={"early_config_prune": prune_dx_configs})(_lora_bwd_dx_kernel)
    return _dx_tuned, {}


def _n_splits(M: int, q_tiles: int, device: torch.device) -> int:
    """How many programs share the M reduction of wgrad: enough for ~2 waves of SMs, >= 4 row blocks each."""
    if interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(2 * sms // max(q_tiles, 1), triton.cdiv(M, 4 * WGRAD_BLOCK_M)))


def _wgrad(lmat, rop, out, scale, p, seed, precision, splits=None):
    """out (P, Q) ← scale · lmatᵀ · (rop, masked when p > 0); out may be a strided view (dB written as (N, r)).
    ``splits`` (how many programs share the M reduction) is chosen from the SM count unless given (tests)."""
    M, Q = rop.shape
    R = lmat.shape[1]
    q_tiles = triton.cdiv(Q, WGRAD_BLOCK_Q)
    splits = _n_splits(M, q_tiles, rop.device) if splits is None else splits
    rows = triton.cdiv(triton.cdiv(M, splits), WGRAD_BLOCK_M) * WGRAD_BLOCK_M
    splits = triton.cdiv(M, rows)
    # one split writes straight into out; several write fp32 partials (splits, P, Q), summed below (deterministic)
    part = out.unsqueeze(0) if splits == 1 else torch.empty((splits, *out.shape), dtype=torch.float32,
                                                             device=out.device)
    _lora_bwd_wgrad_kernel[(q_tiles, splits)](
        lmat, rop, part, seed if p > 0.0 else lmat,
        M, Q, R, rows,
        lmat.stride(0), lmat.stride(1), rop.stride(0), rop.stride(1), part.stride(0), part.stride(1), part.stride(2),
        float(scale), float(p),
        HAS_DROPOUT=p > 0.0, INPUT_PRECISION=precision,
        BLOCK_M=WGRAD_BLOCK_M, BLOCK_Q=WGRAD_BLOCK_Q, BLOCK_R=block_r(R),
    )
    if splits > 1:
        out.copy_(part.sum(0))


def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    fan_in_fan_out: bool = False,
    needs_dx: bool = True,
    needs_dA: bool = True,
    needs_dB: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward on 2-D tensors. Returns (dx in x's dtype, dA in A's dtype, dB in B's dtype); a gradient
    that is not needed is None and not computed.

    Args:
        dy: (M, N) in x's dtype, any strides. x: (M, K) as given to the forward. xa: (M, r) fp32 from the forward
            (needed for dB). weight: (N, K), or (K, N) with ``fan_in_fan_out``. lora_A: (r, K). lora_B: (N, r).
        scaling: s. dropout_p: p (0 when dropout was off). seed: the forward's seed tensor when p > 0.
        needs_dx, needs_dA, needs_dB: which gradients to produce.
    """
    M, K = x.shape
    N = dy.shape[1]
    r = lora_A.shape[0]
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    precision = input_precision(x.dtype)
    keep_scale = 1.0 / (1.0 - dropout_p)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs_dx else None
    dA = torch.zeros((r, K), dtype=torch.float32, device=x.device) if needs_dA else None
    dB = torch.zeros((N, r), dtype=torch.float32, device=x.device) if needs_dB else None
    if M == 0:
        return (dx, dA.to(lora_A.dtype) if needs_dA else None, dB.to(lora_B.dtype) if needs_dB else None)

    gb = torch.empty((M, r), dtype=torch.float32, device=x.device) if needs_dA else None  # dy·B
    if needs_dx or needs_dA:
        stride_wk, stride_wn = weight.stride() if fan_in_fan_out else weight.stride()[::-1]
        kernel, meta = _dx_kernel()
        grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]) if needs_dx else 1)  # noqa: E731
        dx_arg, gb_arg = (dx if needs_dx else dy), (gb if needs_dA else dy)  # dummies are never dereferenced
        kernel[grid](
            dy, weight, lora_A, lora_B, dx_arg, gb_arg, seed if dropout_p > 0.0 else dy,
            M, N, K, r, bucket_m(M),
            dy.stride(0), dy.stride(1), stride_wn, stride_wk, lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), dx_arg.stride(0), dx_arg.stride(1), gb_arg.stride(0), gb_arg.stride(1),
            float(scaling * keep_scale), float(dropout_p),
            COMPUTE_DX=needs_dx, WRITE_GB=needs_dA, HAS_DROPOUT=dropout_p > 0.0, INPUT_PRECISION=precision,
            BLOCK_R=block_r(r), **meta,
        )
    if needs_dA:  # dA (r, K) = s/(1−p) · gbᵀ · (x ⊙ keep)
        _wgrad(gb, x, dA, scaling * keep_scale, dropout_p, seed, precision)
    if needs_dB:  # dBᵀ (r, N) = s · xaᵀ · dy, stored transposed into dB (N, r)
        if xa is None:
            raise ValueError("dB needs xa from the forward pass")
        _wgrad(xa, dy, dB.t(), scaling, 0.0, seed, precision)
    return dx, (dA.to(lora_A.dtype) if needs_dA else None), (dB.to(lora_B.dtype) if needs_dB else None)
