"""Layer benchmark: one LoRA-wrapped GPT-2 projection, five providers, three modes.

    python -m benchmarks.bench_layer            # the full set (meant for a GPU)
    python -m benchmarks.bench_layer --quick    # a small subset, under a minute on a 2-core CPU

Shapes are GPT-2's four projections in Conv1D layout (weight (K, N)): ``c_attn`` 768→2304, ``attn.c_proj``
768→768, ``c_fc`` 768→3072, ``mlp.c_proj`` 3072→768, with M tokens. Providers (all on the same frozen Conv1D, the
same random adapter weights — never zeros — and α = 2r):
    base           the frozen Conv1D alone, input requiring grad: the floor no LoRA layer can beat.
    reference      ``LinearWithLoRA(conv, backend="reference")`` (plain PyTorch).
    peft           PEFT's ``lora.Linear`` from ``get_peft_model`` on a one-module wrapper, ``fan_in_fan_out=True``.
    torch_compile  the reference layer under ``torch.compile(dynamic=False)`` (one compile per shape).
    lora_fast      ``LinearWithLoRA(conv, backend="triton")``: CUDA only. On a CPU it would run in the Triton
                   interpreter (numpy), whose timings are never kernel timings, so it is skipped with a message.
    lora_fast_cublas, lora_fast_one_pass, lora_fast_xa_first
                   the same layer with a kernel variant forced (``LORA_FAST_{FWD,BWD}_VARIANT``, see
                   ``utils.VARIANT_PROVIDERS``): cuBLAS for the frozen GEMMs and Triton for the LoRA terms; or the
                   fused kernels with the one-pass or xa-first forward. CUDA only, asked for by name. ``lora_fast``
                   itself runs with both variables unset (the default rules).
    peft_patched   PEFT's layer as ``peft`` builds it, after ``lora_fast.patch_peft(..., backend="triton")``: what a
                   PEFT user gets from one added line. CUDA only, asked for by name.
Each library keeps its defaults for a bf16 base: both lora_fast and PEFT hold fp32 adapter weights; without
autocast PEFT casts x to the adapters' fp32 for its LoRA GEMMs (and saves that fp32 copy), lora_fast and the
reference cast the adapters to x's bf16. That is what each library's users get, so "vs peft" compares it as is.

Modes: ``fwd`` (forward with autograd recording), ``bwd`` (backward alone, after an untimed forward), ``full``.
Metrics per (provider, mode): time (ms, p20/p50/p80), TFLOP/s, peak memory (MB above the inputs), and — once per
provider, under mode ``fwd`` — saved-activation bytes. FLOPs: base forward 2MKN, base backward 2MKN (dx only, W₀
frozen); LoRA adds 2Mr(K+N) forward and 4Mr(K+N) backward (dx through B then A, dA, dB).

Before timing, every provider's output and gradients are checked against a float64 reference (``check_provider``:
eval mode; the Triton providers with dropout also in training mode, masks included); a provider that disagrees (or
fails) is reported and not timed, and the script exits with status 1. Rows are written to the CSV after each
configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn as nn

from benchmarks import utils

LAYERS = {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}
PROVIDERS = ("base", "reference", "peft", "torch_compile", "lora_fast")
ALL_PROVIDERS = (*PROVIDERS, *utils.PATCHED_PROVIDERS, *utils.VARIANT_PROVIDERS)  # these two kinds: by name
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FULL_SET = {"M": [2048, 8192, 32768], "r": [8, 16, 64], "dropout": [0.0, 0.1], "dtype": ["bf16", "fp32"]}
QUICK_SET = {"M": [64, 256], "r": [16], "dropout": [0.1], "dtype": ["fp32"]}  # ~30 s on 2 idle CPU cores
# torch.compile costs seconds (CPU) to tens of seconds (GPU) per shape: compiled only where the targets are judged
# (bf16, r=16, dropout 0.1; in --quick only the smallest shape: least M, least K·N) unless --compile-all.
COMPILE_TARGET = {"r": 16, "dropout": 0.1, "dtype": "bf16"}
# Sanity tolerance of the eval-mode output vs float64: bf16 rounding (2^-8) with headroom; fp32 allows TF32 (2^-11).
CHECK_TOL = {"fp32": 5e-3, "bf16": 2e-2}


class _Wrapper(nn.Module):
    """The smallest model PEFT's ``get_peft_model`` can wrap: one projection called ``proj``."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def layer_flops(M: int, K: int, N: int, r: int, mode: str, lora: bool) -> float:
    """Floating-point operations of one call (see module docstring)."""
    fwd = 2 * M * K * N + (2 * M * r * (K + N) if lora else 0)
    bwd = 2 * M * K * N + (4 * M * r * (K + N) if lora else 0)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def build_provider(name: str, conv: nn.Module, r: int, dropout: float, lora_A: torch.Tensor,
                   lora_B: torch.Tensor) -> tuple[nn.Module, list[nn.Parameter]]:
    """The module that provider ``name`` times, and its trainable parameters. Adapters get ``lora_A`` (r, K) and
    ``lora_B`` (N, r) copied in, so every provider computes the same function."""
    from lora_fast import LinearWithLoRA

    if name == "base":
        return conv, []
    if name in ("peft", *utils.PATCHED_PROVIDERS):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], fan_in_fan_out=True)
        layer = get_peft_model(_Wrapper(conv), cfg).base_model.model.proj
        if name in utils.PATCHED_PROVIDERS:
            utils.patch_peft_fused(layer)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    else:
        backend = "triton" if name in utils.TRITON_PROVIDERS else "reference"
        layer = LinearWithLoRA(conv, rank=r, alpha=2 * r, dropout=dropout, backend=backend)
        a, b = layer.lora.lora_A, layer.lora.lora_B
    with torch.no_grad():
        a.copy_(lora_A)
        b.copy_(lora_B)
    if name == "torch_compile":
        torch._dynamo.reset()  # a fresh cache per shape: never hit the recompile limit
        # dynamic=False: the reference's dropout (torch.rand(x.shape)) does not trace with symbolic shapes.
        layer = torch.compile(layer, dynamic=False)
    return layer, [a, b]


