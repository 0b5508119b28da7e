"""Kernel properties that a mutation audit of the kernel bodies found untested (each test names the mutants it
kills). All run the kernels through triton's interpreter, which these tests instrument or re-tile.

- Memory: a kernel touches only its tensors' elements. A load mask missing a term still reads past an edge (on a
  GPU past the allocation, or a neighbour's data) even where the value is then discarded or multiplied by a masked
  zero; a store mask missing a term writes there. Checked by recording every address the interpreter touches,
  with inputs that are views of NaN-filled buffers and outputs allocated NaN-filled between margins.
- Tiles: the GPU tuner picks tiles with BLOCK_M, BLOCK_N and BLOCK_K all different and launches several row
  groups, where the interpreter's fixed 64×64×64 tile has one: an offset computed with the wrong block size or a
  lost group offset passed every other CPU test.
- fp32 accumulation: over the other tests' short reductions an fp16 accumulator loses nothing visible.
"""

# ruff: noqa: I001  (the kernels are imported after tests.triton_interpret has set up the interpreter)
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton

from lora_fast.reference import lora_linear_ref
from tests.triton_interpret import DEVICE, HAS_CUDA, interpret  # noqa: F401  (fixture)
from tests.utils import assert_rel_close, ref_grads64, rel_err

from lora_fast.kernels import launch, lora_bwd, lora_fwd
from lora_fast.kernels.dropout import dropout_keep_mask, seed_tensor

pytestmark = [pytest.mark.usefixtures("interpret"),
              pytest.mark.skipif(HAS_CUDA, reason="instruments and re-tiles triton's interpreter (CPU); on a GPU "
                                 "test_kernels and test_tma run the autotuned tiles")]
FP32_TOL = 1e-5  # the interpreter's fp32 dots are exact up to summation order


