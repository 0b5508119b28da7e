"""The GPU lease's diagnostic scripts (``benchmarks/gpu_probe.py``, ``gpu_fp32_check.py``, ``train_parity.py``) run
their whole logic here, so a lease never spends its minutes on a script error: the kernels under the interpreter (on
a GPU: compiled), the timers stubbed — interpreter timings are never kernel timings, and none is asserted.

What is asserted: every variant the probe reports an error for computes the layer (against the float64 oracle with
the kernels' own mask), the summary table finds the figures it prints, the fp32 check's cases all agree with the
oracle, and the training-parity script compares the two backends' curves and turns its tolerance into its exit
status.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.utils import MISSING

pytest.importorskip("triton", reason=MISSING["triton"])
from tests.triton_interpret import HAS_CUDA, TF32_TOL, interpret  # noqa: E402, F401  (fixture; before the kernels)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# interpreter: fp32 dots exact, only the summation order differs. GPU: fp32 dots are IEEE unless torch allows TF32
# (off by default); the project's TF32 bound covers the probe's cuBLAS terms either way.
FP32_TOL = 5e-4 if HAS_CUDA else 1e-5


@pytest.fixture
def probe(monkeypatch):
    """benchmarks.gpu_probe with small projections and timers that call the timed function once (no timing)."""
    import benchmarks.gpu_probe as gp

    def once(fn, grad_to_none=None, **_):
        fn()
        return 1.0

    def host_once(fn, n=30, grad_to_none=()):
        for t in grad_to_none:
            t.grad = None
        fn()
        return 1.0

    monkeypatch.setattr(gp, "LAYERS", {"c_attn": (48, 80), "mlp.c_proj": (80, 40)})  # (K, N): Conv1D layouts
    monkeypatch.setattr(gp, "bench", once)
    monkeypatch.setattr(gp, "graph_ms", once)
    monkeypatch.setattr(gp, "host_ms", host_once)
    return gp


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gpu_probe_case_reports_every_variant_correct(probe, capsys, p):
    """Every error the probe reports (each forward and backward variant, torch's own product) is small: a variant
    called with swapped arguments or compared with the wrong oracle output shows here, not in a lease."""
    c = probe.probe_case("c_attn", 40, 4, p, torch.float32, DEVICE)
    assert (c["K"], c["N"], c["r"], c["p"]) == (48, 80, 4, p)
    variants = {k.split("_", 1)[1] for k in c["err"] if k.startswith("dx_")}
    assert variants == {"cublas", "tma", "gb_first", "gb_first_tma"}  # each backward the probe times, checked
    assert {"y", "dx", "dA", "dB", "y_other_variant", "y_tma", "y_tma_persistent"} <= set(c["err"])
    for name, err in c["err"].items():
        assert err <= FP32_TOL, (name, err)
    probe.print_summary({"cases": [c]})
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("c_attn"))
    assert "nan" not in row  # every eager figure the table prints was measured (a renamed key would print nan)
    assert all(f"layer_{v}=" in table for v in ("base", "lora_fast", "lora_fast_tma", "lora_fast_gb_first"))


def test_gpu_probe_summary_names_a_failed_case(probe, capsys):
    probe.print_summary({"cases": [{"layer": "c_fc", "r": 16, "p": 0.1, "error": "RuntimeError('boom')"}]})
    assert "failed: RuntimeError('boom')" in capsys.readouterr().out


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA; on a GPU the scripts run")
@pytest.mark.parametrize("module", ["gpu_probe", "gpu_fp32_check"])
def test_gpu_scripts_refuse_clearly_without_cuda(module, capsys):
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv", [("gpu_probe", []), ("gemm_probe", []),
                                          ("host_overhead", ["--device", "cuda"])])
def test_gpu_timing_scripts_refuse_the_interpreter_on_a_gpu(module, argv, monkeypatch, capsys):
    """TRITON_INTERPRET inherited on a GPU machine: the scripts timed (host_overhead: as "real launches") the numpy
    interpreter. A fake CUDA machine: the refusal comes before anything touches the GPU."""
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "TRITON_INTERPRET is set" in capsys.readouterr().err


@pytest.mark.usefixtures("interpret")
def test_gpu_fp32_check_cases_agree_with_the_oracle(capsys):
    """Every fp32 case of the diagnostic (each forward variant, atomic and deterministic reductions, TF32 off and
    on) is within the fp32 bound, and the script leaves torch's TF32 switch as it found it."""
    from lora_fast.kernels import lora_fwd
    from lora_fast.kernels.launch import input_precision

    from benchmarks import gpu_fp32_check

    before = input_precision(torch.float32)
    assert gpu_fp32_check.main(["--device", DEVICE.type]) == 0
    assert input_precision(torch.float32) == before
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("M=")]
    assert len(lines) == len(gpu_fp32_check.CASES) * 2 * 2 * len(lora_fwd.FWD_VARIANTS)
    for line in lines:
        errs = dict(tok.split("=") for tok in line.split() if tok.split("=")[0] in ("y", "xa", "dx", "dA", "dB"))
        assert set(errs) == {"y", "xa", "dx", "dA", "dB"}, line
        # with TF32 the frozen GEMMs' operands are rounded to TF32, in the interpreter too (kernels/dots.py)
        tol = TF32_TOL if "tf32=True" in line else FP32_TOL
        assert max(map(float, errs.values())) <= tol, line


