"""Host-side launch helpers (``lora_fast.kernels.launch``): integer helpers, and ``TunedKernel``'s routing — the
first launch of a key through the autotuner, later ones straight to the kernel with the config it chose.

On a CPU the routing is checked with a recording stand-in for the tuner and the kernel (the interpreter cannot
autotune); on a GPU ``test_autotuned_path_matches_fixed_tile_gpu`` runs the real autotuned launchers twice per key
(tuned, then direct) against the fixed-tile launch.
"""

# ruff: noqa: I001  (the kernels are imported after tests.triton_interpret has set up the interpreter)
from __future__ import annotations

import functools
import math

import pytest
import torch

from tests.triton_interpret import HAS_CUDA, fp32_tol, interpret  # noqa: F401  (fixture)
from tests.utils import MISSING, assert_rel_close, ref_grads64

from lora_fast.kernels import launch
from lora_fast.kernels.launch import TunedKernel, block_r, bucket_m, cdiv, config_meta, next_pow2


@pytest.mark.parametrize("n", [0, 1, 2, 3, 15, 16, 17, 1000, 2**20 + 1])
def test_integer_helpers(n):
    assert next_pow2(n) == (1 if n <= 1 else 2 ** math.ceil(math.log2(n)))
    assert next_pow2(n) >= max(n, 1) and next_pow2(n) & (next_pow2(n) - 1) == 0
    for b in (1, 7, 64):
        assert cdiv(n, b) == math.ceil(n / b)
    assert bucket_m(n) == min(next_pow2(n), 1 << 16)
    assert block_r(n) == max(16, next_pow2(n))


class _Config:  # the attributes of triton.Config that config_meta reads (older triton: no all_kwargs)
    def __init__(self, bm):
        self.kwargs, self.num_warps, self.num_stages = {"BLOCK_M": bm}, 4, 3


class _Recorder:
    """Stands in for a jit kernel or an autotuner: ``obj[grid](*args, **meta)`` records the call."""

    def __init__(self, name, log, best=None):
        self.name, self.log, self.best = name, log, best

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append((self.name, args, meta))
            if self.best is not None:
                self.best_config = self.best[args[0]]  # the tuner records the config it launched

        return launch


def test_tuned_kernel_routes_first_launch_through_the_tuner_then_direct():
    log, builds = [], []
    best = {"a": _Config(64), "b": _Config(128)}

    def build():
        builds.append(1)
        return _Recorder("tuner", log, best)

    tk = TunedKernel(_Recorder("kernel", log), build)
    tk.launch(("key-a",), None, "a", 1, FLAG=True)
    tk.launch(("key-a",), None, "a", 2, FLAG=True)
    tk.launch(("key-b",), None, "b", 3, FLAG=False)
    tk.launch(("key-b",), None, "b", 4, FLAG=False)
    tk.launch(("key-a",), None, "a", 5, FLAG=True)
    assert builds == [1]  # the tuner is built once, on the first launch
    assert [(n, a[1]) for n, a, _ in log] == [("tuner", 1), ("kernel", 2), ("tuner", 3), ("kernel", 4),
                                            ("kernel", 5)]
    opts = launch.COMPILE_OPTIONS  # compile options every launch passes along
    assert log[1][2] == {"FLAG": True, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, **opts}  # key a's config
    assert log[3][2] == {"FLAG": False, "BLOCK_M": 128, "num_warps": 4, "num_stages": 3, **opts}  # key b's config
    assert log[4][2]["BLOCK_M"] == 64


class _SmemKernel:
    """A jit kernel stand-in whose launch raises triton's OutOfResources, as the device does before running a
    compiled kernel that needs more shared memory than it has, when BLOCK_K × stages exceeds ``limit``."""

    def __init__(self, limit, log):
        self.limit, self.log = limit, log

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def launch(*args, **meta):
            need = meta["BLOCK_K"] * meta.get("num_stages", 1)
            self.log.append((meta["BLOCK_K"], meta.get("FLAG"), grid(meta)))
            if need > self.limit:
                raise OutOfResources(need, self.limit, "shared memory")

        return launch


