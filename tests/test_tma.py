"""The TMA kernel variants (``tma``, ``tma_persistent`` forward; ``tma`` backward) against the float64 reference,
and the choice between their descriptor path and the pointer path of the same kernels.

Under triton's interpreter a tensor descriptor is emulated (loads zero-fill outside the tensor, stores clip to it),
so what these tests prove on a CPU is the kernels' indexing through descriptors — tile offsets, the transposed W₀
box, partial tiles at every edge, the persistent loop over tiles — and the launchers' layout checks. Whether the
compiled kernels move their tiles by TMA on sm_90 is checked offline (``benchmarks/compile_check.py`` records
``cp.async.bulk.tensor`` in each kernel's PTX; ``tests/test_kernel_targets.py`` asserts it for every TMA launch
and for no other), and their speed only on a GPU (``benchmarks/gpu_probe.py``).
"""

# ruff: noqa: I001  (the kernels are imported after tests.triton_interpret has set up the interpreter)
from __future__ import annotations

import pytest
import torch

from tests.triton_interpret import DEVICE, fp32_tol, interpret  # noqa: F401  (fixture)
from tests.utils import assert_half_precision, assert_rel_close, ref_grads64, rel_err

from lora_fast.kernels import launch, lora_bwd, lora_fwd
from lora_fast.kernels.dropout import dropout_keep_mask, seed_tensor
from lora_fast.reference import lora_linear_ref

pytestmark = pytest.mark.usefixtures("interpret")


class _Spy:
    """Records the switches and grid of each launch of ``kernel`` through ``launch_fitting`` (the fixed-tile path
    the interpreter takes) and of the autotuned path on a GPU."""

    def __init__(self, monkeypatch, module, kernel):
        self.calls = []
        real_fitting, real_tuned = module.launch_fitting, launch.TunedKernel.launch

        def fitting(k, rungs, key, grid, *args, **meta):
            rung = real_fitting(k, rungs, key, grid, *args, **meta)
            if k is kernel:
                self.calls.append({**meta, "grid": grid(rung)})
            return rung

        def tuned(tk, key, grid, *args, **meta):
            if tk.kernel is kernel:
                self.calls.append(dict(meta))
            return real_tuned(tk, key, grid, *args, **meta)

        monkeypatch.setattr(module, "launch_fitting", fitting)
        monkeypatch.setattr(launch.TunedKernel, "launch", tuned)


@pytest.fixture(autouse=True)
def _tf32_on_cuda():
    """On a GPU, fp32 takes descriptors only with tensor-core dots (``launch.tma_worth``): TF32 on, so that the fp32
    cases run the TMA path there too (``fp32_tol`` is then TF32's). The interpreter takes descriptors in any case.

    Set and restored by ``launch.matmul_tf32`` (one API), not with monkeypatch: pytest 9.2 restores an instance
    attribute it did not find in ``__dict__`` by deleting it, which ``torch.backends.cuda.matmul`` refuses (an error
    at teardown, TF32 left on for the rest of the worker)."""
    if DEVICE != "cuda":
        yield
        return
    with launch.matmul_tf32(True):
        assert launch.input_precision(torch.float32) == "tf32"
        yield


def _tma_expected(dtype) -> bool:
    """Whether a launch in ``dtype`` takes descriptors when its layout allows (False only for FMA dots on a GPU)."""
    return launch.tma_worth(dtype, launch.input_precision(dtype))


# (M, K, N, r, fan_in_fan_out, bias, p, dtype): K and N rows 16-byte aligned, no size a multiple of the 64-wide
# tiles in every dimension (partial tiles at each edge), both W₀ layouts, M·N over more tiles than the 4 programs of
# the interpreter's persistent grid (130×100: 3×2 tiles of 64).
CASES = [
    (37, 40, 24, 8, True, True, 0.2, torch.float32),
    (130, 72, 100, 16, False, False, 0.0, torch.float32),
    (130, 72, 100, 5, True, False, 0.3, torch.float32),
    (70, 48, 136, 16, False, True, 0.1, torch.float16),
]


