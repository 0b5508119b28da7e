"""Fused LoRA forward: y = x·W₀ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ, and xa = dropout(x)·Aᵀ (M, r) for the backward.

    x (M, K)   W₀ (N, K) Linear or (K, N) Conv1D (strides only)   A (r, K)   B (N, r)   b (N,)   s: float

Two variants of one kernel (``fwd_variant`` picks; both tested against the float64 reference; ``cublas`` and the
TMA forms of xa_first are described there):

``one_pass`` (one program per (BLOCK_M, BLOCK_N) output tile, grouped along M for L2 reuse as in triton's
``tutorials/03-matrix-multiplication.py``)::

    for each K block:  x̂ = x[m, k]                         (BM, BK)   loaded once, used twice:
                       acc    += x̂ · W₀ᵀ[k, n]               (BM, BN)   the base product
                       xa_acc += (keep ⊙ x̂) · Aᵀ[k, :R]     (BM, R)    the LoRA down-projection
    epilogue:          xa   = xa_acc / (1 − p)                          (dropout scale applied once, on M×r)
                       y    = acc + s · xa · Bᵀ[:R, n] + b[n]           up-projection, scaling, bias
                       programs with pid_n == 0 also store xa (M, r) in fp32, for the backward pass.

``xa_first``: ``_lora_xa_kernel`` computes xa once (one pass over x, the mask drawn once per element), then the
same GEMM kernel with ``XA_IN`` reads xa in its epilogue instead of computing it. The one-pass kernel recomputes xa
— and regenerates the dropout mask — in each of the N/BLOCK_N programs of a row block: R/BLOCK_N extra FLOPs and
N/BLOCK_N mask draws per element, which on an H100 made it 1.5–1.9× slower than xa_first with dropout on.

No M×N or M×K intermediate is written: dropout(x) exists only as register tiles (keep ⊙ x̂). The rank is padded to
R = max(16, next_pow2(r)) with masked (zero) loads: a GPU ``tl.dot`` needs every side >= 16.

Known limits: r <= 128 (``MAX_RANK``); x, W₀ in fp32/fp16/bf16 with equal dtypes; A, B any float dtype (tiles
are cast to the compute dtype, as autocast casts them for ``F.linear``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lora_fast.kernels.dots import base_dot, lora_dot
from lora_fast.kernels.dropout import keep_mask, keep_threshold
from lora_fast.kernels.launch import (
    FMA_FUSED_MAX_RANK,
    MAX_RANK,
    TunedKernel,
    autotune_enabled,
    block_r,
    bucket_m,
    cdiv,
    ensure_scratch_allocator,
    fixed_rungs,
    fma_dots,
    input_precision,
    interpreting,
    launch_fitting,
    num_sms,
    on_input_device,
    per_thread,
    prune_for_dots,
    prune_smem,
    tf32_dots,
    tile_config,
    tma_ok,
    tma_weight,
    tma_worth,
    variant_override,
    wide_tf32,
)
from lora_fast.kernels.lora_bwd_cublas import merge_exact, merged_weight


@triton.jit
def _lora_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr, seed_ptr,
    # sizes (M_BUCKET is only an autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_xam, stride_xar,
    # scalars (thr: keep_threshold(p))
    scaling, thr, keep_scale,
    # switches (XA_IN: xa was computed by _lora_xa_kernel and is read from xa_ptr instead of computed here;
    # TMA: x, W₀ and y through tensor descriptors, W_KN: W₀ stored (K, N); PERSISTENT: each program loops over
    # output tiles, the grid is at most one program per SM)
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_XA: tl.constexpr, XA_IN: tl.constexpr,
    TMA: tl.constexpr, W_KN: tl.constexpr, PERSISTENT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # the descriptors are built once per program (a device-side TMA descriptor is written to global scratch and
    # fenced: not per tile)
    x_desc, w_desc, y_desc = None, None, None
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        if W_KN:
            w_desc = tl.make_tensor_descriptor(w_ptr, [K, N], [stride_wk, 1], [BLOCK_K, BLOCK_N])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
        y_desc = tl.make_tensor_descriptor(y_ptr, [M, N], [stride_ym, 1], [BLOCK_M, BLOCK_N])
    if PERSISTENT:
        num_tiles = ((M + BLOCK_M - 1) // BLOCK_M) * ((N + BLOCK_N - 1) // BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _fwd_tile(tile, x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr, seed_ptr, x_desc, w_desc, y_desc,
                      M, N, K, R, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn,
                      stride_br, stride_ym, stride_yn, stride_xam, stride_xar, scaling, thr, keep_scale,
                      HAS_BIAS, HAS_DROPOUT, WRITE_XA, XA_IN, TMA, W_KN, INPUT_PRECISION,
                      BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M)
    else:
        _fwd_tile(tl.program_id(0), x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr, seed_ptr, x_desc, w_desc,
                  y_desc, M, N, K, R, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn,
                  stride_br, stride_ym, stride_yn, stride_xam, stride_xar, scaling, thr, keep_scale,
                  HAS_BIAS, HAS_DROPOUT, WRITE_XA, XA_IN, TMA, W_KN, INPUT_PRECISION,
                  BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M)


@triton.jit
def _fwd_tile(
    tile, x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr, seed_ptr, x_desc, w_desc, y_desc,
    M, N, K, R, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_xam, stride_xar, scaling, thr, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_XA: tl.constexpr, XA_IN: tl.constexpr,
    TMA: tl.constexpr, W_KN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile of ``_lora_fwd_kernel``, number ``tile`` in the grouped order. With TMA,
    x, W₀ and y move through the descriptors (out-of-range rows and columns read as zero and are not written), the
    rest through pointers."""
    # grouped program order: GROUP_M row blocks share the W₀ column blocks while they are in L2
    num_pid_m, num_pid_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N  # no tl.cdiv: dropout.philox
    group_id = tile // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % group_size
    pid_n = (tile % (GROUP_M * num_pid_n)) // group_size

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M·K may exceed 2**31
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # × stride_wn: N·K may exceed 2**31 too
    offs_r = tl.arange(0, BLOCK_R)
    m_mask, n_mask, r_mask = offs_m < M, offs_n < N, offs_r < R
    dtype = x_ptr.dtype.element_ty
    if HAS_DROPOUT and not XA_IN:
        seed = tl.load(seed_ptr)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # x·W₀ᵀ
    xa_acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)  # (keep ⊙ x)·Aᵀ
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # strided views: k·stride may exceed 2**31
        k_mask = offs_k < K
        if TMA:
            x = x_desc.load([pid_m * BLOCK_M, k0])  # (BM, BK)
            if W_KN:
                w = w_desc.load([k0, pid_n * BLOCK_N])  # (BK, BN) = W₀ᵀ tile
            else:
                w = tl.trans(w_desc.load([pid_n * BLOCK_N, k0]))  # (BN, BK) box, transposed in shared memory
        else:
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
            w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # (BK, BN) = W₀ᵀ tile
        acc = base_dot(x, w, acc, INPUT_PRECISION)
        if not XA_IN:
            a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
            a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BK, R) = Aᵀ tile
            if HAS_DROPOUT:
                x = tl.where(keep_mask(seed, offs_m, k0, thr, BLOCK_K), x, 0.0)
            xa_acc = lora_dot(x, a, xa_acc, INPUT_PRECISION)

    if XA_IN:  # (BM, R) fp32, already scaled by 1/(1-p)
        xa_acc = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    else:
        xa_acc = xa_acc * keep_scale  # 1/(1-p), or 1 without dropout
    if WRITE_XA and not XA_IN:
        if pid_n == 0:
            xa_ptrs = xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar
            tl.store(xa_ptrs, xa_acc, mask=m_mask[:, None] & r_mask[None, :])
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
    # The up-projection accumulates into acc itself, s folded into its operands in fp32 before their rounding to
    # x's dtype: a second (BM, BN) fp32 product tile next to acc made every 128×256 tile spill (sm_90: 255 registers
    # and 520–560 B of spill per thread at 8 warps; benchmarks/compile_check.py --autotune). s < 1 goes on xa, s ≥ 1
    # on B, so that neither rounding leaves the range the old code's (xa and B rounded, s applied in fp32) used: a
    # young adapter's s·B with s < 1 falls into fp16's subnormals (4× torch's error, a review measured), and s·xa
    # with s > 1 overflows fp16 for outlier activations where xa itself does not (inf where torch is finite).
    # Negative s likewise: |s| ≤ 1 all on xa, else its sign on xa and |s| on B (s/|s| = ±1 exactly); product s
    b_scale = tl.maximum(tl.abs(scaling), 1.0)
    xa_scale = scaling / b_scale  # s itself for |s| ≤ 1 (0 included), ±1 otherwise
    b = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)  # (R, BN) = Bᵀ tile
    acc = lora_dot((xa_acc * xa_scale).to(dtype), (b * b_scale).to(dtype), acc, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if TMA:
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(y_ptr.dtype.element_ty))
    else:
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _lora_xa_kernel(
    # pointers
    x_ptr, a_ptr, xa_ptr, seed_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xar,
    # scalars
    thr, keep_scale,
    # switches
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa (M, r) fp32 = (keep ⊙ x)·Aᵀ/(1−p): one program per BLOCK_M rows, one pass over x, the mask drawn once."""
    pid_m = tl.program_id(0)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask, r_mask = offs_m < M, offs_r < R
    dtype = x_ptr.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    xa_acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, offs_m, k0, thr, BLOCK_K), x, 0.0)
        a = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BK, R) = Aᵀ tile
        xa_acc = lora_dot(x, a, xa_acc, INPUT_PRECISION)
    tl.store(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar, xa_acc * keep_scale,
             mask=m_mask[:, None] & r_mask[None, :])


# Interpreter and LORA_FAST_AUTOTUNE=0: one fixed config (autotune over several configs fails under the
# interpreter; 64 keeps the program count low, which is what costs time in numpy).
FIXED_FWD_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
XA_TILE = {"BLOCK_M": 64, "BLOCK_K": 64}  # the xa kernel is a memory-bound skinny product: one fixed tile
XA_TILE_FMA = {"BLOCK_M": 32, "BLOCK_K": 64}  # FMA dots (``fma_dots``): at r = 128, 64×64 spills 528 B, this 0
XA_TILE_TF32_WIDE = {"BLOCK_M": 64, "BLOCK_K": 32}  # "tf32x3" above rank 32 (``wide_tf32``): r = 64/128 0 B spill
# Where the fixed tile needs more shared memory than the GPU has (compiled sizes, sm_86's 99 KiB: the one-pass
# forward at rank 128 in 16 bits 104 KiB, the xa kernel at rank 128 in fp32 112 KiB; a T4 allows 64 KiB), the
# launch falls back to these, in order (``launch_fitting``; benchmarks/compile_check.py checks that the last fits).
FWD_FALLBACKS = ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
                 {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2})
XA_FALLBACKS = ({"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
                {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2})


def get_fwd_configs() -> list[triton.Config]:
    """GPU autotune space: Hopper-sized tiles (wgmma wants 64-row warpgroups and long N), and smaller ones for
    fp32 / rank 128 and pre-Hopper GPUs. Pruned by shared memory per launch (``prune_fwd_configs``)."""
    shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 32, 8, 4),
              (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
              (32, 64, 32, 4, 2)]  # the last: small enough for fp32 at rank 128 on any GPU
    return ([tile_config(shape, GROUP_M=8) for shape in shapes]
            + [tile_config(shape, fma_only=True, GROUP_M=8) for shape in FMA_ONLY_FWD])


# fp32 with IEEE dots (``fma_dots``): a config is kept when each thread's accumulator T = BM·BN/(32·warps) is at most
# 64 elements and, in the one-pass kernel (which also reduces x·Aᵀ over BK), T·BK ≤ 2048. Offline sm_90 compiles of
# every config at r = 8/16/32 (PERF_NOTES "fp32 IEEE autotune lists"): all kept ones spill 0–16 B, all dropped ones
# 400–7944 B. FMA_ONLY_FWD: a 0-spill tile added for that case alone.
FMA_FWD_MAX_ACC, FMA_FWD_MAX_ACC_K = 64, 2048
FMA_ONLY_FWD = [(128, 128, 32, 8, 4)]


def _fma_fwd_fits(c, xa_in: bool) -> bool:
    t = per_thread(c, "BLOCK_M", "BLOCK_N")
    return t <= FMA_FWD_MAX_ACC and (xa_in or t * c.kwargs["BLOCK_K"] <= FMA_FWD_MAX_ACC_K)


def prune_fwd_configs(configs, named_args, **kwargs):
    """Keep the configs for the launch's dots (``prune_for_dots``: for fp32 IEEE FMA dots only tiles that do not
    spill, see ``FMA_FWD_MAX_ACC``); then drop tiles over 128×64 for ranks > 64 when the rank is computed in the
    loop (a 128-wide rank tile next to a large output tile spills registers), then every config whose pipelined
    tiles — x (BM, BK), W₀ (BK, BN), A (BK, R) — exceed the shared memory (fp32 at large rank)."""
    xa_in = kwargs.get("XA_IN", named_args.get("XA_IN", False))
    precision = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION", "ieee"))
    configs = prune_for_dots(configs, fma_dots(named_args["x_ptr"].dtype, precision),
                             lambda c: _fma_fwd_fits(c, xa_in),
                             lambda c: per_thread(c, "BLOCK_M", "BLOCK_N") * c.kwargs["BLOCK_K"])
    big_rank = named_args["R"] > 64 and not xa_in
    kept = [c for c in configs if not (big_rank and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)] or configs
    return prune_smem(kept, named_args, "x_ptr", lambda bm, bn, bk, r: (bm * bk, bk * bn, bk * r))


# The GPU launch path (autotuned; steady-state launches skip the tuner's bookkeeping, see TunedKernel).
FWD_TUNED = TunedKernel(
    _lora_fwd_kernel,
    lambda: triton.autotune(get_fwd_configs(),
                            key=["N", "K", "R", "M_BUCKET", "XA_IN", "HAS_DROPOUT", "INPUT_PRECISION", "TMA",
                                 "W_KN", "PERSISTENT"],
                            prune_configs_by={"early_config_prune": prune_fwd_configs})(_lora_fwd_kernel),
)


FWD_VARIANTS = ("one_pass", "xa_first", "cublas", "tma", "tma_persistent")
XA_FIRST_VARIANTS = ("xa_first", "tma", "tma_persistent")  # xa by ``_lora_xa_kernel``, read by the GEMM's epilogue
ONE_PASS_MAX_RANK = 32  # above it the one-pass kernel's recomputed xa costs more than xa_first's extra pass


def fwd_variant(M: int, N: int, K: int, r: int, dropout_p: float, dtype: torch.dtype = torch.bfloat16) -> str:
    """Which forward to run. ``one_pass`` computes xa inside every (BLOCK_M, BLOCK_N) program (N/BLOCK_N times per
    row block, and regenerates the dropout mask as often); ``xa_first`` computes xa once in a skinny kernel (one
    extra read of x, one more launch) and the GEMM adds s·xa·Bᵀ in its epilogue.

    Rule, from GPU times measured on an H100 (CUDA-graph replays, bf16, M = 8192, r = 16, dropout 0.1;
    benchmarks/PERF_NOTES.md): xa_first was faster at all four GPT-2 shapes (c_attn 0.095 vs 0.173 ms, attn.c_proj
    0.038 vs 0.059, c_fc 0.121 vs 0.229, mlp.c_proj 0.126 vs 0.213). Without dropout the one-pass kernel was the
    faster at all four (timed with launch overhead included; its only redundancy is ≈ r/BLOCK_N extra FLOPs).

    Above rank ``ONE_PASS_MAX_RANK`` xa_first also without dropout — arithmetic, not yet timed: the one-pass
    kernel's redundant down-projection costs r/BLOCK_N of the base GEMM's FLOPs (50–100 % at r = 64–128 with the
    H100 tuner's BLOCK_N = 128), against xa_first's one extra read of x and its r/N extra FLOPs (8–17 % at N = 768).

    ``cublas`` (xa by ``_lora_xa_kernel``, then y = x·W₀ + b by cuBLAS and y += s·xa·Bᵀ by a cuBLAS rank-r update
    in place; in fp32 without dropout one GEMM with the merged weight W₀ᵀ + s·Aᵀ·Bᵀ) is the rule for fp32 with IEEE
    dots (``fma_dots``) above rank ``FMA_FUSED_MAX_RANK``: there the fused kernels' FMA dots over a long rank spill
    9–21 KB per thread and take ~1 min each to compile (benchmarks/compile_check.py, PERF_NOTES "fp32 with IEEE
    dots"), while cuBLAS runs the FP32 GEMMs. It is also the rule for fp32 with TF32 (``tf32_dots``) at every
    rank: cuBLAS's TF32 GEMMs are torch's own numbers (it rounds the operands to TF32), where the fused kernels
    must round every tile first (``kernels/dots.py``); its Triton pass holds only the rank-r product, in
    "tf32x3". Elsewhere it runs only when ``LORA_FAST_FWD_VARIANT=cublas`` asks,
    until a GPU measurement says where it wins (PERF_NOTES: predicted faster where our GEMM core trails cuBLAS).

    ``tma`` and ``tma_persistent``: xa_first with the GEMM's x, W₀ and y tiles moved by Hopper's TMA (device-side
    descriptors; tensors whose layout a descriptor cannot describe — rows not 16-byte aligned, an inner stride
    ≠ 1 — and FMA dots (fp32 without TF32, ``launch.tma_worth``) take the pointer loads of the same kernel),
    ``tma_persistent`` with one program per SM looping over the
    output tiles. Run only when forced, until measured (PERF_NOTES "TMA variants": the gap of our pointer-tile GEMM
    core to cuBLAS is what they are meant to close)."""
    forced = variant_override("LORA_FAST_FWD_VARIANT", FWD_VARIANTS)
    if forced is not None:
        return forced
    precision = input_precision(dtype)
    if (r > FMA_FUSED_MAX_RANK and fma_dots(dtype, precision)) or tf32_dots(dtype, precision):
        return "cublas"
    return "xa_first" if dropout_p > 0.0 or r > ONE_PASS_MAX_RANK else "one_pass"


@on_input_device
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    fan_in_fan_out: bool = False,
    write_xa: bool = True,
    variant: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused forward on 2-D x. Returns (y (M, N) in x's dtype, xa (M, r) fp32 or None).

    Args:
        x: (M, K), any strides. weight: (N, K), or (K, N) with ``fan_in_fan_out``, same dtype as x.
        bias: (N,) or None. lora_A: (r, K). lora_B: (N, r). scaling: s.
        dropout_p: p in [0, 1); 0 disables dropout. seed: 1-element int64 tensor (needed when p > 0).
        write_xa: return xa = dropout(x)·Aᵀ for the backward pass (False under no_grad).
        variant: one of ``FWD_VARIANTS`` (see ``fwd_variant``, the default rule); all compute the same function.
    """
    if x.dim() != 2:
        raise ValueError(f"lora_linear_fwd expects 2-D x (flatten leading dims first), got {tuple(x.shape)}")
    M, K = x.shape
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    r = lora_A.shape[0]
    if r > MAX_RANK:
        raise ValueError(f"rank {r} > {MAX_RANK} is not supported by the Triton kernels")
    if weight.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor")
    variant = variant or fwd_variant(M, N, K, r, dropout_p, x.dtype)
    if variant not in FWD_VARIANTS:
        raise ValueError(f"variant must be one of {FWD_VARIANTS}, got {variant!r}")
    if N == 0 and variant == "one_pass":  # no output tile, so no program would write xa: compute it first
        variant = "xa_first"
    if bias is not None and bias.stride(0) != 1:  # the kernel reads b[n] at bias_ptr + n (N elements: a cheap copy)
        bias = bias.contiguous()
    # xa computed first: always for xa_first; for cublas unless nothing needs it (the merged-weight GEMM, fp32
    # without dropout, does without it, and no backward to feed)
    xa_in = variant in XA_FIRST_VARIANTS or (variant == "cublas" and (dropout_p > 0.0 or write_xa
                                                                      or not merge_exact(x.dtype)))
    # strides read once each (every Tensor.stride() call is a Python → C++ round trip on the launch path)
    sxm, sxk = x.stride()
    sar, sak = lora_A.stride()
    sbn, sbr = lora_B.stride()
    stride_wk, stride_wn = weight.stride() if fan_in_fan_out else weight.stride()[::-1]
    dev = x.device
    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    xa = torch.empty((M, r), dtype=torch.float32, device=dev) if (write_xa or xa_in) else None
    if M == 0:
        return y, (xa if write_xa else None)
    has_dropout = dropout_p > 0.0
    thr, keep_scale = keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p)
    precision = input_precision(x.dtype)
    br = block_r(r)
    seed_arg = seed if has_dropout else y  # never dereferenced without dropout
    if xa_in:
        xa_tile = (XA_TILE_FMA if fma_dots(x.dtype, precision)
                   else XA_TILE_TF32_WIDE if wide_tf32(x.dtype, precision, br) else XA_TILE)
        launch_fitting(
            _lora_xa_kernel, lambda: fixed_rungs(xa_tile, x.dtype, r, XA_FALLBACKS),
            (x.dtype, lora_A.dtype, seed_arg.dtype, dev), lambda cfg: (cdiv(M, cfg["BLOCK_M"]),),
            x, lora_A, xa, seed_arg,
            M, K, r,
            sxm, sxk, sar, sak, r, 1,
            thr, keep_scale,
            HAS_DROPOUT=has_dropout, INPUT_PRECISION=precision, BLOCK_R=br,
        )
    if variant == "cublas":  # cuBLAS for the (K, N) product; xa (computed above) serves the backward's dB
        separate = has_dropout or not merge_exact(x.dtype)
        with torch.autocast(dev.type, enabled=False):
            if separate:  # y = x·W₀ + b, then y += s·xa·Bᵀ (xa rounded to x's dtype, as the kernels do)
                w_kn = weight if fan_in_fan_out else weight.t()  # (K, N) view
            else:  # fp32/fp64, nothing dropped: y = x·(W₀ᵀ + s·Aᵀ·Bᵀ) + b in one GEMM
                w_kn = merged_weight(weight, lora_A, lora_B, scaling, fan_in_fan_out)
            if bias is not None:
                torch.addmm(bias, x, w_kn, out=y)
            else:
                torch.mm(x, w_kn, out=y)
            if separate:
                y.addmm_(xa.to(x.dtype), lora_B.to(x.dtype).t(), alpha=float(scaling))
        return y, (xa if write_xa else None)
    # tma variants: x, W₀ and y through TMA descriptors where their layouts allow (``tma_ok``), else pointers
    persistent = variant == "tma_persistent"
    tma = w_kn = False
    if variant in ("tma", "tma_persistent") and tma_worth(x.dtype, precision) and tma_ok(x) and tma_ok(y):
        tma, w_kn = tma_weight(weight, fan_in_fan_out)
        if tma and dev.type == "cuda":
            ensure_scratch_allocator()
    if persistent:  # at most one program per SM, each looping over output tiles
        sms = num_sms(dev)
        grid = lambda cfg: (min(sms, cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])),)  # noqa: E731
    else:
        grid = lambda cfg: (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)  # noqa: E731
    # xa is contiguous (M, r): strides (r, 1); without it the pointer is y's and never dereferenced
    args = (
        x, weight, bias if bias is not None else y, lora_A, lora_B, y, xa if xa is not None else y, seed_arg,
        M, N, K, r, bucket_m(M),
        sxm, sxk, stride_wn, stride_wk, sar, sak, sbn, sbr, N, 1, r, 1,
        float(scaling), thr, keep_scale,
    )
    meta = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, WRITE_XA=write_xa and not xa_in, XA_IN=xa_in,
                TMA=tma, W_KN=w_kn, PERSISTENT=persistent, INPUT_PRECISION=precision, BLOCK_R=br)
    if interpreting() or not autotune_enabled():  # one fixed tile (the interpreter cannot autotune)
        key = (x.dtype, lora_A.dtype, lora_B.dtype, None if bias is None else bias.dtype, seed_arg.dtype, dev)
        launch_fitting(_lora_fwd_kernel, lambda: fixed_rungs(FIXED_FWD_CONFIG, x.dtype, r, FWD_FALLBACKS), key,
                       grid, *args, **meta)
    else:  # the launch key: the tuner's key arguments and every tensor argument's dtype, and the device
        key = (N, K, r, args[12], xa_in, has_dropout, write_xa, precision, tma, w_kn, persistent, x.dtype,
               lora_A.dtype, lora_B.dtype, None if bias is None else bias.dtype, seed_arg.dtype, dev)
        FWD_TUNED.launch(key, grid, *args, **meta)
    return y, (xa if write_xa else None)
