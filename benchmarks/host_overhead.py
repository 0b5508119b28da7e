"""Host (CPU) cost per LoRA layer call: what a step pays before the GPU does any work.

    python -m benchmarks.host_overhead                 # CPU: lora_fast's Python path with kernel launches stubbed
    python -m benchmarks.host_overhead --device cuda   # GPU: real host time per call, launches included

Why: on the H100 VM of benchmarks/PERF_NOTES.md an eager GPT-2 layer's fwd+bwd cost the host 0.7–1.5 ms on the
lora_fast path — more than its GPU time at M = 8192 — so host time bounds the eager training step.

CPU mode (``--device cpu``, the default off-GPU): TRITON_INTERPRET=1 selects the Triton path for CPU tensors and
every kernel launch is replaced by a no-op, so the figure is lora_fast's own Python/C++ overhead around the
kernels (checks, seed draw, allocations, autograd Function, argument marshalling), not Triton's launch cost and
never a kernel time. ``base`` (the Conv1D alone) and ``peft`` run for real at a tiny shape (M = 1, 64 → 192) where
their compute is negligible: their figure is PyTorch's per-op dispatch cost on this CPU.

GPU mode (``--device cuda``): host microseconds per call with no synchronisation in the loop, for base, peft,
peft_patched (PEFT's layer after ``patch_peft``: its per-call state check included), reference and lora_fast —
Triton's launch path included. The default shape is small (M = 256) and the runs short
(50 calls) so that the GPU keeps up and its launch queue (~1024 entries) never fills: a full queue would block the
host and turn the figure into GPU time.

Printed: median µs per call over ``--rep`` repetitions of ``--calls`` calls; ``--json FILE`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _stub_launches() -> None:
    """Replace the Triton launches of the fused path by no-ops (the grid lambdas still run, as before a launch)."""
    from lora_fast.kernels import launch, lora_bwd, lora_bwd_cublas, lora_fwd

    class _NoLaunch:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                if callable(grid):
                    grid({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})

            return launch

    stub = _NoLaunch()
    lora_fwd._lora_xa_kernel = lora_fwd._lora_fwd_kernel = lora_bwd._lora_bwd_kernel = stub
    lora_bwd_cublas._lora_dy_kernel = lora_bwd_cublas._lora_dx_lora_kernel = stub
    launch.kernels_interpreted = lambda fn: True  # the dispatcher's check that the kernels were built interpreted

def tuner_overhead(calls: int, rep: int) -> dict[str, float]:
    """µs per launch of the forward kernel's arguments through ``triton.autotune``'s wrapper with its key already
    tuned, and through ``TunedKernel``'s direct path — both around a no-op kernel, so only the wrappers count."""
    import torch
    import triton
    from lora_fast.kernels import launch, lora_fwd

    class _NoOpKernel:  # what the wrappers call: JITFunction.run / JITFunction[grid]
        def run(self, *args, **kwargs):
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    # the forward launch's real argument list (41 arguments) at a small shape
    M, K, N, r = 4, 768, 2304, 16
    x, w, b = torch.randn(M, K), torch.randn(K, N), torch.randn(N)
    a, bb, y, xa, seed = torch.randn(r, K), torch.randn(N, r), torch.empty(M, N), torch.empty(M, r), torch.ones(1)
    args = (x, w, b, a, bb, y, xa, seed.long(), M, N, K, r, 4, K, 1, 1, N, K, 1, r, 1, N, 1, r, 1, 2.0, 6554, 1.1)
    meta = dict(HAS_BIAS=True, HAS_DROPOUT=True, WRITE_XA=False, XA_IN=True, TMA=False, W_KN=False, PERSISTENT=False,
                INPUT_PRECISION="ieee", BLOCK_R=16)
    grid = (1,)
    tuner = triton.autotune(lora_fwd.get_fwd_configs(), key=["N", "K", "R", "M_BUCKET", "XA_IN", "HAS_DROPOUT"])(
        lora_fwd._lora_fwd_kernel)
    tuner.fn = _NoOpKernel()
    tuner.prune_configs = lambda kwargs, *a: tuner.configs[:1]  # one config left: chosen without timing
    tuner[grid](*args, **meta)  # fills the tuner's cache for this key
    direct = launch.TunedKernel(_NoOpKernel(), lambda: tuner)
    direct.launch(("k",), grid, *args, **meta)  # records the chosen config
    out = {}
    for name, fn in (("triton.autotune wrapper, key cached", lambda: tuner[grid](*args, **meta)),
                     ("TunedKernel direct launch", lambda: direct.launch(("k",), grid, *args, **meta))):
        out[name] = statistics.median(time_calls(fn, calls, rep, lambda: None))
    return out


