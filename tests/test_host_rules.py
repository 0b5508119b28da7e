"""Host-side rules that decide what a GPU launch gets — the environment switches, the shared-memory and rank pruning
of the autotune lists, the autotuner's key, the fixed tile's depth, the TMA size limit, the variant overrides.

All plain Python, so checked on a CPU: the device's properties are faked, and the kernels are replaced by recorders
(the real ``triton.autotune`` wrapper the launchers build, with its benchmark and kernel stubbed). Nothing compiles
or runs; ``test_launch.test_autotuned_path_matches_fixed_tile_gpu`` runs the real thing on a GPU.
"""

# ruff: noqa: I001  (the kernels are imported after tests.triton_interpret has set up the interpreter)
from __future__ import annotations

import types

import pytest
import torch

import tests.triton_interpret  # noqa: F401  (builds the kernels first, for the interpreter on a CPU)
from tests.utils import MISSING

triton = pytest.importorskip("triton", reason=MISSING["triton"])

from lora_fast import functional  # noqa: E402
from lora_fast.kernels import launch, lora_bwd, lora_fwd  # noqa: E402

H100_SMEM = 232448  # opt-in shared memory per block of an H100 (227 KiB); its default per-block limit is 48 KiB
SM86_SMEM = 101376  # RTX 30xx / consumer Ada: 99 KiB
A100_SMEM = 166912  # 163 KiB
T4_SMEM = 65536  # 64 KiB


def _shape(c) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages


class _CudaArg:
    """A launch's tensor argument as the pruners read it: dtype, element size, and a CUDA device (none needed)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.device = dtype, torch.device("cuda", 0)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def _gpu(monkeypatch, optin: int) -> None:
    """A CUDA device allowing ``optin`` bytes of shared memory per block to a kernel that opts in (as triton's
    kernels do), and the 48 KiB every CUDA GPU allows without opting in."""
    props = types.SimpleNamespace(shared_memory_per_block=48 * 1024, shared_memory_per_block_optin=optin)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


# The launchers' pruning, on a (faked) CUDA argument. Tensor-core dots (bf16, or fp32 with TF32) and rank tiles
# <= 64 in the one-pass forward: shared memory is then the only rule that drops a config (FMA-only tiles aside).
def _prune_fwd(dtype, r, xa_in=False, precision="tf32"):
    return lora_fwd.prune_fwd_configs(lora_fwd.get_fwd_configs(), {"x_ptr": _CudaArg(dtype), "R": r},
                                      XA_IN=xa_in, INPUT_PRECISION=precision)


def _prune_bwd(dtype, r, precision="tf32"):
    return lora_bwd.prune_bwd_configs(lora_bwd.get_bwd_configs(), {"dy_ptr": _CudaArg(dtype), "R": r},
                                      INPUT_PRECISION=precision)


# Shared memory a config's pipeline holds (the pruners' documented model): stages × the tiles of one stage × element
# size; forward x (BM, BK), W₀ (BK, BN), A (BK, R); backward dy (BM, BN), W₀ (BN, BK), B (BN, R).
def _fwd_bytes(c, r, elem):
    bm, bn, bk, _, stages = _shape(c)
    return stages * (bm * bk + bk * bn + bk * r) * elem


def _bwd_bytes(c, r, elem):
    bm, bn, bk, _, stages = _shape(c)
    return stages * (bm * bn + bn * bk + bn * r) * elem


PRUNERS = {"fwd": (_prune_fwd, lora_fwd.get_fwd_configs, _fwd_bytes),
           "bwd": (_prune_bwd, lora_bwd.get_bwd_configs, _bwd_bytes)}


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pruning_keeps_exactly_the_configs_that_fit_the_devices_shared_memory(monkeypatch, kind, dtype):
    """A config whose pipelined tiles are estimated above the device's per-block limit is never handed to the
    tuner (it would fail to launch, or be timed for nothing), and every one that fits is kept — one that fits to
    the byte included. The limit is the opt-in one (an H100's 227 KiB, not the 48 KiB a kernel gets without
    opting in): triton's kernels opt in, and the Hopper tiles need more than 48 KiB."""
    prune, configs, nbytes = PRUNERS[kind]
    elem, r = torch.empty((), dtype=dtype).element_size(), 16
    tensor_core = [c for c in configs() if not getattr(c, "fma_only", False)]
    exact = sorted({nbytes(c, r, elem) for c in tensor_core})  # budgets each config fits to the byte
    for budget in (*exact, T4_SMEM, SM86_SMEM, A100_SMEM, H100_SMEM):
        _gpu(monkeypatch, budget)
        fitting = {_shape(c) for c in tensor_core if nbytes(c, r, elem) <= budget}
        if not fitting:
            continue
        assert {_shape(c) for c in prune(dtype, r)} == fitting, budget
    _gpu(monkeypatch, H100_SMEM)
    assert any(nbytes(c, r, elem) > 48 * 1024 for c in prune(dtype, r))  # the opt-in limit is the one applied


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_when_no_config_fits_the_smallest_one_is_kept(monkeypatch, kind):
    """A device below every estimate (estimates are approximate, and the tuner needs at least one config): the
    config needing the least shared memory, alone — never an empty list, never a larger one."""
    prune, configs, nbytes = PRUNERS[kind]
    tensor_core = [c for c in configs() if not getattr(c, "fma_only", False)]
    least = min(nbytes(c, 128, 2) for c in tensor_core)
    _gpu(monkeypatch, least - 1)
    kept = prune(torch.float16, 128)
    assert len(kept) == 1 and nbytes(kept[0], 128, 2) == least


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("budget", [SM86_SMEM, A100_SMEM])
def test_pruning_counts_the_rank_tile_the_kernel_allocates(monkeypatch, kind, budget):
    """The kernels hold the rank padded to ``block_r(r)`` (>= 16, a power of two) in shared memory, so a rank is
    pruned as its padded tile: rank 3 and rank 16 keep the same configs (estimated at rank 3, a config that does
    not fit with the 16-wide tile the kernel really allocates would be kept)."""
    prune = PRUNERS[kind][0]
    _gpu(monkeypatch, budget)
    for dtype in (torch.bfloat16, torch.float32):
        for r in (1, 3, 8, 15, 17, 33, 65, 100):
            assert {_shape(c) for c in prune(dtype, r)} == {_shape(c) for c in prune(dtype, launch.block_r(r))}, (
                dtype, r)


