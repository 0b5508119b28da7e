"""Whole-model benchmark: a LoRA training step on GPT-2, and inference with unmerged vs merged adapters.

    python -m benchmarks.bench_gpt2            # GPT-2 124M, batch 8 × 1024 tokens (meant for a GPU)
    python -m benchmarks.bench_gpt2 --quick    # a 2-layer, 128-wide GPT-2, batch 2 × 64 (CPU, seconds)

Set-up shared by every provider: architecture from ``GPT2Config`` (pretrained ``gpt2`` weights when they are in the
local Hugging Face cache or ``--model-path`` names them — weights do not change speed), fp32 master weights, bf16
autocast, LoRA on ``c_attn``, ``c_proj`` (attention and MLP) and ``c_fc`` with r=16, α=32, dropout 0.1, AdamW on the
adapters. The adapters' B starts random (not PEFT's zeros; A and B drawn from one seeded generator, so every provider
has the same adapters) and token ids are random in [1, vocab): no all-zero inputs anywhere.

Providers: ``lora_fast`` (``apply_lora(..., backend="triton")``, CUDA only; ``lora_fast_cublas``, asked for by name,
forces the cublas kernel variant — on a CPU the Triton interpreter would
run, whose timings are never kernel timings, so it is skipped with a message), ``peft`` (``get_peft_model`` with
``fan_in_fan_out=True``), ``peft_patched`` (that PEFT model after ``lora_fast.patch_peft(model, backend="triton")``:
every LoRA layer on lora_fast's Triton path, checked; CUDA only, asked for by name), ``reference``
(``apply_lora(..., backend="reference")``).

``--compile MODE`` runs each provider's model under ``torch.compile(mode=MODE)`` (``default`` or
``reduce-overhead``, the latter with CUDA graphs: no per-launch host cost) and records it as provider
``<name>+compile`` (``<name>+compile:<MODE>`` for a non-default mode): lora_fast's layers enter the graph as the
``lora_fast::lora_linear`` custom op (issue 7), PEFT's as traced aten ops. The optimizer step stays eager.

Before timing, each provider's eager model is checked against a float64 oracle (``check_provider``: eval mode, no
autocast, a short probe batch): the LoRA-induced part of the logits and every adapter gradient. Every provider
starts from the same base weights and the same adapters. Rows are written to the CSV after each provider.

Modes and metrics (rows of ``bench=gpt2``): ``train`` — one optimizer step (forward, backward, AdamW step,
zero_grad): time (ms), tokens_per_s, peak_mem (MB above the live model and optimizer state); ``infer_unmerged`` and
``infer_merged`` — a no-grad forward with the adapters separate, then folded into the weights: time, tokens_per_s,
peak_mem.
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks import utils

PROVIDERS = ("lora_fast", "peft", "reference")
# by name: peft_patched (PEFT's model after lora_fast.patch_peft) and the kernel variants (lora_fast_cublas, ...)
ALL_PROVIDERS = (*PROVIDERS, *utils.PATCHED_PROVIDERS, *utils.VARIANT_PROVIDERS)
MODES = ("train", "infer_unmerged", "infer_merged")
TARGETS = ["c_attn", "c_proj", "c_fc"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.1}
FULL_SET = {"model": "gpt2-124M", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": 50257, "batch": 8,
            "seq": 1024}
QUICK_SET = {"model": "gpt2-tiny", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab": 512, "batch": 2, "seq": 64}


def build_model(shape: dict, device: torch.device, model_path: str | None) -> nn.Module:
    """GPT-2 with ``shape``'s architecture: pretrained weights from ``model_path`` (or, for 124M, the local cache
    when present), random ones otherwise."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # the same random weights for every provider and for the check's oracle
    model = None
    source = model_path or ("gpt2" if shape["model"] == "gpt2-124M" else None)
    if source is not None:
        try:
            model = GPT2LMHeadModel.from_pretrained(source, local_files_only=True)
        except OSError as e:
            if model_path:  # asked for explicitly: a missing checkpoint is an error
                raise ValueError(f"--model-path {model_path!r}: cannot load a GPT-2 checkpoint ({e})") from e
    print(f"  weights: {'pretrained (' + source + ')' if model is not None else 'random (GPT2Config)'}", flush=True)
    if model is None:
        cfg = GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                         vocab_size=shape["vocab"], n_positions=max(1024, shape["seq"]),
                         bos_token_id=shape["vocab"] - 1, eos_token_id=shape["vocab"] - 1)
        model = GPT2LMHeadModel(cfg)
    c = model.config
    got = {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "vocab": c.vocab_size}
    if any(got[k] != shape[k] for k in got):
        raise ValueError(f"the checkpoint's architecture {got} differs from the benchmark's {shape}")
    if shape["seq"] > c.n_positions:  # past it, CUDA's embedding lookup is a device-side assert that ends the run
        raise ValueError(f"--seq {shape['seq']} exceeds the model's {c.n_positions} positions "
                         f"({'pretrained ' + source if source else 'GPT2Config'})")
    model.config.use_cache = False
    return model.to(device)