def _element_addresses(t: torch.Tensor) -> np.ndarray:
    """The byte addresses of a tensor's elements (a view's, not its storage's)."""
    index = torch.arange(t.untyped_storage().nbytes() // t.element_size())
    index = torch.as_strided(index, t.shape, t.stride(), t.storage_offset())
    return (t.untyped_storage().data_ptr() + index.reshape(-1) * t.element_size()).numpy().astype(np.uint64)


class _Memory:
    """Where the interpreted kernels may read and write: the elements of each tensor registered here, and nothing
    else inside its surrounding buffer. Inputs are registered as views of NaN-filled buffers (``padded``);
    ``torch.empty``/``empty_like``/``zeros`` (floating dtypes) are replaced by views into the middle of larger buffers
    (``empty``: NaN-filled, as uninitialised memory may be). Every address the interpreter loads, stores or updates
    atomically (masked-off lanes excluded) is recorded; ``check`` asserts that those inside a registered buffer are
    elements of its tensor."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        self.regions, self.accessed, self.recorded = [], [], 0
        real = getattr(interpreter, "_interpreter", None)
        if not all(hasattr(real, f) for f in ("load", "store", "atomic_rmw")):  # triton internals (as of 3.9)
            pytest.skip(f"triton {triton.__version__}'s interpreter has no _interpreter.load/store/atomic_rmw to "
                        "instrument (written for 3.9); the memory check runs where they exist, the results are "
                        "still checked by test_kernels")
        accessed = self.accessed

        class Recorder:  # the interpreter's memory primitives, recording the addresses they touch
            def __getattr__(self, name):
                return getattr(real, name)

            def load(self, ptrs, mask, other, dtype):
                accessed.append(ptrs[mask])
                return real.load(ptrs, mask, other, dtype)

            def store(self, ptrs, value, mask):
                accessed.append(ptrs[mask])
                return real.store(ptrs, value, mask)

            def atomic_rmw(self, op, ptrs, value, mask, sem):
                accessed.append(ptrs[mask])
                return real.atomic_rmw(op, ptrs, value, mask, sem)

        monkeypatch.setattr(interpreter, "_interpreter", Recorder())
        allocators = {name: getattr(torch, name) for name in ("empty", "empty_like", "zeros")}

        def make(name, fill):
            def alloc(*args, **kwargs):
                t = allocators[name](*args, **kwargs)
                if not t.is_floating_point():
                    return t
                margin = 4 * t.numel() + 4096  # past any tile's overhang
                buf = torch.full((t.numel() + 2 * margin,), float("nan"), dtype=t.dtype, device=t.device)
                return self._register(buf, buf[margin:margin + t.numel()].view(t.shape).fill_(fill))
            return alloc

        for name, fill in (("empty", float("nan")), ("empty_like", float("nan")), ("zeros", 0.0)):
            monkeypatch.setattr(torch, name, make(name, fill))

    def _register(self, buf, view):
        start = buf.data_ptr()  # buf is kept: a freed buffer's memory could be handed out again
        self.regions.append((buf, start, start + buf.numel() * buf.element_size(), _element_addresses(view)))
        return view

    def padded(self, rows: int, cols: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
        """A (rows, cols) view of a NaN-filled (rows + 3, cols + 8) buffer (a slice of a bigger tensor; its rows
        stay 16-byte aligned when cols·itemsize is, so the descriptor paths still take it)."""
        buf = torch.full((rows + 3, cols + 8), float("nan"), device=DEVICE, dtype=dtype)
        return self._register(buf, buf[:rows, :cols].copy_(torch.randn(rows, cols, device=DEVICE) * scale))

    def check(self, label: str) -> None:
        touched = np.concatenate([a.reshape(-1).astype(np.uint64) for a in self.accessed] or [np.zeros(0, np.uint64)])
        self.accessed.clear()
        self.recorded += touched.size
        for _, start, end, allowed in self.regions:
            inside = touched[(touched >= start) & (touched < end)]
            assert np.isin(inside, allowed).all(), f"{label}: accessed memory outside a tensor (its buffer's padding)"


@pytest.mark.parametrize("fifo, K, dtype", [(False, 40, torch.float32), (True, 40, torch.float32),
                                            (False, 0, torch.float32), (True, 40, torch.float16)])
def test_kernels_touch_only_their_tensors(monkeypatch, fifo, K, dtype):
    """Every forward variant and backward mode with x, W₀, A, B, b, dy and xa given as views of NaN-filled buffers (a
    slice of a bigger tensor, e.g. one head of a fused projection) and every buffer the launchers allocate
    NaN-filled (uninitialised memory may hold anything) between margins: the results are the reference's, and no
    kernel loads, stores or adds anywhere in those buffers but their tensors' elements. A load mask with a term
    dropped reads past a tensor's edge — on a GPU past the allocation, or a neighbour's data — even where the value
    read is then masked or multiplied by zero; a store mask with a term dropped writes there. K = 0 (no input
    features): no backward program runs, so the deterministic partial sums must start at zero; dB = dyᵀ·xa = 0.
    Kills: load and store masks with a term dropped or off by one in every kernel; B's rank mask dropped (0 · NaN);
    TMA descriptors a row or column larger than their tensor; deterministic partials added into (atomics) instead
    of stored, or left uninitialised at K = 0."""
    M, N, r, p, s = 37, 24, 5, 0.25, 0.5
    mem = _Memory(monkeypatch)
    x, dy, bias = mem.padded(M, K, dtype=dtype), mem.padded(M, N, dtype=dtype), mem.padded(1, N, dtype=dtype)[0]
    w = mem.padded(*((K, N) if fifo else (N, K)), (K or 1) ** -0.5, dtype)
    a, bb = mem.padded(r, K, (K or 1) ** -0.5), mem.padded(N, r)  # fp32 adapters, as LinearWithLoRA keeps them
    tol = FP32_TOL if dtype == torch.float32 else 2e-3
    st = seed_tensor(3, DEVICE)
    ref = ref_grads64(x, w, bias, a, bb, s, p, dropout_keep_mask(3, M, K, p, DEVICE), fifo, dy)
    for variant in lora_fwd.FWD_VARIANTS:
        y, xa = lora_fwd.lora_linear_fwd(x, w, bias, a, bb, s, p, st, fifo, variant=variant)
        assert_rel_close(y, ref[0], tol, f"{variant}: y")
        assert_rel_close(xa, ref[1], tol, f"{variant}: xa")
        mem.check(variant)
    xa_view = mem.padded(M, r)
    xa_view.copy_(xa)
    for variant, deterministic in (("fused", False), ("fused", True), ("tma", True), ("gb_first", False),
                                   ("gb_first_tma", False), ("cublas", False)):
        out = lora_bwd.lora_linear_bwd(dy, x, xa_view, w, a, bb, s, p, st, fifo, deterministic=deterministic,
                                       variant=variant)
        for name, o, rf in zip(("dx", "dA", "dB"), out, ref[2:], strict=True):
            assert_rel_close(o, rf, tol, f"{variant} (deterministic={deterministic}): {name}")
        mem.check(f"{variant} (deterministic={deterministic})")
    assert mem.recorded, "no memory access recorded: has triton's interpreter changed its primitives?"


def _check_all_variants(x, w, b, a, bb, s, p, seed, fifo, dy, fwd_variants, bwd_modes, label):
    st = seed_tensor(seed, DEVICE) if p > 0 else None
    mask = dropout_keep_mask(seed, *x.shape, p, DEVICE) if p > 0 else None
    ref = ref_grads64(x, w, b, a, bb, s, p, mask, fifo, dy)
    xa = None
    for variant in fwd_variants:
        y, xa = lora_fwd.lora_linear_fwd(x, w, b, a, bb, s, p, st, fifo, variant=variant)
        assert_rel_close(y, ref[0], FP32_TOL, f"{label} {variant}: y")
        assert_rel_close(xa, ref[1], FP32_TOL, f"{label} {variant}: xa")
    for variant, deterministic in bwd_modes:
        out = lora_bwd.lora_linear_bwd(dy, x, xa, w, a, bb, s, p, st, fifo, deterministic=deterministic,
                                       variant=variant)
        for name, o, rf in zip(("dx", "dA", "dB"), out, ref[2:], strict=True):
            assert_rel_close(o, rf, FP32_TOL, f"{label} {variant} (deterministic={deterministic}): {name}")


def test_uneven_tiles_and_several_row_groups(monkeypatch):
    """The forward and backward GEMM kernels and the xa kernel at tiles like the tuner's (BLOCK_M, BLOCK_N, BLOCK_K
    all different; GROUP_M = 2 with 5 row blocks: three groups, the last one short), through TMA descriptors (both
    W₀ layouts) and through pointers with a column-major x (K > BLOCK_K: the mask's column index is the logical one,
    not a memory offset).
    Kills: the grouped order without ``first_m`` or without ``% (GROUP_M·num_pid_n)``; TMA box offsets computed with
    the wrong block size (forward x / W₀ / y, backward dy / W₀ / dx); the mask column scaled by x's stride
    (one_pass, the xa kernel, gb_first)."""
    monkeypatch.setattr(launch, "_FITTED", {})  # the rung cache is keyed without the tile
    monkeypatch.setattr(lora_fwd, "FIXED_FWD_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2})
    for name in ("XA_TILE", "XA_TILE_FMA"):
        monkeypatch.setattr(lora_fwd, name, {"BLOCK_M": 32, "BLOCK_K": 16})
    monkeypatch.setattr(lora_bwd, "FIXED_CONFIG", {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64})
    M, K, N, r, p, s = 70, 72, 68, 5, 0.3, 0.7  # K, N: 16-byte fp32 rows (descriptors); 5 row blocks of 16
    dy = torch.randn(M, N, device=DEVICE)
    a, bb = torch.randn(r, K, device=DEVICE) / K**0.5, torch.randn(N, r, device=DEVICE)
    bias = torch.randn(N, device=DEVICE)
    x = torch.randn(M, K, device=DEVICE)
    for fifo, fwd in ((False, "tma"), (True, "tma_persistent")):  # W₀ (N, K) boxes transposed in the kernel or not
        w = torch.randn((K, N) if fifo else (N, K), device=DEVICE) / K**0.5
        _check_all_variants(x, w, bias, a, bb, s, p, 8, fifo, dy, (fwd,), (("tma", False),), f"fifo={fifo}")
    x_t = torch.randn(K, M, device=DEVICE).t()  # column-major: stride_xk = M
    w = torch.randn(N, K, device=DEVICE) / K**0.5
    _check_all_variants(x_t, w, bias, a, bb, s, p, 9, False, dy, ("one_pass", "xa_first"), (("gb_first", False),),
                        "column-major x")


def _cancelling(rows: int, length: int) -> torch.Tensor:
    """(rows, length) fp16 whose second half is minus the first plus a small δ: a reduction against [u, u] sums to
    u·δ, 1/50 of its partial sum at the half-way point. Every value exact in fp16 (so fp32 operands round to
    nothing), δ included."""
    half = torch.randn(rows, length // 2, device=DEVICE).half()
    delta = (torch.randn(rows, length // 2, device=DEVICE) * 0.02).half()
    return torch.cat([half, -half + delta], 1)


def test_fp16_reductions_across_tiles_accumulate_in_fp32():
    """fp16 reductions two tiles long whose partial sum after the first tile is ~50 × the result (cancellation):
    y, xa and dx stay within twice torch's own fp16 error (torch accumulates fp16 products in fp32). An fp16
    accumulator rounds the large partial sum and keeps that error in the small result.
    Kills: the forward's x·W₀ᵀ or one-pass (keep ⊙ x)·Aᵀ accumulator, or the backward's dy·W₀ or dy·B accumulator,
    in the input's dtype."""
    M, L, n, r, s = 16, 128, 24, 8, 0.5  # L: the reduction, two of the interpreter's 64-wide tiles
    u = torch.randn(M, L // 2, device=DEVICE).half()
    x = torch.cat([u, u], 1)  # (M, L)
    w = _cancelling(n, L) / 8  # (n, L)
    a, bb = _cancelling(r, L).float() / 8, torch.randn(n, r, device=DEVICE).half().float()
    ref = ref_grads64(x, w, None, a, bb, s, 0.0, None, False, torch.zeros(M, n, device=DEVICE).half())
    torch_err = rel_err(lora_linear_ref(x, w, None, a.half(), bb.half(), s), ref[0])
    for variant in ("one_pass", "xa_first"):
        y, xa = lora_fwd.lora_linear_fwd(x, w, None, a, bb, s, variant=variant)
        for name, o, rf in (("y", y, ref[0]), ("xa", xa, ref[1])):
            err = rel_err(o, rf)
            assert err <= 2 * torch_err, f"{variant}: {name} error {err:.2e} > 2 x torch's y error {torch_err:.2e}"
    # backward: dy = [g, g] (M, L) against W₀ (L, K) and B (L, r), both reduced over L
    dy = torch.cat([u, u], 1)
    xs = torch.randn(M, n, device=DEVICE).half()
    ws = (_cancelling(n, L) / 8).t().contiguous()  # (L, n): Linear (N, K) with N = L
    a_s, b_s = torch.randn(r, n, device=DEVICE).half().float(), (_cancelling(r, L).float() / 8).t().contiguous()
    _, xa = lora_fwd.lora_linear_fwd(xs, ws, None, a_s, b_s, s)
    dx_ref = ref_grads64(xs, ws, None, a_s, b_s, s, 0.0, None, False, dy)[2]
    xt = xs.clone().requires_grad_()
    lora_linear_ref(xt, ws, None, a_s.half(), b_s.half(), s).backward(dy)
    torch_err = rel_err(xt.grad, dx_ref)
    for variant in ("fused", "gb_first"):
        dx, _, _ = lora_bwd.lora_linear_bwd(dy, xs, xa, ws, a_s, b_s, s, variant=variant)
        err = rel_err(dx, dx_ref)
        assert err <= 2 * torch_err, f"{variant}: dx error {err:.2e} > 2 x torch's {torch_err:.2e}"
