#!/usr/bin/env bash
# Run the GPU checks and benchmarks of issue 4 on a machine with a CUDA GPU, writing everything to OUT_DIR.
#
#   bash benchmarks/run_gpu.sh OUT_DIR [STAGE ...]
#
# Stages (default: env tests layer-bf16 layer-fp32 layer-compile gpt2 report, in this order):
#   env           nvidia-smi, versions                                     -> OUT_DIR/env.txt
#   tests         python -m pytest tests, LORA_FAST_AUTOTUNE=0 (GPU-only tests run when CUDA is there) -> OUT_DIR/tests.log
#   tests-kernels the GPU-relevant test files only (kernels, TMA, launch, Triton Function, compile, layer, TF32)
#                 -> OUT_DIR/tests_kernels.log
#   fp32-check    python -m benchmarks.gpu_fp32_check: y, xa, dx, dA, dB errors vs float64 in fp32, TF32 off and on,
#                 each forward variant, both backward routes, with torch's own y error beside  -> OUT_DIR/fp32_check.log
#   probe         python -m benchmarks.gpu_probe: ceilings, per-kernel times, errors   -> OUT_DIR/probe.json, probe.log
#   train-parity  GPT-2 124M 50 steps, fused vs reference path (bf16)        -> OUT_DIR/parity/train_parity.json
#   layer-bf16    full layer set, bf16, providers except torch_compile (peft_patched included)
#                 -> OUT_DIR/results.csv, bench_layer_bf16.log
#   layer-fp32    the same in fp32                                          -> ..., bench_layer_fp32.log
#   layer-compile torch_compile at bf16, r=16, dropout 0.1 (all layers, all M)   -> ..., bench_layer_compile.log
#   layer-variants lora_fast's default route vs each forced kernel variant (one_pass, xa_first, cublas,
#                 gb_first, tma, tma_persistent), M=8192,
#                 r 16/64, dropout 0/0.1, bf16 and fp32: the measurements the variant rules wait for -> ...
#   gpt2          GPT-2 124M training step and inference                   -> ..., bench_gpt2.log
#   gpt2-compile  the training step of lora_fast and peft under torch.compile (default, reduce-overhead) -> ...
#   gpt2-ckpt     the training step of lora_fast and peft with activation checkpointing (non-reentrant) -> ...
#   gemm-probe    GEMM-core variants (pointer/TMA tiles, persistent) vs cuBLAS and lora_fast -> OUT_DIR/gemm_probe.json
#   host          host µs per layer call (launch overhead), base / peft / peft_patched / reference / lora_fast
#                 -> OUT_DIR/host.json
#   pytest-bench  pytest benchmarks --benchmark-only (json; ~2000 cases on a GPU: far more than 10 minutes, so
#                 narrow it with PYTEST_BENCH_K="c_attn and 8192", a pytest -k expression)  -> OUT_DIR/pytest_bench.json
#   report        SUMMARY.md and PNGs from OUT_DIR/results.csv             -> OUT_DIR/SUMMARY.md, *.png
#
# OUT_DIR/results.csv starts as a copy of benchmarks/results/results.csv (so earlier rows, e.g. the CPU ones,
# stay) and every stage upserts into it. With a per-command time limit (the device tool allows 10 minutes), run the
# stages in several calls and copy OUT_DIR/results.csv back to benchmarks/results/results.csv between calls: the
# next call then starts from it. Finally commit benchmarks/results/{results.csv,SUMMARY.md,*.png}.
# A failing stage is reported and the others still run; the exit status is 1 if any failed.
# LAYER_ARGS (environment) is appended to the layer stages' arguments, e.g. LAYER_ARGS="--layers c_attn c_fc" to
# split a stage that would run past a time limit (rows are upserted after each configuration, so parts add up and
# a stage cut off by the limit keeps what it finished). LORA_FAST_BENCH_COMMIT names the commit recorded in every
# row; set it to the commit the working tree was sent from (the GPU machine's .git may be stale).
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/run_gpu.sh OUT_DIR [STAGE ...] (stages: see the header of this script)" >&2
    exit 2
fi
OUT=$1
shift
STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then
    STAGES=(env tests layer-bf16 layer-fp32 layer-compile gpt2 report)
fi
KNOWN=" env tests tests-kernels fp32-check probe train-parity layer-bf16 layer-fp32 layer-compile layer-variants gpt2 gpt2-compile \
gpt2-ckpt gemm-probe host pytest-bench report "
for stage in "${STAGES[@]}"; do  # all checked before any runs: a typo must not cost a lease's first stages
    if [[ "$KNOWN" != *" $stage "* ]]; then
        echo "run_gpu.sh: unknown stage '$stage' (stages:$KNOWN)" >&2
        exit 2
    fi
done
case $OUT in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where it was called from, not the repo root

cd "$(dirname "$0")/.." || exit 2
if [ -z "${LORA_FAST_BENCH_COMMIT:-}" ]; then
    echo "run_gpu.sh: warning: LORA_FAST_BENCH_COMMIT is unset; rows record this copy's git state" \
        "($(git rev-parse --short HEAD 2>/dev/null || echo unknown)), which may be stale" >&2
fi
PY=${PYTHON:-python3}
python() { "$PY" "$@"; }
# the GPU tests compile many kernel variants: spread them over 8 workers where pytest-xdist is installed (the lent
# GPU machines have it; one 10-minute command then fits the whole suite). -v: per-test lines survive a time-out.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
unset TRITON_INTERPRET  # real kernels, never the interpreter
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: no CUDA GPU visible to torch; this script is for GPU machines (use --quick on a CPU)" >&2
    exit 2
