"""GEMM-core probe (issue 8, tuning): why is lora_fast's base product 2.0–2.4× cuBLAS on an H100, and what closes it?

    python -m benchmarks.gemm_probe [--M 8192] [--json OUT.json]     # a GPU: times every variant × config
    python -m benchmarks.gemm_probe --check                          # CPU (TRITON_INTERPRET=1): correctness only

The two GEMMs of a GPT-2 projection in Conv1D layout (W₀ stored (K, N)), bf16, fp32 accumulation:

    fwd   y  = x·W₀          x (M, K),  W₀ (K, N) row-major                       (M, N)
    dx    dx = dy·W₀ᵀ        dy (M, N), W₀ᵀ read from the (K, N) storage: "B transposed"   (M, K)

Variants of the same product, each over a few Hopper-sized tiles (the fastest is reported):
    ptr32        tutorial-style tiles: int32 offsets, pointers advanced by BLOCK_K each step, no K mask when
                 BLOCK_K divides the reduction (the GPT-2 shapes)
    ptr64        the same with int64 offsets recomputed from the loop index each step, K masked: how lora_fast's
                 kernels address memory today (so ptr32 vs ptr64 isolates the addressing cost)
    tma          tiles loaded through host-built TMA descriptors (``triton.tools.tensor_descriptor``), output
                 stored through one; "B transposed" loads (BN, BK) boxes of W₀ and transposes in registers
    tma_persist  the same with a persistent grid (one program per SM looping over tiles, grouped order)
and the references: cuBLAS (``torch.matmul``) and lora_fast's own kernels at dropout 0 (the xa_first forward —
the skinny xa kernel, then the GEMM with the LoRA up-projection in its epilogue — and the backward's dx part
alone, LoRA term included). Times are CUDA-graph replays (no launch overhead). A variant whose bf16 result is off
by more than 2e-2 (relative, vs an fp32 product) is reported as wrong and not timed; the run exits 1 if any is.
Working tool like ``gpu_probe``: its output goes to benchmarks/PERF_NOTES.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import triton
import triton.language as tl
from lora_fast.kernels.launch import COMPILE_OPTIONS

# Kernels are built (compiled or interpreted) when this module is imported: TRITON_INTERPRET=1 must be in the
# environment before, for --check on a CPU.

LAYERS = {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): Hopper wgmma tiles; the interpreter uses CHECK_CONFIG
GPU_CONFIGS = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
               (128, 256, 64, 8, 4)]
CHECK_CONFIG = (32, 32, 32, 4, 2)
WRONG = 2e-2  # bf16 GEMM vs an fp32 product: ~3e-3 expected; more means a broken kernel


@triton.jit
def _tile_ids(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    num_m, num_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
    first_m = (tile // (GROUP_M * num_n)) * GROUP_M
    size = min(num_m - first_m, GROUP_M)
    return first_m + (tile % (GROUP_M * num_n)) % size, (tile % (GROUP_M * num_n)) // size

@triton.jit
def _gemm_ptr(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
             OFFS64: tl.constexpr, MASK_K: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if OFFS64:  # lora_fast's addressing: int64 offsets recomputed every step, K masked
        om, on = offs_m.to(tl.int64), offs_n.to(tl.int64)
        for k0 in range(0, K, BLOCK_K):
            ok = (k0 + rk).to(tl.int64)
            a = tl.load(a_ptr + om[:, None] * stride_am + ok[None, :] * stride_ak,
                        mask=(om[:, None] < M) & (ok[None, :] < K), other=0.0)
            b = tl.load(b_ptr + ok[:, None] * stride_bk + on[None, :] * stride_bn,
                        mask=(ok[:, None] < K) & (on[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc)
    else:  # tutorial addressing: row/col offsets wrapped into range (no M/N masks), pointers advanced
        am = offs_m % M
        bn = offs_n % N
        a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rk[:, None] * stride_bk + bn[None, :] * stride_bn
        for k0 in range(0, K, BLOCK_K):
            if MASK_K:
                a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0.0)
                b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0.0)
            else:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

@triton.jit
def _gemm_tma(a_desc, b_desc, c_desc, M, N, K, NUM_PROGS,
             B_TRANS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GROUP_M: tl.constexpr):
    # one tile per program when NUM_PROGS == the tile count; a persistent grid loops over tiles
    num_tiles = ((M + BLOCK_M - 1) // BLOCK_M) * ((N + BLOCK_N - 1) // BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, NUM_PROGS):
        pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])  # (BM, BK)
            if B_TRANS:
                b = tl.trans(b_desc.load([pid_n * BLOCK_N, k0]))  # (BN, BK) box of the (N, K) storage
            else:
                b = b_desc.load([k0, pid_n * BLOCK_N])  # (BK, BN)
            acc = tl.dot(a, b, acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


def run_variant(variant: str, a, b_store, b_trans: bool, c, cfg, num_sms: int = 1):
    """C = A·B with B = b_store (K, N) or, with ``b_trans``, b_storeᵀ (b_store is (N, K))."""
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages = cfg
    M, K = a.shape
    N = c.shape[1]
    meta = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"num_warps": warps, "num_stages": stages}
    meta.update(COMPILE_OPTIONS)  # compiled as lora_fast's kernels are
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if variant in ("ptr32", "ptr64"):
        sbk, sbn = (b_store.stride(1), b_store.stride(0)) if b_trans else b_store.stride()
        _gemm_ptr[(tiles,)](a, b_store, c, M, N, K, *a.stride(), sbk, sbn, *c.stride(),
                           OFFS64=variant == "ptr64", MASK_K=variant == "ptr64" or K % bk != 0,
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, **meta)
        return
    a_d = TensorDescriptor.from_tensor(a, [bm, bk])
    b_d = TensorDescriptor.from_tensor(b_store, [bn, bk] if b_trans else [bk, bn])
    c_d = TensorDescriptor.from_tensor(c, [bm, bn])
    progs = min(tiles, num_sms) if variant == "tma_persist" else tiles
    _gemm_tma[(progs,)](a_d, b_d, c_d, M, N, K, progs, B_TRANS=b_trans, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                       GROUP_M=8, **meta)


VARIANTS = ("ptr32", "ptr64", "tma", "tma_persist")


def problems(M: int, K: int, N: int, dtype, device):
    """(name, A, B storage, B transposed?, C) for the forward and the dx GEMM of one Conv1D projection."""
    import torch

    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(K, N, device=device) / K**0.5).to(dtype)  # Conv1D storage (K, N)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    return [("fwd", x, w, False, torch.empty(M, N, device=device, dtype=dtype)),
            ("dx", dy, w, True, torch.empty(M, K, device=device, dtype=dtype))]


def check(dtype_name: str = "fp32") -> dict:
    """Every variant at a small odd-M shape against torch (interpreter or GPU); returns rel. errors."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    errs = {}
    for name, a, b, b_trans, c in problems(70, 64, 96, dtype, device):
        ref = a.double() @ (b.double().t() if b_trans else b.double())
        for v in VARIANTS:
            c.zero_()
            run_variant(v, a, b, b_trans, c, CHECK_CONFIG, num_sms=2)
            errs[f"{name}/{v}"] = float((c.double() - ref).norm() / ref.norm())
    return errs


