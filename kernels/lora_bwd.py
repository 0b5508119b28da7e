"""Fused LoRA backward: dx, dA, dB in one kernel from dy, x, xa and the seed (the mask is regenerated).

Forward: y = x·W₀ᵀ + b + s·xa·Bᵀ with xa = (x ⊙ keep)·Aᵀ / (1 − p). Chain rule, with g = dy (M, N):

    dB = s·gᵀ·xa                                            (N, r)   reduction over M
    d(xa) = s·g·B                    =: s·gb, gb = g·B      (M, r)
    dA = d(xa)ᵀ·(x ⊙ keep)/(1 − p) = s/(1−p) · gbᵀ·(x ⊙ keep)  (r, K)   reduction over M, keep regenerated
    dx = g·W₀ + keep ⊙ (d(xa)·A)/(1 − p) = g·W₀ + s/(1−p) · keep ⊙ (gb·A)   (M, K)

No gradient for the frozen W₀ and b. (unsloth's ``fast_lora.py`` derives the same products; the fusion is ours.)

``_lora_bwd_kernel``, grid (M/BM, K/BK), one program per dx tile::

    for each N block:  ĝ = g[m, n]                                   (BM, BN)   loaded once, used up to three times:
                       acc    += ĝ · W₀[n, k]                         (BM, BK)   the base dgrad
                       gb_acc += ĝ · B[n, :R]                         (BM, R)
                       if this program owns N-tile n (n mod K/BK):   dB[n] += s · ĝᵀ · xa[m]     (BN, R)
    epilogue:          keep = mask(m, k)                              drawn once, for dx and dA
                       ĝb   = s · gb rounded to x's dtype             (BM, R)    s before rounding, as autograd
                       dx   = acc + 1/(1−p) · keep ⊙ (ĝb · A[:, k])
                       dA[:, k] += 1/(1−p) · ĝbᵀ · (keep ⊙ x[m, k])    (R, BK)

gb is recomputed by each of the K/BK programs of a row block (R/BK extra FLOPs), which costs less than another
pass over dy. dA and dB are reduced over row blocks by fp32 ``atomic_add`` (the default), or — deterministic
mode, or ``torch.use_deterministic_algorithms(True)`` — by per-row-block fp32 partials summed in a fixed order.
Everything accumulates in fp32; dA and dB are returned in the parameters' dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lora_fast.kernels.dots import base_dot, lora_dot
from lora_fast.kernels.dropout import keep_mask, keep_threshold
from lora_fast.kernels.launch import (
    FMA_FUSED_MAX_RANK,
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
)
from lora_fast.kernels.lora_bwd_cublas import dy_pass, lora_linear_bwd_cublas
from lora_fast.kernels.lora_terms import add_dx_lora_term, da_part


@triton.jit
def _tile_keep(seed_ptr, offs_m, k0, thr, HAS_DROPOUT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BM, BK) keep-mask of the dx tile at column k0 (the forward's, regenerated from the seed), or None."""
    keep = None
    if HAS_DROPOUT:
        keep = keep_mask(tl.load(seed_ptr), offs_m, k0, thr, BLOCK_K)
    return keep


@triton.jit
def _reduce_into(ptrs, part, mask, ATOMIC: tl.constexpr):
    """Add an fp32 partial into the shared buffer (ATOMIC: fp32 atomics), or write it to this row block's slice."""
    if ATOMIC:
        tl.atomic_add(ptrs, part, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, part, mask=mask)


