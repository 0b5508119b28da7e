"""Smoke test of the benchmark scripts: their quick paths on tiny configurations, into a temporary CSV.

Checks the CSV's schema (columns, units, config keys, provenance), properties every run must have (percentiles
ordered, a frozen base saves no activations, the LoRA path saves at least its input), the upsert (a rerun
replaces its own rows and keeps everyone else's) and the report. No timing assertions: speed is for GPUs, via
``benchmarks/run_gpu.sh``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from datetime import datetime

import pytest
import torch

from benchmarks import bench_gpt2, bench_layer, report, utils

# The schema as the issue states it (not read from the code under test).
COLUMNS = ["bench", "provider", "mode", "metric", "unit", "config", "p20", "p50", "p80", "device", "torch", "triton",
           "transformers", "commit", "timestamp"]
UNITS = {"time": "ms", "tflops": "TFLOP/s", "peak_mem": "MB", "saved_bytes": "bytes", "tokens_per_s": "tokens/s"}
M, K, N = 32, 768, 768  # attn.c_proj, the smallest GPT-2 projection; 32 tokens keep it to milliseconds
LAYER_ARGS = ["--quick", "--layers", "attn.c_proj", "--M", str(M), "--providers", "base", "reference", "peft",
              "lora_fast", "--rep", "2", "--warmup", "0", "--threads", "1"]
GPT2_ARGS = ["--quick", "--providers", "reference", "peft", "--batch", "1", "--seq", "16", "--rep", "1", "--warmup",
             "0", "--threads", "1"]
CPU = not torch.cuda.is_available()
# --threads 1: two OpenMP threads on two cores shared with other test processes spin against each other (bf16
# autocast steps ran ~9x slower in measurement); the smoke test checks the CSV, not speed.


def read(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def check_row(row: dict) -> None:
    assert row["metric"] in UNITS and row["unit"] == UNITS[row["metric"]], row
    p20, p50, p80 = (float(row[c]) for c in ("p20", "p50", "p80"))
    assert all(math.isfinite(v) and v >= 0 for v in (p20, p50, p80)) and p20 <= p50 <= p80, row
    assert row["device"] == ("cpu" if CPU else torch.cuda.get_device_name())
    assert row["torch"] == torch.__version__
    assert row["triton"] and row["transformers"]
    assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?|unknown", row["commit"]), row["commit"]
    datetime.strptime(row["timestamp"], "%Y-%m-%dT%H:%M:%SZ")


def keys(rows):
    return {(r["bench"], r["provider"], r["mode"], r["metric"], r["config"], r["device"]) for r in rows}


@pytest.mark.skipif(not CPU, reason="CPU smoke test; on a GPU benchmarks/run_gpu.sh runs the full benchmarks")
def test_layer_and_gpt2_quick_csv_schema_upsert_and_report(tmp_path, capsys):
    path = tmp_path / "results.csv"
    threads = torch.get_num_threads()
    assert bench_layer.main([*LAYER_ARGS, "--csv", str(path)]) == 0
    assert "lora_fast skipped" in capsys.readouterr().out  # never timed in the interpreter

    header, rows = read(path)
    assert header == COLUMNS
    for row in rows:
        check_row(row)
        assert row["bench"] == "layer"
        cfg = json.loads(row["config"])
        assert {k: cfg[k] for k in ("layer", "M", "K", "N", "r", "dropout", "dtype", "threads")} == {
            "layer": "attn.c_proj", "M": M, "K": K, "N": N, "r": 16, "dropout": 0.1, "dtype": "fp32", "threads": 1}
    assert {r["provider"] for r in rows} == {"base", "reference", "peft"}
    for prov in ("base", "reference", "peft"):
        got = {(r["mode"], r["metric"]) for r in rows if r["provider"] == prov}
        want = {(m, x) for m in ("fwd", "bwd", "full") for x in ("time", "tflops", "peak_mem")}
        assert got == want | {("fwd", "saved_bytes")}, prov
    saved = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "saved_bytes"}
    assert saved["base"] == 0  # x requires grad, W₀ frozen: dx needs only W₀
    assert saved["reference"] >= M * K * 4 and saved["peft"] >= M * K * 4  # dA needs (dropped-out) x, fp32
    fwd_peak = [float(r["p50"]) for r in rows if (r["provider"], r["mode"], r["metric"]) == ("base", "fwd",
                                                                                           "peak_mem")]
    assert fwd_peak[0] * 2**20 >= M * N * 4  # the forward allocates at least its (M, N) fp32 output

    assert torch.get_num_threads() == threads  # --threads is restored after the run

    # A rerun replaces its own rows: same keys, same count.
    assert bench_layer.main([*LAYER_ARGS, "--csv", str(path)]) == 0
    _, rerun = read(path)
    assert len(rerun) == len(rows) and keys(rerun) == keys(rows)

    # Another benchmark adds its rows and keeps the layer's.
    assert bench_gpt2.main([*GPT2_ARGS, "--csv", str(path)]) == 0
    _, both = read(path)
    gpt2 = [r for r in both if r["bench"] == "gpt2"]
    assert keys([r for r in both if r["bench"] == "layer"]) == keys(rows)
    for row in gpt2:
        check_row(row)
        cfg = json.loads(row["config"])
        assert (cfg["batch"], cfg["seq"], cfg["r"], cfg["alpha"], cfg["dropout"]) == (1, 16, 16, 32, 0.1)
    assert {(r["provider"], r["mode"]) for r in gpt2} == {
        (p, m) for p in ("reference", "peft") for m in ("train", "infer_unmerged", "infer_merged")}
    for r in gpt2:
        if r["metric"] == "tokens_per_s":  # 16 tokens per step
            t = next(x for x in gpt2 if (x["provider"], x["mode"], x["metric"]) == (r["provider"], r["mode"], "time"))
            assert float(r["p50"]) == pytest.approx(16 / (float(t["p50"]) / 1e3), rel=1e-4)

    # A different configuration adds rows; the earlier ones stay.
    assert bench_layer.main([*LAYER_ARGS[:4], str(2 * M), *LAYER_ARGS[5:], "--csv", str(path)]) == 0
    _, more = read(path)
    assert keys(both) < keys(more) and len(more) == len(both) + len(rows)

    out = tmp_path / "report"
    summary = report.render(path, out)
    text = summary.read_text(encoding="utf-8")
    assert "CPU numbers, not the product's GPU claims" in text and "| peft |" in text
    assert sorted(p.name for p in out.glob("*.png")) == ["layer_saved_cpu_fp32.png", "layer_time_cpu_fp32.png"]


def test_upsert_refuses_a_foreign_csv_and_bad_rows(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    env = {c: "x" for c in COLUMNS[9:]}
    row = utils.make_row("layer", "base", "fwd", "time", {"M": 1}, [1.0, 2.0, 3.0], env)
    with pytest.raises(ValueError, match="columns"):
        utils.upsert_csv(path, [row])
    assert path.read_text(encoding="utf-8") == "a,b\n1,2\n"  # untouched
    with pytest.raises(ValueError, match="finite"):
        utils.make_row("layer", "base", "fwd", "time", {"M": 1}, [float("nan")], env)
    with pytest.raises(ValueError, match="metric"):
        utils.make_row("layer", "base", "fwd", "speed", {"M": 1}, [1.0], env)
    with pytest.raises(SystemExit):  # argparse names the bad value
        bench_layer.main(["--quick", "--M", "0", "--csv", str(tmp_path / "r.csv")])
    assert not (tmp_path / "r.csv").exists()


def test_report_checks_the_issue_targets_on_gpu_rows(tmp_path):
    """Synthetic GPU rows (made up here, not measured): the target table says met / not met / no data."""
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "t", "triton": "t", "transformers": "t", "commit": "abc1234",
           "timestamp": "2026-01-01T00:00:00Z"}
    rows = []
    for layer, (k, n), lf in [("c_attn", (768, 2304), 1.05), ("c_fc", (768, 3072), 1.3)]:
        cfg = {"layer": layer, "M": 8192, "K": k, "N": n, "r": 16, "dropout": 0.1, "dtype": "bf16"}
        for prov, ms in [("base", 1.0), ("peft", 2.0), ("lora_fast", lf)]:
            rows.append(utils.make_row("layer", prov, "full", "time", cfg, [ms], env))
    g = {"model": "gpt2-124M", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": 50257, "batch": 8, "seq": 1024,
         "r": 16, "alpha": 32, "dropout": 0.1, "dtype": "bf16-autocast", "targets": bench_gpt2.TARGETS}
    for prov, tps, mb in [("peft", 100.0, 1000.0), ("lora_fast", 130.0, 900.0)]:
        rows += [utils.make_row("gpt2", prov, "train", "tokens_per_s", g, [tps], env),
                 utils.make_row("gpt2", prov, "train", "peak_mem", g, [mb], env),
                 utils.make_row("gpt2", prov, "train", "time", g, [8192 / tps * 1e3], env)]
    path = tmp_path / "gpu.csv"
    utils.upsert_csv(path, rows)
    text = report.render(path, tmp_path).read_text(encoding="utf-8")
    assert "CPU numbers" not in text
    assert "| c_attn: lora_fast / base time ≤ 1.1 | 1.050 | met |" in text
    assert "| c_fc: lora_fast / base time ≤ 1.1 | 1.300 | not met |" in text
    assert "| c_fc: peft / lora_fast time ≥ 1.5 | 1.538 | met |" in text
    assert "| GPT-2 train: lora_fast / peft tokens/s ≥ 1.25 | 1.300 | met |" in text
    assert "| GPT-2 train: lora_fast / peft peak memory < 1 | 0.900 | met |" in text


def test_gpt2_checkpointing_rows_are_their_own_and_recompute(tmp_path, monkeypatch):
    """``--gradient-checkpointing`` runs every provider's blocks again in the backward (the LoRA layers of lora_fast
    and PEFT are called more often than without it) and keys its rows apart in the CSV."""
    import peft.tuners.lora.layer as peft_layer

    import lora_fast.layer as layer_mod

    calls = [0]
    for cls in (layer_mod.LinearWithLoRA, peft_layer.Linear):
        real = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _real=real, **k: (calls.__setitem__(0, calls[0] + 1),
                                                                                _real(self, *a, **k))[1])
    path = tmp_path / "results.csv"
    args = ["--quick", "--providers", "reference", "peft", "--modes", "train", "--batch", "1", "--seq", "16",
            "--rep", "1", "--warmup", "0", "--threads", "1", "--no-check"]
    counted = []
    for extra in ([], ["--gradient-checkpointing"]):
        calls[0] = 0
        assert bench_gpt2.main([*args, *extra, "--csv", str(path)]) == 0
        counted.append(calls[0])
    assert counted[1] > counted[0], counted
    _, rows = read(path)
    configs = {json.loads(r["config"]).get("checkpointing") for r in rows}
    assert configs == {None, "non-reentrant"} and len(rows) == 2 * 2 * 3  # 2 runs × 2 providers × 3 metrics


@pytest.mark.skipif(not CPU, reason="CPU smoke test; on a GPU the compiled GPT-2 step is the gpt2-compile stage of "
                    "benchmarks/run_gpu.sh")
def test_gpt2_compile_rows_are_labelled(tmp_path):
    """``--compile`` records the compiled model as its own provider (aot_eager here: no C++ build on CPU)."""
    path = tmp_path / "results.csv"
    args = ["--quick", "--providers", "reference", "--modes", "train", "--batch", "1", "--seq", "16", "--rep", "1",
            "--warmup", "1", "--threads", "1", "--compile", "default", "--compile-backend", "aot_eager"]
    assert bench_gpt2.main([*args, "--csv", str(path)]) == 0
    _, rows = read(path)
    assert {(r["provider"], r["mode"], r["metric"]) for r in rows} == {
        ("reference+compile", "train", m) for m in ("time", "tokens_per_s", "peak_mem")}
    for row in rows:
        check_row(row)
        assert json.loads(row["config"])["compile_backend"] == "aot_eager"
    assert bench_gpt2.provider_label("peft", "reduce-overhead") == "peft+compile:reduce-overhead"


@pytest.mark.skipif(not CPU, reason="interpreter check; on a GPU the gemm-probe stage of benchmarks/run_gpu.sh checks "
                    "every variant in bf16 (exit 1 if one is wrong) and times them")
def test_gemm_probe_variants_compute_the_product():
    """The GEMM-core probe's variants (pointer and TMA-descriptor tiles, persistent grid) compute x·W₀ and dy·W₀ᵀ
    (odd M, fp32 under the interpreter): a timing of a wrong kernel would be meaningless. Runs in a subprocess
    because the probe's kernels are interpreted only if TRITON_INTERPRET=1 is set before their module is imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gemm_probe", "--check"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs = json.loads(proc.stdout)
    assert set(errs) == {f"{g}/{v}" for g in ("fwd", "dx") for v in ("ptr32", "ptr64", "tma", "tma_persist")}
    assert all(e < 1e-5 for e in errs.values()), errs