def test_launch_fitting_falls_back_and_remembers_the_rung_per_key():
    pytest.importorskip("triton", reason=MISSING["triton"])
    from triton.runtime.errors import OutOfResources
    from lora_fast.kernels.launch import launch_fitting

    rungs = [{"BLOCK_K": 64, "num_stages": 3}, {"BLOCK_K": 32, "num_stages": 2}, {"BLOCK_K": 16, "num_stages": 2}]
    log = []
    grid = lambda cfg: (128 // cfg["BLOCK_K"],)  # noqa: E731  (a grid that depends on the tile)
    big = _SmemKernel(1000, log)  # every rung fits: the first is used, nothing else is tried
    assert launch_fitting(big, lambda: rungs, ("k",), grid, 1, FLAG=True) == rungs[0]
    assert log == [(64, True, (2,))]
    log.clear()
    small = _SmemKernel(63, log)  # 64·3 and 32·2 do not fit, 16·2 does
    assert launch_fitting(small, lambda: rungs, ("k",), grid, 1, FLAG=True) == rungs[2]
    assert log == [(64, True, (2,)), (32, True, (4,)), (16, True, (8,))]
    log.clear()
    assert launch_fitting(small, lambda: rungs, ("k",), grid, 2, FLAG=True) == rungs[2]  # remembered: straight to it
    assert log == [(16, True, (8,))]
    log.clear()
    assert launch_fitting(small, lambda: rungs, ("k",), grid, 2, FLAG=False) == rungs[2]  # other meta: tried afresh
    assert [b for b, _, _ in log] == [64, 32, 16]
    log.clear()
    with pytest.raises(OutOfResources):  # no rung fits: the device's own error, not a silent skip
        launch_fitting(_SmemKernel(16, log), lambda: rungs, ("k",), grid, 1, FLAG=True)
    assert [b for b, _, _ in log] == [64, 32, 16]


def test_fixed_tile_fallbacks_keep_what_the_launchers_rely_on(monkeypatch):
    """Every fallback is a complete launch meta with dot dimensions >= 16; the backward's keep BLOCK_M (its
    deterministic partials are sized by it); the interpreter gets the fixed tile alone."""
    pytest.importorskip("triton", reason=MISSING["triton"])
    from lora_fast.kernels import launch, lora_bwd, lora_bwd_cublas, lora_fwd

    cub = lora_bwd_cublas
    families = [(lora_fwd.FIXED_FWD_CONFIG, lora_fwd.FWD_FALLBACKS), (lora_fwd.XA_TILE, lora_fwd.XA_FALLBACKS),
                (lora_bwd.FIXED_CONFIG, lora_bwd.BWD_FALLBACKS), (cub.DY_TILE, cub.DY_FALLBACKS),
                (cub.DX_TILE, cub.DX_FALLBACKS)]
    for tile, fallbacks in families:
        assert fallbacks, tile
        for fb in fallbacks:
            assert set(fb) == set(tile) | {"num_warps", "num_stages"}, (tile, fb)
            assert all(v >= 16 for k, v in fb.items() if k.startswith("BLOCK")), fb
    assert all(fb["BLOCK_M"] == lora_bwd.FIXED_CONFIG["BLOCK_M"] for fb in lora_bwd.BWD_FALLBACKS)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.fixed_rungs(lora_bwd.FIXED_CONFIG, torch.float32, 16, lora_bwd.BWD_FALLBACKS) == [
        lora_bwd.FIXED_CONFIG]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rungs = launch.fixed_rungs(lora_bwd.FIXED_CONFIG, torch.bfloat16, 128, lora_bwd.BWD_FALLBACKS)
    assert rungs == [{**lora_bwd.FIXED_CONFIG, "num_warps": 4, "num_stages": 3}, *lora_bwd.BWD_FALLBACKS]


def test_config_meta_matches_triton_config():
    triton = pytest.importorskip("triton", reason=MISSING["triton"])
    cfg = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    meta = config_meta(cfg)
    assert {k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")} == {
        "BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


@pytest.mark.skipif(not HAS_CUDA, reason="autotuning compiles and times configs on a CUDA GPU (the interpreter runs "
                    "one fixed tile); runs in the GPU job (benchmarks/run_gpu.sh tests)")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, None)])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("variants", [(None, None), ("tma_persistent", "gb_first_tma")])