@triton.jit
def _add_da(gb, keep, keep_scale, x_ptr, da_ptr, slot, offs_m, offs_k, offs_r, m_mask, k_mask, r_mask, stride_xm,
            stride_xk, stride_das, stride_dar, stride_dak,
            HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dA[:, k] += 1/(1−p) · (s·gb)ᵀ·(keep ⊙ x), into the shared fp32 buffer (ATOMIC) or this row block's slice."""
    dap = da_part(gb, keep, x_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, stride_xk, HAS_DROPOUT,
                  INPUT_PRECISION) * keep_scale  # (R, BK)
    _reduce_into(da_ptr + slot * stride_das + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, dap,
                 r_mask[:, None] & k_mask[None, :], ATOMIC)


@triton.jit
def _lora_bwd_kernel(
    # pointers (da/db: (S, r, K) / (S, N, r) fp32 — S = 1 with ATOMIC, else one slice per row block; xa_ptr: xa
    # (M, r) for dB, or with GB_IN ĝb = s·g·B (M, r) fp32 from lora_bwd_cublas._lora_dy_kernel)
    dy_ptr, x_ptr, w_ptr, a_ptr, b_ptr, xa_ptr, dx_ptr, da_ptr, db_ptr, seed_ptr,
    # sizes (M_BUCKET is only an autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xam, stride_xar, stride_dxm, stride_dxk, stride_das, stride_dar, stride_dak, stride_dbs, stride_dbn,
    stride_dbr,
    # scalars: keep_scale = 1/(1−p), db_scale = s, thr = keep_threshold(p)
    keep_scale, db_scale, thr,
    # switches
    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ATOMIC: tl.constexpr, DB_RELOAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # TMA: dy, W₀ and dx through tensor descriptors; W_KN: W₀ stored (K, N); GB_IN: ĝb was computed (and dB
    # reduced) by the dy pass: the LoRA terms come before the loop, which is then the plain dgrad
    TMA: tl.constexpr, W_KN: tl.constexpr, GB_IN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    num_pid_k = tl.num_programs(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # int64: k·stride may exceed 2**31
    offs_r = tl.arange(0, BLOCK_R)
    m_mask, k_mask, r_mask = offs_m < M, offs_k < K, offs_r < R
    dtype = dy_ptr.dtype.element_ty
    slot = 0 if ATOMIC else pid_m.to(tl.int64)  # partial slice this program adds into / writes (int64: slot·stride
    #                                                may pass 2**31 for large M·(K + N)·r)
    dy_desc, w_desc, dx_desc = None, None, None
    if TMA:  # out-of-range rows and columns read as zero and are not written
        dy_desc = tl.make_tensor_descriptor(dy_ptr, [M, N], [stride_dym, 1], [BLOCK_M, BLOCK_N])
        if COMPUTE_DX:
            if W_KN:
                w_desc = tl.make_tensor_descriptor(w_ptr, [K, N], [stride_wk, 1], [BLOCK_K, BLOCK_N])
            else:
                w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
            dx_desc = tl.make_tensor_descriptor(dx_ptr, [M, K], [stride_dxm, 1], [BLOCK_M, BLOCK_K])

    if COMPUTE_DB and not DB_RELOAD:  # xa rows of this block, for dB[n] += s · gᵀ·xa
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BM, R)
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)  # g·W₀
    gb_acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)  # g·B
    if GB_IN:  # the LoRA terms first: the mask and the (BM, BK) product are dead before the GEMM loop starts
        gb = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BM, R) ĝb, rounded as below
        keep = _tile_keep(seed_ptr, offs_m, pid_k * BLOCK_K, thr, HAS_DROPOUT, BLOCK_K)  # once for dx and dA
        if COMPUTE_DA:  # first: x's tile is dead before the accumulator comes alive
            _add_da(gb, keep, keep_scale, x_ptr, da_ptr, slot, offs_m, offs_k, offs_r, m_mask, k_mask, r_mask,
                    stride_xm, stride_xk, stride_das, stride_dar, stride_dak, HAS_DROPOUT, ATOMIC, INPUT_PRECISION)
        if COMPUTE_DX:
            acc = add_dx_lora_term(acc, gb, keep, keep_scale, a_ptr, offs_r, offs_k, r_mask, k_mask, stride_ar,
                                   stride_ak, HAS_DROPOUT, INPUT_PRECISION)  # (BM, BK)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = offs_n < N
        if TMA:
            g = dy_desc.load([pid_m * BLOCK_M, n0])  # (BM, BN)
        else:
            g = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                        mask=m_mask[:, None] & n_mask[None, :], other=0.0)  # (BM, BN)
        if COMPUTE_DX:
            if TMA and W_KN:
                w = tl.trans(w_desc.load([pid_k * BLOCK_K, n0]))  # (BK, BN) box, transposed in shared memory
            elif TMA:
                w = w_desc.load([n0, pid_k * BLOCK_K])  # (BN, BK)
            else:
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # (BN, BK)
            acc = base_dot(g, w, acc, INPUT_PRECISION)
        if (COMPUTE_DX or COMPUTE_DA) and not GB_IN:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BN, R)
            gb_acc = lora_dot(g, b, gb_acc, INPUT_PRECISION)
        if COMPUTE_DB:
            if (n0 // BLOCK_N) % num_pid_k == pid_k:  # N-tiles dealt round-robin over the row block's programs
                if DB_RELOAD:  # fp32: gᵀ and xa loaded afresh (tl.trans(g) here gave a wrong dB on Triton 3.6/H100)
                    gt = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                                 mask=n_mask[:, None] & m_mask[None, :], other=0.0)  # (BN, BM)
                    xa_t = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                                   mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BM, R)
                    dbp = lora_dot(gt, xa_t, None, INPUT_PRECISION) * db_scale  # (BN, R)
                else:
                    dbp = lora_dot(tl.trans(g), xa, None, INPUT_PRECISION) * db_scale  # (BN, R)
                _reduce_into(db_ptr + slot * stride_dbs + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                             dbp, n_mask[:, None] & r_mask[None, :], ATOMIC)

    if (COMPUTE_DX or COMPUTE_DA) and not GB_IN:
        gb = (gb_acc * db_scale).to(dtype)  # s·g·B rounded as autograd rounds (s·g)·B: s first, no overflow
        keep = _tile_keep(seed_ptr, offs_m, pid_k * BLOCK_K, thr, HAS_DROPOUT, BLOCK_K)  # once for dx and dA
        if COMPUTE_DX:
            acc = add_dx_lora_term(acc, gb, keep, keep_scale, a_ptr, offs_r, offs_k, r_mask, k_mask, stride_ar,
                                   stride_ak, HAS_DROPOUT, INPUT_PRECISION)  # (BM, BK)
    if COMPUTE_DX:
        if TMA:
            dx_desc.store([pid_m * BLOCK_M, pid_k * BLOCK_K], acc.to(dx_ptr.dtype.element_ty))
        else:
            tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                     acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])
    if COMPUTE_DA and not GB_IN:  # after the dx store: acc is dead while x's tile is loaded
        _add_da(gb, keep, keep_scale, x_ptr, da_ptr, slot, offs_m, offs_k, offs_r, m_mask, k_mask, r_mask, stride_xm,
                stride_xk, stride_das, stride_dar, stride_dak, HAS_DROPOUT, ATOMIC, INPUT_PRECISION)