def test_check_before_timing_covers_the_timed_training_path(monkeypatch):
    """bench_layer checks each provider's output and gradients before timing it, and, for lora_fast with dropout,
    the training forward/backward the timings run (masks included): a wrong mask or a wrong adapter fails it.
    Runs the Triton provider through the interpreter on a small Conv1D (fp32)."""
    from transformers.pytorch_utils import Conv1D

    from lora_fast import functional
    from tests.triton_interpret import HAS_CUDA

    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = "cuda" if HAS_CUDA else "cpu"
    conv = Conv1D(40, 24).to(dev).requires_grad_(False)  # K=24 → N=40
    r, p = 16, 0.1
    a, b = torch.randn(r, 24, device=dev) / 24**0.5, torch.randn(40, r, device=dev) / r**0.5
    x, dy = torch.randn(33, 24, device=dev), torch.randn(33, 40, device=dev)
    for name in ("base", "reference", "peft", "peft_patched", "lora_fast"):
        layer, params = bench_layer.build_provider(name, conv, r, p, a, b)
        bench_layer.check_provider(name, layer, conv, x, dy, a, b, params, p, "fp32")
    layer, params = bench_layer.build_provider("peft", conv, r, p, a, b)
    with pytest.raises(RuntimeError, match="eval: output differs"):
        bench_layer.check_provider("peft", layer, conv, x, dy, a, 1.1 * b, params, p, "fp32")
    real = functional.dropout_mask
    monkeypatch.setattr(functional, "dropout_mask", lambda seed, *rest: real(seed + 1, *rest))
    layer, params = bench_layer.build_provider("lora_fast", conv, r, p, a, b)
    with pytest.raises(RuntimeError, match="training, dropout 0.1: output differs"):
        bench_layer.check_provider("lora_fast", layer, conv, x, dy, a, b, params, p, "fp32")


