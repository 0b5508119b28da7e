"""LoRA backward, ``cublas`` variant: the base dgrad on cuBLAS, the LoRA terms in two skinny Triton passes.

Same math as ``lora_bwd.py`` (g = dy (M, N), s the scaling, p the dropout probability, keep regenerated)::

    dx = g·W₀ + s/(1−p) · keep ⊙ (gb·A),   gb = g·B        (M, K)
    dA = s/(1−p) · gbᵀ·(keep ⊙ x)                          (r, K)
    dB = s · gᵀ·xa                                         (N, r)

split as
    1. dx₀ = g·W₀ by cuBLAS (``torch.matmul``), written into dx                   (M, K) — the FLOPs
       (fp32 without dropout: dx = g·W_effᵀ whole, W_eff = W₀ᵀ + s·Aᵀ·Bᵀ (``merged_weight``); step 3 then only
       reduces dA)
    2. ``_lora_dy_kernel``, one program per row block, one pass over g:
           ĝb[m] = s·g[m]·B    (M, r) fp32, stored          dB += s·g[m]ᵀ·xa[m]   (fp32 atomics)
    3. ``_lora_dx_lora_kernel``, one program per (row block, K block), ĝb read in x's dtype (s applied before
       that rounding, as autograd rounds (s·g)·B — after it, s < 1 could turn a finite fp16 product into inf):
           dx[m, k] += 1/(1−p) · keep ⊙ (ĝb[m]·A[:, k])   (in place)
           dA[:, k] += 1/(1−p) · ĝb[m]ᵀ·(keep ⊙ x[m, k])  (fp32 atomics)

Why: the fused kernel's GEMM core measured 2.0–2.4× cuBLAS's dgrad on an H100 (benchmarks/PERF_NOTES.md); this
variant pays cuBLAS's dgrad plus memory-bound passes — one read of g (pass 2), and a read of x and a
read-modify-write of dx (pass 3): arithmetic says 1.5–1.9× less than the fused v2 backward at the GPT-2 shapes
(PERF_NOTES, "cublas variant"), to be confirmed on a GPU before a rule selects it for 16-bit inputs. It is the
rule for fp32 with IEEE dots above rank 32 (``bwd_variant``), where the fused kernel's FMA dots spill kilobytes
and this variant's passes, on FMA-sized tiles with the rank reduced in chunks, spill nothing (compile data).

Only fp32 atomics (``torch.use_deterministic_algorithms`` keeps the fused kernel, whose partial-sum reduction is
bitwise reproducible). Nothing of size M×K or M×N is allocated beyond dx itself; gb is M×r fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lora_fast.kernels.dots import lora_dot
from lora_fast.kernels.dropout import keep_mask, keep_threshold
from lora_fast.kernels.launch import (
    block_r,
    cdiv,
    fixed_rungs,
    fma_dots,
    input_precision,
    launch_fitting,
    rank_chunk,
    wide_tf32,
)


@triton.jit
def _lora_dy_kernel(
    # pointers (db: (N, r) fp32, added into atomically; gb: (M, r) fp32)
    dy_ptr, b_ptr, xa_ptr, gb_ptr, db_ptr,
    # sizes
    M, N, R,
    # strides
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar, stride_gbm, stride_gbr, stride_dbn,
    stride_dbr,
    # scalars: db_scale = s (also gb's: s·g·B is stored, the product autograd rounds)
    db_scale,
    # switches (DB_RELOAD: fp32 loads gᵀ afresh, as lora_bwd.py does, instead of tl.trans of a tile used twice)
    COMPUTE_GB: tl.constexpr, COMPUTE_DB: tl.constexpr, DB_RELOAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask, r_mask = offs_m < M, offs_r < R
    dtype = dy_ptr.dtype.element_ty
    if COMPUTE_DB:
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BM, R)
    gb_acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = offs_n < N
        g = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)  # (BM, BN)
        if COMPUTE_GB:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BN, R)
            gb_acc = lora_dot(g, b, gb_acc, INPUT_PRECISION)
        if COMPUTE_DB:
            if DB_RELOAD:
                gt = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                             mask=n_mask[:, None] & m_mask[None, :], other=0.0)  # (BN, BM)
                dbp = lora_dot(gt, xa, None, INPUT_PRECISION) * db_scale  # (BN, R)
            else:
                dbp = lora_dot(tl.trans(g), xa, None, INPUT_PRECISION) * db_scale  # (BN, R)
            tl.atomic_add(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, dbp,
                          mask=n_mask[:, None] & r_mask[None, :], sem="relaxed")
    if COMPUTE_GB:
        tl.store(gb_ptr + offs_m[:, None] * stride_gbm + offs_r[None, :] * stride_gbr, gb_acc * db_scale,
                 mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_dx_lora_kernel(
    # pointers (dx: (M, K) holding g·W₀, updated in place; da: (r, K) fp32, added into atomically)
    x_ptr, a_ptr, gb_ptr, dx_ptr, da_ptr, seed_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_gbm, stride_gbr, stride_dxm, stride_dxk, stride_dar,
    stride_dak,
    # scalars: keep_scale = 1/(1−p) (gb holds s·g·B), thr = keep_threshold(p)
    keep_scale, thr,
    # switches (R_CHUNK: the rank is reduced in chunks of this width, see ``rank_chunk``)
    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
):
    """Per (row block, K block), rank chunk by rank chunk c (gb read from memory a chunk at a time, so only
    (BM, R_CHUNK) of it is live):  lora += ĝb[m, c]·A[c, k]  and  dA[c, k] += 1/(1−p)·ĝb[m, c]ᵀ·(keep ⊙ x[m, k]);
    then dx[m, k] += 1/(1−p)·keep ⊙ lora.  (ĝb = s·g·B, from ``_lora_dy_kernel``.)"""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    m_mask, k_mask = offs_m < M, offs_k < K
    mk_mask = m_mask[:, None] & k_mask[None, :]
    dtype = x_ptr.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep = keep_mask(seed, offs_m, pid_k * BLOCK_K, thr, BLOCK_K)  # (BM, BK), drawn once for dx and dA
    if COMPUTE_DA:
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mk_mask, other=0.0)
        if HAS_DROPOUT:
            xk = tl.where(keep, xk, 0.0)  # (BM, BK) = keep ⊙ x
    lora = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    for c in tl.static_range(0, BLOCK_R, R_CHUNK):
        offs_r = c + tl.arange(0, R_CHUNK)
        r_mask = offs_r < R
        if COMPUTE_DX:  # gb rounded to the activations' dtype, as F.linear rounds its input
            gb = tl.load(gb_ptr + offs_m[:, None] * stride_gbm + offs_r[None, :] * stride_gbr,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BM, RC)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(dtype)  # (RC, BK)
            lora = lora_dot(gb, a, lora, INPUT_PRECISION)
        if COMPUTE_DA:  # gbᵀ loaded transposed (no tl.trans of a tile that feeds another dot, see lora_bwd.py)
            gbt = tl.load(gb_ptr + offs_r[:, None] * stride_gbr + offs_m[None, :] * stride_gbm,
                          mask=r_mask[:, None] & m_mask[None, :], other=0.0).to(dtype)  # (RC, BM)
            dap = lora_dot(gbt, xk, None, INPUT_PRECISION) * keep_scale  # (RC, BK)
            tl.atomic_add(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, dap,
                          mask=r_mask[:, None] & k_mask[None, :], sem="relaxed")
    if COMPUTE_DX:
        if HAS_DROPOUT:
            lora = tl.where(keep, lora, 0.0)
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        dx = tl.load(dx_ptrs, mask=mk_mask, other=0.0).to(tl.float32) + keep_scale * lora
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mk_mask)


def merge_exact(dtype: torch.dtype) -> bool:
    """Whether the merged-weight GEMM keeps the LoRA update: in fp32/fp64 W₀ + s·ΔW loses only what is below 2⁻²⁴
    of W₀. In bf16/fp16 the rounding of W₀ + s·ΔW swallows every entry of s·ΔW under half an ulp of W₀ — most of
    a young adapter's update (measured in review: 70 % of entries at |B| ~ 1e-4 in bf16) — while PEFT and the
    fused kernels add the LoRA term to the base output, so 16-bit inputs never merge."""
    return dtype in (torch.float32, torch.float64)


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  fan_in_fan_out: bool) -> torch.Tensor:
    """W_eff = W₀ᵀ + s·Aᵀ·Bᵀ as a (K, N) tensor in W₀'s dtype (one K×r×N product; a transient, never kept):
    with no dropout, x·W_eff = x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ is the whole LoRA forward in one GEMM and dy·W_effᵀ the whole
    dx. Used in fp32/fp64 only (``merge_exact``)."""
    dtype = weight.dtype
    w_kn = weight if fan_in_fan_out else weight.t()  # (K, N) view
    with torch.autocast(weight.device.type, enabled=False):
        return torch.addmm(w_kn, lora_A.to(dtype).t(), lora_B.to(dtype).t(), alpha=float(scaling))  # (K, N)


# One fixed tile per kernel: both are skinny, memory-bound passes (rank-wide products), not worth a tuner yet.
DY_TILE = {"BLOCK_M": 64, "BLOCK_N": 64}
DX_TILE = {"BLOCK_M": 64, "BLOCK_K": 64}
# FMA dots (fp32, TF32 off; ``fma_dots``): 32-wide tiles, the dx pass reducing the rank in 16-wide chunks. Compiled
# for sm_90 at rank 128, the 64-wide tiles spill 0.5–14 KB per thread (dy pass 816 B, dx pass with dropout 14.5 KB);
# these spill nothing (benchmarks/PERF_NOTES.md, "fp32 with IEEE dots").
DY_TILE_FMA = {"BLOCK_M": 32, "BLOCK_N": 32}
DX_TILE_FMA = {"BLOCK_M": 32, "BLOCK_K": 32}
# "tf32x3" dots above rank 32 (``wide_tf32``: each operand held as two TF32 parts): at r = 128 the 64-wide dy tile
# spilled 1056 B (sm_90), 32×32 96 B (0 at r = 64); the dx pass with dropout 112 B at 64×64, 0 at 64×32
DX_TILE_TF32_WIDE = {"BLOCK_M": 64, "BLOCK_K": 32}
# smaller tiles where those need more shared memory than the GPU has (``launch_fitting``; at rank 128 in fp32 the
# dy pass needs 98 KiB on sm_86, whose limit is 99; a T4 allows 64)
DY_FALLBACKS = ({"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
                {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
DX_FALLBACKS = ({"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
                {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2})


def dy_pass(dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor | None, scaling: float, needs_gb: bool,
            needs_dB: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_lora_dy_kernel`` over dy (M, N): returns (ĝb = s·dy·B (M, r) fp32, dB = s·dyᵀ·xa (N, r) fp32, reduced by
    atomics); one not needed is a placeholder never written."""
    M, N = dy.shape
    r = lora_B.shape[1]
    dev = dy.device
    precision = input_precision(dy.dtype)
    fma = fma_dots(dy.dtype, precision)
    tile = DY_TILE_FMA if fma or wide_tf32(dy.dtype, precision, block_r(r)) else DY_TILE
    gb = torch.empty((M, r), dtype=torch.float32, device=dev) if needs_gb else dy  # dummy: never dereferenced
    db = torch.zeros((N, r) if needs_dB else (1, 1), dtype=torch.float32, device=dev)
    xa_arg = xa if needs_dB else dy
    launch_fitting(
        _lora_dy_kernel, lambda: fixed_rungs(tile, dy.dtype, r, DY_FALLBACKS),
        (dy.dtype, lora_B.dtype, xa_arg.dtype, dev), lambda cfg: (cdiv(M, cfg["BLOCK_M"]),),
        dy, lora_B, xa_arg, gb, db,
        M, N, r,
        *dy.stride(), *lora_B.stride(), *xa_arg.stride(), *gb.stride(), *db.stride(),
        float(scaling),
        COMPUTE_GB=needs_gb, COMPUTE_DB=needs_dB, DB_RELOAD=dy.dtype == torch.float32,
        INPUT_PRECISION=precision, BLOCK_R=block_r(r),
    )
    return gb, db