@pytest.mark.parametrize("M, K, N, r, fifo, has_bias, p, dtype", CASES)
def test_tma_variants_match_fp64_reference_through_descriptors(monkeypatch, M, K, N, r, fifo, has_bias, p, dtype):
    """Forward (tma, tma_persistent) and backward (tma with atomic and deterministic reductions, gb_first_tma;
    every gradient subset with dx) against float64 with the kernels' own mask; the launches took the descriptor
    path (TMA on, the W₀ layout named right) and the persistent grid has at most one program per SM (4 off CUDA)."""
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = (torch.randn((K, N) if fifo else (N, K), device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if has_bias else None
    a, bb = torch.randn(r, K, device=DEVICE) / K**0.5, torch.randn(N, r, device=DEVICE) / r**0.5
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    s, seed = 0.75, 4321
    st = seed_tensor(seed, DEVICE) if p > 0 else None
    mask = dropout_keep_mask(seed, M, K, p, DEVICE) if p > 0 else None
    ref = ref_grads64(x, w, b, a, bb, s, p, mask, fifo, dy)
    tol = fp32_tol() if dtype == torch.float32 else 2e-3  # fp16: ~3e-4, the output's rounding
    torch_err = {}  # fp16: PyTorch's own error in that dtype, the half-precision standard's second bar
    if dtype != torch.float32:
        xt, at, bt = (t.detach().clone().requires_grad_() for t in (x, a.to(dtype), bb.to(dtype)))
        yt = lora_linear_ref(xt, w, b, at, bt, s, dropout_p=p, keep_mask=mask, fan_in_fan_out=fifo)
        yt.backward(dy)
        torch_err = {n: rel_err(t, rf) for n, t, rf in zip(("y", "dx", "dA", "dB"), (yt, xt.grad, at.grad, bt.grad),
                                                          (ref[0], *ref[2:]), strict=True)}

    def close(o, rf, key, name):
        assert_rel_close(o, rf, tol, name)
        if key in torch_err:
            assert_half_precision(rel_err(o, rf), torch_err[key], name)
    tma = _tma_expected(dtype)
    assert tma or DEVICE == "cuda"  # the interpreter always takes them
    fwd_spy = _Spy(monkeypatch, lora_fwd, lora_fwd._lora_fwd_kernel)
    bwd_spy = _Spy(monkeypatch, lora_bwd, lora_bwd._lora_bwd_kernel)
    for variant in ("tma", "tma_persistent"):
        y, xa = lora_fwd.lora_linear_fwd(x, w, b, a, bb, s, p, st, fifo, variant=variant)
        close(y, ref[0], "y", f"{variant}: y")
        assert_rel_close(xa, ref[1], tol, f"{variant}: xa")
    assert [(c["TMA"], c["W_KN"], c["PERSISTENT"]) for c in fwd_spy.calls] == [(tma, fifo and tma, False),
                                                                               (tma, fifo and tma, True)]
    if DEVICE == "cpu":
        tiles = -(-M // 64) * -(-N // 64)
        assert [c["grid"] for c in fwd_spy.calls] == [(tiles,), (min(4, tiles),)]
    subsets = ((True, True), (False, True), (True, False), (False, False))
    for variant, deterministic in (("tma", False), ("tma", True), ("gb_first_tma", False)):
        for need_da, need_db in subsets:
            out = lora_bwd.lora_linear_bwd(dy, x, xa, w, a, bb, s, p, st, fifo, True, need_da, need_db,
                                           deterministic=deterministic, variant=variant)
            for name, need, o, rf in zip(("dx", "dA", "dB"), (True, need_da, need_db), out, ref[2:], strict=True):
                assert (o is not None) == need, name
                if need:
                    close(o, rf, name, f"{variant} backward (deterministic={deterministic}): {name}")
    switches = [(c["TMA"], c["W_KN"], c["GB_IN"]) for c in bwd_spy.calls]
    assert switches == [(tma, fifo and tma, False)] * 8 + [(tma, fifo and tma, True)] * 4


def test_layouts_a_descriptor_cannot_describe_take_the_pointer_path(monkeypatch):
    """A row stride that is not a multiple of 16 bytes (K = 37 fp32), an inner stride ≠ 1 (a transposed view), a
    base address off the 16-byte grid (a view starting one element in), broadcast rows (the stride-0 dy autograd
    hands over for ``y.sum(1)``), and outputs whose rows alone are unaligned (y at N = 25, dx at K = 37 with W₀'s
    rows aligned): each launch falls back to the pointer loads of the same kernel exactly where some tensor it
    would describe breaks the rules, and still gives the reference's numbers."""
    M, K, N, r, p, s = 33, 40, 24, 4, 0.25, 0.5
    base_x = torch.randn(M, K + 1, device=DEVICE)
    rand = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    # name: (x, W₀, fan_in_fan_out, dy rows broadcast, forward TMA, backward TMA) — the backward reads x by
    # pointers: dy, W₀ and dx decide for it
    cases = {
        "row stride 148 B": (rand(M, 37), rand(N, 37), False, False, False, False),
        "transposed x": (rand(K, M).t(), rand(N, K), False, False, False, True),
        "unaligned base": (base_x[:, 1:], rand(N, K), False, False, False, True),
        "strided W₀": (rand(M, K), rand(N, 2 * K)[:, ::2], False, False, False, False),
        "broadcast dy": (rand(K, M).t(), rand(N, K), False, True, False, False),
        "y rows 100 B": (rand(M, K), rand(25, K), False, False, False, False),  # dy (M, 25) too
        "dx rows 148 B": (rand(M, 37), rand(37, N), True, False, False, False),  # Conv1D W₀ (37, 24): rows 96 B
    }
    assert base_x[:, 1:].data_ptr() % 16 != 0
    tma = _tma_expected(torch.float32)
    for name, (x, w, fifo, broadcast, fwd_tma, bwd_tma) in cases.items():
        k, n = x.shape[1], w.shape[1] if fifo else w.shape[0]
        a, bb = rand(r, k), rand(n, r)
        dy = rand(1 if broadcast else M, n).expand(M, n)
        st = seed_tensor(5, DEVICE)
        ref = ref_grads64(x, w, None, a, bb, s, p, dropout_keep_mask(5, M, k, p, DEVICE), fifo, dy)
        fwd_spy = _Spy(monkeypatch, lora_fwd, lora_fwd._lora_fwd_kernel)
        bwd_spy = _Spy(monkeypatch, lora_bwd, lora_bwd._lora_bwd_kernel)
        y, xa = lora_fwd.lora_linear_fwd(x, w, None, a, bb, s, p, st, fifo, variant="tma_persistent")
        dx, da, db = lora_bwd.lora_linear_bwd(dy, x, xa, w, a, bb, s, p, st, fifo, variant="tma")
        for label, o, rf in zip(("y", "xa", "dx", "dA", "dB"), (y, xa, dx, da, db), ref, strict=True):
            assert_rel_close(o, rf, fp32_tol(), f"{name}: {label}")
        assert [c["TMA"] for c in fwd_spy.calls] == [fwd_tma and tma], name
        assert [c["TMA"] for c in bwd_spy.calls] == [bwd_tma and tma], name


def test_tma_layout_checks():
    """``tma_ok``/``tma_weight``: the hardware's rules for a 2-D descriptor (contiguous last dimension, 16-byte
    aligned base and row stride), and which W₀ storage a Conv1D (K, N) or Linear (N, K) weight gives."""
    t = torch.empty(8, 12)  # fp32: 48-byte rows
    assert launch.tma_ok(t) and not launch.tma_ok(t, 0)
    assert launch.tma_ok(t.t(), 0) and not launch.tma_ok(t.t())
    assert not launch.tma_ok(torch.empty(8, 10))  # 40-byte rows
    assert launch.tma_ok(torch.empty(8, 8, dtype=torch.float16))  # 16-byte rows
    assert not launch.tma_ok(torch.empty(8, 17)[:, 1:])  # 68-byte rows, base one element in
    assert not launch.tma_ok(torch.empty(4, 16)[:, 1:13])  # 64-byte rows, base 4 bytes in
    assert not launch.tma_ok(torch.empty(1, 16).expand(8, 16))  # broadcast rows (stride 0): autograd's dy of y.sum(1)
    rows = torch.empty(4096, dtype=torch.float16)  # unfold: 128-byte rows, 16-byte row stride (overlapping) or 128
    assert not launch.tma_ok(rows.unfold(0, 64, 8)) and launch.tma_ok(rows.unfold(0, 64, 64))
    assert not launch.tma_ok(torch.empty(0, 16)) and not launch.tma_ok(torch.empty(8, 0))  # empty
    conv1d_w, linear_w = torch.empty(40, 24), torch.empty(24, 40)  # (K, N) and (N, K), K = 40, N = 24
    assert launch.tma_weight(conv1d_w, True) == (True, True)  # N contiguous
    assert launch.tma_weight(linear_w, False) == (True, False)  # K contiguous
    assert launch.tma_weight(linear_w.t(), True) == (True, False)  # a (K, N) view of (N, K) storage
    assert launch.tma_weight(torch.empty(24, 80)[:, ::2], False) == (False, False)


def test_no_descriptors_for_fma_dots_on_a_gpu(monkeypatch):
    """Off the interpreter, fp32 with IEEE dots (FMA, torch's default without TF32) keeps the pointer loads — the
    descriptor-fed FMA dots spilled where the pointer-fed ones do not — and every tensor-core case takes TMA, given
    a triton with device-side descriptors."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    assert not launch.tma_worth(torch.float32, "ieee")
    assert all(launch.tma_worth(dtype, precision) for dtype, precision in
               ((torch.float32, "tf32"), (torch.float16, "tf32"), (torch.bfloat16, "ieee")))
    import triton.language as tl

    monkeypatch.delattr(tl, "make_tensor_descriptor")  # a triton before 3.4: pointer loads, no AttributeError
    assert not launch.tma_worth(torch.bfloat16, "tf32")


def test_scratch_allocator_is_set_once_and_a_users_is_kept(monkeypatch):
    """Device-side descriptors need triton's global-scratch allocator: set when none is (per thread: triton keeps
    it in a ContextVar), never replacing one the user set."""
    import contextvars

    import triton

    def run_in_fresh_context(fn):
        return contextvars.Context().run(fn)

    def ours():
        launch.ensure_scratch_allocator()
        from triton.runtime._allocation import _allocator

        return _allocator.get()

    assert run_in_fresh_context(ours) is launch._torch_scratch

    def users():
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        launch.ensure_scratch_allocator()
        from triton.runtime._allocation import _allocator

        return _allocator.get() is mine

    assert run_in_fresh_context(users)