# Interpreter and deterministic mode: one fixed tile (autotune with several configs fails under the interpreter;
# the deterministic partial buffers are sized by BLOCK_M, so it must be known before the launch).
FIXED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
# Where the fixed tile needs more shared memory than the GPU has (compiled sizes: fp32 at rank 128 112 KiB, over
# sm_86's 99 KiB; 16 bits at rank 128 160 KiB on sm_90, 96 KiB on sm_86; a T4 allows 64 KiB), the launch falls
# back to these, in order (``launch_fitting``). BLOCK_M stays 64: the deterministic partials are sized by it.
BWD_FALLBACKS = ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
                 {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2})
FIXED_CONFIG_FMA = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}  # fp32 (FMA or TF32 dots): the first fallback's


def get_bwd_configs() -> list[triton.Config]:
    """GPU autotune space (output tile BLOCK_M × BLOCK_K, reduction over N in BLOCK_N steps): Hopper-sized tiles,
    and smaller ones for fp32 / rank 128 / pre-Hopper GPUs. Pruned by shared memory per launch."""
    shapes = [(128, 64, 256, 8, 3), (128, 64, 128, 8, 4), (128, 64, 128, 4, 4), (128, 32, 256, 8, 4),
              (64, 64, 256, 4, 4), (128, 64, 64, 4, 4), (64, 64, 128, 4, 4), (64, 64, 64, 4, 4),
              (32, 32, 64, 4, 2)]  # the last: small enough for fp32 at rank 128 on any GPU
    return [tile_config(shape) for shape in shapes] + [tile_config(shape, fma_only=True) for shape in FMA_ONLY_BWD]


