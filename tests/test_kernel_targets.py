"""The Triton kernels compile for real GPUs on a machine without one (``benchmarks/compile_check.py``): triton's own
compiler and the ``ptxas`` bundled with it build each kernel the launchers launch, specialised as on the device,
for sm_90 (H100/H200) and sm_86 (RTX 30xx); nothing runs. This closes part of the interpreter's gap — it accepts
programs the real compiler rejects — and checks the launchers' shared-memory fallback against compiled sizes.

Each test runs the tool in a subprocess: it compiles for a GPU, so TRITON_INTERPRET must be unset before the
kernels are imported, and it swaps triton's active driver for the duration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _has_ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _has_ptxas(), reason="needs triton's CUDA backend with its bundled ptxas (the "
                                "[triton] extra); on a GPU the kernels compile for real in the GPU job")


def _compile_check(tmp_path, *args, env_set=None) -> dict:
    """The tool's JSON records, and its stderr under ``"stderr"``."""
    out = tmp_path / "records.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", *args, "--json", str(out)],
                          capture_output=True, text=True, env={**env, **(env_set or {})}, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {**json.loads(out.read_text()), "stderr": proc.stderr}


def _family(rec) -> tuple:
    """A compiled kernel apart from its tile: name, dtype and the non-tile constexpr flags."""
    flags = tuple(sorted((k, v) for k, v in rec["meta"].items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
    return rec["kernel"], rec["dtype"], flags


def test_every_kernel_compiles_for_sm90_at_the_gpt2_configuration(tmp_path):
    """bf16, rank 16, dropout off and on: every launch path (each forward variant, the fused backward with atomics
    and deterministic partials, with pointer and TMA loads, after a dy pass, the cublas backward's two Triton
    passes, the dropout mask) compiles for sm_90 and fits its shared memory with the first tile; the kernels
    launched with TMA on move tiles by TMA (``cp.async.bulk.tensor`` in their PTX), and no other does. Each is
    compiled with FMA contraction even where triton's default is off (``launch.COMPILE_OPTIONS``; 3.10's default)."""
    res = _compile_check(tmp_path, "--arch", "90", "--dtypes", "bf16", "--ranks", "16",
                         env_set={"TRITON_DEFAULT_FP_FUSION": "0"})
    assert not res["errors"]
    assert all(r["fp_fusion"] is True for r in res["records"]), [r["kernel"] for r in res["records"]]
    names = {r["kernel"] for r in res["records"]}
    assert names == {"_lora_fwd_kernel", "_lora_xa_kernel", "_lora_bwd_kernel", "_lora_dy_kernel",
                     "_lora_dx_lora_kernel", "_dropout_mask_kernel"}
    assert all(r["shared"] <= r["smem_limit"] for r in res["records"])
    bf16 = [r for r in res["records"] if r["kernel"] != "_dropout_mask_kernel"]
    assert bf16 and all(r["dtype"] == "bfloat16" for r in bf16)
    tma = [r for r in res["records"] if r["meta"].get("TMA")]
    assert {r["kernel"] for r in tma} == {"_lora_fwd_kernel", "_lora_bwd_kernel"}
    assert all(r["tma_copies"] == bool(r["meta"].get("TMA")) for r in res["records"])


def test_fixed_tiles_fall_back_where_they_do_not_fit_sm86(tmp_path):
    """fp16 at rank 128 with dropout on sm_86 (99 KiB per block): some fixed tiles need more shared memory than
    that once compiled (the one-pass forward: 104 KiB). Each such launch must end on a smaller tile that fits —
    the device would raise OutOfResources otherwise — and the tool exits 0 only if every launch found one."""
    res = _compile_check(tmp_path, "--arch", "86", "--dtypes", "fp16", "--ranks", "128", "--dropouts", "0.1")
    assert not res["errors"]
    # triton's default left alone (TRITON_DEFAULT_FP_FUSION unset): no launch leaves the option to it, so triton
    # 3.9's warning about that default never reaches a user
    assert "FP_FUSION" not in res["stderr"], res["stderr"][-2000:]
    recs = res["records"]
    over = [r for r in recs if r["shared"] > r["smem_limit"]]
    assert over, "no fixed tile exceeded sm_86's shared memory: the fallback was not exercised"
    fitting = {_family(r) for r in recs if r["shared"] <= r["smem_limit"]}
    for r in over:
        assert _family(r) in fitting, f"{r['kernel']} {r['meta']}: no smaller tile was compiled in its place"


def test_tf32_kernels_compile_for_sm90(tmp_path):
    """fp32 with TF32 allowed, rank 16 and 128, dropout on: the frozen GEMMs' operand rounding and the "tf32x3"
    rank-r dots (``kernels/dots.py``) compile for sm_90 in every launch path and fit its shared memory; the default
    route's skinny passes (xa, dy, dx/dA: the cublas variant) take the narrow tiles above rank 32
    (``launch.wide_tf32``), where the 64-wide ones spilled up to 1 KB."""
    res = _compile_check(tmp_path, "--arch", "90", "--dtypes", "fp32", "--fp32-precisions", "tf32", "--ranks", "16",
                         "128", "--dropouts", "0.1")
    assert not res["errors"]
    recs = [r for r in res["records"] if r["kernel"] != "_dropout_mask_kernel"]
    assert recs and all(r["meta"]["INPUT_PRECISION"] == "tf32" and r["dtype"] == "float32" for r in recs)
    assert {r["kernel"] for r in recs} == {"_lora_fwd_kernel", "_lora_xa_kernel", "_lora_bwd_kernel",
                                           "_lora_dy_kernel", "_lora_dx_lora_kernel"}
    assert all(r["shared"] <= r["smem_limit"] for r in res["records"])
    wide = {r["kernel"]: (r["meta"]["BLOCK_M"], r["meta"].get("BLOCK_N", r["meta"].get("BLOCK_K")))
            for r in recs if r["meta"]["BLOCK_R"] == 128 and r["kernel"] in ("_lora_xa_kernel", "_lora_dy_kernel",
                                                                             "_lora_dx_lora_kernel")}
    assert wide == {"_lora_xa_kernel": (64, 32), "_lora_dy_kernel": (32, 32), "_lora_dx_lora_kernel": (64, 32)}