def _tiny_gpt2(path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=32)).save_pretrained(path)
    return str(path)


@pytest.mark.usefixtures("interpret")
def test_train_parity_compares_the_two_backends(tmp_path):
    """The lease's train-parity stage end to end on a tiny GPT-2: both backends train, the JSON holds both curves
    and their largest relative difference, and the exit status follows ``--tol``."""
    from benchmarks import train_parity

    model = _tiny_gpt2(tmp_path / "model")
    argv = ["--out", str(tmp_path / "out"), "--steps", "2", "--batch_size", "2", "--max_length", "16", "--model", model]
    assert train_parity.main(argv) == 0
    res = json.loads((tmp_path / "out" / "train_parity.json").read_text())
    lt, lr = res["train_loss_triton"], res["train_loss_reference"]
    assert len(lt) == len(lr) == 2
    rel = [abs(a - b) / abs(b) for a, b in zip(lt, lr, strict=True)]
    assert res["max_rel_diff"] == max(rel) <= (2e-3 if HAS_CUDA else 1e-5)  # as test_train's backend comparison
    assert res["final_rel_diff"] == rel[-1]
    assert all(res[k] for k in ("device", "torch", "triton", "transformers", "commit", "timestamp"))  # provenance
    for backend in ("triton", "reference"):
        metrics = json.loads((tmp_path / "out" / backend / "training_metrics.json").read_text())
        assert metrics["backend_used"] == backend  # the fused run really took the kernels


def test_train_parity_refuses_what_lora_fast_train_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    """Off a GPU without TRITON_INTERPRET=1 the triton run's refusal was a traceback of lora-fast train's
    ConfigError; it is a usage error now, as the other GPU scripts' (exit status 2, one line)."""
    from benchmarks import train_parity
    from lora_fast.train_args import ConfigError

    def refuse(backend, args, out):
        raise ConfigError("--backend triton cannot run here: CPU tensor without TRITON_INTERPRET=1")

    monkeypatch.setattr(train_parity, "run_backend", refuse)
    with pytest.raises(SystemExit) as e:
        train_parity.main(["--out", str(tmp_path), "--steps", "2"])
    assert e.value.code == 2
    assert "error: --backend triton cannot run here: CPU tensor without" in capsys.readouterr().err


def test_train_parity_summary_and_exit_status(tmp_path, monkeypatch):
    """The JSON's differences are relative to the reference curve, the largest and the last; the exit status
    compares the last with ``--tol``."""
    from benchmarks import train_parity

    curves = {"triton": [2.4, 1.10], "reference": [2.0, 1.00]}  # 20 % apart, then 10 %
    monkeypatch.setattr(train_parity, "run_backend", lambda backend, args, out: {
        "train_loss": curves[backend], "final_eval_loss": 1.0, "train_tokens_per_sec": None})
    base = ["--out", str(tmp_path), "--steps", "2"]
    assert train_parity.main([*base, "--tol", "0.05"]) == 1
    res = json.loads((tmp_path / "train_parity.json").read_text())
    assert res["max_rel_diff"] == pytest.approx(0.2) and res["final_rel_diff"] == pytest.approx(0.1)
    assert train_parity.main([*base, "--tol", "0.15"]) == 0  # the last difference decides, not the largest