def _reference(x, conv, lora_A, lora_B, scaling: float, dy, p: float = 0.0, keep_mask=None) -> list[torch.Tensor]:
    """[y, dx, dA, dB] of the LoRA map in float64 (dropout with ``keep_mask`` when given)."""
    from lora_fast.reference import lora_linear_ref

    xs, a, b = (t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B))
    y = lora_linear_ref(xs, conv.weight, conv.bias, a, b, scaling, dropout_p=p, keep_mask=keep_mask,
                        training=keep_mask is not None, fan_in_fan_out=True, upcast=True)
    y.backward(dy.double())
    return [y.detach(), xs.grad, a.grad, b.grad]


def _compare(got, ref, names, dtype: str, what: str) -> None:
    for g, r, n in zip(got, ref, names, strict=True):
        err = utils.rel_err(g, r)
        if not err <= CHECK_TOL[dtype]:
            raise RuntimeError(f"{what}: {n} differs from the float64 reference: relative error {err:.2e} > "
                               f"{CHECK_TOL[dtype]:.0e}")


def check_provider(name: str, layer: nn.Module, conv: nn.Module, x: torch.Tensor, dy: torch.Tensor, lora_A,
                   lora_B, params, dropout: float, dtype: str) -> None:
    """Raise unless the provider computes the LoRA map (the base map for ``base``) and its gradients.

    Every provider: eval-mode output, dx and, for the adapters, dA and dB against float64 (``torch_compile``: the
    output only, under no_grad, one compiled graph fewer per shape). The Triton providers with dropout also run
    the training forward and backward the timings run (``xa_first``/``cublas`` routes, regenerated masks) through
    ``lora_linear`` with an explicit seed, against the reference with that seed's mask (``dropout_mask``)."""
    from lora_fast.functional import dropout_mask, lora_linear

    scaling = 0.0 if name == "base" else 2.0  # α/r = 2r/r
    b_ref = torch.zeros_like(lora_B) if name == "base" else lora_B
    layer.eval()
    try:
        if name == "torch_compile":
            with torch.no_grad():
                out = layer(x)
            _compare([out], _reference(x, conv, lora_A, b_ref, scaling, dy)[:1], ["output"], dtype, "eval")
        else:
            xg = x.detach().clone().requires_grad_(True)
            for p in params:
                p.grad = None
            out = layer(xg)
            out.backward(dy)
            got = [out.detach(), xg.grad, *[p.grad for p in params]]
            names = ["output", "dx", "dA", "dB"][:len(got)]
            _compare(got, _reference(x, conv, lora_A, b_ref, scaling, dy)[:len(got)], names, dtype, "eval")
            for p in params:
                p.grad = None
    finally:
        layer.train()
    if name in utils.TRITON_PROVIDERS and dropout > 0.0:
        seed, (M, K) = 20261123, x.shape
        xg, a, b = (t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B))
        y = lora_linear(xg, conv.weight, conv.bias, a, b, scaling, dropout_p=dropout, seed=seed, training=True,
                        fan_in_fan_out=True, backend="triton")
        y.backward(dy)
        mask = dropout_mask(seed, M, K, dropout, x.device)
        _compare([y.detach(), xg.grad, a.grad, b.grad], _reference(x, conv, lora_A, lora_B, scaling, dy, dropout,
                 mask), ["output", "dx", "dA", "dB"], dtype, f"training, dropout {dropout}")


