"""Compile lora_fast's Triton kernels for a CUDA GPU on a machine without one, and report what each compiled
kernel asks of the GPU (issue 8: verify and tune, in the part that needs no device).

    python -m benchmarks.compile_check                    # sm_90 (H100/H200): the launch paths' fixed tiles
    python -m benchmarks.compile_check --full             # ... every rank tile, both layouts, bias, no_grad, odd sizes
    python -m benchmarks.compile_check --autotune         # every autotune config at the GPT-2 target (bf16, r = 16)
    python -m benchmarks.compile_check --arch 80 --json out.json

The launchers themselves are called (``lora_linear_fwd``, ``lora_linear_bwd``, the cublas variant, the dropout mask),
with small CPU tensors, so the kernels are specialised exactly as on a GPU: the same constexprs, the same dtypes,
the same divisibility-by-16 and ``== 1`` specialisations of the integer arguments. Triton's own compiler then
runs the whole pipeline — TTIR, TTGIR, LLVM IR, PTX and ``ptxas`` (bundled with the triton wheel) to a cubin for the
target architecture — through a stand-in driver that reports that target; nothing is launched. For each compiled
kernel: registers per thread and local memory (spills; ``cuobjdump -res-usage`` on the cubin), and the dynamic
shared memory it will request (``metadata.shared``) against the architecture's per-block limit.

What this proves, and what it does not: a kernel that fails here fails on the GPU too (type errors, a ``tl.dot``
on a dimension < 16 or a dtype the target lacks); one that passes may still compute wrongly or slowly — that is
for the GPU test stage (``benchmarks/run_gpu.sh OUT tests``). The interpreter, which the CPU test suite uses,
accepts programs the real compiler rejects (``tl.dot`` with K < 16, bf16 dots); this closes that gap.

Shared memory is checked as the device checks it: a compiled kernel that needs more than the target allows raises
triton's ``OutOfResources`` at its launch, before anything runs, and the launchers then fall back to a smaller
tile (``launch_fitting``; the autotuner skips such a config). Exit status 1 if any case fails: a compile error, or
a launch for which no tile fits. Spills are reported, not failed: they cost speed, not correctness. In
``--autotune`` mode every config of the tuning lists is compiled, including those the shared-memory pruner
drops, so the pruner's estimate can be checked against the compiler's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.utils import env_vars

# per-block opt-in shared memory (bytes), from NVIDIA's CUDA C programming guide, "compute capabilities" table
SMEM_LIMIT = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _OfflineDriver:
    """The part of a triton driver that compilation asks for: the current device, stream and target."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def cuobjdump() -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