def test_gpt2_check_compares_every_provider_with_the_oracle(monkeypatch):
    """bench_gpt2 checks each provider's model before timing: LoRA part of the logits and every adapter gradient
    against a float64 oracle on the same base weights and adapters. PEFT, PEFT patched and lora_fast (interpreter
    on CPU) pass; one adapter 5 % off fails."""
    from tests.triton_interpret import HAS_CUDA

    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    shape = {**bench_gpt2.QUICK_SET, "n_layer": 1, "seq": 16}
    ref = bench_gpt2.oracle(shape, dev, None)
    assert len(ref["grads"]) == 2 * 4 and all(g.abs().sum() > 0 for g in ref["grads"].values())
    for provider in ("peft", "peft_patched", "lora_fast"):
        model = bench_gpt2.add_lora(bench_gpt2.build_model(shape, dev, None), provider)
        bench_gpt2.check_provider(model, ref)
    with torch.no_grad():
        bench_gpt2.adapter_params(model)[("transformer.h.0.mlp.c_fc", "B")].mul_(1.05)
    with pytest.raises(RuntimeError, match="differs from the float64 oracle"):
        bench_gpt2.check_provider(model, ref)


@pytest.mark.skipif(not CPU, reason="CPU smoke test; on a GPU benchmarks/run_gpu.sh runs the full benchmarks")
def test_a_provider_that_fails_on_rerun_loses_its_earlier_rows(tmp_path, monkeypatch, capsys):
    """A rerun replaces only the rows it measures, so a provider that now fails would leave its figures of an
    earlier commit in the CSV, where the summary would set them beside this run's. They are removed (and said so);
    other providers, other configurations and the other benchmark keep theirs."""
    path = tmp_path / "results.csv"
    env = {"device": "cpu", "torch": "t", "triton": "t", "transformers": "t", "commit": "0ld0ld1",
           "timestamp": "2026-01-01T00:00:00Z"}
    cpu, gpt2_args = torch.device("cpu"), bench_gpt2.parse_args(GPT2_ARGS)  # --threads 1: in the config
    here = utils.run_with_threads(1, lambda: bench_layer.case_config("attn.c_proj", M, 16, 0.1, "fp32", cpu))
    other = {**here, "M": 2 * M}
    g = utils.run_with_threads(1, lambda: bench_gpt2.run_config(gpt2_args.shape, cpu, gpt2_args))
    old = [utils.make_row("layer", "peft", "full", "time", cfg, [9.0], env) for cfg in (here, other)]
    old += [utils.make_row("gpt2", prov, "train", "time", g, [9.0], env) for prov in ("peft", "reference")]
    utils.upsert_csv(path, old)

    real = bench_layer.prepare_case

    def failing(name, *args):
        if name == "peft":
            raise RuntimeError("simulated failure")
        return real(name, *args)

    monkeypatch.setattr(bench_layer, "prepare_case", failing)
    args = [*LAYER_ARGS[:LAYER_ARGS.index("--providers") + 1], "base", "peft", *LAYER_ARGS[LAYER_ARGS.index("--rep"):]]
    assert bench_layer.main([*args, "--csv", str(path)]) == 1
    assert "removed its 1 earlier rows of this configuration (commit 0ld0ld1)" in capsys.readouterr().out
    _, rows = read(path)
    layer = {(r["provider"], json.loads(r["config"])["M"]) for r in rows if r["bench"] == "layer"}
    assert ("peft", M) not in layer and ("peft", 2 * M) in layer and ("base", M) in layer
    assert {r["provider"] for r in rows if r["bench"] == "gpt2"} == {"peft", "reference"}

    monkeypatch.setattr(bench_gpt2, "prepare_provider", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    assert bench_gpt2.main([*GPT2_ARGS, "--csv", str(path)]) == 1
    _, rows = read(path)
    assert not [r for r in rows if r["bench"] == "gpt2"]  # both providers failed: neither keeps old figures
    assert ("peft", 2 * M) in {(r["provider"], json.loads(r["config"])["M"]) for r in rows}


def test_report_says_when_a_table_mixes_commits(tmp_path):
    """Synthetic GPU rows (made up here): a table whose providers were measured at different commits says which
    were measured where, and a target computed across commits is marked so, with both commits."""
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "t", "triton": "t", "transformers": "t",
           "timestamp": "2026-01-01T00:00:00Z"}
    cfg = {"layer": "c_attn", "M": 8192, "K": 768, "N": 2304, "r": 16, "dropout": 0.1, "dtype": "bf16"}
    same = {**cfg, "layer": "c_fc", "N": 3072}
    rows = [utils.make_row("layer", prov, "full", "time", c, [ms], {**env, "commit": commit})
            for c, prov, ms, commit in [(cfg, "base", 1.0, "aaaaaaa"), (cfg, "peft", 2.0, "aaaaaaa"),
                                        (cfg, "lora_fast", 1.05, "bbbbbbb"), (same, "base", 1.0, "bbbbbbb"),
                                        (same, "lora_fast", 1.2, "bbbbbbb")]]
    path = tmp_path / "gpu.csv"
    utils.upsert_csv(path, rows)
    text = report.render(path, tmp_path).read_text(encoding="utf-8")
    assert text.count("Measured at more than one commit") == 1  # c_attn's table only
    assert "Measured at more than one commit: base, peft at aaaaaaa; lora_fast at bbbbbbb." in text
    assert "| c_attn: lora_fast / base time ≤ 1.1 | 1.050 | met (across commits) | aaaaaaa, bbbbbbb |" in text
    assert "| c_fc: lora_fast / base time ≤ 1.1 | 1.200 | not met | bbbbbbb |" in text
    assert "| c_fc: peft / lora_fast time ≥ 1.5 | – | no data | bbbbbbb |" in text