CASE_SEED = 20261124  # seeds each case's weights and inputs, the same for every provider


def prepare_case(name: str, layer_name: str, M: int, r: int, dropout: float, dtype: str,
                 device: torch.device | str) -> dict:
    """Build and check provider ``name`` on one configuration.

    Returns:
        {"fns": {mode: (setup, fn)}, "forward": the bare forward, "exclude": parameters and frozen weights}; each
        ``setup`` (untimed, may be None) prepares one timed ``fn()`` call.
    """
    device = torch.device(device)
    K, N = LAYERS[layer_name]
    torch_dtype = DTYPES[dtype]
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(N, K).to(device=device, dtype=torch_dtype)  # weight (K, N)
    gen = torch.Generator(device).manual_seed(CASE_SEED)  # every provider: the same weights and inputs
    with torch.no_grad():
        conv.weight.normal_(0.0, 0.02, generator=gen)  # Conv1D's own init, drawn from gen
        conv.bias.normal_(0.0, 0.02, generator=gen)
    conv.requires_grad_(False)
    lora_A = torch.randn(r, K, device=device, generator=gen) / K**0.5  # (r, K)
    lora_B = torch.randn(N, r, device=device, generator=gen) / r**0.5  # (N, r), random: a zero B hides the LoRA path
    x = torch.randn(M, K, device=device, dtype=torch_dtype, generator=gen)  # (M, K)
    dy = torch.randn(M, N, device=device, dtype=torch_dtype, generator=gen)  # (M, N)
    layer, params = build_provider(name, conv, r, dropout, lora_A, lora_B)
    check_provider(name, layer, conv, x, dy, lora_A, lora_B, params, dropout, dtype)
    x.requires_grad_(True)
    layer.train()
    state = {}

    def clear():
        x.grad = None
        for p in params:
            p.grad = None

    def forward_only():
        clear()
        state["y"] = layer(x)

    fns = {"fwd": (None, lambda: layer(x)), "full": (clear, lambda: layer(x).backward(dy)),
           "bwd": (forward_only, lambda: state.pop("y").backward(dy))}
    return {"fns": fns, "forward": lambda: layer(x), "exclude": [*params, *conv.parameters()]}


def run_case(name: str, layer_name: str, M: int, r: int, dropout: float, dtype: str, modes, device, args,
             env, measure_mem: bool) -> list[dict]:
    """All rows of one provider on one configuration."""
    with utils.provider_env(name):
        return _run_case(name, layer_name, M, r, dropout, dtype, modes, device, args, env, measure_mem)


def case_config(layer_name: str, M: int, r: int, dropout: float, dtype: str, device) -> dict:
    """The ``config`` of a configuration's rows (its identity in the CSV, with bench, provider, mode and metric)."""
    K, N = LAYERS[layer_name]
    config = {"layer": layer_name, "M": M, "K": K, "N": N, "r": r, "dropout": dropout, "dtype": dtype}
    if device.type == "cpu":
        config["threads"] = torch.get_num_threads()  # CPU numbers depend on it
    return config


