"""pytest-benchmark wrappers of the GPT-2 benchmark: ``pytest benchmarks --benchmark-only``.

On a GPU: GPT-2 124M, batch 8 × 1024; on a CPU: the ``--quick`` tiny GPT-2 (batch 2 × 64). Providers and set-up
from ``bench_gpt2.prepare_provider``. Not part of the CI run; nothing here asserts speed.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_gpt2, utils

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = bench_gpt2.FULL_SET if CUDA else bench_gpt2.QUICK_SET


@pytest.mark.parametrize("mode", ["train", "infer_unmerged", "infer_merged"])
@pytest.mark.parametrize("provider", bench_gpt2.PROVIDERS)
def test_gpt2(benchmark, provider, mode):
    if provider == "lora_fast" and not CUDA:
        pytest.skip("lora_fast (Triton kernels) is timed on a GPU only: interpreter timings are never kernel timings "
                    "(run benchmarks/run_gpu.sh on a GPU machine)")
    case = bench_gpt2.prepare_provider(provider, SHAPE, DEVICE)
    case["model"].train(mode == "train")
    if mode == "infer_merged":
        bench_gpt2.set_merged(case["model"], provider, True)
    fn = case["train"] if mode == "train" else case["infer"]

    def timed():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    # provenance as the CSV's (pytest-benchmark's own commit_info reads .git, stale on a lent machine's copy)
    benchmark.extra_info.update(SHAPE, **utils.env_info(DEVICE), tokens_per_step=SHAPE["batch"] * SHAPE["seq"])
    benchmark.pedantic(timed, rounds=10 if CUDA else 3, warmup_rounds=2 if CUDA else 1)
