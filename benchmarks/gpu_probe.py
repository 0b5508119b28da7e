"""GPU probe for kernel tuning (issue 8): ceilings, per-kernel times and errors at GPT-2 shapes, in one call.

    python -m benchmarks.gpu_probe [--M 8192] [--r 16] [--dtype bf16] [--json OUT.json]

Prints, per GPT-2 projection and dropout p:
  * correctness of the fused forward and backward against a float64 reference that uses the kernels' own mask
    (‖out − ref‖ / ‖ref‖ for y, dx, dA, dB);
  * median times (``triton.testing.do_bench``, ms) of the pieces: cuBLAS base forward / base dx, the fused forward,
    the dx kernel alone, the whole fused backward, the mask kernel (one Philox pass over M×K), and whole-layer
    forward+backward for base, lora_fast and PEFT;
  * the measured ceilings: a bf16 8192³ matmul rate and a device-to-device copy bandwidth.
Working tool, not the benchmark of record (that is ``bench_layer``); its output goes to PERF_NOTES.md by hand.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

LAYERS = {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def graph_ms(fn, grad_to_none=None) -> float:
    """GPU milliseconds of ``fn`` replayed from a CUDA graph (launch overhead removed): what the kernels cost
    when the CPU is ahead, as in a full model. NaN when ``fn`` cannot be captured. ``grad_to_none``: tensors whose
    ``.grad`` is cleared before the capture, so that a backward writes fresh gradients instead of adding into the
    previous ones (an extra read-modify-write of x.grad per call otherwise)."""
    from triton.testing import do_bench_cudagraph

    try:
        fn()  # tuned and compiled outside the capture
        torch.cuda.synchronize()
        return float(do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - a probe reports and goes on
        print(f"graph capture failed: {e!r}", file=sys.stderr)
        return float("nan")


def host_ms(fn, n: int = 30, grad_to_none=()) -> float:
    """Host (CPU) milliseconds per call with no synchronisation inside the loop: the launch overhead, when the
    GPU keeps up (its queue is far deeper than n calls). ``grad_to_none`` as in ``graph_ms`` (cleared each call)."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        for g in grad_to_none:
            g.grad = None
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fp64_reference(x, w, bias, A, B, dy, s: float, p: float, keep, fan_in_fan_out: bool) -> dict:
    """y, xa, dx, dA, dB in float64 from ``lora_fast.reference`` (the test oracle) with the given keep-mask."""
    from lora_fast.reference import lora_linear_ref

    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y = lora_linear_ref(x64, w, bias, a64, b64, s, dropout_p=p, keep_mask=keep if p else None,
                        fan_in_fan_out=fan_in_fan_out, upcast=True)
    y.backward(dy.double())
    xin = x64.detach() * keep / (1 - p) if p else x64.detach()
    return {"y": y.detach(), "xa": xin @ a64.detach().t(), "dx": x64.grad, "dA": a64.grad, "dB": b64.grad}