def _run_case(name, layer_name, M, r, dropout, dtype, modes, device, args, env, measure_mem) -> list[dict]:
    K, N = LAYERS[layer_name]
    case = prepare_case(name, layer_name, M, r, dropout, dtype, device)
    config = case_config(layer_name, M, r, dropout, dtype, device)
    rows = []
    for mode in modes:
        setup, fn = case["fns"][mode]
        t = utils.measure_time(fn, setup, warmup=args.warmup, rep=args.rep, device=device)
        flops = layer_flops(M, K, N, r, mode, lora=name != "base")
        rows.append(utils.make_row("layer", name, mode, "time", config, t, env))
        rows.append(utils.make_row("layer", name, mode, "tflops", config, [flops / ms / 1e9 for ms in t[::-1]], env))
        msg = f"  {name:<14}{mode:<5} {t[1]:9.3f} ms [{t[0]:.3f}, {t[2]:.3f}]  {flops / t[1] / 1e9:8.3f} TFLOP/s"
        if measure_mem:
            mb = utils.peak_memory_mb(fn, setup, device=device)
            rows.append(utils.make_row("layer", name, mode, "peak_mem", config, [mb], env))
            msg += f"  peak {mb:9.2f} MB"
        print(msg, flush=True)
    saved = utils.saved_activation_bytes(case["forward"], exclude=case["exclude"])
    rows.append(utils.make_row("layer", name, "fwd", "saved_bytes", config, [saved], env))
    print(f"  {name:<14}saved activations {saved / 2**20:.2f} MB", flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_layer", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small subset (CPU-friendly); lists below override it")
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--M", nargs="+", type=int, help="token counts")
    p.add_argument("--ranks", nargs="+", type=int)
    p.add_argument("--dropouts", nargs="+", type=float)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    p.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--compile-all", action="store_true", help="torch.compile every configuration")
    p.add_argument("--warmup", type=int, help="untimed calls per measurement (default 10 on GPU, 2 on CPU, 1 quick)")
    p.add_argument("--rep", type=int, help="timed calls per measurement (default 50 on GPU, 10 on CPU, 7 quick)")
    utils.add_common_args(p)
    args = p.parse_args(argv)
    base = QUICK_SET if args.quick else FULL_SET
    args.M = args.M or base["M"]
    args.ranks = args.ranks or base["r"]
    args.dropouts = args.dropouts if args.dropouts is not None else base["dropout"]
    args.dtypes = args.dtypes or base["dtype"]
    cuda = torch.device(args.device).type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1 if args.quick else 2)
    args.rep = args.rep if args.rep is not None else (50 if cuda else 7 if args.quick else 10)
    if args.warmup < 0 or args.rep < 1:
        p.error(f"need --warmup >= 0 and --rep >= 1, got {args.warmup}, {args.rep}")
    utils.check_common_args(p, args)
    bad = [m for m in args.M if m <= 0] + [r for r in args.ranks if r <= 0]
    if bad or any(not 0.0 <= d < 1.0 for d in args.dropouts):
        p.error(f"M and ranks must be positive and dropouts in [0, 1); got M={args.M}, ranks={args.ranks}, "
                f"dropouts={args.dropouts}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return utils.run_with_threads(args.threads, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    env = utils.env_info(device)
    print(f"layer benchmark on {env['device']} (torch {env['torch']}, commit {env['commit']})")
    providers = utils.timeable_providers(args.providers, device)
    # Inductor's CPU buffers bypass the dispatcher, so LiveBytes cannot see them.
    no_mem = {"torch_compile"} if device.type != "cuda" else set()
    if no_mem & set(providers):
        print("note: torch_compile peak memory is not measured on CPU (Inductor allocates outside the dispatcher)")
    min_m = min(args.M)
    min_layer = min(args.layers, key=lambda n: LAYERS[n][0] * LAYERS[n][1])
    written, failures = 0, []
    for layer_name, M, r, dropout, dtype in itertools.product(args.layers, args.M, args.ranks, args.dropouts,
                                                              args.dtypes):
        rows = []
        print(f"{layer_name} M={M} K={LAYERS[layer_name][0]} N={LAYERS[layer_name][1]} r={r} dropout={dropout} "
              f"{dtype}", flush=True)
        for name in providers:
            if name == "torch_compile" and not args.compile_all:
                wanted = (M, layer_name) == (min_m, min_layer) if args.quick else all(
                    {"r": r, "dropout": dropout, "dtype": dtype}[k] == v for k, v in COMPILE_TARGET.items())
                if not wanted:
                    continue
            try:
                rows += run_case(name, layer_name, M, r, dropout, dtype, args.modes, device, args, env,
                                 measure_mem=name not in no_mem)
            except Exception as e:  # report, keep the other providers' numbers
                failures.append(f"{name} {layer_name} M={M} r={r} dropout={dropout} {dtype}: {e}")
                print(f"  {name:<14}FAILED: {type(e).__name__}: {e}", flush=True)
                config = case_config(layer_name, M, r, dropout, dtype, device)
                utils.note_dropped(utils.drop_failed(args.csv, "layer", env["device"], config, name), name)
        if rows:  # now, not at the end: a run stopped by a time limit keeps the configurations it finished
            total = utils.upsert_csv(args.csv, rows)
            written += len(rows)
    if "torch_compile" in providers and not args.compile_all:
        print("note: torch_compile ran only at " + (f"the smallest shape ({min_layer}, M={min_m})" if args.quick else
              f"{COMPILE_TARGET}") + " (compilation time); --compile-all compiles every configuration")
    if written:
        print(f"wrote {written} rows to {args.csv} ({total} rows in the file)")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