def add_lora(model: nn.Module, provider: str) -> nn.Module:
    """The LoRA-wrapped model for ``provider`` (only adapter parameters trainable); B initialised randomly."""
    if provider in ("peft", *utils.PATCHED_PROVIDERS):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                         target_modules=TARGETS, fan_in_fan_out=True)
        model = get_peft_model(model, cfg)
        if provider in utils.PATCHED_PROVIDERS:
            utils.patch_peft_fused(model)
    else:
        from lora_fast import apply_lora

        backend = "triton" if provider in utils.TRITON_PROVIDERS else "reference"
        apply_lora(model, TARGETS, rank=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], backend=backend)
    gen = torch.Generator().manual_seed(1)  # the same adapters for every provider (and the check's oracle)
    with torch.no_grad():
        for (_module, which), p in sorted(adapter_params(model).items()):
            w = torch.randn(p.shape, generator=gen) * (0.02 if which == "B" else p.shape[1] ** -0.5)
            p.copy_(w)
    return model


def adapter_params(model: nn.Module) -> dict[tuple[str, str], nn.Parameter]:
    """{(module name, "A" or "B"): parameter} under either library's naming (PEFT's ``base_model.model.X.lora_A.
    default.weight``, lora_fast's ``X.lora.lora_A``)."""
    out = {}
    for name, p in model.named_parameters():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+?)\.(?:lora\.)?lora_([AB])(?:\.default\.weight)?", name)
        if m and p.requires_grad:
            out[(m.group(1), m.group(2))] = p
    return out