def build(provider: str, k_in: int, n_out: int, r: int, dropout: float, device, dtype):
    """The module for ``provider`` around a Conv1D(k_in → n_out), as bench_layer builds it (B non-zero)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from benchmarks.bench_layer import build_provider

    conv = Conv1D(n_out, k_in).to(device=device, dtype=dtype)
    conv.requires_grad_(False)
    lora_A = torch.randn(r, k_in, device=device) / k_in**0.5
    lora_B = torch.randn(n_out, r, device=device) * 0.02
    layer, _ = build_provider(provider, conv, r, dropout, lora_A, lora_B)
    return layer.to(device)


def time_calls(fn, calls: int, rep: int, sync) -> list[float]:
    """µs per call of ``fn`` over ``rep`` runs of ``calls`` back-to-back calls (no synchronisation inside a run)."""
    for _ in range(3):
        fn()
    sync()
    out = []
    for _ in range(rep):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        sync()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu (stubbed launches) or cuda; default: cuda if available")
    from benchmarks.bench_layer import ALL_PROVIDERS  # imports no kernel either

    p.add_argument("--providers", nargs="+", default=["base", "peft", "peft_patched", "reference", "lora_fast"],
                   choices=[name for name in ALL_PROVIDERS if name != "torch_compile"])
    p.add_argument("--M", type=int, help="rows (default 256 on a GPU, 1 on CPU)")
    p.add_argument("--K", type=int, help="in_features (default 768 on a GPU, 64 on CPU)")
    p.add_argument("--N", type=int, help="out_features (default 2304 on a GPU, 192 on CPU)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--calls", type=int, help="calls per timed run (default 50 on a GPU, 200 on CPU)")
    p.add_argument("--rep", type=int, default=7)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)

    import torch  # imports no Triton kernel: TRITON_INTERPRET can still be chosen below

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # never on a GPU: the interpreter's timings would pass for real launches
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before lora_fast imports the kernels
    from benchmarks.utils import env_info, provider_env
    on_gpu = device.type == "cuda"
    from lora_fast.kernels.launch import interpreting  # the kernels' own reading of the variable

    if on_gpu and interpreting():
        p.error("TRITON_INTERPRET is set: on a GPU the figures would be the numpy interpreter's, not real launches; "
                "unset it")
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("CPU mode needs TRITON_INTERPRET=1 (unset, or set to 1, in the environment)")
    M = args.M or (256 if on_gpu else 1)
    args.calls = args.calls or (50 if on_gpu else 200)
    K, N = args.K or (768 if on_gpu else 64), args.N or (2304 if on_gpu else 192)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:
        wrappers = tuner_overhead(args.calls * 10, args.rep)  # before the stubs replace the kernels
        _stub_launches()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    print(f"host µs per call on {device} ({'real launches' if on_gpu else 'kernel launches stubbed'}), "
          f"M={M} K={K} N={N} r={args.r} dropout={args.dropout} {dtype}, torch {torch.__version__}")
    results = {}
    for provider in args.providers:
        layer = build(provider, K, N, args.r, args.dropout, device, dtype).train()
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)

        grads = [x, *(q for q in layer.parameters() if q.requires_grad)]

        def full(layer=layer, x=x, dy=dy, grads=grads):
            for t in grads:  # fresh gradients each call, as a training step has (no accumulation add)
                t.grad = None
            layer(x).backward(dy)

        def infer(layer=layer, x=x):
            with torch.no_grad():
                layer(x)

        for mode, fn in (("fwd+bwd", full), ("fwd no_grad", infer)):
            with provider_env(provider):
                us = time_calls(fn, args.calls, args.rep, sync)
            results[f"{provider} {mode}"] = statistics.median(us)
            print(f"  {provider:<14} {mode:<12} {statistics.median(us):8.1f} µs  (min {min(us):.1f})", flush=True)
    if not on_gpu:
        print("per-launch wrapper cost around a no-op kernel (forward kernel's 41 arguments):")
        for name, us in wrappers.items():
            results[name] = us
            print(f"  {name:<40} {us:8.1f} µs", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**env_info(device), "M": M, "K": K, "N": N, "r": args.r, "dropout": args.dropout,
                       "stubbed": not on_gpu, "us_per_call": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