# fp32 with IEEE dots (``fma_dots``): a config is kept when each thread's dx accumulator BM·BK/(32·warps) is at
# most 16 elements. Offline sm_90 compiles at r = 8/16/32 (PERF_NOTES "fp32 IEEE autotune lists"): those spill
# 0 B at r ≤ 16 and ≤ 120 B at r = 32; every 32-element config spilled 72–1792 B, 64 and more 1.2–28.6 KB.
# FMA_ONLY_BWD: tiles of that size added for that case alone (the lists above keep only 32×32×64 otherwise).
FMA_BWD_MAX_ACC = 16
FMA_ONLY_BWD = [(64, 64, 64, 8, 4), (32, 64, 64, 4, 3)]


def prune_bwd_configs(configs, named_args, **kwargs):
    """Keep the configs for the launch's dots (``prune_for_dots``: for fp32 IEEE FMA dots only tiles that do not
    spill, see ``FMA_BWD_MAX_ACC``), then those whose pipelined tiles — dy (BM, BN), W₀ (BN, BK), B (BN, R) — fit
    the shared memory."""
    precision = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION", "ieee"))
    configs = prune_for_dots(configs, fma_dots(named_args["dy_ptr"].dtype, precision),
                             lambda c: per_thread(c, "BLOCK_M", "BLOCK_K") <= FMA_BWD_MAX_ACC,
                             lambda c: per_thread(c, "BLOCK_M", "BLOCK_K"))
    return prune_smem(configs, named_args, "dy_ptr", lambda bm, bn, bk, r: (bm * bn, bn * bk, bn * r))


# The GPU launch path (autotuned; dA/dB are zeroed between the tuner's trial runs, which add into them;
# steady-state launches skip the tuner's bookkeeping, see TunedKernel).
BWD_TUNED = TunedKernel(
    _lora_bwd_kernel,
    lambda: triton.autotune(
        get_bwd_configs(), key=["N", "K", "R", "M_BUCKET", "COMPUTE_DX", "COMPUTE_DA", "COMPUTE_DB", "HAS_DROPOUT",
                                "INPUT_PRECISION", "TMA", "W_KN", "GB_IN"],
        prune_configs_by={"early_config_prune": prune_bwd_configs}, reset_to_zero=["da_ptr", "db_ptr"],
    )(_lora_bwd_kernel),
)


def _bwd_fixed_meta(deterministic: bool, dtype: torch.dtype, r: int) -> list[dict] | None:
    """Launch metas of the fixed tile (FIXED_CONFIG, then BWD_FALLBACKS where it does not fit) under the
    interpreter, in deterministic mode (the partial buffers are sized by BLOCK_M before the launch) or with
    ``LORA_FAST_AUTOTUNE=0``; None: the autotuned path."""
    if interpreting() or deterministic or not autotune_enabled():
        precision = input_precision(dtype)
        # FMA dots: the 64×64×64 tile spills 72–1448 B there (sm_90), this one 0–120 B; TF32 (rounded operands,
        # "tf32x3" rank-r dots) at r = 16: 80–104 B against 0 (at r = 128 both ~1.3 KB)
        if (fma_dots(dtype, precision) or tf32_dots(dtype, precision)) and not interpreting():
            return fixed_rungs(FIXED_CONFIG_FMA, dtype, r, BWD_FALLBACKS[1:])
        return fixed_rungs(FIXED_CONFIG, dtype, r, BWD_FALLBACKS)
    return None


BWD_VARIANTS = ("fused", "cublas", "tma", "gb_first", "gb_first_tma")
ATOMIC_ONLY = ("cublas", "gb_first", "gb_first_tma")  # their dB is reduced by the dy pass's atomics


