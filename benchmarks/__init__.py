"""Benchmarks for lora_fast: one LoRA layer (``bench_layer``) and a whole GPT-2 training step (``bench_gpt2``).

Run from the repository root: ``python -m benchmarks.bench_layer --quick``, ``python -m benchmarks.bench_gpt2 --quick``,
then ``python -m benchmarks.report``. Results go to ``benchmarks/results/results.csv`` (long format, upserted).
"""