def _probe(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Eval-mode (dropout off) logits and adapter gradients of the LM loss on ``ids``, without autocast."""
    model.eval()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in adapter_params(model).items()}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


def oracle(shape: dict, device: torch.device, model_path: str | None) -> dict:
    """The float64 answer the check compares every provider with: the base model's logits, and lora_fast's
    reference path (the project's test oracle) on the same weights and adapters."""
    ids = torch.randint(1, shape["vocab"], (1, min(shape["seq"], 128)), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)  # (1, T'): a short probe; the kernels' correctness does not depend on M
    model = build_model(shape, device, model_path).double().eval()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    logits, grads = _probe(add_lora(model, "reference"), ids)
    del model
    return {"ids": ids, "base": base, "logits": logits, "grads": grads}


CHECK_TOL = 1e-2  # fp32 dots (IEEE unless torch allows TF32) through the blocks, on the LoRA-induced logits


def check_provider(model: nn.Module, ref: dict) -> None:
    """Raise unless the provider's model computes the oracle's function: the logits' LoRA-induced part
    (logits − base logits: a LoRA path off or mis-scaled changes it wholly) and every adapter gradient."""
    logits, grads = _probe(model, ref["ids"])
    err = utils.rel_err(logits.double() - ref["base"], ref["logits"] - ref["base"])
    if set(grads) != set(ref["grads"]):
        raise RuntimeError(f"adapters differ from the oracle's: {sorted(set(grads) ^ set(ref['grads']))[:4]}")
    gerr = max(utils.rel_err(grads[k], ref["grads"][k]) for k in grads)
    if not (err <= CHECK_TOL and gerr <= CHECK_TOL):
        raise RuntimeError(f"differs from the float64 oracle: LoRA part of the logits {err:.2e}, worst adapter "
                           f"gradient {gerr:.2e} (tolerance {CHECK_TOL:.0e})")


def set_merged(model: nn.Module, provider: str, merged: bool) -> None:
    """Fold the adapters into the base weights (``merged=True``) or take them out again."""
    if provider in ("peft", *utils.PATCHED_PROVIDERS):
        model.merge_adapter() if merged else model.unmerge_adapter()
    else:
        from lora_fast import merge_lora, unmerge_lora

        merge_lora(model) if merged else unmerge_lora(model)


def provider_label(provider: str, compile_mode: str | None) -> str:
    """The provider name recorded in the CSV: ``lora_fast``, ``lora_fast+compile``, ``peft+compile:reduce-overhead``."""
    if compile_mode is None:
        return provider
    return f"{provider}+compile" + ("" if compile_mode == "default" else f":{compile_mode}")


def prepare_provider(provider: str, shape: dict, device: torch.device | str, model_path: str | None = None,
                     compile_mode: str | None = None, compile_backend: str = "inductor", ref: dict | None = None,
                     checkpointing: bool = False) -> dict:
    """Build provider's LoRA GPT-2, its optimizer and a batch source.

    Args:
        compile_mode: None (eager), or a ``torch.compile`` mode the forward (and so backward) runs under.
        compile_backend: the ``torch.compile`` backend (``aot_eager`` for a quick CPU check).
        ref: ``oracle(...)``'s answer to check the (eager) model against before anything is timed.
        checkpointing: transformers' activation checkpointing (non-reentrant) on, after the check (what
            ``lora-fast train --gradient_checkpointing`` and a PEFT user's Trainer do): memory against recompute.

    Returns:
        {"train": one optimizer step, "infer": one no-grad forward, "model": the (uncompiled) model}.
    """
    device = torch.device(device)
    B, T = shape["batch"], shape["seq"]
    model = add_lora(build_model(shape, device, model_path), provider)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d = shape["n_embd"]
    per_block = LORA["r"] * sum(k + n for k, n in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)])  # r·(K+N) each
    if trainable != shape["n_layer"] * per_block:  # same adapters everywhere, or the comparison means nothing
        raise RuntimeError(f"{trainable} trainable parameters, expected {shape['n_layer'] * per_block}")
    if ref is not None:
        check_provider(model, ref)
    if checkpointing:
        from lora_fast.checkpointing import enable_checkpointing

        enable_checkpointing(getattr(model, "get_base_model", lambda: model)())  # PEFT's: the model inside
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = [torch.randint(1, shape["vocab"], (B, T), device=device) for _ in range(3)]  # (B, T), never zeros
    run = model
    if compile_mode is not None:
        torch._dynamo.reset()  # a fresh cache per provider
        run = torch.compile(model, mode=None if compile_mode == "default" else compile_mode, backend=compile_backend)
    count = [0]

    def next_ids():
        count[0] += 1
        return batches[count[0] % len(batches)]

    def train_step():
        ids = next_ids()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            run(input_ids=next_ids())

    return {"train": train_step, "infer": infer, "model": model}


def inductor_on_cpu(args, device: torch.device) -> bool:
    return args.compile is not None and args.compile_backend == "inductor" and device.type == "cpu"


def run_config(shape: dict, device: torch.device, args) -> dict:
    """The ``config`` of a run's rows (its identity in the CSV, with bench, provider, mode and metric)."""
    config = {**shape, **LORA, "dtype": "bf16-autocast", "targets": TARGETS}
    if args.compile is not None and args.compile_backend != "inductor":
        config["compile_backend"] = args.compile_backend
    if device.type == "cpu":
        config["threads"] = torch.get_num_threads()  # CPU numbers depend on it
    if getattr(args, "gradient_checkpointing", False):
        config["checkpointing"] = "non-reentrant"
    return config