def probe(M: int, layers) -> dict:
    import torch
    from lora_fast.kernels import lora_bwd, lora_fwd

    from benchmarks.gpu_probe import graph_ms

    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    from benchmarks.utils import env_info

    out = {**env_info(device), "M": M, "cases": []}
    r, s = 16, 2.0
    for layer in layers:
        K, N = LAYERS[layer]
        A = torch.randn(r, K, device=device) / K**0.5
        B = torch.randn(N, r, device=device) / r**0.5
        for name, a, b, b_trans, c in problems(M, K, N, torch.bfloat16, device):
            flops = 2 * a.shape[0] * a.shape[1] * c.shape[1]
            row = {"layer": layer, "gemm": name, "ms": {}, "best_cfg": {}, "err": {}}
            ref = a.float() @ (b.float().t() if b_trans else b.float())
            row["ms"]["cublas"] = graph_ms(lambda a=a, b=b, t=b_trans: a @ (b.t() if t else b))
            if name == "fwd":  # lora_fast's xa_first forward: xa kernel + GEMM with the LoRA epilogue
                row["ms"]["lora_fast"] = graph_ms(lambda a=a, b=b, A=A, B=B: lora_fwd.lora_linear_fwd(
                    a, b, None, A, B, s, 0.0, None, True, write_xa=False, variant="xa_first"))
            else:  # lora_fast's backward, dx only (LoRA term included)
                xk = torch.randn(M, K, device=device, dtype=torch.bfloat16)
                row["ms"]["lora_fast"] = graph_ms(lambda a=a, b=b, xk=xk, A=A, B=B: lora_bwd.lora_linear_bwd(
                    a, xk, None, b, A, B, s, 0.0, None, True, needs_dA=False, needs_dB=False))
            for v in VARIANTS:
                best = None
                for cfg in GPU_CONFIGS:
                    try:
                        c.zero_()
                        run_variant(v, a, b, b_trans, c, cfg, sms)
                        err = float((c.float() - ref).norm() / ref.norm())
                        if not err <= WRONG:  # a wrong kernel's time means nothing
                            row["wrong"] = {**row.get("wrong", {}), f"{v} {cfg}": err}
                            print(f"  {layer} {name} {v} {cfg}: WRONG, rel. error {err:.2e}", file=sys.stderr)
                            continue
                        ms = graph_ms(lambda v=v, a=a, b=b, t=b_trans, c=c, cfg=cfg: run_variant(v, a, b, t, c, cfg,
                                                                                                  sms))
                    except Exception as e:  # noqa: BLE001 - a probe reports and goes on (e.g. out of resources)
                        print(f"  {layer} {name} {v} {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                        continue
                    if ms == ms and (best is None or ms < best[0]):  # NaN: capture failed
                        best = (ms, cfg, err)
                if best is not None:
                    row["ms"][v], row["best_cfg"][v], row["err"][v] = best
            row["tflops"] = {k: flops / ms / 1e9 for k, ms in row["ms"].items() if ms == ms and ms > 0}
            out["cases"].append(row)
            cub = row["ms"]["cublas"]
            print(f"{layer:<12}{name:<4} " + "  ".join(f"{k} {v:.4f} ms ({v / cub:.2f}×)" for k, v in row["ms"].items())
                  + "  | best cfg " + str(row["best_cfg"]) + " | err " + str({k: f"{e:.1e}" for k, e in
                                                                              row["err"].items()}), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gemm_probe", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="correctness of every variant at a small shape only")
    p.add_argument("--M", type=int, default=8192)
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch
    from lora_fast.kernels.launch import interpreting

    if torch.cuda.is_available() and interpreting():
        p.error("TRITON_INTERPRET is set on a GPU machine: the probe would time (and check, in bf16, which the "
                "interpreter computes wrongly) Triton's numpy interpreter; unset it")
    if not torch.cuda.is_available():
        if not args.check:
            p.error("timing needs a CUDA GPU; on a CPU use --check (with TRITON_INTERPRET=1)")
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--check on a CPU needs TRITON_INTERPRET=1 in the environment")
    if args.check:
        errs = check("fp32" if not torch.cuda.is_available() else "bf16")
        print(json.dumps(errs, indent=1))
        return 0
    res = probe(args.M, args.layers)
    res["check_bf16"] = check("bf16")
    bad = {k: e for k, e in res["check_bf16"].items() if not e <= WRONG}
    bad.update({f"{c['layer']} {c['gemm']} {k}": e for c in res["cases"] for k, e in c.get("wrong", {}).items()})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    if bad:
        print(f"WRONG results (rel. error > {WRONG}): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
