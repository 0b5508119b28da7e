"""Which fused output goes wrong in fp32 on a GPU, and under which switch (diagnostic for issue 8).

    python -m benchmarks.gpu_fp32_check [--device cuda]

For a few small cases prints ‖out − ref‖/‖ref‖ of y, xa, dx, dA, dB against float64 with the kernels' own mask,
for each forward variant, atomic/deterministic reductions, and fp32 dot precision ieee vs tf32. ``--device cpu``
under ``TRITON_INTERPRET=1`` runs the same cases in the interpreter: a check of the script, not of the GPU (fp32
dots are exact there and its bf16 ``tl.dot`` is garbage).
"""

from __future__ import annotations

import argparse

import torch
from lora_fast.kernels import lora_bwd, lora_fwd
from lora_fast.kernels.launch import matmul_tf32

from benchmarks.gpu_probe import fp64_reference, rel
from lora_fast.functional import dropout_mask, seed_tensor

# (M, K, N, r, dropout p, fan_in_fan_out): one row; odd sizes and r = 16; dropout on a Conv1D layout
CASES = [(1, 97, 75, 1, 0.0, False), (128, 70, 33, 16, 0.0, True), (64, 40, 24, 8, 0.3, True)]


def case(M, K, N, r, p, fifo, variant, det, tf32, dev="cuda") -> dict:
    """One case, printed; returns {output: ‖out − ref‖/‖ref‖}, and ``torch_y``: torch's own y computed with the same
    switch. Runs with torch's TF32 switch set to ``tf32``, restored after."""
    with matmul_tf32(tf32):
        return _case(M, K, N, r, p, fifo, variant, det, tf32, dev)


def _case(M, K, N, r, p, fifo, variant, det, tf32, dev) -> dict:
    x = torch.randn(M, K, device=dev)
    w = torch.randn((K, N) if fifo else (N, K), device=dev) / K**0.5
    b = torch.randn(N, device=dev)
    A, B = torch.randn(r, K, device=dev) / K**0.5, torch.randn(N, r, device=dev) / r**0.5
    dy = torch.randn(M, N, device=dev)
    st = seed_tensor(7, dev) if p else None
    y, xa = lora_fwd.lora_linear_fwd(x, w, b, A, B, 0.5, p, st, fifo, variant=variant)
    dx, dA, dB = lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, 0.5, p, st, fifo, deterministic=det)
    keep = dropout_mask(7, M, K, p, dev) if p else None
    ref = fp64_reference(x, w, b, A, B, dy, 0.5, p, keep, fifo)
    errs = {k: rel(o, ref[k]) for k, o in (("y", y), ("xa", xa), ("dx", dx), ("dA", dA), ("dB", dB))}
    xk = x * keep / (1 - p) if p else x  # torch's own y under the same TF32 switch: the baseline to compare with
    errs["torch_y"] = rel(torch.addmm(b, x, w if fifo else w.t()) + 0.5 * (xk @ A.t()) @ B.t(), ref["y"])
    print(f"M={M} K={K} N={N} r={r} p={p} fifo={fifo} {variant:<8} det={det!s:<5} tf32={tf32!s:<5} "
          + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_fp32_check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu under TRITON_INTERPRET=1")
    dev = ap.parse_args(argv).device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (no CUDA device is visible to torch); --device cpu with TRITON_INTERPRET=1 runs "
                 "the same cases in Triton's interpreter")
    for M, K, N, r, p, fifo in CASES:
        for tf32 in (False, True):  # TF32: the default backward is cuBLAS's, the deterministic one fused
            for variant in lora_fwd.FWD_VARIANTS:
                for det in (False, True):
                    case(M, K, N, r, p, fifo, variant, det, tf32, dev)
    for dtype in (torch.float16, torch.bfloat16):  # the same small case in half precision, for comparison
        x = torch.randn(64, 40, device=dev, dtype=dtype)
        w = torch.randn(24, 40, device=dev, dtype=dtype)
        A, B = torch.randn(8, 40, device=dev), torch.randn(24, 8, device=dev)
        y, _ = lora_fwd.lora_linear_fwd(x, w, None, A, B, 0.5)
        ref = x.double() @ w.double().t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
        print(dtype, "y", f"{rel(y, ref):.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