def run_provider(provider: str, shape: dict, device: torch.device, args, env, ref: dict | None = None
                 ) -> list[dict]:
    """All rows of one provider (checked against ``ref`` first)."""
    B, T = shape["batch"], shape["seq"]
    case = prepare_provider(provider, shape, device, args.model_path, args.compile, args.compile_backend, ref,
                            checkpointing=args.gradient_checkpointing)
    model = case["model"]
    label = provider_label(provider, args.compile)
    config = run_config(shape, device, args)
    rows, merged = [], False
    for mode in args.modes:
        model.train(mode == "train")
        if merged != (mode == "infer_merged"):
            merged = not merged
            set_merged(model, provider, merged)
        fn = case["train"] if mode == "train" else case["infer"]
        t = utils.measure_time(fn, warmup=args.warmup, rep=args.rep, device=device)
        tps = [B * T / (ms / 1e3) for ms in t[::-1]]  # p20 of tokens/s comes from p80 of time
        rows += [utils.make_row("gpt2", label, mode, "time", config, t, env),
                 utils.make_row("gpt2", label, mode, "tokens_per_s", config, tps, env)]
        msg = f"  {label:<18}{mode:<15} {t[1]:9.2f} ms [{t[0]:.2f}, {t[2]:.2f}]  {tps[1]:10.0f} tokens/s"
        if not inductor_on_cpu(args, device):  # Inductor's CPU buffers bypass LiveBytes
            mb = utils.peak_memory_mb(fn, device=device)
            rows.append(utils.make_row("gpt2", label, mode, "peak_mem", config, [mb], env))
            msg += f"  peak {mb:9.1f} MB"
        print(msg, flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpt2", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny GPT-2 and batch (CPU-friendly)")
    p.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch", type=int, help="sequences per step (default 8; 2 with --quick)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 1024; 64 with --quick)")
    p.add_argument("--model-path", help="a local GPT-2 checkpoint directory (weights do not change speed)")
    p.add_argument("--compile", choices=["default", "reduce-overhead"],
                   help="run each model under torch.compile with this mode (provider recorded as <name>+compile)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="transformers' activation checkpointing (non-reentrant) in every provider's model: rows "
                        "with config checkpointing=non-reentrant")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the check against the float64 oracle before timing (it runs by default)")
    p.add_argument("--warmup", type=int, help="untimed steps (default 3; 1 with --quick)")
    p.add_argument("--rep", type=int, help="timed steps (default 10; 4 with --quick)")
    utils.add_common_args(p)
    args = p.parse_args(argv)
    args.shape = dict(QUICK_SET if args.quick else FULL_SET)
    if args.batch is not None:
        args.shape["batch"] = args.batch
    if args.seq is not None:
        args.shape["seq"] = args.seq
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.rep = args.rep if args.rep is not None else (4 if args.quick else 10)
    if args.shape["batch"] < 1 or args.shape["seq"] < 2 or args.warmup < 0 or args.rep < 1:
        p.error(f"need --batch >= 1, --seq >= 2, --warmup >= 0, --rep >= 1; got {args.shape['batch']}, "
                f"{args.shape['seq']}, {args.warmup}, {args.rep}")
    if args.model_path:
        check_model_path(p, args.model_path, args.shape)
    utils.check_common_args(p, args)
    return args


def check_model_path(p: argparse.ArgumentParser, path: str, shape: dict) -> None:
    """``--model-path`` holds a GPT-2 of the benchmark's shape with positions for ``--seq``, or the run stops here
    in one line: found while timing, the error read as every provider's failure, which dropped their earlier rows
    of this configuration from the CSV (a typo in the path emptied it, exit status 0 under ``--no-check``)."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        why = "no such directory" if not Path(path).expanduser().exists() else str(e).splitlines()[0]
        p.error(f"--model-path {path!r}: no model config loads from it ({why})")
    if c.model_type != "gpt2":
        p.error(f"--model-path {path!r} holds a {c.model_type} model, not GPT-2")
    got = {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "vocab": c.vocab_size}
    want = {k: shape[k] for k in got}
    if got != want:
        p.error(f"--model-path {path!r}: its architecture {got} is not the benchmark's {shape['model']} {want}")
    if shape["seq"] > c.n_positions:
        p.error(f"--seq {shape['seq']} exceeds the {c.n_positions} positions of --model-path {path!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return utils.run_with_threads(args.threads, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    env = utils.env_info(device)
    s = args.shape
    print(f"GPT-2 benchmark on {env['device']}: {s['model']} ({s['n_layer']} layers, {s['n_embd']} wide), batch "
          f"{s['batch']} × {s['seq']} tokens, LoRA r={LORA['r']} α={LORA['alpha']} dropout={LORA['dropout']} on "
          f"{TARGETS}, bf16 autocast, AdamW")
    providers = utils.timeable_providers(args.providers, device)
    if inductor_on_cpu(args, device):
        print("note: peak memory is not measured for compiled models on CPU (Inductor allocates outside the "
              "dispatcher)")
    ref = oracle(s, device, args.model_path) if args.check else None
    written, failures = 0, []
    for provider in providers:
        try:
            with utils.provider_env(provider):
                rows = run_provider(provider, s, device, args, env, ref)
            total = utils.upsert_csv(args.csv, rows)  # now: a run stopped by a time limit keeps these
            written += len(rows)
        except Exception as e:  # report, keep the other providers' numbers
            failures.append(f"{provider}: {type(e).__name__}: {e}")
            print(f"  {provider:<10}FAILED: {type(e).__name__}: {e}", flush=True)
            label = provider_label(provider, args.compile)
            utils.note_dropped(utils.drop_failed(args.csv, "gpt2", env["device"], run_config(s, device, args), label),
                               label)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if written:
        print(f"wrote {written} rows to {args.csv} ({total} rows in the file)")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
