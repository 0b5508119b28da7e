"""Which fused output goes wrong in fp32 on a GPU, and under which switch (diagnostic for issue 8).

    python -m benchmarks.gpu_fp32_check

For a few small cases prints ‖out − ref‖/‖ref‖ of y, xa, dx, dA, dB against float64 with the kernels' own mask,
for each forward variant, atomic/deterministic reductions, and fp32 dot precision ieee vs tf32.
"""

from __future__ import annotations

import torch
from lora_fast.kernels import lora_bwd, lora_fwd

from benchmarks.gpu_probe import fp64_reference, rel
from lora_fast.functional import dropout_mask, seed_tensor


def case(M, K, N, r, p, fifo, variant, det, tf32):
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = tf32
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
    print(f"M={M} K={K} N={N} r={r} p={p} fifo={fifo} {variant:<8} det={det!s:<5} tf32={tf32!s:<5} "
          + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)


def main() -> int:
    for M, K, N, r, p, fifo in [(1, 97, 75, 1, 0.0, False), (128, 70, 33, 16, 0.0, True), (64, 40, 24, 8, 0.3, True)]:
        for variant in lora_fwd.FWD_VARIANTS:
            for det in (False, True):
                case(M, K, N, r, p, fifo, variant, det, False)
        case(M, K, N, r, p, fifo, "one_pass", False, True)
    for dtype in (torch.float16, torch.bfloat16):  # the same small case in half precision, for comparison
        x = torch.randn(64, 40, device="cuda", dtype=dtype)
        w = torch.randn(24, 40, device="cuda", dtype=dtype)
        A, B = torch.randn(8, 40, device="cuda"), torch.randn(24, 8, device="cuda")
        y, _ = lora_fwd.lora_linear_fwd(x, w, None, A, B, 0.5)
        ref = x.double() @ w.double().t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
        print(dtype, "y", f"{rel(y, ref):.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