def ceilings(device) -> dict:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    src = torch.randn(2**28 // 2, device=device, dtype=torch.bfloat16)  # 256 MiB
    dst = torch.empty_like(src)
    ms_copy = bench(lambda: dst.copy_(src))
    return {"bf16_tflops": 2 * 8192**3 / ms / 1e9, "copy_tb_s": 2 * src.numel() * 2 / ms_copy / 1e9}


def probe_case(layer: str, M: int, r: int, p: float, dtype: torch.dtype, device) -> dict:
    from lora_fast.kernels import lora_bwd, lora_fwd
    from lora_fast.kernels.dropout import dropout_keep_mask
    from transformers.pytorch_utils import Conv1D

    from benchmarks.utils import provider_env
    from lora_fast import LinearWithLoRA
    from lora_fast.functional import dropout_mask, seed_tensor

    K, N = LAYERS[layer]
    s = 2.0
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(K, N, device=device) / K**0.5).to(dtype)  # Conv1D (K, N)
    bias = (torch.randn(N, device=device) * 0.02).to(dtype)
    A = torch.randn(r, K, device=device) / K**0.5
    B = torch.randn(N, r, device=device) / r**0.5
    dy = torch.randn(M, N, device=device, dtype=dtype)
    seed = seed_tensor(1234, device)
    out = {"layer": layer, "M": M, "K": K, "N": N, "r": r, "p": p, "dtype": str(dtype).split(".")[-1]}

    # --- correctness vs float64 with the kernels' own mask
    y, xa = lora_fwd.lora_linear_fwd(x, w, bias, A, B, s, p, seed if p else None, fan_in_fan_out=True)
    dx, dA, dB = lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, seed if p else None, fan_in_fan_out=True)
    keep = dropout_mask(1234, M, K, p, device) if p else None
    ref = fp64_reference(x, w, bias, A, B, dy, s, p, keep, True)
    y_other, _ = lora_fwd.lora_linear_fwd(x, w, bias, A, B, s, p, seed if p else None, fan_in_fan_out=True,
                                          variant="one_pass" if lora_fwd.fwd_variant(M, N, K, r, p) == "xa_first"
                                          else "xa_first")
    xk = x * keep / (1 - p) if p else x
    torch_y = torch.addmm(bias, x, w) + s * (xk.to(dtype) @ A.t().to(dtype)) @ B.t().to(dtype)
    y_cb, xa_cb = lora_fwd.lora_linear_fwd(x, w, bias, A, B, s, p, seed if p else None, True, variant="cublas")
    dx_cb, dA_cb, dB_cb = lora_bwd.lora_linear_bwd(dy, x, xa_cb, w, A, B, s, p, seed if p else None, True,
                                                   variant="cublas")
    out["err"] = {"y": rel(y, ref["y"]), "y_other_variant": rel(y_other, ref["y"]), "dx": rel(dx, ref["dx"]),
                  "dA": rel(dA, ref["dA"]), "dB": rel(dB, ref["dB"]), "torch_y": rel(torch_y, ref["y"]),
                  "y_cublas": rel(y_cb, ref["y"]), "dx_cublas": rel(dx_cb, ref["dx"]),
                  "dA_cublas": rel(dA_cb, ref["dA"]), "dB_cublas": rel(dB_cb, ref["dB"])}
    del y_cb, xa_cb, dx_cb, dA_cb, dB_cb
    for v in ("tma", "tma_persistent"):  # the TMA variants (forward, then the tma backward on their xa)
        y_t, xa_t = lora_fwd.lora_linear_fwd(x, w, bias, A, B, s, p, seed if p else None, True, variant=v)
        out["err"][f"y_{v}"] = rel(y_t, ref["y"])
        del y_t
    for v in ("tma", "gb_first", "gb_first_tma"):  # the other fused backwards
        dx_t, dA_t, dB_t = lora_bwd.lora_linear_bwd(dy, x, xa_t, w, A, B, s, p, seed if p else None, True, variant=v)
        out["err"].update({f"dx_{v}": rel(dx_t, ref["dx"]), f"dA_{v}": rel(dA_t, ref["dA"]),
                           f"dB_{v}": rel(dB_t, ref["dB"])})
        del dx_t, dA_t, dB_t
    del xa_t
    del ref

    # --- pieces
    t = {}
    sd = seed if p else None
    t["base_fwd"] = bench(lambda: torch.addmm(bias, x, w))
    t["base_dx"] = bench(lambda: dy @ w.t())
    for v in lora_fwd.FWD_VARIANTS:
        t[f"fwd_{v}"] = bench(lambda v=v: lora_fwd.lora_linear_fwd(x, w, bias, A, B, s, p, sd, True, variant=v))
    t["bwd_dx_only"] = bench(lambda: lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, sd, True, needs_dA=False,
                                                             needs_dB=False))
    t["bwd_atomic"] = bench(lambda: lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, sd, True, deterministic=False))
    t["bwd_cublas"] = bench(lambda: lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, sd, True, variant="cublas"))
    for v in ("tma", "gb_first", "gb_first_tma"):
        t[f"bwd_{v}"] = bench(lambda v=v: lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, sd, True, variant=v))
    t["bwd_determ"] = bench(lambda: lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, sd, True, deterministic=True))
    t["mask_MK"] = bench(lambda: dropout_keep_mask(seed, M, K, max(p, 0.1), device))
    g = {}  # the same pieces from CUDA graphs
    g["base_fwd"] = graph_ms(lambda: torch.addmm(bias, x, w))
    g["base_dx"] = graph_ms(lambda: dy @ w.t())
    for v in lora_fwd.FWD_VARIANTS:
        g[f"fwd_{v}"] = graph_ms(lambda v=v: lora_fwd.lora_linear_fwd(x, w, bias, A, B, s, p, sd, True, variant=v))
    g["bwd_dx_only"] = graph_ms(lambda: lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, sd, True,
                                                                 needs_dA=False, needs_dB=False))
    g["bwd_atomic"] = graph_ms(lambda: lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, sd, True,
                                                                deterministic=False))
    g["bwd_cublas"] = graph_ms(lambda: lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, sd, True,
                                                                variant="cublas"))
    for v in ("tma", "gb_first", "gb_first_tma"):
        g[f"bwd_{v}"] = graph_ms(lambda v=v: lora_bwd.lora_linear_bwd(dy, x, xa, w, A, B, s, p, sd, True,
                                                                      variant=v))
    g["mask_MK"] = graph_ms(lambda: dropout_keep_mask(seed, M, K, max(p, 0.1), device))
    out["graph_ms"] = g

    # --- whole layers, forward + backward
    conv = Conv1D(N, K).to(device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(bias)
    xg = x.clone().requires_grad_(True)
    t["layer_base"] = bench(lambda: conv(xg).backward(dy), grad_to_none=[xg])
    t["cpu_base"] = host_ms(lambda: conv(xg).backward(dy), grad_to_none=[xg])
    lf = LinearWithLoRA(conv, rank=r, alpha=2 * r, dropout=p, backend="triton").to(device)
    with torch.no_grad():
        lf.lora.lora_A.copy_(A)
        lf.lora.lora_B.copy_(B)
    t["layer_lora_fast"] = bench(lambda: lf(xg).backward(dy), grad_to_none=[xg, *lf.lora.parameters()])
    lf_grads = [xg, *lf.lora.parameters()]
    t["cpu_lora_fast"] = host_ms(lambda: lf(xg).backward(dy), grad_to_none=lf_grads)
    ref = LinearWithLoRA(conv, rank=r, alpha=2 * r, dropout=p, backend="reference").to(device)
    t["layer_reference"] = bench(lambda: ref(xg).backward(dy), grad_to_none=[xg, *ref.lora.parameters()])
    try:
        from peft import LoraConfig, get_peft_model

        from benchmarks.bench_layer import _Wrapper

        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"], fan_in_fan_out=True)
        pl = get_peft_model(_Wrapper(conv), cfg).base_model.model.proj
        pparams = [q for q in pl.parameters() if q.requires_grad]
        t["layer_peft"] = bench(lambda: pl(xg).backward(dy), grad_to_none=[xg, *pparams])
        t["cpu_peft"] = host_ms(lambda: pl(xg).backward(dy), grad_to_none=[xg, *pparams])
    except Exception as e:  # noqa: BLE001 - a probe reports and goes on
        print(f"peft failed: {e!r}", file=sys.stderr)
    out["ms"] = t
    g["layer_base"] = graph_ms(lambda: conv(xg).backward(dy), grad_to_none=[xg])
    g["layer_lora_fast"] = graph_ms(lambda: lf(xg).backward(dy), grad_to_none=lf_grads)
    for provider in ("lora_fast_cublas", "lora_fast_gb_first", "lora_fast_tma", "lora_fast_tma_persistent"):
        with provider_env(provider):
            g[f"layer_{provider}"] = graph_ms(lambda: lf(xg).backward(dy), grad_to_none=lf_grads)
            t[f"cpu_{provider}"] = host_ms(lambda: lf(xg).backward(dy), grad_to_none=lf_grads)
    if "layer_peft" in t:
        g["layer_peft"] = graph_ms(lambda: pl(xg).backward(dy), grad_to_none=[xg, *pparams])
    cfgs = {}
    # the config per launch key: the whole key but its device (its switches — variant, dropout, TMA, GB_IN, ... —
    # and dtypes tell the launches apart; a shorter prefix let later variants overwrite earlier ones)
    for name, tk in (("fwd", lora_fwd.FWD_TUNED), ("bwd", lora_bwd.BWD_TUNED)):
        cfgs[name] = {str(key[:-1]): meta for key, meta in tk.chosen.items() if key[0] == N and key[1] == K}
    out["configs"] = cfgs
    return out


def print_summary(res: dict) -> None:
    """The table of ``main``'s cases: eager times per piece, then the CUDA-graph times, errors and tuned configs."""
    keys = ("base_fwd", "base_dx", "fwd_one_pass", "fwd_xa_first", "bwd_dx_only", "bwd_atomic", "bwd_determ",
            "mask_MK", "layer_base", "layer_lora_fast", "layer_peft", "layer_reference", "cpu_base", "cpu_lora_fast",
            "cpu_peft")
    print("\nlayer         r   p    | " + " ".join(f"{k[-10:]:>10}" for k in keys))
    for c in res["cases"]:
        if "ms" in c:
            print(f"{c['layer']:<12} {c['r']:>3} {c['p']:<4} | " + " ".join(
                f"{c['ms'].get(k, float('nan')):10.4f}" for k in keys))
            print("    graph " + " ".join(f"{k}={v:.4f}" for k, v in c.get("graph_ms", {}).items()))
            print("    err " + " ".join(f"{k}={v:.1e}" for k, v in c["err"].items()) + f"  cfg {c['configs']}")
        else:
            print(f"{c['layer']:<12} {c['r']:>3} {c['p']:<4} | failed: {c.get('error')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_probe", description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--r", type=int, nargs="+", default=[16])
    ap.add_argument("--p", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (no CUDA device is visible to torch): it times kernels with triton.testing")
    from lora_fast.kernels.launch import interpreting

    from benchmarks.utils import env_info, provider_env
    if interpreting():
        ap.error("TRITON_INTERPRET is set: the kernels would run in Triton's numpy interpreter, and its timings are "
                 "never kernel timings; unset it")
    device = torch.device("cuda")
    torch.manual_seed(0)
    res = {**env_info(device), "ceilings": ceilings(device), "cases": []}
    print(f"ceilings: {res['ceilings']}", flush=True)
    with provider_env("lora_fast"):  # the default route: an exported LORA_FAST_*_VARIANT would relabel it
        run_cases(args, device, res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print_summary(res)
    return 1 if any("error" in c for c in res["cases"]) else 0


def run_cases(args, device, res: dict) -> None:
    for layer in args.layers:
        for r in args.r:
            for p in args.p:
                try:
                    c = probe_case(layer, args.M, r, p, DTYPES[args.dtype], device)
                except Exception as e:  # noqa: BLE001
                    import traceback

                    traceback.print_exc()
                    c = {"layer": layer, "r": r, "p": p, "error": repr(e)}
                res["cases"].append(c)
                print(json.dumps(c), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