def test_autotuned_path_matches_fixed_tile_gpu(monkeypatch, variants, p, dtype, tol):
    """The autotuned launchers — first call tuned, second launched directly with the chosen config — give the
    fixed-tile results (same mask, same math; tile order changes fp32 summation only). fp32 runs IEEE dots (TF32
    off, torch's default): the FMA-pruned lists and fixed tile. Also with the TMA variants (real descriptors on
    sm_90 in bf16 — fp32 with IEEE dots keeps pointer loads —, the persistent grid over the SMs, the gb_first
    backward), against the default fixed-tile route."""
    from lora_fast.kernels.dropout import seed_tensor
    from lora_fast.kernels.lora_bwd import BWD_TUNED, lora_linear_bwd
    from lora_fast.kernels.lora_fwd import FWD_TUNED, lora_linear_fwd

    torch.manual_seed(0)
    M, K, N, r = 300, 192, 320, 16
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(K, N, device="cuda", dtype=dtype) / K**0.5
    a, bb = torch.randn(r, K, device="cuda") / K**0.5, torch.randn(N, r, device="cuda") / r**0.5
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    st = seed_tensor(7, "cuda") if p else None

    def run(fwd=None, bwd=None):
        y, xa = lora_linear_fwd(x, w, None, a, bb, 0.5, p, st, True, variant=fwd)
        return (y, *lora_linear_bwd(dy, x, xa, w, a, bb, 0.5, p, st, True, deterministic=False, variant=bwd))

    monkeypatch.setenv("LORA_FAST_AUTOTUNE", "0")
    fixed = run()
    monkeypatch.setenv("LORA_FAST_AUTOTUNE", "1")
    if variants[0] is not None:
        run = functools.partial(run, *variants)
    n_fwd, n_bwd = len(FWD_TUNED.chosen), len(BWD_TUNED.chosen)
    tuned = run()
    assert len(FWD_TUNED.chosen) == n_fwd + 1 and len(BWD_TUNED.chosen) == n_bwd + 1  # recorded

    class _NoTuner:  # the second run must launch the kernels directly
        def __getitem__(self, grid):
            raise AssertionError("the autotuner ran again for an already chosen key")

    monkeypatch.setattr(FWD_TUNED, "tuners", dict.fromkeys(FWD_TUNED.tuners, _NoTuner()))
    monkeypatch.setattr(BWD_TUNED, "tuners", dict.fromkeys(BWD_TUNED.tuners, _NoTuner()))
    direct = run()
    from lora_fast.kernels.dropout import dropout_keep_mask

    tol = tol or fp32_tol()  # fp32: IEEE dots unless TF32 is allowed
    mask = dropout_keep_mask(7, M, K, p, "cuda") if p else None
    exact = ref_grads64(x, w, None, a, bb, 0.5, p, mask, True, dy)
    for name, f, t, d, r in zip(("y", "dx", "dA", "dB"), fixed, tuned, direct, (exact[0], *exact[2:]), strict=True):
        assert_rel_close(f, r, tol, f"{name} fixed tile vs float64")
        assert_rel_close(t, r, tol, f"{name} tuned vs float64")
        assert_rel_close(d, r, tol, f"{name} direct vs float64")
        assert_rel_close(t, f.double(), tol, f"{name} tuned vs fixed")


class _SimulatedCuda:
    """Torch's current-device bookkeeping without a GPU: ``current_device()`` and the ``device`` context."""

    def __init__(self, monkeypatch, current: int):
        self.current, self.entered = current, []
        sim = self

        class _Device:
            def __init__(self, device):
                self.index = torch.device(device).index

            def __enter__(self):
                sim.entered.append(self.index)
                self.prev, sim.current = sim.current, self.index

            def __exit__(self, *exc):
                sim.current = self.prev
                return False

        monkeypatch.setattr(torch.cuda, "current_device", lambda: sim.current)
        monkeypatch.setattr(torch.cuda, "device", _Device)


class _OnDevice:  # a tensor as the guard sees it: only its device
    def __init__(self, device):
        self.device = torch.device(device)


def test_launcher_runs_with_its_input_device_current(monkeypatch):
    """Triton launches on the *current* CUDA device and stream whatever tensors it is given, so a launcher makes its
    first argument's device current for its whole body and restores the previous one, also when it raises. With
    the input already on the current device, or off CUDA, nothing is entered. (Simulated device bookkeeping; on
    several GPUs ``test_layer_on_a_second_gpu_matches_reference`` runs the real kernels.)"""
    from lora_fast.kernels import dropout, launch, lora_bwd, lora_fwd

    sim = _SimulatedCuda(monkeypatch, current=0)
    seen = []

    @launch.on_input_device
    def launcher(t, fail=False):
        seen.append(torch.cuda.current_device())
        if fail:
            raise RuntimeError("launch failed")
        return "done"

    assert launcher(_OnDevice("cuda:1")) == "done" and seen == [1] and sim.current == 0
    with pytest.raises(RuntimeError, match="launch failed"):
        launcher(_OnDevice("cuda:2"), fail=True)
    assert seen == [1, 2] and sim.current == 0
    launcher(_OnDevice("cuda:0"))
    launcher(_OnDevice("cpu"))
    assert sim.entered == [1, 2] and seen == [1, 2, 0, 0]
    # the public launchers carry the guard (the dropout-mask launcher enters it around its one launch)
    assert lora_fwd.lora_linear_fwd.__wrapped__ and lora_bwd.lora_linear_bwd.__wrapped__
    assert "device_current(device)" in __import__("inspect").getsource(dropout.dropout_keep_mask)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (a layer on cuda:1 while cuda:0 is "
                    "current); runs on a multi-GPU machine — the simulated test above checks the guard everywhere")
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_layer_on_a_second_gpu_matches_reference(p):
    """A LoRA layer placed on cuda:1 (as ``device_map="auto"`` splits a model) while cuda:0 is current: the fused
    forward and backward equal the reference with the kernels' own mask."""
    from lora_fast.functional import dropout_mask, lora_linear
    from lora_fast.reference import lora_linear_ref

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 96, generator=g).to(dev).requires_grad_()
    w, b = (torch.randn(96, 80, generator=g) / 10).to(dev), torch.randn(80, generator=g).to(dev)
    a = (torch.randn(16, 96, generator=g) / 10).to(dev).requires_grad_()
    bb = (torch.randn(80, 16, generator=g) / 4).to(dev).requires_grad_()
    dy = torch.randn(70, 80, generator=g).to(dev)
    y = lora_linear(x, w, b, a, bb, 0.5, dropout_p=p, seed=3, fan_in_fan_out=True, backend="triton")
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    keep = dropout_mask(3, 70, 96, p, dev) if p else None
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, bb))
    ref = lora_linear_ref(xd, w.double(), b.double(), ad, bd, 0.5, dropout_p=p, keep_mask=keep, fan_in_fan_out=True)
    ref_grads = torch.autograd.grad(ref, (xd, ad, bd), dy.double())
    assert torch.cuda.current_device() == 0 and y.device == dev
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, *grads), (ref, *ref_grads), strict=True):
        assert_rel_close(got, want, fp32_tol(), name)


