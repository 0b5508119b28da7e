"""Fused path vs reference path over a real fine-tuning run (issue 8 §1): GPT-2 124M, random init, N steps.

    python -m benchmarks.train_parity --out DIR [--steps 50] [--dropout 0.0] [--bf16] [--model gpt2-random]

Runs ``lora-fast train`` twice with the same seed, data and options, once with ``--backend triton`` and once with
``--backend reference``, and prints both per-step training-loss curves, their largest relative difference, and
the final eval losses; writes ``DIR/train_parity.json``. With dropout 0 the two runs compute the same function
(differences are rounding: bf16 GEMMs in different orders, amplified over the steps); with dropout > 0 the masks
differ (kernel RNG vs torch's), so only the curves' agreement in trend is meaningful. Exit status 1 when the
last training losses differ by more than ``--tol`` (relative); the eval losses are printed, not checked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run_backend(backend: str, args, out: Path) -> dict:
    from lora_fast.train import run
    from lora_fast.train_args import parse_train_args

    argv = ["--model", args.model, "--max_steps", str(args.steps), "--batch_size", str(args.batch_size),
            "--max_length", str(args.max_length), "--eval_steps", str(args.steps), "--eval_batches", "8",
            "--lr", "2e-3", "--rank", "16", "--alpha", "32", "--dropout", str(args.dropout), "--target_modules",
            "c_attn", "c_proj", "c_fc", "--seed", "0", "--backend", backend, "--output_dir", str(out / backend),
            "--overwrite", "--no-progress"] + (["--bf16"] if args.bf16 else [])
    return run(parse_train_args(argv))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--tol", type=float, default=0.02)
    ap.add_argument("--model", default="gpt2-random", help="as lora-fast train's --model (default: GPT-2 124M, random "
                    "init)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    from lora_fast.train_args import ConfigError

    try:  # an option lora-fast train refuses (off a GPU: --backend triton without TRITON_INTERPRET=1) in one line
        res = {b: run_backend(b, args, out) for b in ("triton", "reference")}
    except ConfigError as e:
        ap.error(str(e))
    lt, lr = res["triton"]["train_loss"], res["reference"]["train_loss"]
    rel = [abs(a - b) / abs(b) for a, b in zip(lt, lr, strict=True)]
    ev = {b: m["final_eval_loss"] for b, m in res.items()}
    from benchmarks.utils import env_info

    summary = {**env_info(res["triton"].get("device", "cpu")), "steps": args.steps, "dropout": args.dropout,
               "bf16": args.bf16, "train_loss_triton": lt,
               "train_loss_reference": lr, "max_rel_diff": max(rel), "final_rel_diff": rel[-1], "eval_loss": ev,
               "tokens_per_sec": {b: m.get("train_tokens_per_sec") for b, m in res.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_parity.json").write_text(json.dumps(summary, indent=1))
    print("step  triton     reference  rel")
    for i, (a, b, d) in enumerate(zip(lt, lr, rel, strict=True), 1):
        if i <= 3 or i % 10 == 0 or i == len(lt):
            print(f"{i:4d}  {a:9.5f}  {b:9.5f}  {d:.1e}")
    print(f"max rel diff {max(rel):.2e}; eval loss {ev}; tokens/s {summary['tokens_per_sec']}")
    return 0 if rel[-1] <= args.tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