def test_one_pass_forward_drops_wide_output_tiles_next_to_a_128_wide_rank_tile(monkeypatch):
    """The one-pass forward computes x·Aᵀ in its loop: with a 128-wide rank tile (rank > 64) in registers next to
    the output tile, tiles over 128×64 spill, so none is kept — 128×64 itself is. Rank tiles up to 64, and the
    xa-fed kernel (no rank tile in the loop), keep the wide Hopper tiles. (H100 shared memory: not the limit here.)"""
    _gpu(monkeypatch, H100_SMEM)

    def areas(r, xa_in):
        return {bm * bn for bm, bn, *_ in map(_shape, _prune_fwd(torch.bfloat16, r, xa_in))}

    for r in (65, 100, 128):
        assert max(areas(r, False)) == 128 * 64, r
        assert max(areas(r, True)) > 128 * 64, r
    for r in (16, 33, 64):
        assert max(areas(r, False)) > 128 * 64, r


def test_fma_pruning_never_leaves_the_tuner_without_a_config():
    """FMA dots (fp32, IEEE): the configs ``fits`` accepts; if none does, the least costly (spilling) one alone.
    Tensor-core dots: every config but the FMA-only ones."""
    configs = lora_fwd.get_fwd_configs()

    def cost(c):
        return launch.per_thread(c, "BLOCK_M", "BLOCK_N") * c.kwargs["BLOCK_K"]

    kept = launch.prune_for_dots(configs, True, lambda c: False, cost)
    assert len(kept) == 1 and cost(kept[0]) == min(map(cost, configs))
    small = launch.prune_for_dots(configs, True, lambda c: c.num_stages == 2, cost)
    assert small and all(c.num_stages == 2 for c in small)
    tensor_core = launch.prune_for_dots(configs, False, lambda c: False, cost)
    assert {_shape(c) for c in tensor_core} == {_shape(c) for c in configs if not getattr(c, "fma_only", False)}


