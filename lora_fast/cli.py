"""``lora-fast`` command line: ``train``, ``sweep`` and ``merge``.

    lora-fast train --max_steps 40 --output_dir outputs/quick       # GPT-2 + LoRA on the embedded corpus
    lora-fast sweep --max_steps 40 --output_dir outputs/sweep       # rank / alpha / target-module experiments
    lora-fast merge --adapter outputs/quick --output outputs/merged # a plain transformers model

Exit status: 0 done, 2 bad input (one line on stderr, nothing written), 130 interrupted (Ctrl-C; ``train`` and
``sweep`` save what was trained before exiting).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_fast.train_args import ConfigError
from lora_fast.train_model import load_base_model, log_stderr

USAGE = """usage: lora-fast {train,sweep,merge} ...

  train   LoRA fine-tuning of GPT-2 (causal LM or --task classification); lora-fast train --help
  sweep   rank / alpha / target-module experiments;                         lora-fast sweep --help
  merge   fold an adapter into its base model and save a plain model;      lora-fast merge --help
"""


def merge(adapter: str, output: str, model: str | None = None, overwrite: bool = False, log=log_stderr) -> Path:
    """Load base + adapter, merge ΔW into the base weights, save a plain transformers model (and tokenizer).

    Args:
        adapter: a ``lora-fast train`` output directory, or any PEFT LoRA adapter directory.
        output: directory for ``save_pretrained`` (refused when non-empty unless ``overwrite``).
        model: the base model; default: the adapter's ``base_model_name_or_path`` (``gpt2-random`` is rebuilt from
            the training seed recorded in ``training_args.json``).

    Returns:
        The output directory.
    """
    from lora_fast import load_adapter, merge_and_unload
    from lora_fast.train_io import StagedDir, check_output_dir

    adir = Path(adapter)
    cfg_path = adir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--adapter {adapter!r} has no adapter_config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
        args = json.loads((adir / "training_args.json").read_text()) if (adir / "training_args.json").is_file() \
            else {}
    except ValueError as e:
        raise ConfigError(f"--adapter {adapter!r}: unreadable JSON ({e})") from None
    base = model or cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{cfg_path} names no base model; pass --model")
    out = check_output_dir(output, overwrite)
    task = "classification" if cfg.get("task_type") == "SEQ_CLS" else "causal-lm"
    labels = args.get("label_names") or ["0", "1"]
    base_model, _ = load_base_model(base, task, len(labels), int(args.get("seed", 0)), log=log)
    tokenizer = None
    if (adir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adir)
        if args.get("tokenizer_trained"):  # as training set them (lora_fast.train.prepare)
            for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
                setattr(base_model.config, key, tokenizer.eos_token_id)
    if task == "classification":
        base_model.config.id2label = dict(enumerate(labels))
        base_model.config.label2id = {n: i for i, n in enumerate(labels)}
        if tokenizer is not None:
            base_model.config.pad_token_id = tokenizer.pad_token_id
    try:
        load_adapter(base_model, adir)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    merged = merge_and_unload(base_model)
    staged = StagedDir(out)
    try:
        merged.save_pretrained(staged.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged.path)
        return staged.commit()
    except BaseException:
        staged.discard()
        raise


def _merge_main(argv) -> int:
    p = argparse.ArgumentParser(prog="lora-fast merge", description="Merge a LoRA adapter into its base model")
    p.add_argument("--adapter", required=True, help="adapter directory (a lora-fast train output, or PEFT's)")
    p.add_argument("--output", required=True, help="directory for the merged model")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    a = p.parse_args(argv)
    try:
        out = merge(a.adapter, a.output, a.model, a.overwrite)
    except ConfigError as e:
        print(f"lora-fast merge: error: {e}", file=sys.stderr)
        return 2
    print(f"Merged model saved in {out} (loads with transformers' from_pretrained, no lora_fast needed)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``lora-fast`` entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from lora_fast.train import main as train_main

        return train_main(rest)
    if cmd == "sweep":
        from lora_fast.sweep import main as sweep_main

        return sweep_main(rest)
    if cmd == "merge":
        return _merge_main(rest)
    print(f"lora-fast: error: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