def test_tuned_kernel_tunes_afresh_on_another_device(monkeypatch):
    """Triton's autotuner caches by its key alone, so each CUDA device gets its own tuner: a key first seen on
    cuda:0 is tuned again on cuda:1 (another GPU model may not fit cuda:0's choice), each device's choice is
    launched directly afterwards. (Simulated device bookkeeping.)"""
    sim = _SimulatedCuda(monkeypatch, current=0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    log, builds = [], []
    best = {"a": _Config(64), "b": _Config(32)}

    def build():
        builds.append(sim.current)
        return _Recorder(f"tuner{sim.current}", log, best)

    tk = TunedKernel(_Recorder("kernel", log), build)
    tk.launch(("key", 0), None, "a", 1)  # the launchers' keys end with the device
    tk.launch(("key", 0), None, "a", 2)
    sim.current = 1
    tk.launch(("key", 1), None, "b", 3)
    tk.launch(("key", 1), None, "b", 4)
    assert builds == [0, 1]
    assert [(n, a[1], m.get("BLOCK_M")) for n, a, m in log] == [
        ("tuner0", 1, None), ("kernel", 2, 64), ("tuner1", 3, None), ("kernel", 4, 32)]


def _shapes(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in configs}


def test_fp32_ieee_autotune_lists_keep_the_tiles_that_do_not_spill(monkeypatch):
    """fp32 with IEEE dots (torch's default: TF32 off) runs FMA dots, where large tiles spill kilobytes. With an
    H100's shared memory the pruned lists are the configs measured (offline sm_90 compiles, r = 8/16/32) to spill
    0–16 B (forward) and 0–120 B (backward); tensor-core dtypes keep the lists as they were (no FMA-only tile)."""
    pytest.importorskip("triton", reason=MISSING["triton"])
    from lora_fast.kernels import launch, lora_bwd, lora_fwd

    monkeypatch.setattr(launch, "smem_budget", lambda device: 232448)  # H100 opt-in shared memory per block
    x32, x16 = torch.empty(8, 8), torch.empty(8, 8, dtype=torch.bfloat16)

    def fwd(x, xa_in, precision="ieee"):
        return _shapes(lora_fwd.prune_fwd_configs(lora_fwd.get_fwd_configs(), {"x_ptr": x, "R": 16},
                                                  XA_IN=xa_in, INPUT_PRECISION=precision))

    def bwd(dy, precision="ieee"):
        return _shapes(lora_bwd.prune_bwd_configs(lora_bwd.get_bwd_configs(), {"dy_ptr": dy, "R": 16},
                                                  INPUT_PRECISION=precision))

    assert fwd(x32, False) == {(64, 64, 64, 4, 4), (32, 64, 32, 4, 2), (128, 128, 32, 8, 4)}
    assert fwd(x32, True) == {(128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 32, 4, 2),
                              (128, 128, 32, 8, 4)}
    assert bwd(x32) == {(32, 32, 64, 4, 2), (64, 64, 64, 8, 4), (32, 64, 64, 4, 3)}
    fma_only = set(lora_fwd.FMA_ONLY_FWD) | set(lora_bwd.FMA_ONLY_BWD)
    for shapes in (fwd(x16, False), fwd(x16, True), bwd(x16), fwd(x32, False, "tf32"), bwd(x32, "tf32")):
        assert shapes and not shapes & fma_only
    assert (128, 256, 64, 8, 3) in fwd(x16, True) and (128, 64, 256, 8, 3) in bwd(x16)  # Hopper tiles stay