def test_fixed_tile_pipeline_depth_follows_the_rank_tile():
    """The fixed tile's pipeline is shallower only where its rank tile would overflow a consumer GPU's shared
    memory: fp32 with the 128-wide rank tile. Ranks that share a rank tile (``block_r``) share the depth; 16-bit
    dtypes, and fp32 with rank tiles up to 64, keep the full depth; a pipeline keeps at least two stages."""
    full = launch.fixed_stages(torch.bfloat16, 16)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for r in range(1, launch.MAX_RANK + 1):
            stages = launch.fixed_stages(dtype, r)
            assert stages == launch.fixed_stages(dtype, launch.block_r(r)), (dtype, r)
            if dtype != torch.float32 or launch.block_r(r) < 128:
                assert stages == full, (dtype, r)
    assert 2 <= launch.fixed_stages(torch.float32, 128) < full


def test_rank_chunk_is_one_dot_on_tensor_cores_and_small_pieces_for_fma():
    """Tensor cores reduce the whole (padded) rank in one ``tl.dot``; FMA dots reduce it in pieces of at most
    ``FMA_RANK_CHUNK`` that tile it exactly and are still valid dot sides (>= 16)."""
    for br in (16, 32, 64, 128):
        assert launch.rank_chunk(br, False) == br
        chunk = launch.rank_chunk(br, True)
        assert 16 <= chunk <= launch.FMA_RANK_CHUNK and br % chunk == 0, br


def test_tma_descriptor_sizes_must_fit_int32():
    """A TMA descriptor holds its sizes as int32: a dimension of 2**31 elements takes the pointer path, one just
    below it does not (meta tensors: the layout without the memory)."""
    ok = torch.empty((1, 2**31 - 8), dtype=torch.float16, device="meta")  # 16-byte multiple rows
    assert launch.tma_ok(ok) and launch.tma_ok(torch.empty((2**31 - 8, 8), dtype=torch.float16, device="meta"))
    assert not launch.tma_ok(torch.empty((1, 2**31), dtype=torch.float16, device="meta"))
    assert not launch.tma_ok(torch.empty((2**31, 8), dtype=torch.float16, device="meta"))


@pytest.mark.parametrize("r", [33, 128])
def test_a_forced_variant_runs_where_fp32_ieee_has_its_own_rule(monkeypatch, r):
    """fp32 with IEEE dots above rank 32 takes the cublas route by default, a rule about spills and compile time
    (PERF_NOTES "fp32 with IEEE dots"), not about results: every variant computes the same function (test_kernels).
    A variant forced through ``LORA_FAST_{FWD,BWD}_VARIANT`` is what a benchmark times against that default
    (run_gpu.sh layer-fp32, "the fused kernels forced"), so the forced one must be what runs."""
    monkeypatch.setattr(lora_fwd, "input_precision", lambda dtype: "ieee")
    monkeypatch.setattr(lora_bwd, "input_precision", lambda dtype: "ieee")
    monkeypatch.delenv("LORA_FAST_FWD_VARIANT", raising=False)
    monkeypatch.delenv("LORA_FAST_BWD_VARIANT", raising=False)
    assert lora_fwd.fwd_variant(64, 64, 64, r, 0.0, torch.float32) == "cublas"  # the rule applies here
    assert lora_bwd.bwd_variant(64, 64, 64, r, False, torch.float32) == "cublas"
    for variant in lora_fwd.FWD_VARIANTS:
        monkeypatch.setenv("LORA_FAST_FWD_VARIANT", variant)
        assert lora_fwd.fwd_variant(64, 64, 64, r, 0.0, torch.float32) == variant
    for variant in lora_bwd.BWD_VARIANTS:
        monkeypatch.setenv("LORA_FAST_BWD_VARIANT", variant)
        assert lora_bwd.bwd_variant(64, 64, 64, r, False, torch.float32) == variant