def resource_usage(cubin: bytes, tool: Path | None) -> dict:
    """Registers per thread and the bytes of per-thread stack and local memory of a cubin, from ``cuobjdump
    -res-usage``. A kernel that runs out of registers spills to its stack frame (``STACK``; ``LOCAL`` in older
    ptxas releases): ``spill`` is their sum."""
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([str(tool), "-res-usage", fh.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        return {}
    stack, local = int(m.group(2)), int(m.group(4))
    return {"regs": int(m.group(1)), "stack": stack, "local": local, "spill": stack + local}


@contextlib.contextmanager
def offline_compiler(arch: int, records: list):
    """Within: launching a ``@triton.jit`` kernel compiles it for ``sm_<arch>`` and launches nothing; one record per
    distinct compiled kernel is appended to ``records``. The launchers' shared-memory budget is the target's."""
    import triton
    from lora_fast.kernels import launch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    tool = cuobjdump()
    seen: set[int] = set()
    orig_run, orig_budget = JITFunction.run, launch.smem_budget
    limit = SMEM_LIMIT.get(arch, launch.SMEM_BUDGET)

    def compile_only(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        fits = kernel.metadata.shared <= limit
        if id(kernel) not in seen:
            seen.add(id(kernel))
            tensors = [a for a in args if torch.is_tensor(a) and a.is_floating_point()]
            md = kernel.metadata
            records.append({
                "kernel": self.fn.__name__,
                "dtype": str(tensors[0].dtype).replace("torch.", "") if tensors else "-",
                "meta": {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
                         for k, v in kwargs.items() if k.isupper() and k not in ("M_BUCKET",)},
                "num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared,
                "smem_limit": limit, **resource_usage(kernel.asm["cubin"], tool),
                "tma_copies": "cp.async.bulk.tensor" in kernel.asm.get("ptx", ""),  # TMA loads/stores in its PTX
                "fp_fusion": md.enable_fp_fusion,  # the option it was compiled with (launch.COMPILE_OPTIONS)
                "compile_s": round(time.perf_counter() - t0, 2),
            })
        if not fits:  # what the device does, before anything runs (CompiledKernel._init_handles)
            raise OutOfResources(kernel.metadata.shared, limit, "shared memory")
        return kernel

    attr = "_active" if hasattr(driver, "_active") else "active"  # triton 3.4 keeps it in a plain `active`
    previous = getattr(driver, attr)  # saved and put back: whatever driver was in use before
    driver.set_active(_OfflineDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = compile_only
    launch.smem_budget = lambda device: limit
    try:
        yield records
    finally:
        JITFunction.run, launch.smem_budget = orig_run, orig_budget
        setattr(driver, attr, previous)
        del triton


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _layer(M, K, N, r, dtype, conv1d, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(K, N, generator=g).to(dtype) if conv1d else torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    a = torch.randn(r, K, generator=g)  # adapters in fp32, as the modules keep them
    bb = torch.randn(N, r, generator=g)
    return x, w, b, a, bb


def run_launchers(M, K, N, r, dtype, p, conv1d=True, bias=True, no_grad=False, subsets=False):
    """Every launch path of one layer configuration: each forward variant, the fused backward (atomic and
    deterministic, pointer and TMA loads, after a dy pass), the cublas backward; ``subsets``: also the backward
    without dx (a first layer)."""
    from lora_fast.kernels import lora_bwd, lora_fwd
    from lora_fast.kernels.dropout import seed_tensor

    x, w, b, a, bb = _layer(M, K, N, r, dtype, conv1d, bias)
    seed = seed_tensor(1234, x.device) if p > 0 else None
    for variant in lora_fwd.FWD_VARIANTS:
        lora_fwd.lora_linear_fwd(x, w, b, a, bb, 2.0, p, seed, conv1d, write_xa=True, variant=variant)
        if no_grad:
            lora_fwd.lora_linear_fwd(x, w, b, a, bb, 2.0, p, seed, conv1d, write_xa=False, variant=variant)
    xa = torch.zeros(M, r)
    dy = torch.randn(M, N).to(dtype)
    needs = [(True, True, True)] + ([(False, True, True), (True, False, False)] if subsets else [])
    for nx, na, nb in needs:
        for variant, det in (("fused", False), ("fused", True), ("tma", False), ("tma", True), ("gb_first", False),
                             ("gb_first_tma", False), ("cublas", False)):
            lora_bwd.lora_linear_bwd(dy, x, xa, w, a, bb, 2.0, p, seed, conv1d, nx, na, nb, deterministic=det,
                                     variant=variant)


def fixed_cases(full: bool, dtypes=tuple(DTYPES), ranks=None, dropouts=(0.0, 0.1), fp32=("ieee", "tf32")):
    """(label, thunk) for the fixed-tile launches: each dtype × rank tile × dropout, and fp32 with TF32 allowed
    likewise (its kernels differ: ``kernels/dots.py``); ``fp32`` names which fp32 dot precisions to compile;
    ``full`` adds both layouts, no bias, no_grad forwards, backward subsets and odd sizes."""
    ranks = ranks or ((1, 8, 16, 64, 128) if full else (16, 128))
    shapes = ((128, 64, 96), (37, 33, 45)) if full else ((128, 64, 96),)
    for dname in dtypes:
        dtype = DTYPES[dname]
        for r in ranks if dname != "fp32" or "ieee" in fp32 else ():
            for p in dropouts:
                for M, K, N in shapes:
                    for conv1d, bias in (((True, True), (False, False)) if full else ((True, True),)):
                        label = f"{dname} r={r} p={p} M,K,N={M},{K},{N} {'conv1d' if conv1d else 'linear'}" \
                                f"{'' if bias else ' no-bias'}"
                        yield label, lambda M=M, K=K, N=N, r=r, dtype=dtype, p=p, c=conv1d, b=bias: run_launchers(
                            M, K, N, r, dtype, p, c, b, no_grad=full, subsets=full)
        if dname == "fp32" and "tf32" in fp32:  # TF32: rounded operands for the frozen GEMMs, "tf32x3" for rank r
            for r in ranks:
                for p in dropouts:
                    yield f"fp32 tf32 r={r} p={p}", lambda r=r, p=p: _with_tf32(
                        lambda: run_launchers(128, 64, 96, r, torch.float32, p))
    yield "dropout mask", _dropout_mask


def _with_tf32(fn):
    from lora_fast.kernels.launch import matmul_tf32

    with matmul_tf32(True):
        fn()


def _dropout_mask():
    from lora_fast.kernels import dropout
    from lora_fast.kernels.dropout import seed_tensor

    out = torch.empty(64, 96, dtype=torch.uint8)
    dropout._dropout_mask_kernel[(1, 2)](seed_tensor(7, "cpu"), out, 64, 96, 96, 1, 1000, BLOCK_M=64, BLOCK_K=64,
                                         **dropout.COMPILE_OPTIONS)


def autotune_cases():
    """The GPT-2 target (bf16, r = 16, Conv1D with bias; the xa_first forward at p = 0.1, the one-pass forward at
    p = 0, the fused atomic backward): every config of the tuning lists, pruned or not."""
    from lora_fast.kernels import lora_bwd, lora_fwd
    from lora_fast.kernels.launch import COMPILE_OPTIONS, TunedKernel, config_meta
    from triton.runtime.errors import OutOfResources

    spaces = {id(lora_fwd._lora_fwd_kernel): (lora_fwd.get_fwd_configs, lora_fwd.prune_fwd_configs),
              id(lora_bwd._lora_bwd_kernel): (lora_bwd.get_bwd_configs, lora_bwd.prune_bwd_configs)}
    pruned_away: list[dict] = []

    def every_config(self, key, grid, *args, **meta):
        configs, prune = spaces[id(self.kernel)]
        named = dict(zip(self.kernel.arg_names, args, strict=False))
        all_configs = configs()
        kept = {id(c) for c in prune(all_configs, named, **meta)}
        for c in all_configs:
            if id(c) not in kept:
                pruned_away.append({"kernel": self.kernel.fn.__name__, **c.kwargs, "num_warps": c.num_warps,
                                    "num_stages": c.num_stages})
            try:
                self.kernel[grid](*args, **meta, **config_meta(c), **COMPILE_OPTIONS)
            except OutOfResources:  # the tuner skips such a config on the device too
                pass

    def run():
        orig = TunedKernel.launch
        TunedKernel.launch = every_config
        try:
            with env_vars({"LORA_FAST_AUTOTUNE": "1"}):
                for p in (0.0, 0.1):
                    run_launchers(8192 // 64, 768, 2304, 16, torch.bfloat16, p)
        finally:
            TunedKernel.launch = orig

    return [("bf16 r=16 GPT-2 autotune lists", run)], pruned_away


def check(arch: int = 90, full: bool = False, autotune: bool = False, log=print, **select) -> dict:
    """Compile every case for ``sm_<arch>``; returns {"records", "errors", "pruned"} (errors: label -> message).
    ``select``: ``dtypes``, ``ranks``, ``dropouts``, ``fp32`` narrowing ``fixed_cases``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check compiles for a GPU: unset TRITON_INTERPRET")
    records: list[dict] = []
    errors: dict[str, str] = {}
    pruned: list[dict] = []
    cases = [(label, thunk, False) for label, thunk in fixed_cases(full, **select)]
    if autotune:
        extra, pruned = autotune_cases()
        cases += [(label, thunk, True) for label, thunk in extra]
    with offline_compiler(arch, records), env_vars(
            {"LORA_FAST_AUTOTUNE": "0", "LORA_FAST_FWD_VARIANT": "", "LORA_FAST_BWD_VARIANT": ""}):
        for label, thunk, tuning in cases:
            n0, t0 = len(records), time.perf_counter()
            try:
                thunk()
            except Exception as e:  # noqa: BLE001 — every failure is reported, and the exit status says so
                errors[label] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            for rec in records[n0:]:
                rec.update(case=label, autotune=tuning)
            log(f"{label}: {len(records) - n0} new kernels, {time.perf_counter() - t0:.1f} s"
                + (f"  FAILED {errors[label]}" if label in errors else ""))
    return {"records": records, "errors": errors, "pruned": pruned}


def over_limit(rec: dict) -> bool:
    return rec["shared"] > rec["smem_limit"]


def table(records: list[dict]) -> str:
    lines = ["| kernel | dtype | tile / flags | warps | stages | regs | spill B | shared KiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: (r["kernel"], r["dtype"], json.dumps(r["meta"], sort_keys=True))):
        meta = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(r["meta"].items()))
        flag = " **does not fit**" if over_limit(r) else ""
        lines.append(f"| {r['kernel']} | {r['dtype']} | {meta} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r.get('regs', '?')} | {r.get('spill', '?')} | {r['shared'] / 1024:.1f}{flag} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90,
                    help="compute capability × 10: 90 H100/H200, 80 A100, 86/89 RTX 30xx/40xx, 75 T4")
    ap.add_argument("--full", action="store_true", help="every rank tile, layout, bias, no_grad, odd sizes")
    ap.add_argument("--autotune", action="store_true", help="also every autotune config at the GPT-2 target")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=tuple(DTYPES))
    ap.add_argument("--ranks", nargs="+", type=int, help="default: 16 128 (--full: 1 8 16 64 128)")
    ap.add_argument("--dropouts", nargs="+", type=float, default=(0.0, 0.1))
    ap.add_argument("--fp32-precisions", nargs="+", choices=("ieee", "tf32"), default=("ieee", "tf32"),
                    help="fp32 dots compiled: IEEE (torch's default) and/or TF32 (torch allows it)")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--table", action="store_true", help="print a markdown table of every compiled kernel")
    args = ap.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch} "
          f"(shared memory limit {SMEM_LIMIT.get(args.arch, 0) // 1024} KiB per block)")
    t0 = time.perf_counter()
    res = check(args.arch, args.full, args.autotune, dtypes=args.dtypes, ranks=args.ranks, dropouts=args.dropouts,
                fp32=args.fp32_precisions)
    recs = res["records"]
    spills = [r for r in recs if r.get("spill", 0) > 0]
    if args.table:
        print(table(recs))
    if res["pruned"]:
        print(f"{len(res['pruned'])} config launches dropped by the pruners (compiled anyway, above)")
    print(f"{len(recs)} kernels compiled in {time.perf_counter() - t0:.0f} s; {len(res['errors'])} cases failed; "
          f"{len(spills)} kernels spill; {sum(map(over_limit, recs))} need more shared memory than sm_{args.arch} has "
          f"(their launches fell back to a smaller tile, or the tuner skipped them)")
    for label, err in res["errors"].items():
        print(f"  FAILED {label}: {err}")
    for r in spills:
        print(f"  spills: {r['kernel']} {r['dtype']} {r['meta']} warps={r['num_warps']} spill={r['spill']} B")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, **res}, indent=1))
    if cuobjdump() is None:
        print("note: cuobjdump not found next to ptxas: registers and spills not reported")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