def lora_linear_bwd_cublas(dy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out,
                           needs_dx, needs_dA, needs_dB):
    """The backward in three steps (module docstring). Same contract as ``lora_bwd.lora_linear_bwd``, whose
    checks and empty-case handling have already run: dy is in x's dtype, M > 0, some gradient is needed."""
    M, K = x.shape
    r = lora_A.shape[0]
    dev = x.device
    br, precision = block_r(r), input_precision(x.dtype)
    fma = fma_dots(x.dtype, precision)
    tile = DX_TILE_FMA if fma else DX_TILE_TF32_WIDE if wide_tf32(x.dtype, precision, br) else DX_TILE
    dx = None
    # fp32 without dropout: dx comes whole from one GEMM with the merged weight; else dgrad + the LoRA term added
    fix_dx = needs_dx and (dropout_p > 0.0 or not merge_exact(x.dtype))
    if needs_dx:
        with torch.autocast(dev.type, enabled=False):  # dx in x's dtype even if backward runs under autocast
            if fix_dx:  # dx₀ = g·W₀: W₀ is (N, K) (Linear) or the (K, N) Conv1D storage, read transposed
                dx = torch.matmul(dy, weight.t() if fan_in_fan_out else weight)  # (M, K) contiguous
            else:  # dx = g·(W₀ + s·(B·A)) exactly when nothing is dropped
                dx = torch.matmul(dy, merged_weight(weight, lora_A, lora_B, scaling, fan_in_fan_out).t())
    lora_terms = fix_dx or needs_dA
    gb, db = dy_pass(dy, lora_B, xa, scaling, lora_terms, needs_dB)
    da = None
    if lora_terms:
        da = torch.zeros((r, K) if needs_dA else (1, 1), dtype=torch.float32, device=dev)
        dx_arg = dx if fix_dx else x  # dummy: never dereferenced
        seed_arg = seed if dropout_p > 0.0 else x
        launch_fitting(
            _lora_dx_lora_kernel, lambda: fixed_rungs(tile, x.dtype, r, DX_FALLBACKS),
            (x.dtype, lora_A.dtype, seed_arg.dtype, dev),
            lambda cfg: (cdiv(M, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_K"])),
            x, lora_A, gb, dx_arg, da, seed_arg,
            M, K, r,
            *x.stride(), *lora_A.stride(), *gb.stride(), *dx_arg.stride(), *da.stride(),
            float(1.0 / (1.0 - dropout_p)), keep_threshold(dropout_p),
            COMPUTE_DX=fix_dx, COMPUTE_DA=needs_dA, HAS_DROPOUT=dropout_p > 0.0, INPUT_PRECISION=precision,
            BLOCK_R=br, R_CHUNK=rank_chunk(br, fma),
        )
    dA = (da if da.dtype == lora_A.dtype else da.to(lora_A.dtype)) if needs_dA else None
    dB = (db if db.dtype == lora_B.dtype else db.to(lora_B.dtype)) if needs_dB else None
    return dx, dA, dB
