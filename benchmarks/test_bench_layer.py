"""pytest-benchmark wrappers of the layer benchmark: ``pytest benchmarks --benchmark-only``.

The same cases as ``bench_layer`` (built by ``bench_layer.prepare_case``, so the provider is checked against a
float64 reference first): on a GPU the full set, on a CPU two small shapes. Not part of the CI run (``testpaths``
is ``tests``); nothing here asserts speed. CUDA calls are synchronised inside the timed function.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks import bench_layer, utils

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    S = bench_layer.FULL_SET
    CASES = list(itertools.product(bench_layer.LAYERS, S["M"], S["r"], S["dropout"], S["dtype"]))
else:  # small shapes: the interpreter-free PyTorch providers in milliseconds
    CASES = [("attn.c_proj", 128, 16, 0.1, "fp32"), ("c_attn", 128, 16, 0.0, "fp32")]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", bench_layer.MODES)
@pytest.mark.parametrize("provider", bench_layer.PROVIDERS)
@pytest.mark.parametrize("layer, M, r, dropout, dtype", CASES, ids=lambda v: str(v))
def test_layer(benchmark, layer, M, r, dropout, dtype, provider, mode):
    if provider == "lora_fast" and not CUDA:
        pytest.skip("lora_fast (Triton kernels) is timed on a GPU only: interpreter timings are never kernel timings "
                    "(run benchmarks/run_gpu.sh on a GPU machine)")
    if provider == "torch_compile" and CUDA and (r, dropout, dtype) != tuple(bench_layer.COMPILE_TARGET.values()):
        pytest.skip("torch_compile is timed on the GPU only at bf16, r=16, dropout 0.1 (one compile per shape costs "
                    "tens of seconds); python -m benchmarks.bench_layer --compile-all times every configuration")
    case = bench_layer.prepare_case(provider, layer, M, r, dropout, dtype, DEVICE)
    setup, fn = case["fns"][mode]

    def timed():
        fn()
        _sync()

    def untimed():
        if setup is not None:
            setup()
        _sync()

    # provenance as the CSV's (pytest-benchmark's own commit_info reads .git, stale on a lent machine's copy)
    benchmark.extra_info.update(layer=layer, M=M, r=r, dropout=dropout, dtype=dtype, **utils.env_info(DEVICE))
    benchmark.pedantic(timed, setup=untimed, rounds=20 if CUDA else 5, warmup_rounds=3 if CUDA else 1)
