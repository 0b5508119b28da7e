"""``lora-fast train`` (also ``python -m lora_fast.train``): LoRA fine-tuning of a GPT-2 style model.

The loop is the one the LoRA tutorials teach, with the pieces a real run needs: AdamW over the LoRA parameters
only (plus the classification head for ``--task classification``), linear warm-up then linear decay to zero,
gradient clipping, gradient accumulation, fp16/bf16 autocast (a gradient scaler with fp16), periodic evaluation
(loss and perplexity, or accuracy), a tqdm bar with loss, learning rate and tokens/s. Ctrl-C stops the loop, and
what has been trained so far is saved like a finished run (``interrupted: true`` in the metrics, exit status 130).

Outputs (``--output_dir``, written all at once, see ``lora_fast.train_io``): ``adapter_model.safetensors`` +
``adapter_config.json`` (PEFT's format: ``PeftModel.from_pretrained(base, output_dir)`` loads it), the tokenizer,
``training_metrics.json``, ``training_args.json`` (resolved options: what ``lora-fast merge`` needs to rebuild the
base), ``training_loss_curve.png`` and ``model_comparison.txt``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_fast.train_args import ConfigError, parse_train_args
from lora_fast.train_model import load_base_model, load_tokenizer, log_stderr

HEAD_NAMES = ("score", "classifier")  # sequence-classification heads of GPT-2 / BERT-style models


@dataclass
class Prepared:
    """What a run needs before LoRA goes in: reused across the runs of a sweep."""

    model: torch.nn.Module
    base_name: str
    tokenizer: object
    tokenizer_trained: bool
    data: dict  # causal-lm: {"train": (n, T), "validation": (n, T)}; classification: {split: (texts, labels)}
    source: str
    label_names: list[str] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def prepare(opts, log=log_stderr) -> Prepared:
    """Load data, base model and tokenizer (training one when the model has none). Writes nothing."""
    from lora_fast import data as D

    label_names = None
    if opts.task == "classification":
        splits, label_names = D.load_classification(opts.dataset, opts.text_column, opts.seed)
        train_texts, source = splits["train"][0], opts.dataset
    else:
        train_texts, val_texts, source = D.load_texts(opts.dataset, opts.text_column, opts.val_fraction, opts.seed)
    model, base_name = load_base_model(opts.model, opts.task, len(label_names or [0, 1]), opts.seed, log=log)
    tokenizer = load_tokenizer(base_name)
    trained = tokenizer is None
    if trained:
        tokenizer = D.train_bpe_tokenizer(train_texts, model.config.vocab_size)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            setattr(model.config, key, tokenizer.eos_token_id)
    elif len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"the tokenizer of {opts.model!r} has {len(tokenizer)} tokens but the model only "
                          f"{model.get_input_embeddings().num_embeddings} embeddings")
    if opts.task == "classification":
        model.config.pad_token_id = tokenizer.pad_token_id  # GPT-2 pools the last non-padding token
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {n: i for i, n in enumerate(label_names)}
        data = splits
    else:
        n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        if n_pos is not None and opts.max_length > n_pos:
            raise ConfigError(f"max_length={opts.max_length} exceeds the model's {n_pos} positions")
        data = {"train": D.lm_blocks(tokenizer, train_texts, opts.max_length, "train"),
                "validation": D.lm_blocks(tokenizer, val_texts, opts.max_length, "validation")}
    return Prepared(model, base_name, tokenizer, trained, data, source, label_names)


def _loaders(opts, prep: Prepared):
    from torch.utils.data import DataLoader, TensorDataset

    from lora_fast.data import ClassificationCollator

    g = torch.Generator().manual_seed(opts.seed)
    kw = {"batch_size": opts.batch_size, "num_workers": opts.num_workers}
    if opts.task == "classification":
        collate = ClassificationCollator(prep.tokenizer, opts.max_length)
        mk = lambda split, shuffle: DataLoader(list(zip(*prep.data[split], strict=True)), shuffle=shuffle,
                                               collate_fn=collate, generator=g if shuffle else None, **kw)
        return {s: mk(s, s == "train") for s in prep.data} | {"train_eval": mk("train", False)}
    to_batch = lambda b: {"input_ids": b[0], "labels": b[0]}  # the model shifts labels itself
    mk = lambda split, shuffle: DataLoader(TensorDataset(prep.data[split]), shuffle=shuffle, generator=g
                                           if shuffle else None, collate_fn=lambda xs: to_batch(
                                               torch.utils.data.default_collate(xs)), **kw)
    return {"train": mk("train", True), "validation": mk("validation", False)}


def _inject(opts, model):
    from lora_fast import apply_lora

    try:
        apply_lora(model, opts.target_modules, opts.rank, opts.alpha, opts.dropout, use_rslora=opts.use_rslora,
                   backend=opts.backend)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if opts.task == "classification":
        heads = [h for h in HEAD_NAMES if isinstance(getattr(model, h, None), torch.nn.Module)]
        if not heads:
            raise ConfigError(f"{type(model).__name__} has no classification head named one of {HEAD_NAMES}")
        getattr(model, heads[0]).requires_grad_(True)


def _backend_used(opts, model, device, amp_dtype) -> str:
    from lora_fast import lora_layers
    from lora_fast.functional import triton_unsupported_reason

    if opts.backend == "reference":
        return "reference"
    layer = next(iter(lora_layers(model).values()))
    x = torch.zeros(1, layer.in_features, device=device, dtype=layer.linear.weight.dtype)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        reason = triton_unsupported_reason(x, layer.linear.weight, layer.lora.lora_A)
    if reason is not None and opts.backend == "triton":
        raise ConfigError(f"--backend triton cannot run here: {reason}")
    return "reference" if reason else "triton"


@torch.no_grad()
def evaluate(model, loader, device, amp, max_batches=None) -> dict:
    """Mean loss (causal LM: perplexity too) and, with class labels, accuracy over ``loader``."""
    was_training = model.training
    model.eval()
    total_loss, n_batches, correct, seen = 0.0, 0, 0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp():
            out = model(**batch)
        total_loss += out.loss.float().item()
        n_batches += 1
        if out.logits.dim() == 2:  # (B, n_labels): classification
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
            seen += batch["labels"].numel()
    model.train(was_training)
    loss = total_loss / max(n_batches, 1)
    res = {"loss": loss}
    if seen:
        res["accuracy"] = correct / seen
    else:
        res["perplexity"] = math.exp(min(loss, 700.0))  # exp overflows a float past ~709
    return res


def _tensorboard(logdir, log):
    if not logdir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("lora-fast: tensorboard is not installed, --logdir ignored (pip install tensorboard)")
        return None
    return SummaryWriter(logdir)


def train(opts, prep: Prepared, on_step=None, log=log_stderr, copy_model: bool = True) -> dict:
    """Run the loop on ``prep.model`` (a copy of it by default) and write the outputs; returns the metrics dict.

    Args:
        opts: validated options (``parse_train_args``).
        prep: from ``prepare``; its model is left unmodified when ``copy_model`` (a sweep reuses it).
        on_step: optional ``callable(step, metrics)`` after every optimizer step (tests raise KeyboardInterrupt).
        log: one-line messages (stderr by default).
    """
    from tqdm.auto import tqdm

    from lora_fast.train_io import StagedDir, check_output_dir, reset_peak_memory

    out_dir = check_output_dir(opts.output_dir, opts.overwrite)
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    model = copy.deepcopy(prep.model) if copy_model else prep.model
    _inject(opts, model)
    model.to(device).train()
    amp_dtype = torch.float16 if opts.fp16 else torch.bfloat16 if opts.bf16 else None
    backend_used = _backend_used(opts, model, device, amp_dtype)
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=opts.fp16)
    loaders = _loaders(opts, prep)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    steps_per_epoch = max(1, len(loaders["train"]) // opts.gradient_accumulation_steps)
    total = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))
    warmup = round(opts.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup
                                              else max(0.0, (total - s) / max(1, total - warmup)))
    writer = _tensorboard(opts.logdir, log)
    reset_peak_memory(device)
    is_cls = opts.task == "classification"
    m = {"train_loss": [], "learning_rate": [], "tokens_per_sec": [], "eval": [], "epochs": []}
    step, micro, tokens_seen, interrupted = 0, 0, 0, False
    t_start = time.perf_counter()
    bar = tqdm(total=total, disable=not opts.progress, dynamic_ncols=True, desc="train", file=sys.stderr)

    def do_eval():
        r = evaluate(model, loaders["validation"], device, amp, opts.eval_batches)
        m["eval"].append({"step": step, **{f"eval_{k}": v for k, v in r.items()}})
        if writer:
            for k, v in r.items():
                writer.add_scalar(f"eval/{k}", v, step)
        bar.write(f"step {step}: " + ", ".join(f"eval {k} {v:.4g}" for k, v in r.items()))

    def epoch_accuracy():
        tr = evaluate(model, loaders["train_eval"], device, amp, opts.eval_batches)
        va = evaluate(model, loaders["validation"], device, amp, opts.eval_batches)
        ep = round(step / steps_per_epoch, 3)
        m["epochs"].append({"epoch": ep, "step": step, "train_accuracy": tr["accuracy"],
                            "val_accuracy": va["accuracy"], "val_loss": va["loss"]})
        bar.write(f"epoch {ep:g}: train accuracy {tr['accuracy']:.2%}, validation accuracy {va['accuracy']:.2%}")

    staged = StagedDir(out_dir)
    try:
        try:
            acc_loss, acc_tokens, t_step = 0.0, 0, time.perf_counter()
            while step < total:
                for batch in loaders["train"]:
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    with amp():
                        loss = model(**batch).loss / opts.gradient_accumulation_steps
                    scaler.scale(loss).backward()
                    acc_loss += loss.item()
                    acc_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
                        else batch["input_ids"].numel()
                    micro += 1
                    if micro % opts.gradient_accumulation_steps:
                        continue
                    if opts.max_grad_norm > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
                    lr = optimizer.param_groups[0]["lr"]
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    sched.step()
                    step += 1
                    now = time.perf_counter()
                    tps = acc_tokens / max(now - t_step, 1e-9)
                    m["train_loss"].append(acc_loss)
                    m["learning_rate"].append(lr)
                    m["tokens_per_sec"].append(tps)
                    tokens_seen += acc_tokens
                    if writer:
                        writer.add_scalar("train/loss", acc_loss, step)
                        writer.add_scalar("train/lr", lr, step)
                    bar.set_postfix(loss=f"{acc_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    bar.update(1)
                    acc_loss, acc_tokens = 0.0, 0
                    if step % opts.eval_steps == 0 or step == total:
                        do_eval()
                    if on_step is not None:
                        on_step(step, m)
                    t_step = time.perf_counter()
                    if step >= total:
                        break
                else:  # a full pass over the training data
                    if is_cls:
                        epoch_accuracy()
            if is_cls and (not m["epochs"] or m["epochs"][-1]["step"] != step):
                epoch_accuracy()  # the last, partial epoch
        except KeyboardInterrupt:
            interrupted = True
            bar.write(f"lora-fast: interrupted at step {step}/{total}; saving what has been trained")
        bar.close()
        model.eval()
        if is_cls and "test" in loaders and not interrupted:
            m["test_accuracy"] = evaluate(model, loaders["test"], device, amp, None)["accuracy"]
            log(f"test accuracy {m['test_accuracy']:.2%}")
        metrics = _finish_metrics(m, opts, prep, step, total, tokens_seen, t_start, device, backend_used,
                                  interrupted)
        _write_outputs(staged.path, opts, prep, model, metrics)
        final = staged.commit()
    except BaseException:
        staged.discard()
        raise
    finally:
        if writer:
            writer.close()
    metrics["output_dir"] = str(final)
    return metrics


def _finish_metrics(m, opts, prep, step, total, tokens_seen, t_start, device, backend_used, interrupted) -> dict:
    from lora_fast.train_io import peak_memory

    peak, kind = peak_memory(device)
    evals = m.pop("eval")
    m["eval_steps"] = [e["step"] for e in evals]
    m["eval_loss"] = [e["eval_loss"] for e in evals]
    if evals and "eval_perplexity" in evals[0]:
        m["eval_perplexity"] = [e["eval_perplexity"] for e in evals]
    if evals and "eval_accuracy" in evals[0]:
        m["eval_accuracy"] = [e["eval_accuracy"] for e in evals]
    if not m["epochs"]:
        m.pop("epochs")
    wall = time.perf_counter() - t_start
    return {
        **m,
        "final_eval_loss": m["eval_loss"][-1] if m["eval_loss"] else None,
        "final_perplexity": m["eval_perplexity"][-1] if m.get("eval_perplexity") else None,
        "steps": step, "planned_steps": total, "interrupted": interrupted, "tokens_seen": tokens_seen,
        "mean_tokens_per_sec": tokens_seen / wall if wall > 0 else None, "wall_time_s": wall,
        "peak_memory_mb": peak, "peak_memory_kind": kind,
        "backend": opts.backend, "backend_used": backend_used, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "base_model": prep.base_name, "dataset": prep.source, "task": opts.task,
        "torch_version": torch.__version__,
    }


def _write_outputs(path: Path, opts, prep: Prepared, model, metrics: dict) -> None:
    from lora_fast import count_parameters, save_adapter
    from lora_fast.plots import loss_curve
    from lora_fast.train_io import model_comparison, write_atomic, write_json

    task_type = "SEQ_CLS" if opts.task == "classification" else "CAUSAL_LM"
    save_adapter(model, path, base_model_name_or_path=prep.base_name, task_type=task_type)
    prep.tokenizer.save_pretrained(path)
    args = {k: v for k, v in vars(opts).items()}
    args.update(base_model=prep.base_name, tokenizer_trained=prep.tokenizer_trained, label_names=prep.label_names,
                vocab_size=model.config.vocab_size)
    write_json(path / "training_args.json", args)
    counts = count_parameters(model)
    metrics["parameters"] = counts
    write_json(path / "training_metrics.json", metrics)
    loss_curve(path / "training_loss_curve.png", metrics["train_loss"], metrics["eval_steps"],
               metrics["eval_loss"], title=f"LoRA r={opts.rank} alpha={opts.alpha:g} on {Path(prep.base_name).name}")
    write_atomic(path / "model_comparison.txt", model_comparison(counts, model, path))


def run(opts, on_step=None, log=log_stderr) -> dict:
    """``prepare`` then ``train``: one complete ``lora-fast train``. Returns the metrics (with ``output_dir``)."""
    from lora_fast.train_io import check_output_dir

    check_output_dir(opts.output_dir, opts.overwrite)  # fail before minutes of loading
    resolve_device(opts.device)
    return train(opts, prepare(opts, log), on_step, log, copy_model=False)


def print_summary(metrics: dict) -> None:
    out = metrics["output_dir"]
    status = "interrupted, partial results" if metrics["interrupted"] else "done"
    loss = metrics["final_eval_loss"]
    print(f"\nlora-fast train {status}: {metrics['steps']} steps in {metrics['wall_time_s']:.1f} s"
          + (f", eval loss {loss:.4f}" if loss is not None else "")
          + (f", perplexity {metrics['final_perplexity']:.2f}" if metrics.get("final_perplexity") else "")
          + (f", test accuracy {metrics['test_accuracy']:.2%}" if "test_accuracy" in metrics else ""))
    print(f"Outputs in {out}:")
    for p in sorted(Path(out).iterdir()):
        print(f"  {p}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lora-fast train``; returns the exit status (0, 2 bad input, 130 interrupted)."""
    try:
        metrics = run(parse_train_args(argv))
    except ConfigError as e:
        print(f"lora-fast train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-fast train: interrupted before training started (or while saving); nothing was written",
              file=sys.stderr)
        return 130
    print_summary(metrics)
    return 130 if metrics["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