def bwd_variant(M: int, N: int, K: int, r: int, deterministic: bool, dtype: torch.dtype = torch.bfloat16) -> str:
    """Which backward to run:

    - ``fused``: ``_lora_bwd_kernel``, dx, dA, dB in one kernel; ``tma``: the same kernel loading dy and W₀ and
      storing dx through TMA descriptors where the layouts allow (Hopper);
    - ``gb_first`` (and ``gb_first_tma``, with TMA): a pass over dy first (``lora_bwd_cublas._lora_dy_kernel``:
      ĝb = s·dy·B and dB), then ``_lora_bwd_kernel`` with ``GB_IN``: the dA and dx terms from ĝb before its loop,
      which is then the plain dgrad — no g·B product (R/BLOCK_K of the loop's MMA work), no dB branch inside the
      pipelined loop, the mask and x's tile dead before the loop starts (sm_90: without dropout no tile of the
      autotune list spills in its TMA form; with dropout the 256-wide tiles still spill, as the fused kernel's
      do); one extra read of dy;
    - ``cublas``: ``lora_bwd_cublas``, cuBLAS dgrad plus two skinny Triton passes.

    ``fused`` until a GPU measurement says where another wins (benchmarks/PERF_NOTES.md), except for fp32 with IEEE
    dots above rank ``FMA_FUSED_MAX_RANK``, where the fused kernel's FMA dots spill kilobytes, and for fp32 with
    TF32 (cuBLAS's TF32 dgrad is torch's own; as in ``lora_fwd.fwd_variant``); ``LORA_FAST_BWD_VARIANT`` forces
    one. Deterministic mode runs ``fused`` (``tma`` when a TMA variant is forced): the others reduce dB with
    atomics."""
    forced = variant_override("LORA_FAST_BWD_VARIANT", BWD_VARIANTS)
    if deterministic:
        return "tma" if forced in ("tma", "gb_first_tma") else "fused"
    precision = input_precision(dtype)
    if forced is None and ((r > FMA_FUSED_MAX_RANK and fma_dots(dtype, precision)) or tf32_dots(dtype, precision)):
        return "cublas"
    return forced or "fused"