fi
# lora_fast.kernels exists only through an install (setup.py maps it to kernels/): the lent GPU image has no
# lora_fast, and one installed from another copy would test other code. Install this checkout where needed.
here=$(python -c "import os, lora_fast.kernels as k; print(os.path.dirname(os.path.dirname(os.path.abspath(k.__file__))))" \
    2>/dev/null)
if [ "$here" != "$PWD" ]; then
    echo "run_gpu.sh: installing this checkout (pip install --no-deps --no-build-isolation -e .)"
    if ! python -m pip install -q --no-deps --no-build-isolation -e . ; then
        echo "run_gpu.sh: could not install this checkout; lora_fast.kernels would not import" >&2
        exit 2
    fi
fi
mkdir -p "$OUT" || exit 2
CSV="$OUT/results.csv"
if [ ! -f "$CSV" ] && [ -f benchmarks/results/results.csv ]; then
    cp benchmarks/results/results.csv "$CSV"
fi

failed=()
run() {  # run NAME LOG COMMAND...: tee the output, remember failures
    local name=$1 log=$2
    shift 2
    echo "=== $name: $* ($(date -u +%H:%M:%S))"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

for stage in "${STAGES[@]}"; do
    case $stage in
        env) run env env.txt bash -c 'nvidia-smi; "$0" -c "import torch, triton, transformers, peft; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, peft.__version__); print(torch.cuda.get_device_name())" || exit 1; echo "commit ${LORA_FAST_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"' "$PY" ;;
        tests) run tests tests.log env LORA_FAST_AUTOTUNE=0 "$PY" -m pytest -v -rfEs tests --durations=15 \
            -p no:cacheprovider $XDIST ;;
        tests-kernels) run tests-kernels tests_kernels.log env LORA_FAST_AUTOTUNE=0 "$PY" -m pytest -v -rfEs \
            -p no:cacheprovider tests/test_kernels.py tests/test_tma.py tests/test_launch.py tests/test_triton_fn.py \
            tests/test_compile.py tests/test_layer.py tests/test_tf32.py ;;
        fp32-check) run fp32-check fp32_check.log "$PY" -m benchmarks.gpu_fp32_check ;;
        probe) run probe probe.log "$PY" -m benchmarks.gpu_probe --json "$OUT/probe.json" ;;
        train-parity) run train-parity train_parity.log "$PY" -m benchmarks.train_parity --out "$OUT/parity" --bf16 ;;
        layer-bf16) run layer-bf16 bench_layer_bf16.log python -m benchmarks.bench_layer --dtypes bf16 \
            --providers base reference peft peft_patched lora_fast lora_fast_cublas --csv "$CSV" ${LAYER_ARGS:-} ;;
        layer-fp32) run layer-fp32 bench_layer_fp32.log python -m benchmarks.bench_layer --dtypes fp32 \
            --providers base reference peft lora_fast --csv "$CSV" ${LAYER_ARGS:-} ;;
        layer-compile) run layer-compile bench_layer_compile.log python -m benchmarks.bench_layer --dtypes bf16 \
            --ranks 16 --dropouts 0.1 --providers torch_compile --csv "$CSV" ${LAYER_ARGS:-} ;;
        layer-variants) run layer-variants bench_layer_variants.log python -m benchmarks.bench_layer --M 8192 \
            --ranks 16 64 --dtypes bf16 fp32 --providers lora_fast lora_fast_one_pass lora_fast_xa_first \
            lora_fast_cublas lora_fast_gb_first lora_fast_tma lora_fast_tma_persistent --csv "$CSV" ${LAYER_ARGS:-} ;;
        gpt2) run gpt2 bench_gpt2.log python -m benchmarks.bench_gpt2 --providers lora_fast lora_fast_cublas \
            lora_fast_tma peft peft_patched \
            reference --csv "$CSV" ;;
        gpt2-compile) run gpt2-compile bench_gpt2_compile.log bash -c '"$0" -m benchmarks.bench_gpt2 --modes train \
            --providers lora_fast peft --compile default --csv "$1"; a=$?; "$0" -m benchmarks.bench_gpt2 --modes \
            train --providers lora_fast peft --compile reduce-overhead --csv "$1"; b=$?; exit $((a | b))' "$PY" "$CSV" ;;
        gpt2-ckpt) run gpt2-ckpt bench_gpt2_ckpt.log python -m benchmarks.bench_gpt2 --modes train --providers \
            lora_fast peft --gradient-checkpointing --csv "$CSV" ;;
        gemm-probe) run gemm-probe gemm_probe.log "$PY" -m benchmarks.gemm_probe --json "$OUT/gemm_probe.json" ;;
        host) run host host.log "$PY" -m benchmarks.host_overhead --device cuda --json "$OUT/host.json" ;;
        pytest-bench) run pytest-bench pytest_bench.log python -m pytest benchmarks --benchmark-only -q \
            -p no:cacheprovider --benchmark-json "$OUT/pytest_bench.json" ${PYTEST_BENCH_K:+-k "$PYTEST_BENCH_K"} ;;
        report) run report report.log python -m benchmarks.report --csv "$CSV" --out "$OUT" ;;
    esac
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "run_gpu.sh: failed stages: ${failed[*]}" >&2
    exit 1
fi
echo "run_gpu.sh: all stages passed; results in $OUT"