class _Routes:
    """Records how the launchers launch on a GPU: ``tuned`` (through the real autotuner the launcher's TunedKernel
    builds — its key, its pruning — with the benchmark stubbed; ``benched`` counts the configs timed), ``direct``
    (TunedKernel's launch with a config chosen before) or ``fixed`` (the fixed tile, ``launch_fitting``)."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        routes = self

        class _Kernel:  # the jit kernel, as TunedKernel (kernel[grid](...)) and the autotuner (fn.run) launch it
            def __getitem__(self, grid):
                return lambda *args, **meta: routes.events.append(("direct", meta))

            def run(self, *args, **meta):
                routes.events.append(("tuned", meta))

        def bench(kernel_call, quantiles):
            routes.events.append(("bench", None))
            return [float(len(routes.events))] * 3  # distinct timings: the first config timed is chosen

        def builder(real):  # the launcher's own tuner recipe, its kernel and benchmark stubbed
            def build():
                tuner = real._build_tuner()
                tuner.fn, tuner._do_bench = _Kernel(), bench
                return tuner

            return build

        for module, name in ((lora_fwd, "FWD_TUNED"), (lora_bwd, "BWD_TUNED")):
            monkeypatch.setattr(module, name, launch.TunedKernel(_Kernel(), builder(getattr(module, name))))
            monkeypatch.setattr(module, "launch_fitting",
                                lambda kernel, rungs, key, grid, *args, **meta: routes.events.append(("fixed", meta)))
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # a GPU process: the launchers may autotune
        monkeypatch.delenv("LORA_FAST_AUTOTUNE", raising=False)

    def fwd(self, M, p=0.0):
        K, N, r = 64, 48, 16
        seed = torch.tensor([7]) if p else None
        return self._record(lambda: lora_fwd.lora_linear_fwd(
            torch.zeros(M, K, dtype=torch.float16), torch.zeros(N, K, dtype=torch.float16), None, torch.zeros(r, K),
            torch.zeros(N, r), 1.0, p, seed, variant="one_pass"))

    def bwd(self, M, p=0.0):
        K, N, r = 64, 48, 16
        seed = torch.tensor([7]) if p else None
        return self._record(lambda: lora_bwd.lora_linear_bwd(
            torch.zeros(M, N, dtype=torch.float16), torch.zeros(M, K, dtype=torch.float16), torch.zeros(M, r),
            torch.zeros(N, K, dtype=torch.float16), torch.zeros(r, K), torch.zeros(N, r), 1.0, p, seed,
            deterministic=False, variant="fused"))

    def _record(self, call) -> tuple[str, int, tuple | None]:
        """(route of the kernel launch, configs benchmarked for it, its tile)."""
        self.events.clear()
        call()
        launches = [(kind, meta) for kind, meta in self.events if kind != "bench"]
        assert len(launches) == 1, launches
        kind, meta = launches[0]
        tile = tuple(meta.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
        return kind, sum(kind == "bench" for kind, _ in self.events), tile


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_tuning_is_shared_within_an_m_bucket_and_redone_across_buckets(monkeypatch, kind):
    """A new sequence length in the same M bucket launches the config tuned for the bucket, straight to the kernel
    (no re-tuning per length, no tuner bookkeeping); a very different M (another bucket) is tuned afresh — a config
    chosen for 100 rows is not the one for 5000 — and then launched directly too."""
    launch_m = getattr(_Routes(monkeypatch), kind)
    route, benched, tile = launch_m(100)
    assert route == "tuned" and benched > 1
    assert launch_m(120) == ("direct", 0, tile)  # same bucket
    route, benched, _ = launch_m(5000)
    assert route == "tuned" and benched > 1  # another bucket: timed again
    assert launch_m(7000)[:2] == ("direct", 0)  # 5000's bucket
    assert launch_m(100) == ("direct", 0, tile)


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_dropout_and_no_dropout_are_tuned_separately(monkeypatch, kind):
    """The kernel with dropout (mask generated in the loop) is another kernel than without: the two never share a
    tuned config, and each is launched directly once tuned. (Today the seed argument's dtype — the int64 seed, or a
    float dummy without dropout — separates them in both keys already; ``HAS_DROPOUT`` in the keys keeps it so.)"""
    launch_m = getattr(_Routes(monkeypatch), kind)
    route, benched, tile = launch_m(100, p=0.0)
    assert route == "tuned" and benched > 1
    route, benched, _ = launch_m(100, p=0.1)
    assert route == "tuned" and benched > 1
    assert launch_m(100, p=0.1)[:2] == ("direct", 0)
    assert launch_m(100, p=0.0) == ("direct", 0, tile)


@pytest.mark.parametrize("value, tuned", [(None, True), ("1", True), ("true", True), ("yes", True), ("0", False),
                                          ("false", False), ("False", False), (" off ", False), ("no", False)])
def test_autotune_switch(monkeypatch, value, tuned):
    """``LORA_FAST_AUTOTUNE`` off in any usual spelling: both launchers take the fixed tile, never the tuner."""
    routes = _Routes(monkeypatch)
    if value is not None:
        monkeypatch.setenv("LORA_FAST_AUTOTUNE", value)
    assert launch.autotune_enabled() == tuned
    for kind in ("fwd", "bwd"):
        assert getattr(routes, kind)(100)[0] == ("tuned" if tuned else "fixed"), kind


@pytest.mark.parametrize("value", ["1", "0", "true", "TRUE", "yes", "on", "y", "false", "off", "no", "", "2", " 1"])
def test_interpret_switch_reads_triton_interpret_as_triton_does(monkeypatch, value):
    """Whether triton interprets its kernels and whether the launchers think so must agree: a launcher that
    believes it is on a GPU while triton interprets would autotune (impossible in the interpreter), and one that
    believes it is interpreted on a GPU would launch without warps and stages. Under the interpreter the launchers
    take the fixed tile."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        pytest.skip("triton < 3.4 has no triton.knobs to compare with; this runs with triton >= 3.4 (CI's)")
    routes = _Routes(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert launch.interpreting() == bool(knobs.runtime.interpret)
    # and the functional entry decides "the kernels can run on this CPU tensor" by the same switch
    reason = functional.triton_unsupported_reason(torch.zeros(2, 16), torch.zeros(8, 16), torch.zeros(16, 16))
    assert (reason == "CPU tensor without TRITON_INTERPRET=1") == (not knobs.runtime.interpret), reason
    if launch.interpreting():
        assert routes.fwd(100)[0] == routes.bwd(100)[0] == "fixed"


def test_every_launch_pins_fma_contraction(monkeypatch):
    """Each launch path passes ``enable_fp_fusion=True`` (``launch.COMPILE_OPTIONS``) to triton: tuned, direct after
    tuning, the fixed tile (and its fallback rungs) and the dropout mask. Left to triton's default, the kernels'
    rounding and speed would change with triton 3.10, whose default is off (3.9 warns at the first compile);
    ``test_kernel_targets`` checks that the compiled kernels carry it even with that default turned off."""
    from lora_fast.kernels import dropout
    from triton.runtime.errors import OutOfResources

    pinned = launch.COMPILE_OPTIONS
    assert pinned == {"enable_fp_fusion": True}
    routes = _Routes(monkeypatch)
    for kind in ("fwd", "bwd"):
        for _ in range(2):  # tuned, then direct with the chosen config
            getattr(routes, kind)(100)
            ((route, meta),) = [e for e in routes.events if e[0] != "bench"]
            assert meta.get("enable_fp_fusion") is True, (kind, route)

    seen = []

    class _Fitting:  # the first rung is out of shared memory, the second launches
        def __getitem__(self, grid):
            def launch_(*args, **meta):
                seen.append(meta)
                if len(seen) == 1:
                    raise OutOfResources(1, 0, "shared memory")

            return launch_

    kernel = _Fitting()
    rungs = lambda: [{"BLOCK_M": 64}, {"BLOCK_M": 32}]  # noqa: E731
    for _ in range(2):  # the fitting search, then the remembered rung
        launch.launch_fitting(kernel, rungs, ("pin-test",), (1,), HAS_BIAS=True)
    assert len(seen) == 3 and all(m.get("enable_fp_fusion") is True for m in seen), seen

    class _Mask:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append(meta)

    seen.clear()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dropout, "_dropout_mask_kernel", _Mask())
    dropout.dropout_keep_mask(7, 8, 8, 0.5, "cpu")
    assert len(seen) == 1 and seen[0].get("enable_fp_fusion") is True