@on_input_device
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
    deterministic: bool | None = None,
    variant: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward on 2-D tensors. Returns (dx in x's dtype, dA in A's dtype, dB in B's dtype); a gradient
    that is not needed is None and not computed.

    Args:
        dy: (M, N) in x's dtype, any strides. x: (M, K) as given to the forward. xa: (M, r) fp32 from the forward
            (needed for dB). weight: (N, K), or (K, N) with ``fan_in_fan_out``. lora_A: (r, K). lora_B: (N, r).
        scaling: s. dropout_p: p (0 when dropout was off). seed: the forward's seed tensor when p > 0.
        needs_dx, needs_dA, needs_dB: which gradients to produce.
        deterministic: reduce dA/dB over row blocks through per-block fp32 partials summed in a fixed order
            (bitwise reproducible; (M/64)·(K + N)·r·4 bytes of scratch) instead of fp32 atomics. None: follow
            ``torch.are_deterministic_algorithms_enabled()``.
        variant: one of ``BWD_VARIANTS`` (see ``bwd_variant``, the default rule); those in ``ATOMIC_ONLY`` with
            deterministic=True are an error (their dB is reduced by atomics).
    """
    M, K = x.shape
    N = dy.shape[1]
    r = lora_A.shape[0]
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if needs_dB and xa is None:
        raise ValueError("dB needs xa from the forward pass")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    dev = x.device
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs_dx else None
    if M == 0 or not (needs_dx or needs_dA or needs_dB):
        zeros = lambda shape, t: torch.zeros(shape, dtype=t.dtype, device=dev)  # noqa: E731
        return (dx, zeros((r, K), lora_A) if needs_dA else None, zeros((N, r), lora_B) if needs_dB else None)

    variant = variant or bwd_variant(M, N, K, r, deterministic, x.dtype)
    if variant not in BWD_VARIANTS:
        raise ValueError(f"variant must be one of {BWD_VARIANTS}, got {variant!r}")
    if deterministic and variant in ATOMIC_ONLY:
        raise ValueError(f"the {variant} backward reduces dB with atomics: use variant='fused' when deterministic")
    gb_in = variant in ("gb_first", "gb_first_tma")
    if variant == "cublas" or (gb_in and not needs_dx):  # without dx, gb_first is the cublas variant's two passes
        return lora_linear_bwd_cublas(dy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out,
                                      needs_dx, needs_dA, needs_dB)
    kernel_db = needs_dB and not gb_in  # whether the kernel below reduces dB
    if gb_in:  # ĝb = s·dy·B (M, r) fp32 and dB, by one pass over dy; the kernel below reads ĝb from xa's slot
        xa, db_pass = dy_pass(dy, lora_B, xa, scaling, True, needs_dB)
    fixed = _bwd_fixed_meta(deterministic, x.dtype, r)
    # tma: dy, W₀ and dx through TMA descriptors where their layouts allow (``tma_ok``), else pointers
    tma = w_kn = False
    if (variant in ("tma", "gb_first_tma") and tma_worth(x.dtype, input_precision(x.dtype)) and tma_ok(dy)
            and (not needs_dx or tma_ok(dx))):
        tma, w_kn = tma_weight(weight, fan_in_fan_out) if needs_dx else (True, False)
        if tma and dev.type == "cuda":
            ensure_scratch_allocator()
    atomic = not deterministic
    # fp32 reductions: with atomics one zeroed (r, K) / (N, r) buffer (its slot stride 0); deterministic: one slice
    # per row block, written whole (no zeroing, except at K == 0 where no program runs to write them). Unneeded
    # ones stay tiny and are never dereferenced.
    if atomic:
        da = torch.zeros((r, K) if needs_dA else (1, 1), dtype=torch.float32, device=dev)
        db = torch.zeros((N, r) if kernel_db else (1, 1), dtype=torch.float32, device=dev)  # (the tuner zeroes it)
        da_strides, db_strides = (0, *da.stride()), (0, *db.stride())
    else:
        slots = cdiv(M, fixed[0]["BLOCK_M"])  # every rung has the same BLOCK_M
        alloc = torch.zeros if K == 0 else torch.empty
        da = alloc((slots, r, K) if needs_dA else (1, 1, 1), dtype=torch.float32, device=dev)
        db = alloc((slots, N, r) if kernel_db else (1, 1, 1), dtype=torch.float32, device=dev)
        da_strides, db_strides = da.stride(), db.stride()
    stride_wk, stride_wn = weight.stride() if fan_in_fan_out else weight.stride()[::-1]
    k_programs = needs_dx or needs_dA
    grid = lambda cfg: (cdiv(M, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_K"]) if k_programs else 1)  # noqa: E731
    xa_arg = xa if needs_dB or gb_in else dy  # a dummy is never dereferenced
    dx_strides = (K, 1) if needs_dx else (0, 0)  # dx is a fresh contiguous (M, K)
    keep_scale = 1.0 / (1.0 - dropout_p)
    args = (
        dy, x, weight, lora_A, lora_B, xa_arg, dx if needs_dx else dy, da, db, seed if dropout_p > 0.0 else dy,
        M, N, K, r, bucket_m(M),
        *dy.stride(), *x.stride(), stride_wn, stride_wk, *lora_A.stride(), *lora_B.stride(), *xa_arg.stride(),
        *dx_strides, *da_strides, *db_strides,
        float(keep_scale), float(scaling), keep_threshold(dropout_p),
    )
    meta = dict(COMPUTE_DX=needs_dx, COMPUTE_DA=needs_dA, COMPUTE_DB=kernel_db, HAS_DROPOUT=dropout_p > 0.0,
                ATOMIC=atomic, DB_RELOAD=x.dtype == torch.float32, INPUT_PRECISION=input_precision(x.dtype),
                TMA=tma, W_KN=w_kn, GB_IN=gb_in, BLOCK_R=block_r(r))
    if fixed is not None:
        key = (x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype, None if xa is None else xa.dtype, args[9].dtype,
               dev)
        launch_fitting(_lora_bwd_kernel, lambda: fixed, key, grid, *args, **meta)
    else:  # the launch key: the tuner's key arguments and every tensor argument's dtype, and the device
        key = (N, K, r, args[14], needs_dx, needs_dA, kernel_db, dropout_p > 0.0, meta["INPUT_PRECISION"], tma,
               w_kn, gb_in, x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype, None if xa is None else xa.dtype,
               args[9].dtype, dev)
        BWD_TUNED.launch(key, grid, *args, **meta)
    dA = dB = None
    if needs_dA:
        dA = da if atomic else da.sum(0)
        dA = dA if dA.dtype == lora_A.dtype else dA.to(lora_A.dtype)
    if needs_dB:
        dB = db_pass if gb_in else db if atomic else db.sum(0)
        dB = dB if dB.dtype == lora_B.dtype else dB.to(lora_B.dtype)
    return dx, dA, dB
